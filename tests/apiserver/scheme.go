package main

import (
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/conversion"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
)

// Scheme of the built-in groups we serve (core/v1, events.k8s.io/v1,
// coordination.k8s.io/v1).
//
// The generic apiserver wants an "internal" version per group. Instead of
// writing internal types, we register the *versioned* Go types a second time
// under the internal version: converting between two GVKs of the same Go type
// is a no-op in runtime.Scheme, so v1 objects are stored and served unchanged.
//
// events.k8s.io/v1 Events are, as in the real kube-apiserver, a second view of
// core/v1 Events: the internal type of both groups is corev1.Event, storage
// always writes core/v1, and conversion funcs map eventsv1.Event <-> corev1.Event.
var (
	Scheme         = runtime.NewScheme()
	Codecs         = serializer.NewCodecFactory(Scheme)
	ParameterCodec = runtime.NewParameterCodec(Scheme)

	// NamerScheme only knows the external versions; it is used to tag OpenAPI
	// definitions with x-kubernetes-group-version-kind (no __internal noise).
	NamerScheme = runtime.NewScheme()
)

func internal(group string) schema.GroupVersion {
	return schema.GroupVersion{Group: group, Version: runtime.APIVersionInternal}
}

func init() {
	for _, s := range []*runtime.Scheme{Scheme, NamerScheme} {
		utilruntime.Must(corev1.AddToScheme(s))
		utilruntime.Must(eventsv1.AddToScheme(s))
		utilruntime.Must(coordinationv1.AddToScheme(s))
	}
	utilruntime.Must(Scheme.SetVersionPriority(corev1.SchemeGroupVersion))
	utilruntime.Must(Scheme.SetVersionPriority(eventsv1.SchemeGroupVersion))
	utilruntime.Must(Scheme.SetVersionPriority(coordinationv1.SchemeGroupVersion))
	Scheme.AddKnownTypes(internal(""),
		&corev1.Namespace{}, &corev1.NamespaceList{},
		&corev1.Secret{}, &corev1.SecretList{},
		&corev1.ConfigMap{}, &corev1.ConfigMapList{},
		&corev1.Event{}, &corev1.EventList{},
	)
	Scheme.AddKnownTypes(internal("events.k8s.io"), &corev1.Event{}, &corev1.EventList{})
	Scheme.AddKnownTypes(internal("coordination.k8s.io"), &coordinationv1.Lease{}, &coordinationv1.LeaseList{})

	utilruntime.Must(Scheme.AddConversionFunc((*eventsv1.Event)(nil), (*corev1.Event)(nil),
		func(a, b interface{}, _ conversion.Scope) error {
			eventFromEventsV1(a.(*eventsv1.Event), b.(*corev1.Event))
			return nil
		}))
	utilruntime.Must(Scheme.AddConversionFunc((*corev1.Event)(nil), (*eventsv1.Event)(nil),
		func(a, b interface{}, _ conversion.Scope) error {
			eventToEventsV1(a.(*corev1.Event), b.(*eventsv1.Event))
			return nil
		}))
	utilruntime.Must(Scheme.AddConversionFunc((*eventsv1.EventList)(nil), (*corev1.EventList)(nil),
		func(a, b interface{}, _ conversion.Scope) error {
			in, out := a.(*eventsv1.EventList), b.(*corev1.EventList)
			out.ListMeta = in.ListMeta
			out.Items = make([]corev1.Event, len(in.Items))
			for i := range in.Items {
				eventFromEventsV1(&in.Items[i], &out.Items[i])
			}
			return nil
		}))
	utilruntime.Must(Scheme.AddConversionFunc((*corev1.EventList)(nil), (*eventsv1.EventList)(nil),
		func(a, b interface{}, _ conversion.Scope) error {
			in, out := a.(*corev1.EventList), b.(*eventsv1.EventList)
			out.ListMeta = in.ListMeta
			out.Items = make([]eventsv1.Event, len(in.Items))
			for i := range in.Items {
				eventToEventsV1(&in.Items[i], &out.Items[i])
			}
			return nil
		}))

	utilruntime.Must(registerFieldSelectors(Scheme))

	// Same boilerplate as k8s.io/sample-apiserver: options and unversioned
	// meta types the generic server expects to find.
	metav1.AddToGroupVersion(Scheme, schema.GroupVersion{Version: "v1"})
	unversioned := schema.GroupVersion{Group: "", Version: "v1"}
	Scheme.AddUnversionedTypes(unversioned,
		&metav1.Status{}, &metav1.APIVersions{}, &metav1.APIGroupList{}, &metav1.APIGroup{}, &metav1.APIResourceList{})
}

// eventFromEventsV1 mirrors k8s.io/kubernetes pkg/apis/events/v1 conversion.
func eventFromEventsV1(in *eventsv1.Event, out *corev1.Event) {
	out.ObjectMeta = in.ObjectMeta
	out.EventTime = in.EventTime
	out.Series = nil
	if in.Series != nil {
		out.Series = &corev1.EventSeries{Count: in.Series.Count, LastObservedTime: in.Series.LastObservedTime}
	}
	out.ReportingController = in.ReportingController
	out.ReportingInstance = in.ReportingInstance
	out.Action = in.Action
	out.Reason = in.Reason
	out.InvolvedObject = in.Regarding
	out.Related = in.Related
	out.Message = in.Note
	out.Type = in.Type
	out.Source = in.DeprecatedSource
	out.FirstTimestamp = in.DeprecatedFirstTimestamp
	out.LastTimestamp = in.DeprecatedLastTimestamp
	out.Count = in.DeprecatedCount
}

func eventToEventsV1(in *corev1.Event, out *eventsv1.Event) {
	out.ObjectMeta = in.ObjectMeta
	out.EventTime = in.EventTime
	out.Series = nil
	if in.Series != nil {
		out.Series = &eventsv1.EventSeries{Count: in.Series.Count, LastObservedTime: in.Series.LastObservedTime}
	}
	out.ReportingController = in.ReportingController
	out.ReportingInstance = in.ReportingInstance
	out.Action = in.Action
	out.Reason = in.Reason
	out.Regarding = in.InvolvedObject
	out.Related = in.Related
	out.Note = in.Message
	out.Type = in.Type
	out.DeprecatedSource = in.Source
	out.DeprecatedFirstTimestamp = in.FirstTimestamp
	out.DeprecatedLastTimestamp = in.LastTimestamp
	out.DeprecatedCount = in.Count
}
