package caddymodule_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/caddymodule"
	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
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

// After the fake revokes every access token, 300 concurrent POSTs with
// distinct bodies all meet a 401 with the same generation: exactly one refresh,
// every request replayed with its body intact.
func TestRevokedTokenConcurrentPostsReplayOnce(t *testing.T) {
	fake := newFake(t, fakerestream.Options{Latency: 100 * time.Millisecond, Logf: func(string, ...any) {}})
	cfg := siteConfig{Port: freePort(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed()}
	runInProcess(t, cfg.Caddyfile())
	url := "http://127.0.0.1:" + itoa(cfg.Port) + "/v2/user/channel-meta/42"
	if status, body, _ := do(t, http.MethodGet, url, nil, nil); status != http.StatusOK {
		t.Fatalf("warm-up: %d %s", status, body)
	}
	before := fake.Stats()
	fake.RevokeAccessTokens()

	const n = 300
	var wg sync.WaitGroup
	var failed atomic.Int64
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := []byte(strings.Repeat(fmt.Sprintf("body-%d;", i), 50+i))
			status, resp, hdr := do(t, http.MethodPost, url, body, map[string]string{"Content-Type": "text/plain"})
			if status != http.StatusOK {
				failed.Add(1)
				t.Errorf("request %d: status %d: %s", i, status, resp)
				return
			}
			e := decodeEcho(t, resp)
			sum := sha256.Sum256(body)
			if e.BodySHA256 != hex.EncodeToString(sum[:]) || e.BodyLen != len(body) || e.Method != http.MethodPost {
				t.Errorf("request %d: upstream saw %s %d bytes sha %s, want POST %d bytes", i, e.Method, e.BodyLen, e.BodySHA256, len(body))
			}
			if cl := hdr.Values("Content-Length"); len(cl) > 1 {
				t.Errorf("request %d: duplicate Content-Length %v", i, cl)
			}
		}()
	}
	wg.Wait()
	after := fake.Stats()
	t.Logf("%d POSTs: failed=%d; upstream 401s=%d; refreshes=%d; invalid_grant=%d",
		n, failed.Load(), after.API401-before.API401, after.RefreshCalls-before.RefreshCalls, after.InvalidGrant)
	if got := after.RefreshCalls - before.RefreshCalls; got != 1 {
		t.Fatalf("refreshes after revocation = %d, want exactly 1", got)
	}
	if after.InvalidGrant != 0 {
		t.Fatalf("invalid_grant = %d", after.InvalidGrant)
	}
}

// Upstream answers that a refresh cannot fix: a second 401 and any 403 go to
// the client unchanged, a 403 never refreshes, and forced refreshes are rate-limited.
func TestUpstream401And403PassThrough(t *testing.T) {
	fake := newFake(t, fakerestream.Options{Logf: func(string, ...any) {}})
	var calls401, calls403 atomic.Int64
	upstream := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Upstream", "yes")
		switch r.URL.Path {
		case "/always401":
			calls401.Add(1)
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, `{"error":{"statusCode":401,"name":"invalid_token"}}`)
		case "/forbidden":
			calls403.Add(1)
			w.WriteHeader(http.StatusForbidden)
			io.WriteString(w, `{"error":{"statusCode":403,"name":"insufficient_scope"}}`)
		}
	}))
	upstream.Listener, _ = net.Listen("tcp", "127.0.0.1:0")
	upstream.Start()
	t.Cleanup(upstream.Close)

	port := freePort(t)
	caddyfileText := fmt.Sprintf(`{
	admin off
	storage file_system %s
}
http://127.0.0.1:%d {
	header X-Sidecar on
	restream_auth {
		client_id test-client
		client_secret test-secret
		refresh_token %s
		token_url %s
	}
	reverse_proxy %s
}
`, t.TempDir(), port, fake.Seed(), fake.TokenURL(), upstream.URL)
	runInProcess(t, caddyfileText)
	base := "http://127.0.0.1:" + itoa(port)

	status, body, hdr := do(t, http.MethodPost, base+"/always401", []byte("payload"), nil)
	if status != http.StatusUnauthorized || !strings.Contains(string(body), "invalid_token") {
		t.Fatalf("want the upstream's 401 body, got %d %s", status, body)
	}
	if calls401.Load() != 2 {
		t.Fatalf("upstream saw %d attempts, want 2 (original + one replay)", calls401.Load())
	}
	for _, h := range []string{"Content-Length", "X-Upstream", "X-Sidecar", "Content-Type"} {
		if v := hdr.Values(h); len(v) != 1 {
			t.Errorf("header %s = %q, want exactly one value", h, v)
		}
	}
	refreshes := fake.Stats().RefreshCalls
	if refreshes != 2 { // the seed, then one forced refresh
		t.Fatalf("refresh calls = %d, want 2 (seed + one forced)", refreshes)
	}
	// Within ForcedRefreshInterval another 401 must not rotate the chain again.
	for range 5 {
		if status, _, _ := do(t, http.MethodGet, base+"/always401", nil, nil); status != http.StatusUnauthorized {
			t.Fatalf("status %d", status)
		}
	}
	if got := fake.Stats().RefreshCalls; got != refreshes {
		t.Fatalf("401 storm rotated the chain: %d refresh calls, want %d", got, refreshes)
	}
	status, body, _ = do(t, http.MethodGet, base+"/forbidden", nil, nil)
	if status != http.StatusForbidden || !strings.Contains(string(body), "insufficient_scope") || calls403.Load() != 1 {
		t.Fatalf("403: status %d body %s upstream calls %d", status, body, calls403.Load())
	}
	if got := fake.Stats().RefreshCalls; got != refreshes {
		t.Fatalf("a 403 triggered a refresh")
	}
}

