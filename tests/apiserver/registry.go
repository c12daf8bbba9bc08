package main

import (
	"context"
	"fmt"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/validation"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/duration"
	utilvalidation "k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/apiserver/pkg/registry/generic"
	genericregistry "k8s.io/apiserver/pkg/registry/generic/registry"
	"k8s.io/apiserver/pkg/registry/rest"
	"k8s.io/apiserver/pkg/storage"
	"k8s.io/apiserver/pkg/storage/names"
)

// strategy is one create/update/delete strategy for all our built-in kinds:
// object-meta validation (names, labels, annotations, immutable fields),
// generation bumps, plus a small per-kind hook. There is no defaulting beyond
// what the hook does (the real defaulters live in k8s.io/kubernetes).
type strategy struct {
	runtime.ObjectTyper
	names.NameGenerator
	namespaced bool
	nameFn     validation.ValidateNameFunc
	prepare    func(obj, old runtime.Object) // optional; old is nil on create
	validate   func(obj, old runtime.Object) field.ErrorList
}

func newStrategy(namespaced bool) *strategy {
	return &strategy{ObjectTyper: Scheme, NameGenerator: names.SimpleNameGenerator, namespaced: namespaced,
		nameFn: validation.NameIsDNSSubdomain}
}

func (s *strategy) NamespaceScoped() bool          { return s.namespaced }
func (s *strategy) AllowCreateOnUpdate() bool      { return false }
func (s *strategy) AllowUnconditionalUpdate() bool { return true }
func (s *strategy) Canonicalize(runtime.Object)    {}
func (s *strategy) WarningsOnCreate(context.Context, runtime.Object) []string {
	return nil
}
func (s *strategy) WarningsOnUpdate(context.Context, runtime.Object, runtime.Object) []string {
	return nil
}

func (s *strategy) PrepareForCreate(_ context.Context, obj runtime.Object) {
	if s.prepare != nil {
		s.prepare(obj, nil)
	}
}

func (s *strategy) PrepareForUpdate(_ context.Context, obj, old runtime.Object) {
	if s.prepare != nil {
		s.prepare(obj, old)
	}
}

func (s *strategy) Validate(_ context.Context, obj runtime.Object) field.ErrorList {
	m, err := meta.Accessor(obj)
	if err != nil {
		return field.ErrorList{field.InternalError(nil, err)}
	}
	errs := validation.ValidateObjectMetaAccessor(m, s.namespaced, s.nameFn, field.NewPath("metadata"))
	if s.validate != nil {
		errs = append(errs, s.validate(obj, nil)...)
	}
	return errs
}

func (s *strategy) ValidateUpdate(_ context.Context, obj, old runtime.Object) field.ErrorList {
	m, err := meta.Accessor(obj)
	if err != nil {
		return field.ErrorList{field.InternalError(nil, err)}
	}
	o, _ := meta.Accessor(old)
	errs := validation.ValidateObjectMetaAccessorUpdate(m, o, field.NewPath("metadata"))
	if s.validate != nil {
		errs = append(errs, s.validate(obj, old)...)
	}
	return errs
}

// ---- per-kind behaviour ---------------------------------------------------

func secretStrategy() *strategy {
	s := newStrategy(true)
	s.prepare = func(obj, _ runtime.Object) {
		sec := obj.(*corev1.Secret)
		if sec.Type == "" {
			sec.Type = corev1.SecretTypeOpaque
		}
		// stringData is write-only: merged into data, never stored.
		for k, v := range sec.StringData {
			if sec.Data == nil {
				sec.Data = map[string][]byte{}
			}
			sec.Data[k] = []byte(v)
		}
		sec.StringData = nil
	}
	s.validate = func(obj, old runtime.Object) field.ErrorList {
		var errs field.ErrorList
		sec := obj.(*corev1.Secret)
		for k := range sec.Data {
			for _, msg := range utilvalidation.IsConfigMapKey(k) {
				errs = append(errs, field.Invalid(field.NewPath("data").Key(k), k, msg))
			}
		}
		if old != nil {
			o := old.(*corev1.Secret)
			if sec.Type != o.Type {
				errs = append(errs, field.Invalid(field.NewPath("type"), sec.Type, "field is immutable"))
			}
			if o.Immutable != nil && *o.Immutable {
				if sec.Immutable == nil || !*sec.Immutable {
					errs = append(errs, field.Forbidden(field.NewPath("immutable"), "field is immutable when `immutable` is set"))
				}
				if fmt.Sprint(sec.Data) != fmt.Sprint(o.Data) {
					errs = append(errs, field.Forbidden(field.NewPath("data"), "field is immutable when `immutable` is set"))
				}
			}
		}
		return errs
	}
	return s
}

