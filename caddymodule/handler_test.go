package caddymodule_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream/wstest"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"github.com/coder/websocket"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

func TestHeaderReplaced(t *testing.T) {
	fake := newFake(t, fakerestream.Options{})
	cfg := siteConfig{Port: testproc.Port(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed()}
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

// query_param puts the token in the query as well, replacing a client's
// value and leaving the other parameters as they were.
func TestQueryParamReplaced(t *testing.T) {
	fake := newFake(t, fakerestream.Options{Logf: func(string, ...any) {}})
	cfg := siteConfig{Port: testproc.Port(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(), Extra: "query_param accessToken"}
	runInProcess(t, cfg.Caddyfile())
	status, body, _ := do(t, http.MethodGet, "http://127.0.0.1:"+itoa(cfg.Port)+"/v2/user/profile?b=2&accessToken=from-client&a=x%20y&accessToken=again", nil, nil)
	if status != http.StatusOK {
		t.Fatalf("status %d %s", status, body)
	}
	e := decodeEcho(t, body)
	if !fake.ValidAccessToken(e.AccessTokenQuery) || e.Authorization != "Bearer "+e.AccessTokenQuery {
		t.Fatalf("upstream saw accessToken %.8q… and Authorization %.15q…", e.AccessTokenQuery, e.Authorization)
	}
	if want := "b=2&a=x%20y&accessToken=" + e.AccessTokenQuery; e.Query != want {
		t.Fatalf("query %q, want %q", e.Query, want)
	}
}

// Upstream answers that a refresh cannot fix: a second 401 and any 403 go to
// the client unchanged, a 403 never refreshes, and forced refreshes are rate-limited.
func TestUpstream401And403PassThrough(t *testing.T) {
	fake := newFake(t, fakerestream.Options{Logf: func(string, ...any) {}})
	var calls401, calls403 atomic.Int64
	upstream := startLocal(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
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

	cfg := siteConfig{Port: testproc.Port(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(),
		SiteExtra: "header X-Sidecar on", Upstream: upstream.URL}
	runInProcess(t, cfg.Caddyfile())
	base := "http://127.0.0.1:" + itoa(cfg.Port)

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

// With the token endpoint down and the token expired: 503, Retry-After and a
// JSON body that names the account and cause and holds no secret; recovery
// once the endpoint is back. A dead chain answers reauth_required.
func TestUnavailable503(t *testing.T) {
	skipIfShort(t, "waits for a 2-second token to expire")
	fake := newFake(t, fakerestream.Options{AccessTTL: 2 * time.Second, Logf: func(string, ...any) {}})
	seed := fake.Seed()
	cfg := siteConfig{Port: testproc.Port(t), StorageDir: t.TempDir(), Fake: fake, Seed: seed, Extra: "refresh_ahead 1s"}
	runInProcess(t, cfg.Caddyfile())
	url := cfg.profileURL()
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
	cfg := siteConfig{Port: testproc.Port(t), StorageDir: t.TempDir(), Fake: fake, Seed: "rt_never_issued_0123456789"}
	runInProcess(t, cfg.Caddyfile())
	url := cfg.profileURL()
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

// A restart with the original Caddyfile after rotations must not resend the
// spent seed; a never-seen seed starts a new chain.
func TestRestartStaleSeedAndNewSeed(t *testing.T) {
	skipIfShort(t, "waits for three rotations of 2-second tokens")
	fake := newFake(t, fakerestream.Options{AccessTTL: 2 * time.Second, Logf: func(string, ...any) {}})
	storageDir := t.TempDir()
	cfg := siteConfig{Port: testproc.Port(t), StorageDir: storageDir, Fake: fake, Seed: fake.Seed(), Extra: "refresh_ahead 1s"}
	url := cfg.profileURL()
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

// Eight workers for ten seconds with 2-second tokens: every response 200,
// no invalid_grant at the fake.
func TestRotationUnderLoad(t *testing.T) {
	skipIfShort(t, "10 s of load on 2-second tokens")
	fake := newFake(t, fakerestream.Options{AccessTTL: 2 * time.Second, Latency: 50 * time.Millisecond, Logf: func(string, ...any) {}})
	cfg := siteConfig{Port: testproc.Port(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(), Extra: "refresh_ahead 1s"}
	runInProcess(t, cfg.Caddyfile())
	url := "http://127.0.0.1:" + itoa(cfg.Port) + "/v2/user/channel/all"

	ok, failed := loadFor(t, []string{url}, 8, 10*time.Second)
	st := fake.Stats()
	t.Logf("requests ok=%d failed=%d; fake: refreshes=%d invalid_grant=%d api401=%d max concurrent refreshes=%d",
		ok, failed, st.RefreshCalls, st.InvalidGrant, st.API401, st.MaxConcurrentRefresh)
	if failed != 0 || st.InvalidGrant != 0 {
		t.Fatalf("want 0 failures and 0 invalid_grant")
	}
	if st.RefreshCalls < 5 {
		t.Fatalf("only %d refreshes in 10 s with 2 s tokens: the refresher is not rotating", st.RefreshCalls)
	}
	if st.MaxConcurrentRefresh != 1 {
		t.Fatalf("max concurrent refreshes %d, want 1", st.MaxConcurrentRefresh)
	}
}

// Secrets never reach a log line, even with DEBUG logs and `servers { trace }`,
// across rotations, replays and outages. Secrets come from {env.*} and
// {file.*} placeholders, as the README recommends: Caddy itself prints the
// whole config (literals included) in its DEBUG "adjusted config" line.
func TestNoSecretsInLogs(t *testing.T) {
	skipIfShort(t, "waits through rotations, a replay and an outage of 2-second tokens")
	fake := newFake(t, fakerestream.Options{AccessTTL: 2 * time.Second, ClientSecret: "cs_literal_secret_9f8e7d", Logf: func(string, ...any) {}})
	dir := t.TempDir()
	serverLog, accessLog := filepath.Join(dir, "server.log"), filepath.Join(dir, "access.log")
	port := testproc.Port(t)
	seed := fake.Seed()
	seedFile := filepath.Join(dir, "seed")
	if err := os.WriteFile(seedFile, []byte(seed+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("RESTREAM_TEST_CLIENT_SECRET", "cs_literal_secret_9f8e7d")
	caddyfileText := fmt.Sprintf(`{
	admin off
	storage file_system %s
	%s
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
`, filepath.Join(dir, "storage"), debugLogOptions(serverLog), port, accessLog, seedFile, fake.TokenURL(), fake.URL())
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
	logs := readFiles(t, serverLog, accessLog)
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

// revokeGrant revokes a refresh token at the fake (RFC 7009): the whole
// pair dies, so its access token is rejected upstream and its refresh
// token gets invalid_grant.
func revokeGrant(t *testing.T, fake *fakerestream.Server, refreshToken string) {
	t.Helper()
	form := url.Values{"token": {refreshToken}, "token_type_hint": {"refresh_token"}}
	req, _ := http.NewRequest(http.MethodPost, fake.URL()+"/oauth/revoke", strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth("test-client", "test-secret")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("revoke: %d", resp.StatusCode)
	}
}

// Terminal: the grant is revoked, so the upstream answers 401 and
// the refresh that follows gets invalid_grant. The request that met the
// 401 gets 503 reauth_required, not the upstream's 401; from then on the
// rejected token is never sent again: every request gets 503
// reauth_required at once, without reaching the upstream.
func TestRejectedAndDeadChainAnswers503(t *testing.T) {
	fake := newFake(t, fakerestream.Options{Logf: quiet})
	cfg := siteConfig{Port: testproc.Port(t), AdminPort: testproc.Port(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(), Extra: "timeout 2s"}
	site := runWarmedUp(t, cfg)
	rec, err := tokensource.LoadRecord(context.Background(), &certmagic.FileStorage{Path: cfg.StorageDir}, "default")
	if err != nil || rec == nil {
		t.Fatalf("stored record: %v", err)
	}
	revokeGrant(t, fake, rec.RefreshToken)
	before := fake.Stats()

	first := timedGet(t, site)
	if !first.is503("reauth_required") || !strings.Contains(string(first.body), "re-authorize") {
		t.Fatalf("the request whose token was rejected, after a terminal refresh: %s, want 503 reauth_required", first)
	}
	const n = 20
	var slowest time.Duration
	for range n {
		got := timedGet(t, site)
		slowest = max(slowest, got.took)
		if !got.is503("reauth_required") {
			t.Fatalf("after the chain was declared dead: %s, want 503 reauth_required", got)
		}
	}
	st := fake.Stats()
	t.Logf("terminal: first answer %s; %d more answers 503 reauth_required, slowest %s; fake: upstream 401s %d, token calls %d, invalid_grant %d",
		first, n, slowest.Round(time.Millisecond), st.API401-before.API401, st.RefreshCalls-before.RefreshCalls, st.InvalidGrant)
	if slowest > 500*time.Millisecond {
		t.Errorf("an answer took %s: reauth_required should come at once", slowest)
	}
	if st.API401-before.API401 != 1 || st.RefreshCalls-before.RefreshCalls != 1 || st.InvalidGrant != 1 {
		t.Errorf("fake: upstream 401s %d, token calls %d, invalid_grant %d; want 1, 1, 1 (the rejected token and the dead refresh token each sent once)",
			st.API401-before.API401, st.RefreshCalls-before.RefreshCalls, st.InvalidGrant)
	}
	if s := adminStatus(t, fmt.Sprintf("http://127.0.0.1:%d", cfg.AdminPort))["default"]; s.State != "reauth_required" {
		t.Errorf("admin status: %+v", s)
	}
}

// Transient: the access token is revoked (the grant stays valid)
// and the token endpoint answers 500 during the refresh that the 401
// forces. The client gets 503 with Retry-After, not the upstream's 401;
// once the endpoint works again, 200.
func TestRejectedAndFailedRefreshAnswers503(t *testing.T) {
	skipIfShort(t, "waits through the token endpoint's backoff (about 3 s)")
	fake := newFake(t, fakerestream.Options{Logf: quiet})
	cfg := siteConfig{Port: testproc.Port(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(), Extra: "timeout 2s"}
	site := runWarmedUp(t, cfg)
	fake.RevokeAccessTokens()
	fake.SetFault(fakerestream.Fault500)
	before := fake.Stats()
	var answers []string
	for range 5 {
		got := timedGet(t, site)
		answers = append(answers, got.key())
		if !got.is503("temporarily_unavailable") || !strings.Contains(string(got.body), "500") || got.took > 3*time.Second {
			t.Fatalf("after a 401 and a failed refresh: %s, want 503 temporarily_unavailable naming the 500, with Retry-After", got)
		}
		time.Sleep(300 * time.Millisecond)
	}
	during := fake.Stats()
	fake.SetFault(fakerestream.FaultNone)
	cleared := time.Now()
	waitFor(t, 10*time.Second, "a 200 once the endpoint works", func() bool { return timedGet(t, site).status == http.StatusOK })
	st := fake.Stats()
	t.Logf("transient: answers during the fault %v; token calls during it %d; 200 %s after it cleared; invalid_grant %d",
		answers, during.RefreshCalls-before.RefreshCalls, time.Since(cleared).Round(time.Millisecond), st.InvalidGrant)
	if during.RefreshCalls == before.RefreshCalls || st.InvalidGrant != 0 {
		t.Errorf("token calls during the fault %d (want some), invalid_grant %d", during.RefreshCalls-before.RefreshCalls, st.InvalidGrant)
	}
}

// With query_param the token reaches the upstream in the query, for a plain
// request and for a websocket upgrade, yet no token appears in Caddy's DEBUG
// log (reverse_proxy's "upstream roundtrip" logs r.RequestURI as "uri") or
// in the access log: both show the URI as the client sent it.
func TestQueryParamTokenNotInDebugLogs(t *testing.T) {
	fake := newFake(t, fakerestream.Options{})
	ws := fakerestream.NewWebsocket(fake)
	t.Cleanup(ws.Close)
	dir := t.TempDir()
	debugLog, accessLog := filepath.Join(dir, "debug.log"), filepath.Join(dir, "access.log")
	// /ws goes to the fake websocket, anything else to the fake API; both
	// are logged, at DEBUG and in the access log.
	cfg := siteConfig{Port: testproc.Port(t), StorageDir: filepath.Join(dir, "storage"), Fake: fake, Seed: fake.Seed(),
		LogFile: debugLog, Extra: "query_param accessToken", SiteExtra: "log {\noutput file " + accessLog + "\n}\nreverse_proxy /ws " + ws.URL()}
	runInProcess(t, cfg.Caddyfile())
	addr := "127.0.0.1:" + itoa(cfg.Port)
	const bogus = "client-supplied-bogus"

	// (1) A plain GET: the upstream sees the token in the header and in the
	// one accessToken parameter.
	status, body, _ := do(t, http.MethodGet, "http://"+addr+"/v2/user/profile?a=1&accessToken="+bogus, nil, nil)
	if status != http.StatusOK {
		t.Fatalf("plain GET: %d %s", status, body)
	}
	e := decodeEcho(t, body)
	if !fake.ValidAccessToken(e.AccessTokenQuery) || e.Authorization != "Bearer "+e.AccessTokenQuery || e.Query != "a=1&accessToken="+e.AccessTokenQuery {
		t.Fatalf("plain GET: upstream saw accessToken %.9q…, Authorization %.16q…, %d accessToken parameter(s)",
			e.AccessTokenQuery, e.Authorization, strings.Count(e.Query, "accessToken="))
	}

	// (2) A websocket upgrade: the fake accepts the handshake only with a
	// valid token in the query.
	ctx := wsTestCtx(t)
	c, id := wsDial(t, ctx, "ws://"+addr+"/ws?x=1&accessToken="+bogus)
	wstest.Echo(t, ctx, c, "through the sidecar")
	if got := wsTokenOf(t, ws, id); got != e.AccessTokenQuery {
		t.Fatalf("the websocket upstream saw %.9q…, want the sidecar's token", got)
	}
	if err := c.Close(websocket.StatusNormalClosure, ""); err != nil {
		t.Fatalf("closing the websocket: %v", err)
	}
	if n := ws.Refused(); n != 0 {
		t.Fatalf("the websocket upstream refused %d handshakes", n)
	}

	// The upgrade is access-logged when its handler returns, after the
	// connection has closed; Caddy offers no signal for that.
	waitFor(t, 10*time.Second, "the access log line of the upgrade", func() bool {
		b, _ := os.ReadFile(accessLog)
		return strings.Count(string(b), `"msg":"handled request"`) >= 2
	})
	if err := caddy.Stop(); err != nil { // flush and close the logs
		t.Fatal(err)
	}

	read := func(name string) string {
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	debug, access := read(debugLog), read(accessLog)
	// The logs do carry the URIs (so a token in one would be seen): both
	// requests' "upstream roundtrip" lines and access log lines, each with
	// the query the client sent.
	for _, uri := range []string{`"uri":"/v2/user/profile?a=1&accessToken=` + bogus + `"`, `"uri":"/ws?x=1&accessToken=` + bogus + `"`} {
		if !hasLineWith(debug, `"msg":"upstream roundtrip"`, uri) {
			t.Errorf("DEBUG log has no upstream roundtrip line with %s", uri)
		}
		if !hasLineWith(access, `"msg":"handled request"`, uri) {
			t.Errorf("access log has no line with %s", uri)
		}
	}
	secrets := append(fake.IssuedTokens(), "test-secret")
	mustContainNone(t, "DEBUG log", debug, secrets...)
	mustContainNone(t, "access log", access, secrets...)
	t.Logf("checked %d bytes of DEBUG log and %d of access log against %d secrets", len(debug), len(access), len(secrets))
}

// hasLineWith tells whether some line of text contains all of subs.
func hasLineWith(text string, subs ...string) bool {
	for line := range strings.SplitSeq(text, "\n") {
		all := true
		for _, s := range subs {
			all = all && strings.Contains(line, s)
		}
		if all {
			return true
		}
	}
	return false
}