// A restart with the original Caddyfile after rotations must not resend the
// spent seed; a never-seen seed starts a new chain.
func TestRestartStaleSeedAndNewSeed(t *testing.T) {
	fake := newFake(t, fakerestream.Options{AccessTTL: 2 * time.Second, Logf: func(string, ...any) {}})
	storageDir := t.TempDir()
	cfg := siteConfig{Port: freePort(t), StorageDir: storageDir, Fake: fake, Seed: fake.Seed(), Extra: "refresh_ahead 1s"}
	url := "http://127.0.0.1:" + itoa(cfg.Port) + "/v2/user/profile"
	st := &certmagic.FileStorage{Path: storageDir}

	inProcessMu.Lock()
	defer inProcessMu.Unlock()
	loadInProcess(t, cfg.Caddyfile())
	waitFor(t, 15*time.Second, "three rotations", func() bool { return fake.Stats().RefreshOK >= 3 })
	if status, body, _ := do(t, http.MethodGet, url, nil, nil); status != http.StatusOK {
		t.Fatalf("status %d %s", status, body)
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	rec1, err := tokensource.LoadRecord(context.Background(), st, "default")
	if err != nil || rec1 == nil {
		t.Fatalf("stored record: %v %v", rec1, err)
	}

	// Restart with the very same Caddyfile: the seed is spent.
	loadInProcess(t, cfg.Caddyfile())
	for range 20 {
		if status, body, _ := do(t, http.MethodGet, url, nil, nil); status != http.StatusOK {
			t.Fatalf("after restart: status %d %s", status, body)
		}
	}
	if ig := fake.Stats().InvalidGrant; ig != 0 {
		t.Fatalf("restart with a stale seed caused %d invalid_grant", ig)
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}

	// A new seed (the user re-authorized): a new chain, generations keep
	// growing. The refresher exchanges the seed in the background; until
	// then the stored pair, still valid, is served.
	cfg.Seed = fake.Seed()
	loadInProcess(t, cfg.Caddyfile())
	defer caddy.Stop()
	if status, body, _ := do(t, http.MethodGet, url, nil, nil); status != http.StatusOK {
		t.Fatalf("after new seed: status %d %s", status, body)
	}
	var rec2 *tokensource.Record
	waitFor(t, 10*time.Second, "the new seed's chain in storage", func() bool {
		rec2, err = tokensource.LoadRecord(context.Background(), st, "default")
		return err == nil && rec2 != nil && rec2.Chain != rec1.Chain
	})
	if status, body, _ := do(t, http.MethodGet, url, nil, nil); status != http.StatusOK {
		t.Fatalf("on the new chain: status %d %s", status, body)
	}
	if rec2.Generation <= rec1.Generation || len(rec2.ConsumedSeeds) != 2 || rec2.ConsumedSeeds[1] != tokensource.Fingerprint(cfg.Seed) {
		t.Fatalf("new seed did not start a new chain: generation %d -> %d, consumed seeds %d", rec1.Generation, rec2.Generation, len(rec2.ConsumedSeeds))
	}
	if ig := fake.Stats().InvalidGrant; ig != 0 {
		t.Fatalf("invalid_grant = %d", ig)
	}
}

// Two Caddy processes share one storage directory under load with 2-second
// tokens: no failed request and no invalid_grant; once more with the record
// encrypted at rest, where the storage must never hold a token in the clear.
func TestTwoProcessesShareStorage(t *testing.T) {
	if testing.Short() {
		t.Skip("starts two Caddy processes")
	}
	t.Run("plain", func(t *testing.T) { twoProcesses(t, "") })
	t.Run("encrypted", func(t *testing.T) {
		t.Setenv("RESTREAM_TEST_ENCRYPTION_KEY", base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{7}, 32)))
		twoProcesses(t, "encryption_key {env.RESTREAM_TEST_ENCRYPTION_KEY}")
	})
}

