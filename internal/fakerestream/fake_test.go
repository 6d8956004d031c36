package fakerestream

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

type resp struct {
	status int
	header http.Header
	body   map[string]any
	raw    string
}

// call performs a request and decodes a JSON object body if there is one.
// It reports failures with Errorf (not Fatal) so goroutines may use it.
func call(t *testing.T, method, u, contentType, body string, hdr map[string]string) resp {
	t.Helper()
	req, err := http.NewRequest(method, u, strings.NewReader(body))
	if err != nil {
		t.Errorf("%s %s: %v", method, u, err)
		return resp{}
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Errorf("%s %s: %v", method, u, err)
		return resp{}
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Errorf("%s %s: read body: %v", method, u, err)
	}
	r := resp{status: res.StatusCode, header: res.Header, raw: string(b)}
	if len(b) > 0 && b[0] == '{' {
		if err := json.Unmarshal(b, &r.body); err != nil {
			t.Errorf("bad JSON %q: %v", b, err)
		}
	}
	return r
}

// Typed field accessors; they return zero values instead of panicking.
func (r resp) str(k string) string  { v, _ := r.body[k].(string); return v }
func (r resp) num(k string) float64 { v, _ := r.body[k].(float64); return v }
func (r resp) list(k string) []any  { v, _ := r.body[k].([]any); return v }

const form = "application/x-www-form-urlencoded"

// basicAuth returns an Authorization header for HTTP Basic client auth.
func basicAuth(id, secret string) map[string]string {
	req, _ := http.NewRequest("POST", "http://x", nil)
	req.SetBasicAuth(id, secret)
	return map[string]string{"Authorization": req.Header.Get("Authorization")}
}

// token posts f to the token endpoint with the default Basic credentials.
func token(t *testing.T, s *Server, f url.Values) resp {
	t.Helper()
	return call(t, "POST", s.TokenURL(), form, f.Encode(), basicAuth("test-client", "test-secret"))
}

func refresh(t *testing.T, s *Server, rt string) resp {
	t.Helper()
	return token(t, s, url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}})
}

func api(t *testing.T, s *Server, at string) resp {
	t.Helper()
	return call(t, "GET", s.URL()+"/v2/user/profile", "", "", map[string]string{"Authorization": "Bearer " + at})
}

func wantErr(t *testing.T, r resp, status int, code string) {
	t.Helper()
	if r.status != status || r.body["error"] != code {
		t.Fatalf("got %d %s, want %d %s", r.status, r.raw, status, code)
	}
}

func newServer(t *testing.T, o Options) *Server {
	o.Logf = t.Logf
	s := New(o)
	t.Cleanup(s.Close)
	return s
}

func TestRotation(t *testing.T) {
	s := newServer(t, Options{})
	at0, rt0 := s.SeedPair()
	if !strings.HasPrefix(at0, "at_") || !strings.HasPrefix(rt0, "rt_") {
		t.Fatalf("unexpected token shapes %q %q", at0, rt0)
	}
	if r := api(t, s, at0); r.status != 200 {
		t.Fatalf("seeded access token rejected: %d %s", r.status, r.raw)
	}

	r := refresh(t, s, rt0)
	if r.status != 200 {
		t.Fatalf("refresh: %d %s", r.status, r.raw)
	}
	if r.header.Get("Cache-Control") != "no-store" || !strings.HasPrefix(r.header.Get("Content-Type"), "application/json") {
		t.Errorf("bad headers: %v", r.header)
	}
	at1, rt1 := r.str("access_token"), r.str("refresh_token")
	if at1 == at0 || rt1 == rt0 || r.body["accessToken"] != at1 || r.body["refreshToken"] != rt1 {
		t.Fatalf("bad rotation body: %s", r.raw)
	}
	if r.body["token_type"] != "Bearer" || r.body["tokenType"] != "Bearer" || r.body["scope"] != Scope ||
		r.body["expires_in"] != 3600.0 || r.body["accessTokenExpiresIn"] != 3600.0 ||
		len(r.list("scopeJson")) != 4 {
		t.Errorf("bad token fields: %s", r.raw)
	}
	exp := int64(r.num("expires"))
	if d := exp - time.Now().Unix(); d < 3590 || d > 3610 || int64(r.num("accessTokenExpiresEpoch")) != exp {
		t.Errorf("bad expires %d", exp)
	}
	if at, err := time.Parse(time.RFC3339, r.str("accessTokenExpiresAt")); err != nil || at.Unix() != exp {
		t.Errorf("bad accessTokenExpiresAt %v: %v", r.body["accessTokenExpiresAt"], err)
	}

	// New pair works; old pair is dead on both sides.
	if r := api(t, s, at1); r.status != 200 {
		t.Fatalf("new access token rejected: %s", r.raw)
	}
	r = api(t, s, at0)
	if r.status != 401 || r.body["error"].(map[string]any)["name"] != "invalid_token" {
		t.Fatalf("old access token: %d %s", r.status, r.raw)
	}
	wantErr(t, refresh(t, s, rt0), 400, "invalid_grant")
	if got := s.CurrentAccessTokens(); got != 1 {
		t.Errorf("CurrentAccessTokens = %d, want 1", got)
	}
	// A separate chain is unaffected by rotating the first.
	rtB := s.Seed()
	if r := refresh(t, s, rt1); r.status != 200 {
		t.Fatal(r.raw)
	}
	if r := refresh(t, s, rtB); r.status != 200 {
		t.Fatal(r.raw)
	}
	st := s.Stats()
	if st.RefreshCalls != 4 || st.RefreshOK != 3 || st.InvalidGrant != 1 || st.APICalls != 3 || st.API401 != 1 {
		t.Errorf("stats %+v", st)
	}
}

