package caddymodule_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/redistest"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// Requirement: only operators that Caddy authenticated reach the flow.
// Without an authentication handler in front, every page answers 403 with
// what to do, sets no cookie and exchanges nothing; behind basic_auth
// (Caddy's bcrypt) the operator gets through; allow_unauthenticated opens
// the route and says so at provisioning.
func TestLoginRequiresAuthentication(t *testing.T) {
	t.Run("no authentication handler", func(t *testing.T) {
		site := newLoginSite(t, true)
		site.noAuth = true
		runInProcess(t, site.caddyfile())
		b := newLoginBrowser(t, site)
		code := site.fake.IssueCode(site.redirectURI())
		for _, path := range []string{"/restream/", "/restream/login", "/restream/callback?code=" + code + "&state=" + strings.Repeat("A", 43)} {
			p := b.get(site.base() + path)
			if p.status != http.StatusForbidden || !strings.HasPrefix(p.header.Get("Content-Type"), "text/html") {
				t.Errorf("GET %s: status %d %q, want a 403 page", path, p.status, p.header.Get("Content-Type"))
			}
			for _, want := range []string{"Sign-in required", "basic_auth", "caddy hash-password", "forward_auth", "allow_unauthenticated"} {
				if !strings.Contains(p.body, want) {
					t.Errorf("GET %s: the page does not say %q", path, want)
				}
			}
			if p.header.Get("Set-Cookie") != "" || p.loc != "" {
				t.Errorf("GET %s: Set-Cookie %q Location %q on a refused request", path, p.header.Get("Set-Cookie"), p.loc)
			}
			wantLoginNoStore(t, path, p)
		}
		if st := site.fake.Stats(); st.CodeCalls != 0 {
			t.Errorf("the fake saw %d code exchanges", st.CodeCalls)
		}
		site.wantUnchanged("unauthenticated callback", nil)
		if err := caddy.Stop(); err != nil {
			t.Fatal(err)
		}
		if logs := site.serverLog(); !strings.Contains(logs, "login route refused a request that no authentication handler identified") {
			t.Error("refusals are not logged")
		}
	})

	t.Run("basic_auth", func(t *testing.T) {
		site := newLoginSite(t, false)
		runInProcess(t, site.caddyfile())
		if status, _, _ := do(t, http.MethodGet, site.base()+"/restream/login", nil, nil); status != http.StatusUnauthorized {
			t.Errorf("no credentials: status %d, want basic_auth's 401", status)
		}
		wrong, _ := http.NewRequest(http.MethodGet, site.base()+"/restream/login", nil)
		wrong.SetBasicAuth(loginUser, "not-the-password")
		if resp, err := client.Do(wrong); err != nil || resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("wrong password: %v %v", resp, err)
		} else {
			resp.Body.Close()
		}
		b := newLoginBrowser(t, site)
		if p := b.connect(); !strings.Contains(p.body, "fake-streamer (id 1001)") {
			t.Fatalf("an authenticated operator could not connect:\n%s", p.body)
		}
	})

	t.Run("allow_unauthenticated", func(t *testing.T) {
		site := newLoginSite(t, false)
		site.noAuth = true
		site.loginExtra = "allow_unauthenticated"
		runInProcess(t, site.caddyfile())
		b := newLoginBrowser(t, site)
		if p := b.connect(); !strings.Contains(p.body, "Restream account stored") {
			t.Fatalf("allow_unauthenticated: %d\n%s", p.status, p.body)
		}
		if err := caddy.Stop(); err != nil {
			t.Fatal(err)
		}
		if logs := site.serverLog(); !strings.Contains(logs, "allow_unauthenticated is set") || !strings.Contains(logs, `"level":"warn"`) {
			t.Error("no warning about allow_unauthenticated at provisioning")
		}
	})
}

