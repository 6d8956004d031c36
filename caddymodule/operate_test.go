package caddymodule_test

import (
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
)

// Metrics, the admin status API and the health handler, through real Caddy:
// series exist from provisioning, events move them, nothing shows a token.
func TestMetricsStatusAndHealth(t *testing.T) {
	fake := newFake(t, fakerestream.Options{Logf: func(string, ...any) {}})
	port, adminPort := testproc.Port(t), testproc.Port(t)
	seed := fake.Seed()
	caddyfileText := fmt.Sprintf(`{
	admin 127.0.0.1:%d
	storage file_system %s
	persist_config off
}

http://127.0.0.1:%d {
	handle /healthz {
		restream_auth_health ops
	}
	handle /healthz/dead {
		restream_auth_health dead
	}
	handle /dead/* {
		restream_auth dead {
			client_id test-client
			client_secret test-secret
			refresh_token rt_not_issued_by_the_fake
			token_url %s
		}
		reverse_proxy %s
	}
	handle {
		restream_auth ops {
			client_id test-client
			client_secret test-secret
			refresh_token %s
			token_url %s
		}
		reverse_proxy %s
	}
}
`, adminPort, t.TempDir(), port, fake.TokenURL(), fake.URL(), seed, fake.TokenURL(), fake.URL())
	runInProcess(t, caddyfileText)
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	admin := fmt.Sprintf("http://127.0.0.1:%d", adminPort)

	// Metrics are per process: account names unique to this test keep its
	// counts its own. Both accounts settle: ops on generation 1, dead in reauth_required.
	waitFor(t, 10*time.Second, "both accounts to settle", func() bool {
		st := adminStatus(t, admin)
		return len(st) == 2 && st["ops"].State == "ok" && st["ops"].Generation == 1 && st["dead"].State == "reauth_required"
	})
	scrape := metricsText(t, admin)
	for _, want := range []string{
		`caddy_restream_auth_refreshes_total{account="ops",result="ok"} 1`,
		`caddy_restream_auth_refreshes_total{account="ops",result="invalid_grant"} 0`,
		`caddy_restream_auth_refreshes_total{account="dead",result="invalid_grant"} 1`,
		`caddy_restream_auth_reauth_required{account="dead"} 1`,
		`caddy_restream_auth_reauth_required{account="ops"} 0`,
		`caddy_restream_auth_replays_total{account="ops",reason="second_401"} 0`,
		`caddy_restream_auth_unavailable_total{account="dead"} 0`,
		`caddy_restream_auth_persist_failures_total{account="ops"} 0`,
		`caddy_restream_auth_refresh_duration_seconds_count{account="ops"} 1`,
		// Lock waits are observed while another instance holds the lease;
		// the series exists from provisioning.
		`caddy_restream_auth_lock_wait_seconds_count{account="ops"} `,
		`caddy_restream_auth_state{account="ops",state="ok"} 1`,
		`caddy_restream_auth_state{account="ops",state="degraded"} 0`,
		`caddy_restream_auth_state{account="dead",state="reauth_required"} 1`,
		`caddy_restream_auth_state{account="dead",state="ok"} 0`,
		`caddy_restream_auth_state{account="dead",state="misconfigured"} 0`,
	} {
		if !strings.Contains(scrape, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	if !regexp.MustCompile(`caddy_restream_auth_access_token_expiry_timestamp_seconds\{account="ops"\} 1\.\d+e\+09`).MatchString(scrape) {
		t.Errorf("access token expiry gauge not set:\n%s", grepLines(scrape, "expiry_timestamp"))
	}
	if !regexp.MustCompile(`caddy_restream_auth_refresh_token_expiry_timestamp_seconds\{account="ops"\} 1\.\d+e\+09`).MatchString(scrape) {
		t.Errorf("refresh token expiry gauge not set:\n%s", grepLines(scrape, "expiry_timestamp"))
	}
	// The dead account never had a token: its refresh expiry is unknown,
	// which is no series at all rather than a timestamp of 0 (1970).
	if strings.Contains(scrape, `caddy_restream_auth_refresh_token_expiry_timestamp_seconds{account="dead"}`) {
		t.Errorf("refresh expiry of an account without a token is exported:\n%s", grepLines(scrape, "expiry_timestamp"))
	}
	if st := adminStatus(t, admin); !st["ops"].Persisted || st["ops"].RefreshExpiresAt == "" || st["dead"].RefreshExpiresAt != "" {
		t.Errorf("admin status: ops %+v, dead %+v", st["ops"], st["dead"])
	}
	if _, raw, _ := do(t, http.MethodGet, admin+"/restream_auth/", nil, nil); strings.Contains(string(raw), `"refresh_expires_at":""`) {
		t.Errorf("admin status shows an unknown refresh expiry instead of omitting it: %s", raw)
	}

	// Health: 200 for a serving account, 503 for a dead one.
	status, body, _ := do(t, http.MethodGet, base+"/healthz", nil, nil)
	if status != http.StatusOK || !strings.Contains(string(body), `"state":"ok"`) {
		t.Fatalf("health: %d %s", status, body)
	}
	status, body, _ = do(t, http.MethodGet, base+"/healthz/dead", nil, nil)
	if status != http.StatusServiceUnavailable || !strings.Contains(string(body), `"reauth_required"`) {
		t.Fatalf("dead health: %d %s", status, body)
	}
	if status, _, _ := do(t, http.MethodGet, base+"/dead/v2/user/profile", nil, nil); status != http.StatusServiceUnavailable {
		t.Fatalf("dead account request: %d", status)
	}

	// A revoked token: one refresh and a replay, counted by reason.
	fake.RevokeAccessTokens()
	if status, body, _ := do(t, http.MethodGet, base+"/v2/user/profile", nil, nil); status != http.StatusOK {
		t.Fatalf("after revocation: %d %s", status, body)
	}
	// Forced refresh through the admin API.
	before := fake.Stats().RefreshCalls
	status, body, _ = do(t, http.MethodPost, admin+"/restream_auth/ops/refresh", nil, nil)
	if status != http.StatusOK || fake.Stats().RefreshCalls != before+1 {
		t.Fatalf("admin refresh: %d %s (refresh calls %d -> %d)", status, body, before, fake.Stats().RefreshCalls)
	}
	if st := adminStatus(t, admin)["ops"]; st.Generation != 3 || st.LastResult != "ok" || st.AccessExpiresAt == "" || st.NextRefreshAt == "" {
		t.Fatalf("status after admin refresh: %+v", st)
	}
	if status, _, _ := do(t, http.MethodPost, admin+"/restream_auth/nope/refresh", nil, nil); status != http.StatusNotFound {
		t.Fatalf("unknown account: %d", status)
	}

	scrape = metricsText(t, admin)
	for _, want := range []string{
		`caddy_restream_auth_replays_total{account="ops",reason="refreshed"} 1`,
		`caddy_restream_auth_refreshes_total{account="ops",result="ok"} 3`,
		`caddy_restream_auth_unavailable_total{account="dead"} 1`,
	} {
		if !strings.Contains(scrape, want) {
			t.Errorf("metrics lack %s:\n%s", want, grepLines(scrape, "caddy_restream_auth_"))
		}
	}
	_, statusBody, _ := do(t, http.MethodGet, admin+"/restream_auth/", nil, nil)
	secrets := append(fake.IssuedTokens(), "test-secret", "rt_not_issued_by_the_fake")
	mustContainNone(t, "metrics", scrape, secrets...)
	mustContainNone(t, "status", string(statusBody), secrets...)
	t.Logf("status: %s", statusBody)
}

func metricsText(t *testing.T, admin string) string {
	t.Helper()
	status, body, _ := do(t, http.MethodGet, admin+"/metrics", nil, nil)
	if status != http.StatusOK {
		t.Fatalf("metrics: %d", status)
	}
	return string(body)
}

func grepLines(text, sub string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, sub) && !strings.HasPrefix(l, "#") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// With placeholders, the secrets stay out of Caddy's own surfaces: the
// admin /config/ endpoint and the adapted JSON show the placeholder only.
func TestNoSecretsInAdminConfig(t *testing.T) {
	fake := newFake(t, fakerestream.Options{ClientSecret: "cs_admin_config_secret", Logf: func(string, ...any) {}})
	seed := fake.Seed()
	t.Setenv("RESTREAM_TEST_SECRET", "cs_admin_config_secret")
	t.Setenv("RESTREAM_TEST_SEED", seed)
	port, adminPort := testproc.Port(t), testproc.Port(t)
	caddyfileText := fmt.Sprintf(`{
	admin 127.0.0.1:%d
	storage file_system %s
	persist_config off
}

http://127.0.0.1:%d {
	restream_auth {
		client_id test-client
		client_secret {env.RESTREAM_TEST_SECRET}
		refresh_token {env.RESTREAM_TEST_SEED}
		token_url %s
	}
	reverse_proxy %s
}
`, adminPort, t.TempDir(), port, fake.TokenURL(), fake.URL())
	runInProcess(t, caddyfileText)
	if status, body, _ := do(t, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/v2/user/profile", port), nil, nil); status != http.StatusOK {
		t.Fatalf("status %d %s", status, body)
	}
	status, cfg, _ := do(t, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/config/", adminPort), nil, nil)
	if status != http.StatusOK || !strings.Contains(string(cfg), "{env.RESTREAM_TEST_SECRET}") {
		t.Fatalf("admin /config/: %d %s", status, cfg)
	}
	secrets := append(fake.IssuedTokens(), "cs_admin_config_secret", seed)
	mustContainNone(t, "admin /config/", string(cfg), secrets...)
	mustContainNone(t, "adapted config", string(adapt(t, caddyfileText)), secrets...)
}
