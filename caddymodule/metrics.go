package caddymodule

import (
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// Label values of the metrics. Series for every value exist from
// provisioning, so dashboards and alerts see them before the first event.
// Results and states are tokensource's words, declared there once.
var (
	refreshResults = tokensource.RefreshResults()
	replayReasons  = []string{"refreshed", "newer_token", "not_replayable", "second_401"}
	accountStates  = tokensource.States()
)

// metrics are package-level because Caddy creates a registry per config and
// collectors must be created once per process; each Provision registers them
// into its config's registry (as Caddy's reverse_proxy metrics do).
var metrics = struct {
	once            sync.Once
	refreshes       *prometheus.CounterVec
	refreshDuration *prometheus.HistogramVec
	lockWait        *prometheus.HistogramVec
	accessExpiry    *prometheus.GaugeVec
	refreshExpiry   *prometheus.GaugeVec
	replays         *prometheus.CounterVec
	unavailable     *prometheus.CounterVec
	reauthRequired  *prometheus.GaugeVec
	state           *prometheus.GaugeVec
	persistFailures *prometheus.CounterVec
}{}

func initMetrics() {
	metrics.once.Do(func() {
		const ns, sub = "caddy", "restream_auth"
		account := []string{"account"}
		metrics.refreshes = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "refreshes_total",
			Help: "Token refresh outcomes: ok, invalid_grant, invalid_client, transient, adopted (a pair another instance stored).",
		}, []string{"account", "result"})
		metrics.refreshDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "refresh_duration_seconds",
			Help:    "Time taken by refresh attempts, lease and storage included.",
			Buckets: []float64{.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, account)
		metrics.lockWait = prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "lock_wait_seconds",
			Help:    "Time spent waiting for the account's storage lock and refresh lease.",
			Buckets: []float64{.001, .005, .01, .05, .1, .5, 1, 5, 10, 30},
		}, account)
		metrics.accessExpiry = prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "access_token_expiry_timestamp_seconds",
			Help: "Unix time at which the current access token expires (0: none).",
		}, account)
		metrics.refreshExpiry = prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "refresh_token_expiry_timestamp_seconds",
			Help: "Unix time at which the current refresh token expires; absent while unknown (the endpoint did not say, or no token yet).",
		}, account)
		metrics.replays = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "replays_total",
			Help: "Upstream 401s by what followed: refreshed, newer_token (replayed without refreshing), not_replayable, second_401.",
		}, []string{"account", "reason"})
		metrics.unavailable = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "unavailable_total",
			Help: "Requests answered 503 because no valid token could be had.",
		}, account)
		metrics.reauthRequired = prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "reauth_required",
			Help: "1 while the account's chain is dead and needs re-authorization (a new refresh_token seed); 0 otherwise, misconfigured included (see state).",
		}, account)
		metrics.state = prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "state",
			Help: "1 for the account's current state, 0 for the others: ok, refreshing, backoff, degraded (the served pair is only in memory), misconfigured (the endpoint refuses the client credentials), reauth_required, no_chain.",
		}, []string{"account", "state"})
		metrics.persistFailures = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "persist_failures_total",
			Help: "Failed writes of a new token pair to storage (the pair is then served from memory and the write retried).",
		}, account)
	})
}

// registerMetrics registers the collectors with a config's registry and
// creates every series of the account at zero.
func registerMetrics(registry *prometheus.Registry, account string) error {
	initMetrics()
	if registry != nil {
		for _, c := range []prometheus.Collector{metrics.refreshes, metrics.refreshDuration, metrics.lockWait,
			metrics.accessExpiry, metrics.refreshExpiry, metrics.replays, metrics.unavailable,
			metrics.reauthRequired, metrics.state, metrics.persistFailures} {
			if err := registry.Register(c); err != nil && !errors.As(err, new(prometheus.AlreadyRegisteredError)) {
				return err
			}
		}
	}
	for _, r := range refreshResults {
		metrics.refreshes.WithLabelValues(account, string(r))
	}
	for _, r := range replayReasons {
		metrics.replays.WithLabelValues(account, r)
	}
	metrics.refreshDuration.WithLabelValues(account)
	metrics.lockWait.WithLabelValues(account)
	metrics.accessExpiry.WithLabelValues(account)
	// The refresh expiry has no series until it is known: 0 would read as
	// "expired in 1970" to an alert on expiry - time().
	metrics.unavailable.WithLabelValues(account)
	metrics.reauthRequired.WithLabelValues(account)
	for _, st := range accountStates {
		metrics.state.WithLabelValues(account, string(st))
	}
	metrics.persistFailures.WithLabelValues(account)
	return nil
}

// metricsObserver turns token source events into metrics. Label values are
// account names and fixed words only: never a token or secret.
type metricsObserver struct{}

func (metricsObserver) Refreshed(account string, result tokensource.RefreshResult, took time.Duration) {
	if result == tokensource.ResultUnauthorizedClient {
		result = tokensource.ResultInvalidClient // the same refusal, counted once
	}
	if !slices.Contains(refreshResults, result) {
		return // not an attempt: no series to count it in
	}
	metrics.refreshes.WithLabelValues(account, string(result)).Inc()
	if result != tokensource.ResultAdopted { // an adoption is a storage read, not an attempt
		metrics.refreshDuration.WithLabelValues(account).Observe(took.Seconds())
	}
}

func (metricsObserver) LockWaited(account string, d time.Duration) {
	metrics.lockWait.WithLabelValues(account).Observe(d.Seconds())
}

func (metricsObserver) Published(account string, t *tokensource.Token) {
	metrics.accessExpiry.WithLabelValues(account).Set(unixSeconds(t.Expiry))
	if t.RefreshExpiry.IsZero() {
		// Unknown: no series rather than a zero timestamp.
		metrics.refreshExpiry.DeleteLabelValues(account)
	} else {
		metrics.refreshExpiry.WithLabelValues(account).Set(unixSeconds(t.RefreshExpiry))
	}
}

func (metricsObserver) PersistFailed(account string) {
	metrics.persistFailures.WithLabelValues(account).Inc()
}

// StateChanged sets the state gauge. reauth_required is 1 only for a dead
// chain: a misconfigured account (the endpoint refuses the client
// credentials) keeps its chain, needs a configuration fix rather than a new
// seed, and shows as state="misconfigured".
func (metricsObserver) StateChanged(account string, state tokensource.State) {
	metrics.reauthRequired.WithLabelValues(account).Set(boolGauge(state == tokensource.StateReauthRequired))
	for _, st := range accountStates {
		metrics.state.WithLabelValues(account, string(st)).Set(boolGauge(st == state))
	}
}

func boolGauge(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func unixSeconds(t time.Time) float64 {
	if t.IsZero() {
		return 0
	}
	return float64(t.UnixNano()) / 1e9
}

var _ tokensource.Observer = metricsObserver{}