func namespaceStrategy() *strategy {
	s := newStrategy(false)
	s.nameFn = func(name string, prefix bool) []string { return validation.NameIsDNSLabel(name, prefix) }
	s.prepare = func(obj, old runtime.Object) {
		ns := obj.(*corev1.Namespace)
		if old != nil {
			ns.Status = old.(*corev1.Namespace).Status
		}
		if ns.Status.Phase == "" {
			ns.Status.Phase = corev1.NamespaceActive
		}
		// Like the real API server: every namespace carries its name as a label.
		if ns.Labels == nil {
			ns.Labels = map[string]string{}
		}
		ns.Labels[corev1.LabelMetadataName] = ns.Name
	}
	return s
}

// ---- field selectors -------------------------------------------------------

func attrs(extra func(obj runtime.Object, set fields.Set)) storage.AttrFunc {
	return func(obj runtime.Object) (labels.Set, fields.Set, error) {
		m, err := meta.Accessor(obj)
		if err != nil {
			return nil, nil, err
		}
		om := metav1.ObjectMeta{Name: m.GetName(), Namespace: m.GetNamespace()}
		set := generic.ObjectMetaFieldsSet(&om, m.GetNamespace() != "")
		if extra != nil {
			extra(obj, set)
		}
		return labels.Set(m.GetLabels()), set, nil
	}
}

var secretAttrs = attrs(func(obj runtime.Object, s fields.Set) { s["type"] = string(obj.(*corev1.Secret).Type) })
var namespaceAttrs = attrs(func(obj runtime.Object, s fields.Set) {
	s["status.phase"] = string(obj.(*corev1.Namespace).Status.Phase)
})

// Same selectable fields as the real core/v1 events registry (kubectl events
// --for uses involvedObject.*).
var eventAttrs = attrs(func(obj runtime.Object, s fields.Set) {
	e := obj.(*corev1.Event)
	s["involvedObject.kind"] = e.InvolvedObject.Kind
	s["involvedObject.namespace"] = e.InvolvedObject.Namespace
	s["involvedObject.name"] = e.InvolvedObject.Name
	s["involvedObject.uid"] = string(e.InvolvedObject.UID)
	s["involvedObject.apiVersion"] = e.InvolvedObject.APIVersion
	s["involvedObject.resourceVersion"] = e.InvolvedObject.ResourceVersion
	s["involvedObject.fieldPath"] = e.InvolvedObject.FieldPath
	s["reason"] = e.Reason
	s["reportingComponent"] = e.ReportingController
	s["source"] = e.Source.Component
	s["type"] = e.Type
})

