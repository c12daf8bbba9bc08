package main

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metainternalversion "k8s.io/apimachinery/pkg/apis/meta/internalversion"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apiserver/pkg/admission"
	genericapirequest "k8s.io/apiserver/pkg/endpoints/request"
	genericregistry "k8s.io/apiserver/pkg/registry/generic/registry"
	"k8s.io/apiserver/pkg/registry/rest"
	"k8s.io/client-go/dynamic"
	"k8s.io/klog/v2"
)

// There is no namespace controller. Instead, deleting a namespace is
// synchronous: the DELETE request first deletes everything in the namespace
// (secrets, configmaps, events, leases, and custom resources of every
// namespaced CRD), then removes the namespace object at once (no
// "Terminating" phase). Custom resources that carry finalizers only get their
// deletionTimestamp and stay until their controller removes the finalizers,
// even though their namespace is already gone.
type namespaceREST struct {
	*genericregistry.Store
	contents []*genericregistry.Store // namespaced built-in stores (one per storage)
	dynamic  func() (dynamic.Interface, error)
}

func (r *namespaceREST) Delete(ctx context.Context, name string, validate rest.ValidateObjectFunc, opts *metav1.DeleteOptions) (runtime.Object, bool, error) {
	if _, err := r.Store.Get(ctx, name, &metav1.GetOptions{}); err != nil {
		return nil, false, err
	}
	if opts == nil || len(opts.DryRun) == 0 {
		if err := r.purge(ctx, name); err != nil {
			return nil, false, apierrors.NewInternalError(fmt.Errorf("emptying namespace %s: %w", name, err))
		}
	}
	return r.Store.Delete(ctx, name, validate, opts)
}

func (r *namespaceREST) purge(ctx context.Context, ns string) error {
	nsCtx := genericapirequest.WithNamespace(ctx, ns)
	for _, s := range r.contents {
		if _, err := s.DeleteCollection(nsCtx, rest.ValidateAllObjectFunc, &metav1.DeleteOptions{}, &metainternalversion.ListOptions{}); err != nil {
			return err
		}
	}
	// Custom resources: go through the server itself (loopback client), as
	// their storage belongs to the apiextensions machinery.
	dyn, err := r.dynamic()
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	crds, err := dyn.Resource(schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}).
		List(cctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	for _, crd := range crds.Items {
		scope, _, _ := unstructuredString(crd.Object, "spec", "scope")
		if scope != "Namespaced" {
			continue
		}
		group, _, _ := unstructuredString(crd.Object, "spec", "group")
		plural, _, _ := unstructuredString(crd.Object, "spec", "names", "plural")
		version := servedVersion(crd.Object)
		if version == "" {
			continue
		}
		gvr := schema.GroupVersionResource{Group: group, Version: version, Resource: plural}
		err := dyn.Resource(gvr).Namespace(ns).DeleteCollection(cctx, metav1.DeleteOptions{}, metav1.ListOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			klog.Warningf("namespace %s: deleting %s: %v", ns, gvr, err)
		}
	}
	return nil
}

func unstructuredString(obj map[string]interface{}, path ...string) (string, bool, error) {
	cur := interface{}(obj)
	for _, p := range path {
		m, ok := cur.(map[string]interface{})
		if !ok {
			return "", false, nil
		}
		cur = m[p]
	}
	s, ok := cur.(string)
	return s, ok, nil
}

func servedVersion(crd map[string]interface{}) string {
	spec, _ := crd["spec"].(map[string]interface{})
	versions, _ := spec["versions"].([]interface{})
	for _, v := range versions {
		if m, ok := v.(map[string]interface{}); ok && m["served"] == true {
			name, _ := m["name"].(string)
			return name
		}
	}
	return ""
}

// namespaceExists is the part of the NamespaceLifecycle admission plugin we
// need: creating an object in a namespace that does not exist fails with the
// same 404 as on a real cluster.
type namespaceExists struct {
	*admission.Handler
	namespaces *genericregistry.Store // set once the store exists
}

var _ admission.ValidationInterface = &namespaceExists{}

func (a *namespaceExists) Validate(ctx context.Context, attrs admission.Attributes, _ admission.ObjectInterfaces) error {
	if a.namespaces == nil || attrs.GetNamespace() == "" || attrs.GetSubresource() != "" {
		return nil
	}
	if attrs.GetResource().GroupResource() == corev1.Resource("namespaces") {
		return nil
	}
	_, err := a.namespaces.Get(genericapirequest.WithNamespace(genericapirequest.NewContext(), ""), attrs.GetNamespace(), &metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return apierrors.NewNotFound(corev1.Resource("namespaces"), attrs.GetNamespace())
	}
	return err
}

// createDefaultNamespaces creates the namespaces every cluster has.
func createDefaultNamespaces(store *genericregistry.Store) error {
	for _, name := range []string{"default", "kube-system", "kube-public", "kube-node-lease"} {
		ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
		_, err := store.Create(genericapirequest.WithNamespace(genericapirequest.NewContext(), ""), ns, rest.ValidateAllObjectFunc, &metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return err
		}
	}
	return nil
}

func (r *namespaceREST) ShortNames() []string { return []string{"ns"} }