func TestClientAuth(t *testing.T) {
	s := newServer(t, Options{ClientID: "id", ClientSecret: "sec"})
	basic := basicAuth
	f := func(extra ...string) string {
		v := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {s.Seed()}}
		for i := 0; i < len(extra); i += 2 {
			v.Set(extra[i], extra[i+1])
		}
		return v.Encode()
	}
	post := func(body string, hdr map[string]string) resp {
		return call(t, "POST", s.TokenURL(), form, body, hdr)
	}

	if r := post(f(), basic("id", "sec")); r.status != 200 {
		t.Fatalf("basic: %s", r.raw)
	}
	if r := post(f("client_id", "id", "client_secret", "sec"), nil); r.status != 200 {
		t.Fatalf("body: %s", r.raw)
	}
	if r := post(f("client_id", "id"), basic("id", "sec")); r.status != 200 {
		t.Fatalf("basic + agreeing client_id: %s", r.raw)
	}

	r := post(f(), basic("id", "wrong"))
	wantErr(t, r, 401, "invalid_client")
	if r.header.Get("WWW-Authenticate") != `Basic realm="restream"` || r.body["error_description"] != "Client authentication failed" {
		t.Errorf("bad basic failure: %v %s", r.header, r.raw)
	}
	r = post(f("client_id", "id", "client_secret", "wrong"), nil)
	wantErr(t, r, 400, "invalid_client")
	if r.header.Get("WWW-Authenticate") != "" {
		t.Errorf("unexpected WWW-Authenticate on body auth failure")
	}
	wantErr(t, post(f(), nil), 400, "invalid_client")
	wantErr(t, post(f("client_id", "other"), basic("id", "sec")), 401, "invalid_client")
	if st := s.Stats(); st.InvalidClient != 4 || st.RefreshOK != 3 {
		t.Errorf("stats %+v", st)
	}

	// Request shape errors.
	wantErr(t, call(t, "GET", s.TokenURL(), "", "", nil), 400, "invalid_request")
	wantErr(t, call(t, "POST", s.TokenURL(), "application/json", `{}`, basic("id", "sec")), 400, "invalid_request")
	wantErr(t, post("grant_type=refresh_token", basic("id", "sec")), 400, "invalid_request")
	wantErr(t, post("refresh_token=x", basic("id", "sec")), 400, "invalid_request")
	wantErr(t, post("grant_type=password", basic("id", "sec")), 400, "unsupported_grant_type")
}