func twoProcesses(t *testing.T, extra string) {
	fake := newFake(t, fakerestream.Options{AccessTTL: 2 * time.Second, Latency: 100 * time.Millisecond, LatencyJitter: 200 * time.Millisecond, Logf: func(string, ...any) {}})
	storageDir := t.TempDir()
	seed := fake.Seed()
	var urls []string
	for range 2 {
		cfg := siteConfig{Port: freePort(t), StorageDir: storageDir, Fake: fake, Seed: seed, Extra: "refresh_ahead 1s\n" + extra}
		p := startProcess(t, cfg.Caddyfile())
		u := "http://127.0.0.1:" + itoa(cfg.Port) + "/v2/user/profile"
		waitReady(t, u, p)
		urls = append(urls, u)
	}
	var ok, bad atomic.Int64
	deadline := time.Now().Add(10 * time.Second)
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				status, body, _ := do(t, http.MethodGet, urls[w%2], nil, nil)
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
	t.Logf("two processes: ok=%d failed=%d; fake: refreshes=%d invalid_grant=%d max concurrent refreshes=%d upstream 401s=%d",
		ok.Load(), bad.Load(), st.RefreshCalls, st.InvalidGrant, st.MaxConcurrentRefresh, st.API401)
	if bad.Load() != 0 || st.InvalidGrant != 0 || st.MaxConcurrentRefresh != 1 {
		t.Fatalf("want 0 failures, 0 invalid_grant, 1 concurrent refresh at most")
	}
	if st.RefreshCalls < 5 {
		t.Fatalf("only %d refreshes in 10 s of 2 s tokens", st.RefreshCalls)
	}
	raw, err := os.ReadFile(filepath.Join(storageDir, "restream_auth", "default", "token.json"))
	if err != nil {
		t.Fatal(err)
	}
	if extra != "" {
		if !bytes.Contains(raw, []byte(`"aes-256-gcm"`)) {
			t.Fatalf("record not encrypted: %.80s", raw)
		}
		mustContainNone(t, "encrypted record", string(raw), fake.IssuedTokens()...)
	}
}

