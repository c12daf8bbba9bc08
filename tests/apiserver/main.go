// Command s3grant-test-apiserver is a small Kubernetes API server for tests.
//
// It is ONE upstream generic apiserver (k8s.io/apiserver) that hosts:
//   - the upstream apiextensions-apiserver (CRDs and custom resources, with
//     validation, CEL, defaulting, SSA, /status, finalizers, watch, printer
//     columns, and its OpenAPI controllers that publish CRD schemas), and
//   - core/v1 namespaces, secrets, configmaps, events; events.k8s.io/v1 events
//     (a second view of core/v1 events); coordination.k8s.io/v1 leases, all
//     served by upstream genericregistry.Store on etcd.
//
// Installing the built-in groups into the apiextensions server's own
// GenericAPIServer (instead of chaining a second server behind it) means a
// single discovery manager (/api, /apis, aggregated discovery) and a single
// OpenAPI v2/v3 service list everything, which kubectl api-resources and
// kubectl explain need.
//
// Security: TLS on 127.0.0.1 only; clients authenticate with X.509 client
// certificates signed by --client-ca-file (user = CN, groups = O); every
// authenticated request is allowed (no RBAC).
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"strings"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiextensionsv1beta1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1beta1"
	apiextensionsapiserver "k8s.io/apiextensions-apiserver/pkg/apiserver"
	apiextensionsoptions "k8s.io/apiextensions-apiserver/pkg/cmd/server/options"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apiserver/pkg/admission"
	x509request "k8s.io/apiserver/pkg/authentication/request/x509"
	"k8s.io/apiserver/pkg/authorization/authorizerfactory"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	genericregistry "k8s.io/apiserver/pkg/registry/generic/registry"
	"k8s.io/apiserver/pkg/registry/rest"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/apiserver/pkg/server/dynamiccertificates"
	genericoptions "k8s.io/apiserver/pkg/server/options"
	serverstorage "k8s.io/apiserver/pkg/server/storage"
	"k8s.io/apiserver/pkg/storage/storagebackend"
	"k8s.io/client-go/dynamic"
	"k8s.io/klog/v2"
)

