package main

import (
	"fmt"
	"net/url"

	noopoteltrace "go.opentelemetry.io/otel/trace/noop"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/apiserver/pkg/util/webhook"
)

// CRD conversion webhooks would need Services, which this server does not
// have: resolving one fails with a clear error.
type noServices struct{}

func (noServices) ResolveEndpoint(namespace, name string, port int32) (*url.URL, error) {
	return nil, fmt.Errorf("service %s/%s: this test apiserver has no Services (conversion webhooks need a URL)", namespace, name)
}

func noAuthResolver(cfg *genericapiserver.RecommendedConfig) webhook.AuthenticationInfoResolverWrapper {
	return webhook.NewDefaultAuthenticationInfoResolverWrapper(nil, nil, cfg.LoopbackClientConfig, noopoteltrace.NewTracerProvider())
}