// Requirement: expected_user_id pins the Restream user. Another user's
// authorization is refused and installs nothing; the expected user's is
// installed with its user, shown on the account page and by the admin API;
// and while pinned, an authorization whose user cannot be read (missing
// scope, outage, not JSON, too large, a redirect) installs nothing either.
func TestLoginPinsExpectedUser(t *testing.T) {
	site := newLoginSite(t, true)
	site.adminPort = testproc.Port(t)
	site.loginExtra = "expected_user_id 4242"
	runInProcess(t, site.caddyfile())
	b := newLoginBrowser(t, site)

	p, code := b.flow() // signed in at Restream as the default user, 1001
	wantLoginErrorPage(t, "another user", p, http.StatusForbidden, "This is not the expected Restream account", append(site.fake.IssuedTokens(), code)...)
	for _, want := range []string{"fake-streamer (id 1001)", "pinned to Restream user id 4242 (expected_user_id)", "Nothing was installed"} {
		if !strings.Contains(p.body, want) {
			t.Errorf("refusal page lacks %q:\n%s", want, p.body)
		}
	}
	site.wantUnchanged("another user", nil)
	wantOnlyLive(t, site.fake, "")
	if status, body, _ := do(t, http.MethodGet, site.base()+"/v2/user/profile", nil, nil); status != http.StatusServiceUnavailable {
		t.Errorf("the proxied route serves after a refused authorization: %d %s", status, body)
	}

	site.fake.SetUser(loginAlice)
	page := b.connect()
	if !strings.Contains(page.body, "<dt>Restream user</dt><dd>alice (id 4242)</dd>") {
		t.Fatalf("account page:\n%s", page.body)
	}
	rec := site.record()
	if rec.User == nil || rec.User.ID != "4242" || rec.User.Username != "alice" {
		t.Fatalf("stored user %+v", rec.User)
	}
	raw, accounts := site.adminAccounts()
	if len(accounts) != 1 || fmt.Sprint(accounts[0]["user"]) != "map[id:4242 username:alice]" {
		t.Fatalf("admin status: %s", raw)
	}
	mustContainNone(t, "admin status", raw, site.fake.IssuedTokens()...)

	var hits atomic.Int64
	target := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { hits.Add(1) }))
	t.Cleanup(target.Close)
	for _, tc := range []struct {
		name   string
		set    func()
		detail string
	}{
		{"missing scope", func() { site.fake.SetProfileFault(fakerestream.ProfileForbidden) }, "403 insufficient_scope"},
		{"outage", func() { site.fake.SetProfileFault(fakerestream.Profile500) }, "answered 500"},
		{"not JSON", func() { site.fake.SetProfileFault(fakerestream.ProfileGarbage) }, "not a profile: an HTML page"},
		{"too large", func() { site.fake.SetProfileFault(fakerestream.ProfileHuge) }, "larger than"},
		{"redirect", func() { site.fake.SetProfileRedirect(target.URL + "/steal") }, "a redirect (not followed"},
	} {
		tc.set()
		p, code := b.flow()
		wantLoginErrorPage(t, tc.name, p, http.StatusBadGateway, "The Restream account could not be identified", append(site.fake.IssuedTokens(), code)...)
		if !strings.Contains(p.body, tc.detail) || !strings.Contains(p.body, "expected_user_id") {
			t.Errorf("%s: the page does not say why (%q):\n%s", tc.name, tc.detail, p.body)
		}
		site.wantUnchanged(tc.name, rec)
	}
	site.fake.SetProfileRedirect("")
	if hits.Load() != 0 {
		t.Fatalf("the profile's redirect target got %d requests: the access token went elsewhere", hits.Load())
	}
	if st := site.fake.Stats(); st.CodeCalls != 7 || st.InvalidGrant != 0 {
		t.Errorf("fake stats %+v: want 7 code exchanges", st)
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	logs := site.serverLog()
	for _, want := range []string{`"reason":"not the expected Restream user"`, `"reason":"Restream user unknown"`} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %q", want)
		}
	}
	mustContainNone(t, "logs", logs, append(site.fake.IssuedTokens(), loginSecret, loginPassword)...)
}

