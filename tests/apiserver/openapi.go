package main

import (
	"reflect"
	"strings"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	generatedopenapi "k8s.io/apiextensions-apiserver/pkg/generated/openapi"
	"k8s.io/kube-openapi/pkg/common"
	"k8s.io/kube-openapi/pkg/validation/spec"
)

// getDefinitions returns the OpenAPI definitions the server publishes and uses
// for server-side apply: the generated ones shipped with apiextensions-apiserver
// (meta/v1, runtime, apiextensions/v1...) plus definitions of the built-in
// types we serve, derived by reflection from the k8s.io/api Go types (their
// generated definitions live in k8s.io/kubernetes, which Debian does not ship).
//
// Reflection sees json tags, patchStrategy/patchMergeKey tags and the
// SwaggerDoc() descriptions, but not the `+listType` comments: lists with a
// patchMergeKey become associative lists for SSA (as structured-merge-diff does
// for such schemas), other lists are atomic.
func getDefinitions(ref common.ReferenceCallback) map[string]common.OpenAPIDefinition {
	g := &reflectGen{ref: ref, defs: generatedopenapi.GetOpenAPIDefinitions(ref)}
	for _, obj := range []interface{}{
		corev1.Namespace{}, corev1.NamespaceList{},
		corev1.Secret{}, corev1.SecretList{},
		corev1.ConfigMap{}, corev1.ConfigMapList{},
		corev1.Event{}, corev1.EventList{},
		eventsv1.Event{}, eventsv1.EventList{},
		coordinationv1.Lease{}, coordinationv1.LeaseList{},
	} {
		g.define(reflect.TypeOf(obj))
	}
	return g.defs
}

type reflectGen struct {
	ref  common.ReferenceCallback
	defs map[string]common.OpenAPIDefinition
}

type modelNamer interface{ OpenAPIModelName() string }
type swaggerDoc interface{ SwaggerDoc() map[string]string }
type schemaTyper interface {
	OpenAPISchemaType() []string
	OpenAPISchemaFormat() string
}

// modelName is the definition key, e.g. io.k8s.api.core.v1.Secret.
func modelName(t reflect.Type) string {
	if n, ok := reflect.New(t).Elem().Interface().(modelNamer); ok {
		return n.OpenAPIModelName()
	}
	parts := strings.SplitN(t.PkgPath(), "/", 2)
	host := strings.Split(parts[0], ".")
	for i, j := 0, len(host)-1; i < j; i, j = i+1, j-1 {
		host[i], host[j] = host[j], host[i]
	}
	name := strings.Join(host, ".")
	if len(parts) == 2 {
		name += "." + strings.ReplaceAll(parts[1], "/", ".")
	}
	return name + "." + t.Name()
}

// define adds the definition of the named struct type t (if missing) and
// returns its name.
func (g *reflectGen) define(t reflect.Type) string {
	name := modelName(t)
	if _, ok := g.defs[name]; ok {
		return name
	}
	g.defs[name] = common.OpenAPIDefinition{} // placeholder against recursion
	zero := reflect.New(t).Elem().Interface()
	if st, ok := zero.(schemaTyper); ok { // Time, Quantity, IntOrString...
		g.defs[name] = common.OpenAPIDefinition{Schema: spec.Schema{SchemaProps: spec.SchemaProps{
			Type: st.OpenAPISchemaType(), Format: st.OpenAPISchemaFormat()}}}
		return name
	}
	docs := map[string]string{}
	if d, ok := zero.(swaggerDoc); ok {
		docs = d.SwaggerDoc()
	}
	s := spec.Schema{SchemaProps: spec.SchemaProps{
		Type: []string{"object"}, Description: docs[""], Properties: map[string]spec.Schema{}}}
	deps := map[string]bool{}
	g.fields(t, &s, docs, deps)
	def := common.OpenAPIDefinition{Schema: s}
	for d := range deps {
		def.Dependencies = append(def.Dependencies, d)
	}
	g.defs[name] = def
	return name
}

func (g *reflectGen) fields(t reflect.Type, s *spec.Schema, docs map[string]string, deps map[string]bool) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		tag := strings.Split(f.Tag.Get("json"), ",")
		jsonName := tag[0]
		if jsonName == "-" {
			continue
		}
		omitempty, inline := false, false
		for _, o := range tag[1:] {
			omitempty = omitempty || o == "omitempty"
			inline = inline || o == "inline"
		}
		if inline || (f.Anonymous && jsonName == "") { // e.g. TypeMeta
			ft := f.Type
			if ft.Kind() == reflect.Ptr {
				ft = ft.Elem()
			}
			g.fields(ft, s, docs, deps)
			continue
		}
		if jsonName == "" {
			jsonName = f.Name
		}
		prop := g.schema(f.Type, deps)
		prop.Description = docs[jsonName]
		if ps := f.Tag.Get("patchStrategy"); ps != "" {
			prop.AddExtension("x-kubernetes-patch-strategy", ps)
		}
		if mk := f.Tag.Get("patchMergeKey"); mk != "" {
			prop.AddExtension("x-kubernetes-patch-merge-key", mk)
			if f.Type.Kind() == reflect.Slice {
				prop.AddExtension("x-kubernetes-list-type", "map")
				prop.AddExtension("x-kubernetes-list-map-keys", []interface{}{mk})
			}
		}
		s.Properties[jsonName] = prop
		if !omitempty && f.Type.Kind() != reflect.Ptr {
			s.Required = append(s.Required, jsonName)
		}
	}
}

// schema returns the inline schema of a field of type t (a $ref for structs).
func (g *reflectGen) schema(t reflect.Type, deps map[string]bool) spec.Schema {
	prim := func(typ, format string) spec.Schema {
		return spec.Schema{SchemaProps: spec.SchemaProps{Type: []string{typ}, Format: format}}
	}
	switch t.Kind() {
	case reflect.Ptr:
		return g.schema(t.Elem(), deps)
	case reflect.Struct:
		name := g.define(t)
		deps[name] = true
		return spec.Schema{SchemaProps: spec.SchemaProps{Ref: g.ref(name)}}
	case reflect.Slice:
		if t.Elem().Kind() == reflect.Uint8 {
			return prim("string", "byte")
		}
		items := g.schema(t.Elem(), deps)
		return spec.Schema{SchemaProps: spec.SchemaProps{Type: []string{"array"},
			Items: &spec.SchemaOrArray{Schema: &items}}}
	case reflect.Map:
		val := g.schema(t.Elem(), deps)
		return spec.Schema{SchemaProps: spec.SchemaProps{Type: []string{"object"},
			AdditionalProperties: &spec.SchemaOrBool{Allows: true, Schema: &val}}}
	case reflect.String:
		return prim("string", "")
	case reflect.Bool:
		return prim("boolean", "")
	case reflect.Int32, reflect.Int16, reflect.Int8, reflect.Uint16, reflect.Uint8:
		return prim("integer", "int32")
	case reflect.Int, reflect.Int64, reflect.Uint32, reflect.Uint64, reflect.Uint:
		return prim("integer", "int64")
	case reflect.Float32, reflect.Float64:
		return prim("number", "double")
	default: // interface{}
		return prim("object", "")
	}
}
