package caddymodule_test

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"runtime/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/caddymodule"
	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
)

// A config reload keeps exactly one refresher per account and serves
// requests throughout.
func TestReloadKeepsOneRefresher(t *testing.T) {
	fake := newFake(t, fakerestream.Options{AccessTTL: 2 * time.Second, Logf: func(string, ...any) {}})
	cfg := siteConfig{Port: testproc.Port(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(), Extra: "refresh_ahead 1s"}
	runInProcess(t, cfg.Caddyfile())
	url := cfg.profileURL()
	if status, _, _ := do(t, http.MethodGet, url, nil, nil); status != http.StatusOK {
		t.Fatalf("status %d", status)
	}
	before := refreshers(t)
	if before != 1 {
		t.Fatalf("%d refreshers before reload, want 1", before)
	}
	for i := range 5 {
		cfg.Global = fmt.Sprintf("grace_period %dms", 1000+i) // a changed config: a real reload
		loadInProcess(t, cfg.Caddyfile())
		if status, body, _ := do(t, http.MethodGet, url, nil, nil); status != http.StatusOK {
			t.Fatalf("after reload %d: status %d %s", i, status, body)
		}
	}
	if n := refreshers(t); n != 1 {
		t.Fatalf("%d refreshers after 5 reloads, want 1", n)
	}
	if n := caddymodule.SourcesInPool(); n != 1 {
		t.Fatalf("%d token sources in the pool, want 1", n)
	}
}

// refreshers counts running refresher goroutines in this process.
func refreshers(t *testing.T) int {
	t.Helper()
	var n int
	waitFor(t, 5*time.Second, "refresher count to settle", func() bool {
		var buf bytes.Buffer
		_ = pprof.Lookup("goroutine").WriteTo(&buf, 1)
		n = strings.Count(buf.String(), "tokensource.(*Source).run")
		return n <= 1
	})
	return n
}

// A reload that changes an account's configuration replaces its
// token source, and Caddy waits for the old one to close. While another
// instance holds the account's lease (a live lease.json with a foreign
// owner and a 60 s TTL) and the old source is polling for it, the admin
// /load must still return within timeout + 2 s.
func TestReloadWithForeignLeaseIsQuick(t *testing.T) {
	skipIfShort(t, "waits out token call timeouts around a reload (about 5 s)")
	const timeout = 2 * time.Second
	fake := newFake(t, fakerestream.Options{Logf: quiet})
	cfg := siteConfig{Port: testproc.Port(t), AdminPort: testproc.Port(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(), Extra: "timeout 2s"}
	site := runWarmedUp(t, cfg)
	planted, _ := plantLease(t, cfg.StorageDir, leaseFile{Owner: "another-instance", Nonce: "n", Seq: 1, TTLMillis: 60000})
	before := fake.Stats()

	// The served token is revoked: the source needs a refresh and waits,
	// round after round, for the other instance's lease.
	fake.RevokeAccessTokens()
	if got := timedGet(t, site); !got.is503("temporarily_unavailable") || got.took > timeout+time.Second {
		t.Fatalf("while another instance holds the lease: %s, want 503 within %s", got, timeout+time.Second)
	}

	cfg.Extra = "timeout 3s" // a changed account configuration: a new token source
	req, _ := http.NewRequest(http.MethodPost, fmt.Sprintf("http://127.0.0.1:%d/load", cfg.AdminPort), strings.NewReader(cfg.Caddyfile()))
	req.Header.Set("Content-Type", "text/caddyfile")
	start := time.Now()
	resp, err := noKeepAlive.Do(req)
	reload := time.Since(start)
	if err != nil {
		t.Fatalf("reload: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("reload: %d", resp.StatusCode)
	}
	// The new source waits for the same lease: nothing was sent, nothing
	// written, and only one refresher runs.
	after := timedGet(t, site)
	_, raw := readLease(t, cfg.StorageDir)
	n, inPool := refreshers(t), caddymodule.SourcesInPool()
	t.Logf("reload with a foreign lease took %s (bound %s); then %s; refreshers %d, sources in pool %d; token calls %d",
		reload.Round(time.Millisecond), timeout+2*time.Second, after, n, inPool, fake.Stats().RefreshCalls-before.RefreshCalls)
	if reload > timeout+2*time.Second {
		t.Errorf("the reload took %s, more than timeout + 2 s", reload)
	}
	if !after.is503("temporarily_unavailable") || string(raw) != string(planted) || fake.Stats().RefreshCalls != before.RefreshCalls {
		t.Errorf("after the reload, with the lease still held: %s; lease.json %s; %d token calls", after, raw, fake.Stats().RefreshCalls-before.RefreshCalls)
	}
	if n != 1 || inPool != 1 {
		t.Errorf("%d refreshers and %d pooled sources after the reload, want 1 and 1", n, inPool)
	}

	// The other instance releases its lease: the new source refreshes.
	releasePlanted(t, cfg.StorageDir)
	waitFor(t, 10*time.Second, "a 200 once the lease is released", func() bool { return timedGet(t, site).status == http.StatusOK })
	if st := fake.Stats(); st.RefreshCalls != before.RefreshCalls+1 || st.InvalidGrant != 0 {
		t.Errorf("token calls %d (want 1), invalid_grant %d", st.RefreshCalls-before.RefreshCalls, st.InvalidGrant)
	}
}

// `caddy reload` 20 times under load, in process: no failed request,
// exactly one refresher afterwards, and no goroutine growth. The reloads
// change what the token source does not depend on (grace_period,
// max_replay_body), so the source is shared by the overlapping configs.
// (A reload that replaces the source: TestReloadReplacingSourceClosesTokenConnections.)
//
// Caddy itself resets a few connections on a reload under load, with or
// without restream_auth: it listens with SO_REUSEPORT, and connections
// queued on the old config's socket are reset when it closes. A request
// whose connection is reset is therefore retried once (as any client
// would); a failed retry, and any completed answer other than 200, count
// as failures.
//
// Caddy's reverse_proxy also leaves each old config's upstream connections
// open after a reload (its default transport is not cleaned up; about one
// per worker per reload, with or without restream_auth). The goroutines
// are counted after the fake closes those connections, and the number left
// open is reported.
func TestReloadUnderLoad(t *testing.T) {
	skipIfShort(t, "20 reloads under load (about 8 s)")
	const (
		reloads = 20
		workers = 8
		// goroutineSlack allows for pooled connections that come and go; a
		// leak of one goroutine per reload exceeds it. certmagic's
		// keepLockfileFresh goroutines (one per storage lock, alive at least
		// 5 s after it) are counted apart.
		goroutineSlack = 10
	)
	fake := newFake(t, fakerestream.Options{AccessTTL: 2 * time.Second, Latency: 20 * time.Millisecond, Logf: func(string, ...any) {}})
	cfg := siteConfig{Port: testproc.Port(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(), Extra: "refresh_ahead 1s\ntimeout 5s", Global: "grace_period 300ms"}
	runInProcess(t, cfg.Caddyfile())
	url := cfg.profileURL()

	var ok, failed, resets atomic.Int64
	var firstBad atomic.Value
	load := func(stop <-chan struct{}) {
		var wg sync.WaitGroup
		for range workers {
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					status, body, err := get(client, url)
					if err != nil {
						resets.Add(1)
						status, body, err = get(client, url)
					}
					if err == nil && status == http.StatusOK {
						ok.Add(1)
						continue
					}
					failed.Add(1)
					firstBad.CompareAndSwap(nil, fmt.Sprintf("%d %s %v", status, body, err))
				}
			})
		}
		wg.Wait()
	}
	// Warm up the connection pools, then take the baseline.
	warm := make(chan struct{})
	time.AfterFunc(2*time.Second, func() { close(warm) })
	load(warm)
	fake.CloseAPIConnections()
	before, lockBefore := settledGoroutines(0, 0)

	stop := make(chan struct{})
	loaded := make(chan struct{})
	go func() { load(stop); close(loaded) }()
	stopLoad := sync.OnceFunc(func() { close(stop); <-loaded })
	defer stopLoad()
	start := time.Now()
	for i := range reloads {
		cfg.Global = fmt.Sprintf("grace_period %dms", 300+i)
		cfg.Extra = fmt.Sprintf("refresh_ahead 1s\ntimeout 5s\nmax_replay_body %dKiB", 512+i)
		loadInProcess(t, cfg.Caddyfile())
		time.Sleep(150 * time.Millisecond)
	}
	took := time.Since(start)
	stopLoad()

	n := refreshers(t)
	inPool := caddymodule.SourcesInPool()
	// settledGoroutines waits out the last old config's grace period and
	// cleanup: it polls until the count is back within the slack.
	client.CloseIdleConnections()
	upstreamConns := fake.Stats().OpenAPIConns
	fake.CloseAPIConnections()
	after, lockAfter := settledGoroutines(before, goroutineSlack)
	st := fake.Stats()
	t.Logf("reload: %d reloads in %s under %d workers: requests ok=%d failed=%d connection resets retried=%d; refreshers=%d sources in pool=%d; goroutines %d -> %d (slack %d; keepLockfileFresh %d -> %d; upstream connections Caddy left open, closed before counting: %d); fake: refreshes=%d invalid_grant=%d max concurrent refreshes=%d",
		reloads, took.Round(time.Millisecond), workers, ok.Load(), failed.Load(), resets.Load(), n, inPool, before, after, goroutineSlack,
		lockBefore, lockAfter, upstreamConns, st.RefreshCalls, st.InvalidGrant, st.MaxConcurrentRefresh)
	if failed.Load() != 0 {
		t.Errorf("%d requests failed; first: %v", failed.Load(), firstBad.Load())
	}
	if n != 1 || inPool != 1 {
		t.Errorf("%d refreshers and %d pooled sources after the reloads, want 1 and 1", n, inPool)
	}
	if after > before+goroutineSlack {
		var buf strings.Builder
		_ = pprof.Lookup("goroutine").WriteTo(&buf, 1)
		t.Errorf("goroutines grew from %d to %d over %d reloads\n%s", before, after, reloads, buf.String())
	}
	if st.InvalidGrant != 0 {
		t.Errorf("invalid_grant = %d", st.InvalidGrant)
	}
}

// settledGoroutines closes the test client's idle connections and counts
// goroutines, apart from certmagic's keepLockfileFresh ones (returned
// second), once the count is within slack of target or stops changing.
func settledGoroutines(target, slack int) (n, lockRefreshers int) {
	deadline := time.Now().Add(15 * time.Second)
	prev := -1
	for {
		client.CloseIdleConnections()
		time.Sleep(300 * time.Millisecond)
		n, lockRefreshers = countGoroutines()
		if target > 0 && n <= target+slack || target == 0 && n == prev || time.Now().After(deadline) {
			return n, lockRefreshers
		}
		prev = n
	}
}

func countGoroutines() (other, lockRefreshers int) {
	var buf strings.Builder
	_ = pprof.Lookup("goroutine").WriteTo(&buf, 2)
	for _, g := range strings.Split(buf.String(), "\n\n") {
		switch {
		case !strings.HasPrefix(strings.TrimSpace(g), "goroutine "):
		case strings.Contains(g, "certmagic.keepLockfileFresh"):
			lockRefreshers++
		default:
			other++
		}
	}
	return other, lockRefreshers
}

// A reload that changes what the token source depends on (here timeout)
// gives the new config a new source, and the old one is closed with the old
// config. Its kept-alive connection to the token endpoint must go with it.
func TestReloadReplacingSourceClosesTokenConnections(t *testing.T) {
	const replacements = 4
	fake := newFake(t, fakerestream.Options{Logf: func(string, ...any) {}})
	cfg := siteConfig{Port: testproc.Port(t), AdminPort: testproc.Port(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(), Global: "grace_period 100ms"}
	runInProcess(t, cfg.Caddyfile())
	url := cfg.profileURL()
	for i := range replacements + 1 {
		cfg.Extra = fmt.Sprintf("timeout %ds", 5+i) // a new source each time
		if i > 0 {
			loadInProcess(t, cfg.Caddyfile())
			// Force a token call by the new source. (Revoking the access
			// token would not do: a generation issued because of a 401 is
			// not replaced because of another 401 within 5 s, whichever
			// source sees it.)
			before := fake.Stats().RefreshCalls
			adminURL := fmt.Sprintf("http://127.0.0.1:%d/restream_auth/default/refresh", cfg.AdminPort)
			// Each load restarts the admin server: no kept-alive connection.
			resp, err := noKeepAlive.Post(adminURL, "", nil)
			if err != nil {
				t.Fatalf("forced refresh after reload %d: %v", i, err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK || fake.Stats().RefreshCalls != before+1 {
				t.Fatalf("forced refresh after reload %d: %d %s (token calls %d -> %d)", i, resp.StatusCode, body, before, fake.Stats().RefreshCalls)
			}
		}
		if status, body, _ := do(t, http.MethodGet, url, nil, nil); status != http.StatusOK {
			t.Fatalf("after reload %d: %d %s", i, status, body)
		}
	}
	if st := fake.Stats(); st.RefreshCalls < replacements+1 {
		t.Fatalf("only %d token calls: the sources did not all call the endpoint", st.RefreshCalls)
	}
	if n := refreshers(t); n != 1 {
		t.Fatalf("%d refreshers, want 1", n)
	}
	var open int64
	deadline := time.Now().Add(5 * time.Second)
	for open = fake.Stats().OpenTokenConns; open > 1 && time.Now().Before(deadline); open = fake.Stats().OpenTokenConns {
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("%d token sources replaced by reloads; connections to the token endpoint still open: %d", replacements, open)
	if open > 1 {
		t.Fatalf("%d connections to the token endpoint are open after %d sources were replaced, want at most 1 (the live source's)", open, replacements)
	}
}