// Requirement: a chain whose user is known is not replaced by another
// user's authorization, nor by one whose user cannot be read; the check runs
// under the install lease with the stored record. allow_account_change lets
// the other user in.
func TestLoginRefusesAccountChange(t *testing.T) {
	site := newLoginSite(t, true)
	runInProcess(t, site.caddyfile())
	b := newLoginBrowser(t, site)
	b.connect()
	first := site.record()
	if first.User == nil || first.User.ID != "1001" {
		t.Fatalf("first chain's user %+v", first.User)
	}

	site.fake.SetUser(loginBob)
	p, code := b.flow()
	wantLoginErrorPage(t, "another user", p, http.StatusConflict, "This is another Restream account", append(site.fake.IssuedTokens(), code)...)
	for _, want := range []string{"acts as Restream user fake-streamer (id 1001)", "you authorized Restream user bob (id 77)", "allow_account_change"} {
		if !strings.Contains(p.body, want) {
			t.Errorf("refusal page lacks %q:\n%s", want, p.body)
		}
	}
	site.wantUnchanged("another user", first)
	wantOnlyLive(t, site.fake, first.AccessToken)
	if status, body, _ := do(t, http.MethodGet, site.base()+"/v2/user/profile", nil, nil); status != http.StatusOK ||
		decodeEcho(t, body).Authorization != "Bearer "+first.AccessToken {
		t.Fatalf("the proxied route does not serve the first chain any more: %d", status)
	}

	site.fake.SetProfileFault(fakerestream.Profile500)
	p, _ = b.flow()
	wantLoginErrorPage(t, "user unknown", p, http.StatusBadGateway, "The Restream account could not be identified")
	if !strings.Contains(p.body, "the sidecar acts as Restream user fake-streamer (id 1001)") {
		t.Errorf("the page does not name the pinned user:\n%s", p.body)
	}
	site.wantUnchanged("user unknown", first)
	site.fake.SetProfileFault(fakerestream.ProfileNone)

	// The same user re-authorizes freely.
	site.fake.SetUser(fakerestream.DefaultUser)
	if page := b.connect(); !strings.Contains(page.body, "<dt>Generation</dt><dd>2</dd>") {
		t.Fatalf("same user again:\n%s", page.body)
	}
	second := site.record()

	site.loginExtra = "allow_account_change"
	loadInProcess(t, site.caddyfile())
	site.fake.SetUser(loginBob)
	if page := b.connect(); !strings.Contains(page.body, "bob (id 77)") || !strings.Contains(page.body, "<dt>Generation</dt><dd>3</dd>") {
		t.Fatalf("allow_account_change:\n%s", page.body)
	}
	third := site.record()
	if third.User == nil || third.User.ID != "77" || third.Chain == second.Chain {
		t.Fatalf("stored %+v", third.User)
	}
	if status, body, _ := do(t, http.MethodGet, site.base()+"/v2/user/profile", nil, nil); status != http.StatusOK ||
		decodeEcho(t, body).Authorization != "Bearer "+third.AccessToken {
		t.Fatalf("the proxied route does not serve bob's chain: %d", status)
	}
}

// Without a pin, a chain whose user cannot be read is installed; the page
// says the user is not known yet and the log says why. The profile
// client's redirect goes nowhere.
func TestLoginProfileUnreadableWithoutPin(t *testing.T) {
	site := newLoginSite(t, true)
	var hits atomic.Int64
	target := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { hits.Add(1) }))
	t.Cleanup(target.Close)
	site.fake.SetProfileRedirect(target.URL + "/steal")
	runInProcess(t, site.caddyfile())
	page := newLoginBrowser(t, site).connect()
	if !strings.Contains(page.body, "<dt>Restream user</dt><dd>not known yet</dd>") || !strings.Contains(page.body, "Restream account connected") {
		t.Fatalf("account page:\n%s", page.body)
	}
	if rec := site.record(); rec == nil || rec.User != nil {
		t.Fatalf("stored %+v", rec)
	}
	if hits.Load() != 0 {
		t.Fatalf("the redirect target got %d requests", hits.Load())
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	logs := site.serverLog()
	if !strings.Contains(logs, "its Restream user is unknown") || !strings.Contains(logs, "answered 302, a redirect (not followed") {
		t.Errorf("the log does not say the user is unknown and why")
	}
	mustContainNone(t, "logs", logs, append(site.fake.IssuedTokens(), loginSecret)...)
}

