package caddymodule_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"testing"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
)

// restream_auth_health answers a probe from the account's state: 200 while
// a token can be served, 503 otherwise; an account no restream_auth of the
// config serves is "not_configured" (a typo in the probe's account must not
// look healthy). HEAD gets the status alone. Metrics and the admin API are
// in operate_test.go.
func TestHealthStates(t *testing.T) {
	fake := newFake(t, fakerestream.Options{Logf: func(string, ...any) {}})
	port := testproc.Port(t)
	runInProcess(t, fmt.Sprintf(`{
	admin off
	storage file_system %s
	persist_config off
}

http://127.0.0.1:%d {
	handle /healthz/live {
		restream_auth_health live
	}
	handle /healthz/typo {
		restream_auth_health lvie
	}
	route {
		restream_auth live {
			client_id test-client
			client_secret test-secret
			refresh_token %s
			token_url %s
		}
		respond 204
	}
}
`, t.TempDir(), port, fake.Seed(), fake.TokenURL()))
	base := "http://127.0.0.1:" + itoa(port)
	if status, body, _ := do(t, http.MethodGet, base+"/", nil, nil); status != http.StatusNoContent {
		t.Fatalf("the account's route: %d %s", status, body)
	}

	for _, tc := range []struct {
		path, state string
		status      int
	}{
		{"/healthz/live", "ok", http.StatusOK},
		{"/healthz/typo", "not_configured", http.StatusServiceUnavailable},
	} {
		status, body, hdr := do(t, http.MethodGet, base+tc.path, nil, nil)
		var got struct {
			Account, State string
			Generation     uint64
		}
		if err := json.Unmarshal(body, &got); err != nil || status != tc.status || got.State != tc.state {
			t.Fatalf("%s: %d %s, want %d with state %q", tc.path, status, body, tc.status, tc.state)
		}
		if hdr.Get("Cache-Control") != "no-store" || hdr.Get("Content-Type") != "application/json" {
			t.Errorf("%s: headers %v", tc.path, hdr)
		}
		if tc.state == "ok" && got.Generation != 1 {
			t.Errorf("%s: generation %d, want 1", tc.path, got.Generation)
		}
		if status, body, _ := do(t, http.MethodHead, base+tc.path, nil, nil); status != tc.status || len(body) != 0 {
			t.Errorf("HEAD %s: %d with %d body bytes, want %d and none", tc.path, status, len(body), tc.status)
		}
	}
}
