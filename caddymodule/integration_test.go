package caddymodule_test

import (
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
)

func newFake(t *testing.T, opts fakerestream.Options) *fakerestream.Server {
	t.Helper()
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	f := fakerestream.New(opts)
	t.Cleanup(f.Close)
	return f
}

func TestHeaderReplaced(t *testing.T) {
	fake := newFake(t, fakerestream.Options{})
	cfg := siteConfig{Port: freePort(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed()}
	runInProcess(t, cfg.Caddyfile())
	base := "http://127.0.0.1:" + itoa(cfg.Port)

	status, body, _ := do(t, http.MethodGet, base+"/v2/user/profile?x=1", nil, map[string]string{"Authorization": "Bearer client-supplied"})
	if status != http.StatusOK {
		t.Fatalf("status %d: %s", status, body)
	}
	e := decodeEcho(t, body)
	if !strings.HasPrefix(e.Authorization, "Bearer at_") || !fake.ValidAccessToken(strings.TrimPrefix(e.Authorization, "Bearer ")) {
		t.Fatalf("upstream saw Authorization %q, want a valid fake token", e.Authorization)
	}
	if e.Query != "x=1" || e.Path != "/v2/user/profile" {
		t.Fatalf("request changed on the way: %+v", e)
	}
	if st := fake.Stats(); st.RefreshCalls != 1 || st.InvalidGrant != 0 {
		t.Fatalf("want exactly one refresh (the seed), got %+v", st)
	}
}

// Eight workers for ten seconds with 2-second tokens: every response 200,
// no invalid_grant at the fake.
func TestRotationUnderLoad(t *testing.T) {
	fake := newFake(t, fakerestream.Options{AccessTTL: 2 * time.Second, Latency: 50 * time.Millisecond, Logf: func(string, ...any) {}})
	cfg := siteConfig{Port: freePort(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(), Extra: "refresh_ahead 1s"}
	runInProcess(t, cfg.Caddyfile())
	url := "http://127.0.0.1:" + itoa(cfg.Port) + "/v2/user/channel/all"

	var ok, bad atomic.Int64
	deadline := time.Now().Add(10 * time.Second)
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				status, body, _ := do(t, http.MethodGet, url, nil, nil)
				if status == http.StatusOK {
					ok.Add(1)
				} else {
					bad.Add(1)
					t.Errorf("status %d: %s", status, body)
				}
			}
		}()
	}
	wg.Wait()
	st := fake.Stats()
	t.Logf("requests ok=%d failed=%d; fake: refreshes=%d invalid_grant=%d api401=%d max concurrent refreshes=%d",
		ok.Load(), bad.Load(), st.RefreshCalls, st.InvalidGrant, st.API401, st.MaxConcurrentRefresh)
	if bad.Load() != 0 || st.InvalidGrant != 0 {
		t.Fatalf("want 0 failures and 0 invalid_grant")
	}
	if st.RefreshCalls < 5 {
		t.Fatalf("only %d refreshes in 10 s with 2 s tokens: the refresher is not rotating", st.RefreshCalls)
	}
	if st.MaxConcurrentRefresh != 1 {
		t.Fatalf("max concurrent refreshes %d, want 1", st.MaxConcurrentRefresh)
	}
}