// Requirement: the state is single-use and bound to this flow. A replayed
// callback (same state, even with its cookie put back, with the same or a
// fresh code), a tampered state, a missing code and access_denied each get
// a clear page, clear the cookie, exchange nothing and change nothing; a
// state minted by another login of the account (another redirect_uri) does
// not complete this one.
func TestLoginStateSingleUseAndBound(t *testing.T) {
	site := newLoginSite(t, true)
	other := site.base() + "/other/callback"
	site.extraSite = site.loginRoute("/other/", other, "")
	runInProcess(t, site.caddyfile())
	cbBase := site.redirectURI()
	u, _ := url.Parse(cbBase)
	codeCalls := func() int64 { return site.fake.Stats().CodeCalls }

	b := newLoginBrowser(t, site)
	loc, state := b.login()
	cookie := b.cookie()
	cb := b.consent(loc)
	if p := b.get(cb); p.status != http.StatusSeeOther {
		t.Fatalf("first use: %d\n%s", p.status, p.body)
	}
	installed := site.record()

	putBack := func() {
		b.jar.SetCookies(u, []*http.Cookie{{Name: cookie.Name, Value: cookie.Value, Path: "/restream/"}})
	}
	putBack()
	p := b.get(cb)
	wantLoginErrorPage(t, "replayed callback", p, http.StatusBadRequest, "This authorization was used already")
	if b.cookie() != nil {
		t.Error("the replayed callback left the cookie in place")
	}
	putBack()
	fresh := site.fake.IssueCode(cbBase)
	p = b.get(cbBase + "?code=" + fresh + "&state=" + url.QueryEscape(state))
	wantLoginErrorPage(t, "replayed state, fresh code", p, http.StatusBadRequest, "This authorization was used already", fresh)
	if n := codeCalls(); n != 1 {
		t.Fatalf("%d code exchanges, want only the first", n)
	}
	site.wantUnchanged("replays", installed)

	for _, tc := range []struct {
		name   string
		query  func(code, state string) url.Values
		status int
		says   string
	}{
		{"tampered state", func(c, s string) url.Values { return url.Values{"code": {c}, "state": {s[:len(s)-1] + "x"}} },
			http.StatusBadRequest, "does not match"},
		{"missing code", func(_, s string) url.Values { return url.Values{"state": {s}} }, http.StatusBadRequest, "Incomplete callback"},
		{"access_denied", func(_, s string) url.Values { return url.Values{"error": {"access_denied"}, "state": {s}} },
			http.StatusForbidden, "Authorization was not granted"},
	} {
		b := newLoginBrowser(t, site)
		_, state := b.login()
		code := site.fake.IssueCode(cbBase)
		p := b.get(cbBase + "?" + tc.query(code, state).Encode())
		wantLoginErrorPage(t, tc.name, p, tc.status, tc.says, code)
		if b.cookie() != nil {
			t.Errorf("%s: the cookie is still set", tc.name)
		}
	}

	// A state and cookie from the other login of the account (its own
	// redirect_uri) presented to this one.
	ob := newLoginBrowser(t, site)
	op := ob.get(site.base() + "/other/login")
	if op.status != http.StatusFound {
		t.Fatalf("other login: %d", op.status)
	}
	ou, _ := url.Parse(op.loc)
	var oc *http.Cookie
	for _, c := range (&http.Response{Header: op.header}).Cookies() {
		if c.Name == loginCookie {
			oc = c
		}
	}
	if oc == nil || oc.Path != "/other/" {
		t.Fatalf("other login's cookie: %v", op.header["Set-Cookie"])
	}
	ob.jar.SetCookies(u, []*http.Cookie{{Name: oc.Name, Value: oc.Value, Path: "/restream/"}})
	code := site.fake.IssueCode(cbBase)
	p = ob.get(cbBase + "?code=" + code + "&state=" + url.QueryEscape(ou.Query().Get("state")))
	wantLoginErrorPage(t, "state of another redirect_uri", p, http.StatusBadRequest, "The state cookie is not valid", code)

	if n := codeCalls(); n != 1 {
		t.Errorf("%d code exchanges, want only the first", n)
	}
	site.wantUnchanged("refusals", installed)
}

