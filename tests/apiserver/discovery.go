package main

import (
	"net/http"
	"sort"

	apiextensionsapiserver "k8s.io/apiextensions-apiserver/pkg/apiserver"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/version"
	discoveryendpoint "k8s.io/apiserver/pkg/endpoints/discovery/aggregated"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
)

// installRootDiscovery serves /apis.
//
// The apiextensions server turns the generic /apis endpoint off (in
// kube-apiserver the aggregator serves it). We put it back: aggregated
// discovery (v2, what kubectl asks for first) comes from the shared
// AggregatedDiscoveryGroupManager, which already has both the built-in groups
// and the CRD groups; legacy discovery (APIGroupList, what kube-rs reads) comes
// from the server's DiscoveryGroupManager, which has the built-in groups and
// which we keep updated with CRD groups from the CRD informer.
func installRootDiscovery(crds *apiextensionsapiserver.CustomResourceDefinitions) {
	gs := crds.GenericAPIServer
	var peer http.Handler // no peer apiservers
	wrapped := discoveryendpoint.WrapAggregatedDiscoveryToHandler(gs.DiscoveryGroupManager, gs.AggregatedDiscoveryGroupManager, peer)
	gs.Handler.GoRestfulContainer.Add(wrapped.GenerateWebService("/apis", metav1.APIGroupList{}))

	informer := crds.Informers.Apiextensions().V1().CustomResourceDefinitions()
	known := map[string]bool{} // CRD groups currently published
	sync := func() {
		all, err := informer.Lister().List(labels.Everything())
		if err != nil {
			klog.Errorf("listing CRDs for discovery: %v", err)
			return
		}
		groups := map[string][]string{}
		for _, crd := range all {
			for _, v := range crd.Spec.Versions {
				if v.Served && !contains(groups[crd.Spec.Group], v.Name) {
					groups[crd.Spec.Group] = append(groups[crd.Spec.Group], v.Name)
				}
			}
		}
		for g, versions := range groups {
			sort.Slice(versions, func(i, j int) bool {
				return version.CompareKubeAwareVersionStrings(versions[i], versions[j]) > 0
			})
			apiGroup := metav1.APIGroup{Name: g}
			for _, v := range versions {
				apiGroup.Versions = append(apiGroup.Versions, metav1.GroupVersionForDiscovery{GroupVersion: g + "/" + v, Version: v})
			}
			apiGroup.PreferredVersion = apiGroup.Versions[0]
			gs.DiscoveryGroupManager.AddGroup(apiGroup)
			known[g] = true
		}
		for g := range known {
			if _, ok := groups[g]; !ok {
				gs.DiscoveryGroupManager.RemoveGroup(g)
				delete(known, g)
			}
		}
	}
	// Handlers of one informer run sequentially, so sync needs no lock.
	informer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(interface{}) { sync() },
		UpdateFunc: func(interface{}, interface{}) { sync() },
		DeleteFunc: func(interface{}) { sync() },
	})
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
