package caddymodule

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// tokenProxyMetrics are restream_token_proxy's metrics, shared by every
// instance of the handler (like metrics, created once per process). They
// have no labels, so the request path touches only atomics.
var tokenProxyMetrics = struct {
	inFlight   prometheus.Gauge
	throttled  prometheus.Counter
	redactions prometheus.Counter
	// unauthenticated counts requests refused because no authentication
	// handler identified the caller.
	unauthenticated prometheus.Counter
}{
	inFlight: prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "restream_auth", Name: "token_proxy_in_flight",
		Help: "Device calls restream_token_proxy is forwarding to the token or revocation endpoint right now (at most max_concurrent per handler).",
	}),
	throttled: prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "restream_auth", Name: "token_proxy_throttled_total",
		Help: "Device calls restream_token_proxy answered 429 without forwarding because max_concurrent calls were in flight.",
	}),
	redactions: prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "restream_auth", Name: "token_proxy_secret_redactions_total",
		Help: "Token endpoint answers that echoed the client secret, which restream_token_proxy redacted before relaying.",
	}),
	unauthenticated: prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "restream_auth", Name: "token_proxy_unauthenticated_total",
		Help: "Device calls restream_token_proxy refused (403) because no Caddy authentication handler identified the caller and allow_unauthenticated is not set.",
	}),
}

// registerTokenProxyMetrics registers the collectors with a config's
// registry (nil: none, as in some tests).
func registerTokenProxyMetrics(registry *prometheus.Registry) error {
	if registry == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{tokenProxyMetrics.inFlight, tokenProxyMetrics.throttled, tokenProxyMetrics.redactions, tokenProxyMetrics.unauthenticated} {
		if err := registry.Register(c); err != nil && !errors.As(err, new(prometheus.AlreadyRegisteredError)) {
			return err
		}
	}
	return nil
}