// registerFieldSelectors lets the request handlers accept the field
// selectors above (without it only metadata.name/namespace pass).
func registerFieldSelectors(scheme *runtime.Scheme) error {
	for gvk, attr := range map[schema.GroupVersionKind]storage.AttrFunc{
		corev1.SchemeGroupVersion.WithKind("Secret"):    secretAttrs,
		corev1.SchemeGroupVersion.WithKind("Namespace"): namespaceAttrs,
		corev1.SchemeGroupVersion.WithKind("Event"):     eventAttrs,
		eventsv1.SchemeGroupVersion.WithKind("Event"):   eventAttrs,
	} {
		var sample runtime.Object
		switch gvk.Kind {
		case "Secret":
			sample = &corev1.Secret{}
		case "Namespace":
			sample = &corev1.Namespace{}
		default:
			sample = &corev1.Event{}
		}
		_, fieldSet, _ := attr(sample)
		err := scheme.AddFieldLabelConversionFunc(gvk, func(label, value string) (string, string, error) {
			if _, ok := fieldSet[label]; ok {
				return label, value, nil
			}
			return "", "", fmt.Errorf("field label not supported: %s", label)
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// ---- table printing (kubectl get columns) ----------------------------------

type column struct {
	name, typ string
	cell      func(obj runtime.Object) interface{}
}

type tableConvertor struct{ cols []column }

func age(t metav1.Time) string {
	if t.IsZero() {
		return "<unknown>"
	}
	return duration.HumanDuration(time.Since(t.Time))
}

func (t tableConvertor) ConvertToTable(_ context.Context, obj runtime.Object, _ runtime.Object) (*metav1.Table, error) {
	table := &metav1.Table{}
	table.ColumnDefinitions = append(table.ColumnDefinitions, metav1.TableColumnDefinition{Name: "Name", Type: "string", Format: "name"})
	for _, c := range t.cols {
		table.ColumnDefinitions = append(table.ColumnDefinitions, metav1.TableColumnDefinition{Name: c.name, Type: c.typ})
	}
	table.ColumnDefinitions = append(table.ColumnDefinitions, metav1.TableColumnDefinition{Name: "Age", Type: "date"})
	add := func(o runtime.Object) error {
		m, err := meta.Accessor(o)
		if err != nil {
			return err
		}
		cells := []interface{}{m.GetName()}
		for _, c := range t.cols {
			cells = append(cells, c.cell(o))
		}
		cells = append(cells, age(m.GetCreationTimestamp()))
		table.Rows = append(table.Rows, metav1.TableRow{Cells: cells, Object: runtime.RawExtension{Object: o}})
		return nil
	}
	var err error
	if meta.IsListType(obj) {
		err = meta.EachListItem(obj, add)
		if l, lerr := meta.ListAccessor(obj); lerr == nil {
			table.ResourceVersion = l.GetResourceVersion()
			table.Continue = l.GetContinue()
			table.RemainingItemCount = l.GetRemainingItemCount()
		}
	} else {
		err = add(obj)
	}
	return table, err
}

var secretTable = tableConvertor{[]column{
	{"Type", "string", func(o runtime.Object) interface{} { return string(o.(*corev1.Secret).Type) }},
	{"Data", "integer", func(o runtime.Object) interface{} { return int64(len(o.(*corev1.Secret).Data)) }},
}}
var configMapTable = tableConvertor{[]column{
	{"Data", "integer", func(o runtime.Object) interface{} {
		c := o.(*corev1.ConfigMap)
		return int64(len(c.Data) + len(c.BinaryData))
	}},
}}
var namespaceTable = tableConvertor{[]column{
	{"Status", "string", func(o runtime.Object) interface{} { return string(o.(*corev1.Namespace).Status.Phase) }},
}}
var leaseTable = tableConvertor{[]column{
	{"Holder", "string", func(o runtime.Object) interface{} {
		if h := o.(*coordinationv1.Lease).Spec.HolderIdentity; h != nil {
			return *h
		}
		return ""
	}},
}}

// eventTable mimics kube-apiserver's event columns (kubectl get events).
type eventTableConvertor struct{}

func (eventTableConvertor) ConvertToTable(_ context.Context, obj runtime.Object, _ runtime.Object) (*metav1.Table, error) {
	table := &metav1.Table{ColumnDefinitions: []metav1.TableColumnDefinition{
		{Name: "Last Seen", Type: "string"}, {Name: "Type", Type: "string"}, {Name: "Reason", Type: "string"},
		{Name: "Object", Type: "string"}, {Name: "Message", Type: "string"},
		{Name: "Name", Type: "string", Format: "name", Priority: 1},
	}}
	add := func(o runtime.Object) error {
		e := o.(*corev1.Event)
		last := e.LastTimestamp.Time
		if e.Series != nil {
			last = e.Series.LastObservedTime.Time
		} else if last.IsZero() {
			last = e.EventTime.Time
		}
		if last.IsZero() {
			last = e.CreationTimestamp.Time
		}
		object := fmt.Sprintf("%s/%s", lower(e.InvolvedObject.Kind), e.InvolvedObject.Name)
		table.Rows = append(table.Rows, metav1.TableRow{
			Cells:  []interface{}{age(metav1.NewTime(last)), e.Type, e.Reason, object, e.Message, e.Name},
			Object: runtime.RawExtension{Object: o},
		})
		return nil
	}
	if meta.IsListType(obj) {
		if l, err := meta.ListAccessor(obj); err == nil {
			table.ResourceVersion = l.GetResourceVersion()
			table.Continue = l.GetContinue()
		}
		return table, meta.EachListItem(obj, add)
	}
	return table, add(obj)
}

func lower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c >= 'A' && c <= 'Z' {
			b[i] = c + 32
		}
	}
	return string(b)
}

// ---- stores -----------------------------------------------------------------

// newStore builds an upstream genericregistry.Store (etcd-backed, watch cache,
// SSA, resourceVersion conflicts, finalizers/deletionTimestamp handling).
func newStore(optsGetter generic.RESTOptionsGetter, gr schema.GroupResource, singular string,
	newFn, newListFn func() runtime.Object, s *strategy, attrFn storage.AttrFunc, table rest.TableConvertor) (*genericregistry.Store, error) {
	store := &genericregistry.Store{
		NewFunc:                   newFn,
		NewListFunc:               newListFn,
		DefaultQualifiedResource:  gr,
		SingularQualifiedResource: schema.GroupResource{Group: gr.Group, Resource: singular},
		CreateStrategy:            s,
		UpdateStrategy:            s,
		DeleteStrategy:            s,
		TableConvertor:            table,
	}
	if err := store.CompleteWithOptions(&generic.StoreOptions{RESTOptions: optsGetter, AttrFunc: attrFn}); err != nil {
		return nil, fmt.Errorf("store %s: %w", gr, err)
	}
	return store, nil
}

// shortNamed adds kubectl short names (ns, cm, ev) to a store.
type shortNamed struct {
	*genericregistry.Store
	short []string
}

func (s shortNamed) ShortNames() []string { return s.short }