// Over https (the redirect_uri's scheme) the state cookie is a __Host-
// cookie: Path=/, Secure, no Domain, HttpOnly, SameSite=Lax, 10 minutes;
// the callback clears it under the same name.
func TestLoginHostCookieOverHTTPS(t *testing.T) {
	site := newLoginSite(t, false)
	site.redirect = "https://sidecar.example.test/restream/callback" // TLS ends in front of Caddy
	runInProcess(t, site.caddyfile())
	b := newLoginBrowser(t, site)
	p := b.get(site.base() + "/restream/login")
	if p.status != http.StatusFound {
		t.Fatalf("login: %d", p.status)
	}
	set := p.header.Get("Set-Cookie")
	cookies := (&http.Response{Header: p.header}).Cookies()
	if len(cookies) != 1 {
		t.Fatalf("Set-Cookie %q", p.header["Set-Cookie"])
	}
	c := cookies[0]
	if c.Name != "__Host-restream_auth_login_default" || c.Path != "/" || !c.Secure || !c.HttpOnly || c.Domain != "" ||
		c.SameSite != http.SameSiteLaxMode || c.MaxAge != 600 {
		t.Fatalf("cookie %q: want __Host-restream_auth_login_default, Path=/, Secure, HttpOnly, SameSite=Lax, Max-Age=600, no Domain", set)
	}
	lu, _ := url.Parse(p.loc)
	state := lu.Query().Get("state")
	code := site.fake.IssueCode(site.redirect)
	req, _ := http.NewRequest(http.MethodGet, site.base()+"/restream/callback?code="+code+"&state="+url.QueryEscape(state), nil)
	req.SetBasicAuth(loginUser, loginPassword)
	req.Header.Set("Cookie", c.Name+"="+c.Value)
	resp, err := b.c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	cleared := resp.Header.Get("Set-Cookie")
	if resp.StatusCode != http.StatusSeeOther || !strings.HasPrefix(cleared, "__Host-restream_auth_login_default=;") ||
		!strings.Contains(cleared, "Path=/;") || !strings.Contains(cleared, "Max-Age=0") || !strings.Contains(cleared, "Secure") {
		t.Fatalf("callback: %d, Set-Cookie %q", resp.StatusCode, cleared)
	}
	if rec := site.record(); rec == nil || rec.Generation != 1 {
		t.Fatalf("stored %+v", rec)
	}
}