// A config reload keeps exactly one refresher per account and serves
// requests throughout.
func TestReloadKeepsOneRefresher(t *testing.T) {
	fake := newFake(t, fakerestream.Options{AccessTTL: 2 * time.Second, Logf: func(string, ...any) {}})
	cfg := siteConfig{Port: freePort(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(), Extra: "refresh_ahead 1s"}
	runInProcess(t, cfg.Caddyfile())
	url := "http://127.0.0.1:" + itoa(cfg.Port) + "/v2/user/profile"
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

// With the token endpoint down and the token expired: 503, Retry-After and a
// JSON body that names the account and cause and holds no secret; recovery
// once the endpoint is back. A dead chain answers reauth_required.
func TestUnavailable503(t *testing.T) {
	fake := newFake(t, fakerestream.Options{AccessTTL: 2 * time.Second, Logf: func(string, ...any) {}})
	seed := fake.Seed()
	cfg := siteConfig{Port: freePort(t), StorageDir: t.TempDir(), Fake: fake, Seed: seed, Extra: "refresh_ahead 1s"}
	runInProcess(t, cfg.Caddyfile())
	url := "http://127.0.0.1:" + itoa(cfg.Port) + "/v2/user/profile"
	if status, _, _ := do(t, http.MethodGet, url, nil, nil); status != http.StatusOK {
		t.Fatalf("status %d", status)
	}
	fake.SetDown(http.StatusBadGateway)
	var body []byte
	var hdr http.Header
	waitFor(t, 10*time.Second, "a 503 once the token expired", func() bool {
		var status int
		status, body, hdr = do(t, http.MethodGet, url, nil, nil)
		return status == http.StatusServiceUnavailable
	})
	var e struct{ Error, ErrorDescription string }
	if err := json.Unmarshal(body, &struct {
		Error            *string `json:"error"`
		ErrorDescription *string `json:"error_description"`
	}{&e.Error, &e.ErrorDescription}); err != nil {
		t.Fatalf("503 body is not JSON: %s", body)
	}
	if e.Error != "temporarily_unavailable" || !strings.Contains(e.ErrorDescription, `"default"`) || !strings.Contains(e.ErrorDescription, "502") {
		t.Fatalf("503 body does not name the account and cause: %s", body)
	}
	if ra, err := strconv.Atoi(hdr.Get("Retry-After")); err != nil || ra < 1 || ra > 120 {
		t.Fatalf("Retry-After = %q", hdr.Get("Retry-After"))
	}
	mustContainNone(t, "503 body", string(body), "test-secret", seed)
	t.Logf("503 body: %s (Retry-After %s)", body, hdr.Get("Retry-After"))

	fake.SetDown(0)
	waitFor(t, 10*time.Second, "recovery after the endpoint came back", func() bool {
		status, _, _ := do(t, http.MethodGet, url, nil, nil)
		return status == http.StatusOK
	})
}

func TestDeadSeedAnswersReauthRequired(t *testing.T) {
	fake := newFake(t, fakerestream.Options{Logf: func(string, ...any) {}})
	cfg := siteConfig{Port: freePort(t), StorageDir: t.TempDir(), Fake: fake, Seed: "rt_never_issued_0123456789"}
	runInProcess(t, cfg.Caddyfile())
	url := "http://127.0.0.1:" + itoa(cfg.Port) + "/v2/user/profile"
	for range 5 {
		status, body, hdr := do(t, http.MethodGet, url, nil, nil)
		if status != http.StatusServiceUnavailable || !strings.Contains(string(body), `"reauth_required"`) || !strings.Contains(string(body), "re-authorize") || hdr.Get("Retry-After") == "" {
			t.Fatalf("status %d %s", status, body)
		}
		mustContainNone(t, "503 body", string(body), "test-secret", cfg.Seed)
	}
	if st := fake.Stats(); st.RefreshCalls != 1 || st.InvalidGrant != 1 {
		t.Fatalf("a dead seed must be sent once: %+v", st)
	}
}

// Secrets never reach a log line, even with DEBUG logs and `servers { trace }`,
// across rotations, replays and outages. Secrets come from {env.*} and
// {file.*} placeholders, as the README recommends: Caddy itself prints the
// whole config (literals included) in its DEBUG "adjusted config" line.
func TestNoSecretsInLogs(t *testing.T) {
	fake := newFake(t, fakerestream.Options{AccessTTL: 2 * time.Second, ClientSecret: "cs_literal_secret_9f8e7d", Logf: func(string, ...any) {}})
	dir := t.TempDir()
	serverLog, accessLog := filepath.Join(dir, "server.log"), filepath.Join(dir, "access.log")
	port := freePort(t)
	seed := fake.Seed()
	seedFile := filepath.Join(dir, "seed")
	if err := os.WriteFile(seedFile, []byte(seed+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("RESTREAM_TEST_CLIENT_SECRET", "cs_literal_secret_9f8e7d")
	caddyfileText := fmt.Sprintf(`{
	admin off
	storage file_system %s
	log {
		output file %s
		level DEBUG
	}
	servers {
		trace
	}
}

http://127.0.0.1:%d {
	log {
		output file %s
	}
	restream_auth {
		client_id test-client
		client_secret {env.RESTREAM_TEST_CLIENT_SECRET}
		refresh_token {file.%s}
		token_url %s
		refresh_ahead 1s
	}
	reverse_proxy %s
}
`, filepath.Join(dir, "storage"), serverLog, port, accessLog, seedFile, fake.TokenURL(), fake.URL())
	runInProcess(t, caddyfileText)
	url := "http://127.0.0.1:" + itoa(port) + "/v2/user/profile"
	get := func() int {
		status, _, _ := do(t, http.MethodGet, url, nil, map[string]string{"Authorization": "Bearer client-secret-should-not-matter"})
		return status
	}
	waitFor(t, 15*time.Second, "two rotations", func() bool { get(); return fake.Stats().RefreshOK >= 3 })
	// Replay path. A rotation racing the revocation can leave the replay's
	// newer token revoked too; its 401 then passes through, so allow a retry.
	fake.RevokeAccessTokens()
	waitFor(t, 5*time.Second, "a 200 after revocation", func() bool { return get() == http.StatusOK })
	fake.SetDown(http.StatusInternalServerError) // error path
	waitFor(t, 10*time.Second, "a 503", func() bool { return get() == http.StatusServiceUnavailable })
	fake.SetDown(0)
	waitFor(t, 10*time.Second, "recovery", func() bool { return get() == http.StatusOK })
	if err := caddy.Stop(); err != nil { // flush logs
		t.Fatal(err)
	}
	logs := ""
	for _, f := range []string{serverLog, accessLog} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		logs += string(b)
	}
	for _, want := range []string{"refreshed token pair", "token refresh failed; retrying", `"restream_auth"`, "replaying request after 401"} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %q: the test would not see a leak there", want)
		}
	}
	secrets := append(fake.IssuedTokens(), "cs_literal_secret_9f8e7d", seed, "client-secret-should-not-matter")
	mustContainNone(t, "logs", logs, secrets...)
	if os.Getenv("LEAKDUMP") != "" {
		_ = os.WriteFile(os.Getenv("LEAKDUMP"), []byte(logs), 0o600)
	}
	t.Logf("checked %d bytes of logs against %d secrets", len(logs), len(secrets))
}

// query_param puts the token in the query as well, replacing a client's
// value and leaving the other parameters as they were.
func TestQueryParamReplaced(t *testing.T) {
	fake := newFake(t, fakerestream.Options{Logf: func(string, ...any) {}})
	cfg := siteConfig{Port: freePort(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(), Extra: "query_param accessToken"}
	runInProcess(t, cfg.Caddyfile())
	status, body, _ := do(t, http.MethodGet, "http://127.0.0.1:"+itoa(cfg.Port)+"/v2/user/profile?b=2&accessToken=from-client&a=x%20y&accessToken=again", nil, nil)
	if status != http.StatusOK {
		t.Fatalf("status %d %s", status, body)
	}
	e := decodeEcho(t, body)
	if !fake.ValidAccessToken(e.AccessTokenQ) || e.Authorization != "Bearer "+e.AccessTokenQ {
		t.Fatalf("upstream saw accessToken %.8q… and Authorization %.15q…", e.AccessTokenQ, e.Authorization)
	}
	if want := "b=2&a=x%20y&accessToken=" + e.AccessTokenQ; e.Query != want {
		t.Fatalf("query %q, want %q", e.Query, want)
	}
}

// A body over max_replay_body is streamed, not buffered: its 401 passes
// through after one attempt, while a body within the limit is replayed.
func TestLargeBodyNotReplayed(t *testing.T) {
	fake := newFake(t, fakerestream.Options{Logf: func(string, ...any) {}})
	var attempts atomic.Int64
	upstream := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		attempts.Add(1)
		w.Header().Set("X-Body-Len", strconv.FormatInt(n, 10))
		w.WriteHeader(http.StatusUnauthorized)
	}))
	upstream.Listener, _ = net.Listen("tcp", "127.0.0.1:0")
	upstream.Start()
	t.Cleanup(upstream.Close)
	port := freePort(t)
	runInProcess(t, fmt.Sprintf(`{
	admin off
	storage file_system %s
}

http://127.0.0.1:%d {
	restream_auth {
		client_id test-client
		client_secret test-secret
		refresh_token %s
		token_url %s
		max_replay_body 1KiB
	}
	reverse_proxy %s
}
`, t.TempDir(), port, fake.Seed(), fake.TokenURL(), upstream.URL))
	url := "http://127.0.0.1:" + itoa(port) + "/v2/user/channel/1"
	for _, tc := range []struct {
		size, attempts int
	}{{1024, 2}, {1025, 1}} {
		attempts.Store(0)
		status, _, hdr := do(t, http.MethodPatch, url, bytes.Repeat([]byte("x"), tc.size), nil)
		if status != http.StatusUnauthorized || attempts.Load() != int64(tc.attempts) || hdr.Get("X-Body-Len") != strconv.Itoa(tc.size) {
			t.Fatalf("%d-byte body: status %d, %d attempts (want %d), upstream read %s bytes", tc.size, status, attempts.Load(), tc.attempts, hdr.Get("X-Body-Len"))
		}
	}
}