func TestAuthorizationCode(t *testing.T) {
	s := newServer(t, Options{})
	const cb = "http://localhost/cb"
	exchange := func(code, redirect string) resp {
		return token(t, s, url.Values{"grant_type": {"authorization_code"}, "code": {code}, "redirect_uri": {redirect}})
	}
	code := s.IssueCode(cb)
	r := exchange(code, cb)
	if r.status != 200 || api(t, s, r.str("access_token")).status != 200 {
		t.Fatalf("exchange: %s", r.raw)
	}
	wantErr(t, exchange(code, cb), 400, "invalid_grant") // single use
	wantErr(t, exchange("code_bogus", cb), 400, "invalid_grant")
	code = s.IssueCode(cb)
	wantErr(t, exchange(code, "http://evil/cb"), 400, "invalid_grant")
	wantErr(t, exchange(code, cb), 400, "invalid_grant") // burned by the failed attempt
	wantErr(t, token(t, s, url.Values{"grant_type": {"authorization_code"}, "code": {s.IssueCode(cb)}}), 400, "invalid_request")
	if st := s.Stats(); st.CodeCalls != 6 || st.InvalidGrant != 4 {
		t.Errorf("stats %+v", st)
	}
}

func TestExpiry(t *testing.T) {
	var now atomic.Int64
	now.Store(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	clock := func() time.Time { return time.Unix(0, now.Load()) }
	advance := func(d time.Duration) { now.Add(int64(d)) }

	s := newServer(t, Options{AccessTTL: 1500 * time.Millisecond, RefreshTTL: 10 * time.Second, Now: clock})
	at, rt := s.SeedPair()
	r := refresh(t, s, rt)
	if r.status != 200 || r.body["expires_in"] != 2.0 || int64(r.num("expires")) != clock().Add(1500*time.Millisecond).Unix() {
		t.Fatalf("refresh: %s", r.raw)
	}
	if s.ValidAccessToken(at) {
		t.Fatal("rotated access token still valid")
	}
	at, rt = r.str("access_token"), r.str("refresh_token")

	advance(1499 * time.Millisecond)
	if api(t, s, at).status != 200 {
		t.Fatal("access token expired early")
	}
	advance(time.Millisecond)
	if api(t, s, at).status != 401 || s.CurrentAccessTokens() != 0 {
		t.Fatal("access token did not expire")
	}
	advance(8498 * time.Millisecond) // refresh token has 1ms left
	if r = refresh(t, s, rt); r.status != 200 {
		t.Fatalf("refresh with unexpired RT: %s", r.raw)
	}
	advance(10 * time.Second)
	wantErr(t, refresh(t, s, r.str("refresh_token")), 400, "invalid_grant")

	// Short TTLs still report expires_in >= 1.
	s2 := newServer(t, Options{AccessTTL: time.Millisecond, Now: clock})
	if r := refresh(t, s2, s2.Seed()); r.body["expires_in"] != 1.0 {
		t.Errorf("expires_in %v", r.body["expires_in"])
	}
}

func TestConcurrentRefreshSameToken(t *testing.T) {
	s := newServer(t, Options{Latency: 100 * time.Millisecond, LatencyJitter: 10 * time.Millisecond})
	rt := s.Seed()
	var wg sync.WaitGroup
	results := make([]resp, 2)
	for i := range results {
		wg.Go(func() { results[i] = refresh(t, s, rt) })
	}
	wg.Wait()
	ok, bad := 0, 0
	for _, r := range results {
		switch {
		case r.status == 200:
			ok++
		case r.status == 400 && r.body["error"] == "invalid_grant":
			bad++
		}
	}
	if ok != 1 || bad != 1 {
		t.Fatalf("want exactly one success and one invalid_grant, got %+v", results)
	}
	if st := s.Stats(); st.MaxConcurrentRefresh != 2 || st.RefreshCalls != 2 || st.RefreshOK != 1 || st.InvalidGrant != 1 {
		t.Errorf("stats %+v", st)
	}
}

func TestManyConcurrentChains(t *testing.T) {
	s := newServer(t, Options{LatencyJitter: 5 * time.Millisecond})
	var wg sync.WaitGroup
	for range 200 {
		wg.Go(func() {
			rt := s.Seed()
			for range 3 {
				r := refresh(t, s, rt)
				if r.status != 200 {
					t.Errorf("refresh: %s", r.raw)
					return
				}
				rt = r.str("refresh_token")
				if a := api(t, s, r.str("access_token")); a.status != 200 {
					t.Errorf("api: %s", a.raw)
				}
			}
		})
	}
	wg.Wait()
	if st := s.Stats(); st.RefreshOK != 600 || st.APICalls != 600 || st.MaxConcurrentRefresh < 2 {
		t.Errorf("stats %+v", st)
	}
	if n := s.CurrentAccessTokens(); n != 200 {
		t.Errorf("CurrentAccessTokens = %d, want 200", n)
	}
}

func TestRevoke(t *testing.T) {
	s := newServer(t, Options{})
	revoke := func(tok string) {
		t.Helper()
		r := call(t, "POST", s.URL()+"/oauth/revoke", form, url.Values{"token": {tok}, "token_type_hint": {"access_token"}}.Encode(),
			basicAuth("test-client", "test-secret"))
		if r.status != 200 || r.raw != "" {
			t.Fatalf("revoke: %d %q", r.status, r.raw)
		}
	}

	// Revoking the access token kills the refresh token too.
	at, rt := s.SeedPair()
	revoke(at)
	if s.ValidAccessToken(at) {
		t.Fatal("revoked access token valid")
	}
	wantErr(t, refresh(t, s, rt), 400, "invalid_grant")
	// And vice versa.
	at, rt = s.SeedPair()
	revoke(rt)
	if api(t, s, at).status != 401 {
		t.Fatal("access token of revoked pair still valid")
	}
	revoke("rt_unknown") // unknown tokens are fine

	// Bad client credentials are rejected.
	r := call(t, "POST", s.URL()+"/oauth/revoke", form, "token=x&client_id=test-client&client_secret=no", nil)
	wantErr(t, r, 400, "invalid_client")

	// RevokeAccessTokens keeps refresh tokens usable.
	at, rt = s.SeedPair()
	s.RevokeAccessTokens()
	if s.ValidAccessToken(at) || s.CurrentAccessTokens() != 0 {
		t.Fatal("access token survived RevokeAccessTokens")
	}
	r = refresh(t, s, rt)
	if r.status != 200 || !s.ValidAccessToken(r.str("access_token")) {
		t.Fatalf("refresh after RevokeAccessTokens: %s", r.raw)
	}
}

func TestSetDown(t *testing.T) {
	s := newServer(t, Options{})
	rt := s.Seed()
	s.SetDown(http.StatusServiceUnavailable)
	wantErr(t, refresh(t, s, rt), 503, "server_error")
	s.SetDown(0)
	if r := refresh(t, s, rt); r.status != 200 {
		t.Fatalf("after outage: %s", r.raw) // the outage must not have consumed the token
	}
	if st := s.Stats(); st.RefreshCalls != 2 || st.RefreshOK != 1 {
		t.Errorf("stats %+v", st)
	}
}

func TestAPI(t *testing.T) {
	s := newServer(t, Options{})
	for _, p := range []string{"/v2/platform/all", "/v2/server/all"} {
		r := call(t, "GET", s.URL()+p, "", "", nil)
		if r.status != 200 || !strings.HasPrefix(r.raw, "[") {
			t.Errorf("%s: %d %s", p, r.status, r.raw)
		}
	}

	at, _ := s.SeedPair()
	body := strings.Repeat("x", 1<<20)
	sum := sha256.Sum256([]byte(body))
	r := call(t, "PATCH", s.URL()+"/v2/user/channel/1?a=1&b=2", "text/plain", body, map[string]string{"Authorization": "Bearer " + at})
	if r.status != 200 || r.body["method"] != "PATCH" || r.body["path"] != "/v2/user/channel/1" || r.body["query"] != "a=1&b=2" ||
		r.body["body_sha256"] != hex.EncodeToString(sum[:]) || r.body["body_len"] != float64(len(body)) ||
		r.body["authorization"] != "Bearer "+at || r.body["access_token_query"] != "" {
		t.Fatalf("echo: %d %s", r.status, r.raw)
	}

	// Query parameter is used only without an Authorization header.
	r = call(t, "GET", s.URL()+"/v2/user/profile?accessToken="+at, "", "", nil)
	if r.status != 200 || r.body["access_token_query"] != at || r.body["authorization"] != "" {
		t.Fatalf("query token: %s", r.raw)
	}
	r = call(t, "GET", s.URL()+"/v2/user/profile?accessToken="+at, "", "", map[string]string{"Authorization": "Bearer at_wrong"})
	if r.status != 401 {
		t.Fatalf("header should win over query: %s", r.raw)
	}
	r = call(t, "POST", s.URL()+"/v2/user/profile", "", body, nil)
	e, _ := r.body["error"].(map[string]any)
	if r.status != 401 || e["statusCode"] != 401.0 || e["message"] != "Invalid token: access token is invalid" {
		t.Fatalf("missing token: %s", r.raw)
	}
	if st := s.Stats(); st.APICalls != 6 || st.API401 != 2 {
		t.Errorf("stats %+v", st)
	}
}

// post sends a refresh grant with its own client, returning transport errors
// instead of failing the test.
func post(c *http.Client, u, rt string) (int, http.Header, []byte, error) {
	req, err := http.NewRequest("POST", u, strings.NewReader(url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}}.Encode()))
	if err != nil {
		return 0, nil, nil, err
	}
	req.Header.Set("Content-Type", form)
	req.SetBasicAuth("test-client", "test-secret")
	res, err := c.Do(req)
	if err != nil {
		return 0, nil, nil, err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	return res.StatusCode, res.Header, b, err
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// mustStillWork checks that rt was not rotated by the faulted calls: it
// refreshes once, successfully.
func mustStillWork(t *testing.T, s *Server, rt string) {
	t.Helper()
	if r := refresh(t, s, rt); r.status != 200 {
		t.Fatalf("refresh token unusable after the fault: %d %s", r.status, r.raw)
	}
}

// Faults that answer at once: status, content type and body shape; none
// rotates, each is counted.
func TestFaultAnswers(t *testing.T) {
	for _, tc := range []struct {
		fault  Fault
		status int
		ctype  string
		check  func(h http.Header, b []byte) bool
	}{
		{Fault500, 500, "application/json", func(_ http.Header, b []byte) bool { return strings.Contains(string(b), `"error":"server_error"`) }},
		{FaultGarbage, 200, "application/json", func(_ http.Header, b []byte) bool { return len(b) > 0 && !json.Valid(b) }},
		{FaultHTML, 502, "text/html", func(_ http.Header, b []byte) bool {
			return strings.HasPrefix(string(b), "<!DOCTYPE html>") && strings.Contains(string(b), "502 Bad Gateway")
		}},
		{Fault429, 429, "application/json", func(h http.Header, b []byte) bool {
			return h.Get("Retry-After") == "2" && strings.Contains(string(b), "too_many_requests")
		}},
		{FaultHuge, 200, "application/json", func(_ http.Header, b []byte) bool {
			return len(b) == HugeBodyBytes && strings.HasPrefix(string(b), `{"access_token":"at_`)
		}},
	} {
		t.Run(tc.fault.String(), func(t *testing.T) {
			s := newServer(t, Options{})
			rt := s.Seed()
			s.SetFault(tc.fault)
			if s.Fault() != tc.fault {
				t.Fatalf("Fault() = %v", s.Fault())
			}
			for range 2 {
				status, h, b, err := post(http.DefaultClient, s.TokenURL(), rt)
				if err != nil {
					t.Fatal(err)
				}
				if status != tc.status || !strings.HasPrefix(h.Get("Content-Type"), tc.ctype) || !tc.check(h, b) {
					t.Fatalf("got %d %q %d bytes: %.200q", status, h.Get("Content-Type"), len(b), b)
				}
			}
			// The API and the token endpoint on URL() fail alike (only FaultRefuse tells them apart).
			if status, _, _, _ := post(http.DefaultClient, s.URL()+"/oauth/token", rt); status != tc.status {
				t.Fatalf("URL()/oauth/token: %d, want %d", status, tc.status)
			}
			s.SetFault(FaultNone)
			mustStillWork(t, s, rt)
			if st := s.Stats(); st.RefreshCalls != 4 || st.RefreshOK != 1 || st.FaultedCalls != 3 || st.InvalidGrant != 0 {
				t.Errorf("stats %+v", st)
			}
		})
	}
}

func TestFault429RetryAfter(t *testing.T) {
	s := newServer(t, Options{})
	s.SetFault(Fault429)
	s.SetRetryAfter(7)
	status, h, _, err := post(http.DefaultClient, s.TokenURL(), s.Seed())
	if err != nil || status != 429 || h.Get("Retry-After") != "7" {
		t.Fatalf("got %d Retry-After %q (%v)", status, h.Get("Retry-After"), err)
	}
}

// SetDown keeps working and wins over a fault.
func TestSetDownWinsOverFault(t *testing.T) {
	s := newServer(t, Options{})
	rt := s.Seed()
	s.SetFault(FaultHang)
	s.SetDown(503)
	wantErr(t, refresh(t, s, rt), 503, "server_error")
	s.SetDown(0)
	s.SetFault(FaultNone)
	mustStillWork(t, s, rt)
}

// A hang answers nothing while the client waits, is counted as a refresh
// call, never rotates, and ends when the client gives up.
func TestFaultHang(t *testing.T) {
	s := newServer(t, Options{})
	rt := s.Seed()
	s.SetFault(FaultHang)
	c := &http.Client{Timeout: 300 * time.Millisecond}
	start := time.Now()
	_, _, _, err := post(c, s.TokenURL(), rt)
	if err == nil || time.Since(start) < 300*time.Millisecond {
		t.Fatalf("want a client timeout, got %v after %s", err, time.Since(start))
	}
	waitUntil(t, "the hang to end with its client", func() bool { return s.Stats().Hanging == 0 })
	if st := s.Stats(); st.RefreshCalls != 1 || st.Hangs != 1 || st.FaultedCalls != 1 || st.RefreshOK != 0 {
		t.Errorf("stats %+v", st)
	}

	// Clearing the fault releases a waiting client with a 503, still without rotating.
	done := make(chan int)
	go func() {
		status, _, b, err := post(http.DefaultClient, s.TokenURL(), rt)
		if err != nil || !strings.Contains(string(b), "server_error") {
			t.Errorf("released hang: %d %s %v", status, b, err)
		}
		done <- status
	}()
	waitUntil(t, "a hanging call", func() bool { return s.Stats().Hanging == 1 })
	select {
	case <-done:
		t.Fatal("a hanging call was answered")
	case <-time.After(200 * time.Millisecond):
	}
	s.SetFault(FaultNone)
	if status := <-done; status != 503 {
		t.Fatalf("released hang answered %d, want 503", status)
	}
	mustStillWork(t, s, rt)
}

// Close ends hanging calls at once and leaves no goroutine behind.
func TestFaultHangCloseNoLeak(t *testing.T) {
	before := runtime.NumGoroutine()
	s := New(Options{})
	s.SetFault(FaultHang)
	tr := &http.Transport{}
	c := &http.Client{Transport: tr}
	var wg sync.WaitGroup
	for i := range 6 {
		u := s.TokenURL()
		if i%2 == 1 {
			u = s.URL() + "/oauth/token" // the main listener hangs too
		}
		wg.Go(func() {
			if _, _, _, err := post(c, u, "rt_whatever"); err == nil {
				t.Errorf("a hanging call got an answer at Close")
			}
		})
	}
	waitUntil(t, "6 hanging calls", func() bool { return s.Stats().Hanging == 6 })
	closed := make(chan struct{})
	go func() { s.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("Close blocked on hanging calls")
	}
	wg.Wait()
	tr.CloseIdleConnections()
	const slack = 2
	var now int
	deadline := time.Now().Add(5 * time.Second)
	for now = runtime.NumGoroutine(); now > before+slack && time.Now().Before(deadline); now = runtime.NumGoroutine() {
		time.Sleep(20 * time.Millisecond)
	}
	if now > before+slack {
		buf := make([]byte, 1<<20)
		t.Fatalf("goroutines: %d before, %d after Close\n%s", before, now, buf[:runtime.Stack(buf, true)])
	}
}

// RotateThenHang rotates the pair and then answers nothing: the caller
// cannot tell, and its old refresh token is spent.
func TestFaultRotateThenHang(t *testing.T) {
	s := newServer(t, Options{})
	at0, rt0 := s.SeedPair()
	s.SetFault(FaultRotateThenHang)
	c := &http.Client{Timeout: 300 * time.Millisecond}
	if _, _, _, err := post(c, s.TokenURL(), rt0); err == nil {
		t.Fatal("want a client timeout")
	}
	waitUntil(t, "the hang to end with its client", func() bool { return s.Stats().Hanging == 0 })
	if s.ValidAccessToken(at0) || s.CurrentAccessTokens() != 1 {
		t.Fatalf("the pair was not rotated server-side")
	}
	// Invalid calls are answered as usual, even under the fault.
	wantErr(t, refresh(t, s, rt0), 400, "invalid_grant")
	if st := s.Stats(); st.RefreshCalls != 2 || st.RefreshOK != 1 || st.Hangs != 1 || st.FaultedCalls != 1 || st.InvalidGrant != 1 {
		t.Errorf("stats %+v", st)
	}

	// A client still waiting when the fault clears gets its pair late.
	rt1 := s.Seed()
	done := make(chan resp)
	go func() {
		status, _, b, err := post(http.DefaultClient, s.TokenURL(), rt1)
		r := resp{status: status, raw: string(b)}
		if err != nil || json.Unmarshal(b, &r.body) != nil {
			t.Errorf("late answer: %v %s", err, b)
		}
		done <- r
	}()
	waitUntil(t, "a hanging call", func() bool { return s.Stats().Hanging == 1 })
	s.SetFault(FaultNone)
	r := <-done
	if r.status != 200 || !s.ValidAccessToken(r.str("access_token")) {
		t.Fatalf("late answer %d %s", r.status, r.raw)
	}
	mustStillWork(t, s, r.str("refresh_token"))
}

// FaultRefuse takes the token port down (connection refused, kept-alive
// connections cut); URL() keeps serving; clearing it listens on the same port.
func TestFaultRefuse(t *testing.T) {
	s := newServer(t, Options{})
	rt := s.Seed()
	tokenURL := s.TokenURL()
	if strings.HasPrefix(tokenURL, s.URL()) {
		t.Fatalf("TokenURL %s is not on its own listener (URL %s)", tokenURL, s.URL())
	}
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr}
	r := refresh(t, s, rt) // warm a kept-alive connection on c too
	rt = r.str("refresh_token")
	if status, _, _, err := post(c, tokenURL, "rt_unknown"); err != nil || status != 400 {
		t.Fatalf("warm-up: %d %v", status, err)
	}
	before := s.Stats()

	s.SetFault(FaultRefuse)
	// A kept-alive connection is cut: its client may first see EOF or a
	// reset, then connection refused like everyone else.
	for i := range 3 {
		_, _, _, err := post(c, tokenURL, rt)
		if err == nil || (i > 0 && !errors.Is(err, syscall.ECONNREFUSED)) {
			t.Fatalf("call %d: want connection refused, got %v", i, err)
		}
	}
	if _, _, _, err := post(&http.Client{Transport: &http.Transport{}}, tokenURL, rt); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("new client: want connection refused, got %v", err)
	}
	if st := s.Stats(); st.RefreshCalls != before.RefreshCalls {
		t.Fatalf("refused calls reached the server: %+v", st)
	}
	// The API and URL()'s own token endpoint are unaffected.
	at, _ := s.SeedPair()
	if r := api(t, s, at); r.status != 200 {
		t.Fatalf("API during FaultRefuse: %d", r.status)
	}
	if status, _, _, err := post(c, s.URL()+"/oauth/token", "rt_unknown"); err != nil || status != 400 {
		t.Fatalf("URL()/oauth/token during FaultRefuse: %d %v", status, err)
	}

	s.SetFault(FaultNone)
	if s.TokenURL() != tokenURL {
		t.Fatalf("TokenURL moved: %s -> %s", tokenURL, s.TokenURL())
	}
	if status, _, b, err := post(c, tokenURL, rt); err != nil || status != 200 {
		t.Fatalf("after FaultRefuse: %d %s %v", status, b, err)
	}
	// Refuse and clear again: the port comes back every time.
	for range 3 {
		s.SetFault(FaultRefuse)
		s.SetFault(FaultNone)
	}
	if status, _, _, err := post(c, tokenURL, "rt_unknown"); err != nil || status != 400 {
		t.Fatalf("after repeated FaultRefuse: %d %v", status, err)
	}
}

