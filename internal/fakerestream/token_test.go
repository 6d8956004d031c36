package fakerestream

import (
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

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

// The token answer grants the scope names of Restream's documentation by
// default, space separated in scope and as an array in scopeJson, for a
// refresh and a code alike; Options.Scopes grants other names.
func TestScopes(t *testing.T) {
	documented := "profile.read channels.read chat.read stream.read"
	realNames := []string{"profile.default.read", "chat.default.read", "channels.write"}
	for _, tc := range []struct {
		name   string
		scopes []string
		want   []string
	}{
		{"default", nil, strings.Fields(documented)},
		{"real grant names", realNames, realNames},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newServer(t, Options{Scopes: tc.scopes})
			code := s.IssueCode("https://app.example/cb")
			for grant, r := range map[string]resp{
				"refresh":            refresh(t, s, s.Seed()),
				"authorization_code": token(t, s, url.Values{"grant_type": {"authorization_code"}, "code": {code}, "redirect_uri": {"https://app.example/cb"}}),
			} {
				var scopeJSON []string
				for _, v := range r.list("scopeJson") {
					scopeJSON = append(scopeJSON, fmt.Sprint(v))
				}
				if r.status != 200 || r.str("scope") != strings.Join(tc.want, " ") || !slices.Equal(scopeJSON, tc.want) {
					t.Errorf("%s: scope %q, scopeJson %q; want %q (%d %s)", grant, r.str("scope"), scopeJSON, tc.want, r.status, r.raw)
				}
			}
		})
	}
	if Scope != documented {
		t.Errorf("Scope = %q, want the documented %q", Scope, documented)
	}
}

// A scope name no server could send is refused when the fake starts.
func TestScopesRefuseBadNames(t *testing.T) {
	for _, bad := range []string{"", "chat.read stream.read", "chat.read,stream.read"} {
		func() {
			defer func() {
				msg, _ := recover().(string)
				if !strings.Contains(msg, "Options.Scopes") {
					t.Errorf("New with scope %q: panic %q, want one naming Options.Scopes", bad, msg)
				}
			}()
			s := New(Options{Scopes: []string{"profile.read", bad}})
			s.Close()
		}()
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

// A refresh whose client gives up during the latency still rotates (the new
// pair is lost: LostRotations), unless DropDisconnected drops the call.
func TestClientGoneDuringLatency(t *testing.T) {
	for _, drop := range []bool{false, true} {
		t.Run(fmt.Sprintf("DropDisconnected=%v", drop), func(t *testing.T) {
			t.Parallel() // each waits out its own server's latency
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