func main() {
	etcdServers := flag.String("etcd-servers", "http://127.0.0.1:2379", "comma-separated etcd URLs")
	port := flag.Int("secure-port", 6443, "HTTPS port on 127.0.0.1")
	certFile := flag.String("tls-cert-file", "", "serving certificate (PEM)")
	keyFile := flag.String("tls-private-key-file", "", "serving key (PEM)")
	clientCA := flag.String("client-ca-file", "", "CA that signs client certificates (PEM)")
	klog.InitFlags(flag.CommandLine)
	flag.Parse()

	if err := run(*etcdServers, *port, *certFile, *keyFile, *clientCA); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

func run(etcdServers string, port int, certFile, keyFile, clientCA string) error {
	// Registers the build's effective version and the default feature gate.
	runOpts := genericoptions.NewServerRunOptions()
	cfg := genericapiserver.NewRecommendedConfig(apiextensionsapiserver.Codecs)
	if err := runOpts.ApplyTo(&cfg.Config); err != nil {
		return err
	}

	// Serving: 127.0.0.1 only, our certificate; plus the usual self-signed
	// loopback certificate/token for in-process clients.
	serving := genericoptions.NewSecureServingOptions().WithLoopback()
	serving.BindAddress = net.ParseIP("127.0.0.1")
	serving.BindPort = port
	serving.ServerCert.CertKey = genericoptions.CertKey{CertFile: certFile, KeyFile: keyFile}
	if err := serving.ApplyTo(&cfg.SecureServing, &cfg.LoopbackClientConfig); err != nil {
		return err
	}

	// Authentication: client certificates. Authorization: allow everything.
	ca, err := dynamiccertificates.NewDynamicCAContentFromFile("client-ca", clientCA)
	if err != nil {
		return err
	}
	cfg.Authentication.Authenticator = x509request.NewDynamic(ca.VerifyOptions, x509request.CommonNameUserConversion)
	if err := cfg.Authentication.ApplyClientCert(ca, cfg.SecureServing); err != nil {
		return err
	}
	cfg.Authorization.Authorizer = authorizerfactory.NewAlwaysAllowAuthorizer()
	genericapiserver.AuthorizeClientBearerToken(cfg.LoopbackClientConfig, &cfg.Authentication, &cfg.Authorization)

	nsAdmission := &namespaceExists{Handler: admission.NewHandler(admission.Create)}
	cfg.AdmissionControl = nsAdmission

	// OpenAPI v2 and v3. Setting OpenAPIConfig (v2) also makes the
	// apiextensions server start its CRD OpenAPI controllers, which publish
	// CRD schemas to /openapi/v2 and /openapi/v3.
	namer := openapinamer.NewDefinitionNamer(apiextensionsapiserver.Scheme, NamerScheme)
	cfg.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(getDefinitions, namer)
	cfg.OpenAPIConfig.Info.Title = "s3grant-test-apiserver"
	cfg.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(getDefinitions, namer)
	cfg.OpenAPIV3Config.Info.Title = "s3grant-test-apiserver"

	cfg.MergedResourceConfig = apiextensionsapiserver.DefaultAPIResourceConfigSource()

	// Storage: one etcd, one codec per API family (see storageFactory).
	etcd := genericoptions.NewEtcdOptions(storagebackend.NewDefaultConfig("/registry", nil))
	etcd.StorageConfig.Transport.ServerList = strings.Split(etcdServers, ",")
	if err := etcd.ApplyWithStorageFactoryTo(&storageFactory{base: etcd.StorageConfig}, &cfg.Config); err != nil {
		return err
	}

	extCfg := &apiextensionsapiserver.Config{
		GenericConfig: cfg,
		ExtraConfig: apiextensionsapiserver.ExtraConfig{
			CRDRESTOptionsGetter: apiextensionsoptions.NewCRDRESTOptionsGetter(*etcd, cfg.ResourceTransformers, cfg.StorageObjectCountTracker),
			ServiceResolver:      noServices{},
			AuthResolverWrapper:  noAuthResolver(cfg),
		},
	}
	completed := extCfg.Complete()
	server, err := completed.New(genericapiserver.NewEmptyDelegate())
	if err != nil {
		return err
	}
	gs := server.GenericAPIServer

	// ---- built-in groups, installed into the same GenericAPIServer ----
	opts := cfg.RESTOptionsGetter
	newList := func(o runtime.Object) func() runtime.Object {
		return func() runtime.Object { return o.DeepCopyObject() }
	}
	namespaces, err := newStore(opts, corev1.Resource("namespaces"), "namespace",
		newList(&corev1.Namespace{}), newList(&corev1.NamespaceList{}), namespaceStrategy(), namespaceAttrs, namespaceTable)
	if err != nil {
		return err
	}
	secrets, err := newStore(opts, corev1.Resource("secrets"), "secret",
		newList(&corev1.Secret{}), newList(&corev1.SecretList{}), secretStrategy(), secretAttrs, secretTable)
	if err != nil {
		return err
	}
	configMaps, err := newStore(opts, corev1.Resource("configmaps"), "configmap",
		newList(&corev1.ConfigMap{}), newList(&corev1.ConfigMapList{}), newStrategy(true), attrs(nil), configMapTable)
	if err != nil {
		return err
	}
	events, err := newStore(opts, corev1.Resource("events"), "event",
		newList(&corev1.Event{}), newList(&corev1.EventList{}), newStrategy(true), eventAttrs, eventTableConvertor{})
	if err != nil {
		return err
	}
	// Same etcd keys and internal type as core/v1 events (see storageFactory).
	eventsNew, err := newStore(opts, schema.GroupResource{Group: "events.k8s.io", Resource: "events"}, "event",
		newList(&corev1.Event{}), newList(&corev1.EventList{}), newStrategy(true), eventAttrs, eventTableConvertor{})
	if err != nil {
		return err
	}
	leases, err := newStore(opts, coordinationv1.Resource("leases"), "lease",
		newList(&coordinationv1.Lease{}), newList(&coordinationv1.LeaseList{}), newStrategy(true), attrs(nil), leaseTable)
	if err != nil {
		return err
	}
	nsAdmission.namespaces = namespaces
	nsREST := &namespaceREST{
		Store:    namespaces,
		contents: []*genericregistry.Store{secrets, configMaps, events, leases},
		dynamic:  func() (dynamic.Interface, error) { return dynamic.NewForConfig(gs.LoopbackClientConfig) },
	}

	core := genericapiserver.NewDefaultAPIGroupInfo("", Scheme, ParameterCodec, Codecs)
	core.VersionedResourcesStorageMap["v1"] = map[string]rest.Storage{
		"namespaces": nsREST, "secrets": secrets,
		"configmaps": shortNamed{configMaps, []string{"cm"}}, "events": shortNamed{events, []string{"ev"}},
	}
	if err := gs.InstallLegacyAPIGroup("/api", &core); err != nil {
		return fmt.Errorf("installing core/v1: %w", err)
	}
	eventsGroup := genericapiserver.NewDefaultAPIGroupInfo("events.k8s.io", Scheme, ParameterCodec, Codecs)
	eventsGroup.VersionedResourcesStorageMap["v1"] = map[string]rest.Storage{"events": eventsNew}
	coordGroup := genericapiserver.NewDefaultAPIGroupInfo("coordination.k8s.io", Scheme, ParameterCodec, Codecs)
	coordGroup.VersionedResourcesStorageMap["v1"] = map[string]rest.Storage{"leases": leases}
	if err := gs.InstallAPIGroups(&eventsGroup, &coordGroup); err != nil {
		return fmt.Errorf("installing events.k8s.io, coordination.k8s.io: %w", err)
	}

	installRootDiscovery(server)

	gs.AddPostStartHookOrDie("default-namespaces", func(genericapiserver.PostStartHookContext) error {
		return createDefaultNamespaces(namespaces)
	})

	ctx := genericapiserver.SetupSignalContext()
	return gs.PrepareRun().RunWithContext(ctx)
}

// storageFactory hands each resource its etcd prefix and codec:
// CRDs use apiextensions' codec; our built-in kinds are stored as core/v1
// (and coordination.k8s.io/v1) JSON. events.k8s.io events share the core
// "events" keys, as in kube-apiserver.
type storageFactory struct{ base storagebackend.Config }

func (f *storageFactory) NewConfig(gr schema.GroupResource, _ runtime.Object) (*storagebackend.ConfigForResource, error) {
	c := f.base
	if gr.Group == apiextensionsv1.GroupName {
		c.Codec = apiextensionsapiserver.Codecs.LegacyCodec(apiextensionsv1beta1.SchemeGroupVersion, apiextensionsv1.SchemeGroupVersion)
	} else {
		c.Codec = Codecs.LegacyCodec(corev1.SchemeGroupVersion, coordinationv1.SchemeGroupVersion)
	}
	return c.ForResource(gr), nil
}

func (f *storageFactory) ResourcePrefix(gr schema.GroupResource) string {
	switch gr.Group {
	case "", "events.k8s.io", "coordination.k8s.io":
		return gr.Resource
	}
	return gr.Group + "/" + gr.Resource
}

func (f *storageFactory) Configs() []storagebackend.Config { return serverstorage.Configs(f.base) }
func (f *storageFactory) Backends() []serverstorage.Backend {
	return serverstorage.Backends(f.base)
}