// A call accepted before FaultRefuse is dropped unanswered and does not
// rotate, even if the fault clears before its latency ends.
func TestFaultRefuseDropsAcceptedCalls(t *testing.T) {
	s := newServer(t, Options{Latency: 300 * time.Millisecond})
	rt := s.Seed()
	errc := make(chan error)
	go func() {
		_, _, _, err := post(&http.Client{Transport: &http.Transport{}}, s.TokenURL(), rt)
		errc <- err
	}()
	waitUntil(t, "a call in flight", func() bool { return s.Stats().MaxConcurrentRefresh == 1 })
	s.SetFault(FaultRefuse)
	s.SetFault(FaultNone)
	if err := <-errc; err == nil {
		t.Fatal("a call accepted before FaultRefuse got an answer")
	}
	waitUntil(t, "the dropped call to be counted", func() bool { return s.Stats().FaultedCalls == 1 })
	mustStillWork(t, s, rt)
}

// A refresh whose client gives up during the latency still rotates (the new
// pair is lost: LostRotations), unless DropDisconnected drops the call.
func TestClientGoneDuringLatency(t *testing.T) {
	for _, drop := range []bool{false, true} {
		t.Run(fmt.Sprintf("DropDisconnected=%v", drop), func(t *testing.T) {
			s := newServer(t, Options{Latency: 300 * time.Millisecond, DropDisconnected: drop})
			rt := s.Seed()
			if s.TokenIdleFor() <= 0 {
				t.Fatal("TokenIdleFor is 0 with no call in flight")
			}
			c := &http.Client{Timeout: 100 * time.Millisecond, Transport: &http.Transport{}}
			if _, _, _, err := post(c, s.TokenURL(), rt); err == nil {
				t.Fatal("want a client timeout")
			}
			if st := s.Stats(); st.RefreshInFlight != 1 || s.TokenIdleFor() != 0 {
				t.Fatalf("in flight %d, idle for %s", st.RefreshInFlight, s.TokenIdleFor())
			}
			if n, oldest, _ := s.TokenActivity(); n != 1 || oldest < 50*time.Millisecond || oldest > 300*time.Millisecond { // the client timed out after 100 ms, counted from before the handler began
				t.Fatalf("TokenActivity: %d in flight, oldest %s", n, oldest)
			}
			waitUntil(t, "the call to end", func() bool { return s.Stats().RefreshInFlight == 0 })
			if idle := s.TokenIdleFor(); idle <= 0 || idle > time.Second {
				t.Fatalf("idle for %s right after a call", idle)
			}
			if n, oldest, since := s.TokenActivity(); n != 0 || oldest != 0 || since <= 0 || since > time.Second {
				t.Fatalf("TokenActivity after the call: %d, %s, %s", n, oldest, since)
			}
			st := s.Stats()
			if drop {
				if st.DroppedCalls != 1 || st.RefreshOK != 0 || st.LostRotations != 0 || st.RefreshCalls != 1 {
					t.Fatalf("stats %+v", st)
				}
				mustStillWork(t, s, rt)
				return
			}
			if st.DroppedCalls != 0 || st.RefreshOK != 1 || st.LostRotations != 1 {
				t.Fatalf("stats %+v", st)
			}
			wantErr(t, refresh(t, s, rt), 400, "invalid_grant")
		})
	}
}