// Requirement: <prefix>/ shows the account's state and what to do, with a
// button to connect or re-authorize; every value is escaped.
func TestLoginStatusPage(t *testing.T) {
	site := newLoginSite(t, true)
	site.adminPort = testproc.Port(t)
	runInProcess(t, site.caddyfile())
	b := newLoginBrowser(t, site)
	p := b.get(site.base() + "/restream/")
	for _, want := range []string{"No Restream account connected", `<a href="./login" class="button">Connect a Restream account</a>`, "<dt>State</dt><dd>no_chain</dd>"} {
		if !strings.Contains(p.body, want) {
			t.Errorf("before connecting, the page lacks %q:\n%s", want, p.body)
		}
	}
	if p.status != http.StatusOK || strings.Contains(p.body, "Generation") {
		t.Errorf("before connecting: status %d\n%s", p.status, p.body)
	}

	site.fake.SetUser(fakerestream.User{ID: 31337, Username: `<script>alert("x")</script>&`})
	page := b.connect()
	if strings.Contains(page.body, "<script>") || !strings.Contains(page.body, "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp; (id 31337)") {
		t.Fatalf("the username is not escaped:\n%s", page.body)
	}
	rec := site.record()

	// Kill the chain at Restream and let the running source find out.
	form := url.Values{"token": {rec.RefreshToken}}.Encode()
	req, _ := http.NewRequest(http.MethodPost, site.fake.URL()+"/oauth/revoke", strings.NewReader(form))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth("test-client", loginSecret)
	if resp, err := client.Do(req); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("revoke: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
	resp, err := noKeepAlive.Post(fmt.Sprintf("http://127.0.0.1:%d/restream_auth/default/refresh", site.adminPort), "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("forced refresh of a revoked chain: %d", resp.StatusCode)
	}
	p = b.get(site.base() + "/restream/")
	for _, want := range []string{"Re-authorization required", "<dt>State</dt><dd>reauth_required</dd>", "invalid_grant",
		`<a href="./login" class="button">Re-authorize</a>`, "(id 31337)"} {
		if !strings.Contains(p.body, want) {
			t.Errorf("dead chain: the page lacks %q:\n%s", want, p.body)
		}
	}
	// The same user re-authorizes, and the page says so.
	if page := b.connect(); !strings.Contains(page.body, "Restream account connected") || !strings.Contains(page.body, "<dt>Generation</dt><dd>2</dd>") {
		t.Fatalf("after re-authorizing:\n%s", page.body)
	}
	if status, _, _ := do(t, http.MethodGet, site.base()+"/v2/user/profile", nil, nil); status != http.StatusOK {
		t.Fatalf("proxied route after re-authorizing: %d", status)
	}
	mustContainNone(t, "pages", p.body+page.body, append(site.fake.IssuedTokens(), loginSecret)...)
}

// Requirement: the login installs only into a restream_auth of its account
// bound alike; a difference fails provisioning (so `caddy validate` too),
// whichever handler Caddy provisions first, naming both sides and no secret.
func TestLoginBindingMismatch(t *testing.T) {
	inProcessMu.Lock()
	defer inProcessMu.Unlock()
	key := base64.StdEncoding.EncodeToString([]byte("0123456789abcdef0123456789abcdef"))
	t.Setenv("RESTREAM_LOGIN_TEST_KEY", key)
	kr, err := tokensource.NewKeyring([]byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, proxyExtra, want string
	}{
		{"client_id", "client_id other-client", `restream_auth_login "default": client_id differs from restream_auth "default" ("test-client" here, "other-client" there)`},
		{"client_secret", "client_secret cs_other_secret_9f8e", `restream_auth_login "default": client_secret differs from restream_auth "default" (values not shown)`},
		{"encryption key", "encryption_key {env.RESTREAM_LOGIN_TEST_KEY}", `encryption keys differ from restream_auth "default" (key ids none here, "` + kr.KeyIDs() + `" there)`},
		{"token_url", "token_url http://127.0.0.1:9/oauth/token", `token_url differs from restream_auth "default"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			site := newLoginSite(t, true)
			site.proxyExtra = tc.proxyExtra
			cfgJSON := adapt(t, site.caddyfile())
			// In the Caddyfile the login's route comes first; reversed, the
			// restream_auth handler is provisioned first.
			for _, order := range []string{"login first", "restream_auth first"} {
				raw := cfgJSON
				if order == "restream_auth first" {
					raw = reverseRoutes(t, cfgJSON)
				}
				var cfg caddy.Config
				if err := json.Unmarshal(raw, &cfg); err != nil {
					t.Fatal(err)
				}
				err := caddy.Validate(&cfg)
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("%s: validate: %v\nwant %q", order, err, tc.want)
				}
				mustContainNone(t, "error", err.Error(), loginSecret, "cs_other_secret_9f8e", key)
			}
			if err := caddy.Load(cfgJSON, true); err == nil {
				_ = caddy.Stop()
				t.Fatal("the config loaded")
			}
			if st := site.fake.Stats(); st.CodeCalls+st.RefreshCalls != 0 {
				t.Errorf("fake stats %+v", st)
			}
		})
	}
}

// reverseRoutes reverses the order of the routes of the config's first
// server's first route's subroute (the site block's handle blocks).
func reverseRoutes(t *testing.T, cfgJSON []byte) []byte {
	t.Helper()
	var cfg map[string]any
	if err := json.Unmarshal(cfgJSON, &cfg); err != nil {
		t.Fatal(err)
	}
	servers := cfg["apps"].(map[string]any)["http"].(map[string]any)["servers"].(map[string]any)
	for _, srv := range servers {
		route := srv.(map[string]any)["routes"].([]any)[0].(map[string]any)
		sub := route["handle"].([]any)[0].(map[string]any)
		routes := sub["routes"].([]any)
		for i, j := 0, len(routes)-1; i < j; i, j = i+1, j-1 {
			routes[i], routes[j] = routes[j], routes[i]
		}
	}
	out, _ := json.Marshal(cfg)
	return out
}

// Requirement: the login's code exchange follows no redirect: a 3xx from
// the token endpoint is an unusable answer, and its target gets nothing
// (not the code, not the client secret).
func TestLoginExchangeRefusesRedirect(t *testing.T) {
	var hits atomic.Int64
	target := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { hits.Add(1) }))
	t.Cleanup(target.Close)
	redirector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, target.URL+"/oauth/token", http.StatusTemporaryRedirect)
	}))
	t.Cleanup(redirector.Close)
	site := newLoginSite(t, false)
	site.loginExtra = "token_url " + redirector.URL + "/oauth/token"
	runInProcess(t, site.caddyfile())
	p, code := newLoginBrowser(t, site).flow()
	wantLoginErrorPage(t, "redirecting token endpoint", p, http.StatusBadGateway, "Restream did not accept the authorization", code)
	if !strings.Contains(p.body, "answered 307") {
		t.Errorf("the page does not say the endpoint redirected:\n%s", p.body)
	}
	if hits.Load() != 0 {
		t.Fatalf("the redirect target got %d requests", hits.Load())
	}
	site.wantUnchanged("redirect", nil)
}

// With the restream_auth app's Redis, the login keeps the chain where
// restream_auth does: it installs into the running source (same binding),
// and without one, its own source writes to Redis; the account page reads
// it from there.
func TestLoginWithRedisBackend(t *testing.T) {
	for _, proxy := range []bool{true, false} {
		t.Run(fmt.Sprintf("restream_auth in the config: %v", proxy), func(t *testing.T) {
			srv := redistest.Start(t, redistest.Options{Password: "login-redis-pw-5c"})
			site := newLoginSite(t, proxy)
			site.global = "restream_auth {\n\t\tredis " + srv.URL() + "\n\t}"
			runInProcess(t, site.caddyfile())
			page := newLoginBrowser(t, site).connect()
			want := "Restream account connected"
			if !proxy {
				want = "Restream account stored"
			}
			if !strings.Contains(page.body, want) || !strings.Contains(page.body, "fake-streamer (id 1001)") {
				t.Fatalf("account page:\n%s", page.body)
			}
			if srv.MustDo("EXISTS", "restream_auth/{default}/record") != int64(1) {
				t.Fatal("the chain is not in Redis")
			}
			if rec, err := tokensource.LoadRecord(context.Background(), &certmagic.FileStorage{Path: site.storageDir}, "default"); err != nil || rec != nil {
				t.Fatalf("the chain went to Caddy storage too: %v", err)
			}
			if proxy {
				if status, _, _ := do(t, http.MethodGet, site.base()+"/v2/user/profile", nil, nil); status != http.StatusOK {
					t.Fatalf("proxied route: %d", status)
				}
			}
			mustContainNone(t, "account page", page.body, "login-redis-pw-5c")
		})
	}
}
