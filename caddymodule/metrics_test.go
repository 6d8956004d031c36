package caddymodule

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// accountSeries returns the values of the metric's series of account, by
// the value of its other label (label; "" for none).
func accountSeries(t *testing.T, reg *prometheus.Registry, name, account, label string) (values map[string]float64, help string) {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	values = map[string]float64{}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		help = f.GetHelp()
		for _, m := range f.GetMetric() {
			var acct, key string
			for _, l := range m.GetLabel() {
				switch l.GetName() {
				case "account":
					acct = l.GetValue()
				case label:
					key = l.GetValue()
				}
			}
			if acct != account {
				continue
			}
			switch {
			case m.GetCounter() != nil:
				values[key] = m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				values[key] = m.GetGauge().GetValue()
			}
		}
	}
	return values, help
}

// The state and result series an account gets at provisioning are exactly
// tokensource's declared words, and the metrics' help names each of them.
func TestMetricLabelsAreTheDeclaredWords(t *testing.T) {
	const account = "metric-words"
	reg := prometheus.NewRegistry()
	if err := registerMetrics(reg, account); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, label string
		words       []string
	}{
		{"caddy_restream_auth_state", "state", wordsOf(tokensource.States())},
		{"caddy_restream_auth_refreshes_total", "result", wordsOf(tokensource.RefreshResults())},
	} {
		series, help := accountSeries(t, reg, c.name, account, c.label)
		got := slices.Sorted(func(yield func(string) bool) {
			for k := range series {
				if !yield(k) {
					return
				}
			}
		})
		if want := slices.Sorted(slices.Values(c.words)); !slices.Equal(got, want) {
			t.Errorf("%s: %s values %v, want %v", c.name, c.label, got, want)
		}
		for _, w := range c.words {
			if !strings.Contains(help, w) {
				t.Errorf("%s: the help does not name %q: %s", c.name, w, help)
			}
		}
	}
}

func wordsOf[W ~string](list []W) []string {
	out := make([]string, len(list))
	for i, w := range list {
		out[i] = string(w)
	}
	return out
}

// The observer counts attempts under their declared result (an
// unauthorized_client refusal as invalid_client), ignores rounds that sent
// nothing, and sets the state gauges from the declared states.
func TestMetricsObserverUsesDeclaredWords(t *testing.T) {
	const account = "metric-observer"
	reg := prometheus.NewRegistry()
	if err := registerMetrics(reg, account); err != nil {
		t.Fatal(err)
	}
	var o metricsObserver
	for _, r := range []tokensource.RefreshResult{tokensource.ResultUnauthorizedClient, tokensource.ResultInvalidClient,
		tokensource.ResultOK, tokensource.ResultNoChain, tokensource.ResultRateLimited, tokensource.ResultInDoubt,
		tokensource.ResultInstalled, "some_other_code"} {
		o.Refreshed(account, r, time.Millisecond)
	}
	results, _ := accountSeries(t, reg, "caddy_restream_auth_refreshes_total", account, "result")
	want := map[string]float64{"ok": 1, "invalid_client": 2, "invalid_grant": 0, "transient": 0, "adopted": 0}
	if len(results) != len(want) {
		t.Errorf("result series %v, want %v", results, want)
	}
	for k, v := range want {
		if results[k] != v {
			t.Errorf("result %q: %v, want %v (all: %v)", k, results[k], v, results)
		}
	}

	for _, s := range tokensource.States() {
		o.StateChanged(account, s)
		states, _ := accountSeries(t, reg, "caddy_restream_auth_state", account, "state")
		for k, v := range states {
			if want := boolGauge(k == string(s)); v != want {
				t.Errorf("after %s: state %q is %v", s, k, v)
			}
		}
		reauth, _ := accountSeries(t, reg, "caddy_restream_auth_reauth_required", account, "")
		if want := boolGauge(s == tokensource.StateReauthRequired); reauth[""] != want {
			t.Errorf("after %s: reauth_required %v", s, reauth[""])
		}
	}
}