func TestCloseAPIConnections(t *testing.T) {
	s := newServer(t, Options{})
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr}
	for range 2 {
		res, err := c.Get(s.URL() + "/v2/platform/all")
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, res.Body)
		res.Body.Close()
	}
	if st := s.Stats(); st.OpenAPIConns != 1 || st.OpenTokenConns != 0 {
		t.Fatalf("OpenAPIConns = %d, OpenTokenConns = %d with one kept-alive API connection", st.OpenAPIConns, st.OpenTokenConns)
	}
	if status, _, _, err := post(c, s.TokenURL(), "rt_unknown"); err != nil || status != 400 {
		t.Fatalf("token call: %d %v", status, err)
	}
	if n := s.Stats().OpenTokenConns; n != 1 {
		t.Fatalf("OpenTokenConns = %d with one kept-alive token connection", n)
	}
	s.CloseAPIConnections()
	waitUntil(t, "the connection to close", func() bool { return s.Stats().OpenAPIConns == 0 })
	if n := s.Stats().OpenTokenConns; n != 1 {
		t.Fatalf("CloseAPIConnections closed token connections: %d left", n)
	}
	if res, err := c.Get(s.URL() + "/v2/platform/all"); err != nil || res.StatusCode != 200 {
		t.Fatalf("after CloseAPIConnections: %v", err)
	} else {
		res.Body.Close()
	}
}
