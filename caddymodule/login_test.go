package caddymodule_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/caddymodule"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// The whole onboarding flow through real Caddy: a restream_auth route
// without a seed answers 503 no_chain; a browser logs in (behind
// basic_auth), consents on the fake's page and comes back; the chain is
// installed in storage and the proxied route serves with it at once. A
// second authorization installs a new chain as the next generation.
func TestLoginFlowInstallsChainWithoutRestart(t *testing.T) {
	site := newLoginSite(t, true)
	runInProcess(t, site.caddyfile())
	api := site.base() + "/v2/user/profile"

	status, body, _ := do(t, http.MethodGet, api, nil, nil)
	if status != http.StatusServiceUnavailable || !strings.Contains(string(body), "no_chain") {
		t.Fatalf("before onboarding: %d %s", status, body)
	}
	if status, _, _ := do(t, http.MethodGet, site.base()+"/restream/login", nil, nil); status != http.StatusUnauthorized {
		t.Fatalf("login without credentials: status %d, want 401 from basic_auth", status)
	}

	b := newLoginBrowser(t, site)
	p := b.get(site.base() + "/restream/login")
	if p.status != http.StatusFound {
		t.Fatalf("login: status %d\n%s", p.status, p.body)
	}
	wantLoginNoStore(t, "login", p)
	loc, err := url.Parse(p.loc)
	if err != nil {
		t.Fatal(err)
	}
	q := loc.Query()
	if got := loc.Scheme + "://" + loc.Host + loc.Path; got != site.authorize {
		t.Errorf("redirected to %s, want %s", got, site.authorize)
	}
	for k, want := range map[string]string{"response_type": "code", "client_id": "test-client", "redirect_uri": site.redirectURI()} {
		if q.Get(k) != want {
			t.Errorf("Location %s=%q, want %q", k, q.Get(k), want)
		}
	}
	state := q.Get("state")
	if len(state) < 32 || len(q) != 4 {
		t.Errorf("Location query %v: want a random state and exactly 4 parameters", q)
	}
	mustContainNone(t, "Location", p.loc, loginSecret)
	var set *http.Cookie
	for _, c := range (&http.Response{Header: p.header}).Cookies() {
		if c.Name == loginCookie {
			set = c
		}
	}
	switch {
	case set == nil:
		t.Fatalf("login set no %s cookie: %v", loginCookie, p.header["Set-Cookie"])
	case !set.HttpOnly || set.SameSite != http.SameSiteLaxMode || set.Path != "/restream/" || set.MaxAge != 600 || set.Secure:
		t.Errorf("cookie attributes: %q (want HttpOnly, SameSite=Lax, Path=/restream/, Max-Age=600, not Secure over http)", p.header["Set-Cookie"])
	case !strings.Contains(set.Value, state):
		t.Errorf("cookie does not carry the state")
	}

	cbURL := b.consent(p.loc)
	cbQuery, _ := url.Parse(cbURL)
	code := cbQuery.Query().Get("code")
	if code == "" || cbQuery.Query().Get("state") != state {
		t.Fatalf("callback URL %s lacks the code or the state", cbURL)
	}
	cb := b.get(cbURL)
	if cb.status != http.StatusSeeOther || cb.loc != "./" {
		t.Fatalf("callback: status %d, Location %q, want 303 See Other to ./ (the spent code leaves the address bar)\n%s", cb.status, cb.loc, cb.body)
	}
	wantLoginNoStore(t, "callback", cb)
	if b.cookie() != nil {
		t.Error("the callback did not clear the state cookie")
	}
	// The account's page, and a reload of it, say what is connected.
	var done loginResp
	for range 2 {
		done = b.get(site.base() + "/restream/")
		if done.status != http.StatusOK {
			t.Fatalf("account page: status %d\n%s", done.status, done.body)
		}
		wantLoginNoStore(t, "account page", done)
		for _, want := range []string{"Restream account connected", "<dd>default</dd>", "<dt>Restream user</dt><dd>fake-streamer (id 1001)</dd>",
			"<dt>Generation</dt><dd>1</dd>", "Access token expires", "in 59 minutes (renewed automatically before then)",
			"in 364 days (re-authorize before then)", `<a href="./login" class="button">Re-authorize</a>`} {
			if !strings.Contains(done.body, want) {
				t.Errorf("account page lacks %q:\n%s", want, done.body)
			}
		}
	}

	rec := site.record()
	if rec == nil || rec.Generation != 1 || rec.Chain == "" || !site.fake.ValidAccessToken(rec.AccessToken) {
		t.Fatalf("stored record after the first authorization: %+v", rec)
	}
	if rec.User == nil || rec.User.ID != "1001" || rec.User.Username != "fake-streamer" {
		t.Fatalf("stored user %+v, want the fake's signed-in user", rec.User)
	}
	mustContainNone(t, "account page", done.body+cb.body, append(site.fake.IssuedTokens(), code, loginSecret, loginPassword)...)

	// The restream_auth route that answered 503 serves now, without a restart.
	status, body, _ = do(t, http.MethodGet, api, nil, nil)
	if status != http.StatusOK {
		t.Fatalf("after onboarding: %d %s", status, body)
	}
	if e := decodeEcho(t, body); e.Authorization != "Bearer "+rec.AccessToken {
		t.Fatal("the proxied request did not carry the installed chain's token")
	}

	// Authorizing again installs a new chain as the next generation, and
	// the proxied route switches to it at once.
	done2, code2 := b.flow()
	if page := b.get(site.base() + "/restream/"); done2.status != http.StatusSeeOther || !strings.Contains(page.body, "<dt>Generation</dt><dd>2</dd>") {
		t.Fatalf("second authorization: status %d\n%s", done2.status, page.body)
	}
	rec2 := site.record()
	if rec2.Generation != 2 || rec2.Chain == rec.Chain || rec2.AccessToken == rec.AccessToken {
		t.Fatalf("second record: generation %d, same chain %v", rec2.Generation, rec2.Chain == rec.Chain)
	}
	status, body, _ = do(t, http.MethodGet, api, nil, nil)
	if status != http.StatusOK || decodeEcho(t, body).Authorization != "Bearer "+rec2.AccessToken {
		t.Fatalf("after the second authorization the route does not use the new chain: %d", status)
	}
	if st := site.fake.Stats(); st.CodeCalls != 2 || st.InvalidGrant != 0 || st.RefreshCalls != 0 {
		t.Fatalf("fake stats %+v: want two code exchanges and nothing else", st)
	}

	if err := caddy.Stop(); err != nil { // flush the logs
		t.Fatal(err)
	}
	logs := site.logs()
	for _, want := range []string{`"msg":"installed a new token chain from the login flow"`, `"generation":2`, `"operator":"onboard"`,
		`"restream_user_id":"1001"`, `"restream_username":"fake-streamer"`, `"served_at_once":true`, `"restream_auth_login"`} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %q", want)
		}
	}
	if os.Getenv("LOGINDUMP") != "" {
		_ = os.WriteFile(os.Getenv("LOGINDUMP"), []byte(logs), 0o600)
	}
	mustContainNone(t, "logs", logs, append(site.fake.IssuedTokens(), code, code2, loginSecret, loginPassword)...)
}

// Every refusal gives a clear page with a 4xx/5xx status and a way to start
// again, echoes no code, token or secret, and changes nothing.
func TestLoginRefusals(t *testing.T) {
	site := newLoginSite(t, true)
	runInProcess(t, site.caddyfile())
	cb := site.redirectURI()
	codeCalls := func() int64 { return site.fake.Stats().CodeCalls }

	t.Run("callback without cookie", func(t *testing.T) {
		b := newLoginBrowser(t, site)
		code := site.fake.IssueCode(cb)
		p := b.get(cb + "?code=" + code + "&state=" + strings.Repeat("A", 43))
		wantLoginErrorPage(t, "no cookie", p, http.StatusBadRequest, "No authorization in progress in this browser", code)
		if codeCalls() != 0 {
			t.Error("the code was exchanged without a state cookie")
		}
	})

	t.Run("wrong state", func(t *testing.T) {
		b := newLoginBrowser(t, site)
		_, state := b.login()
		code := site.fake.IssueCode(cb)
		p := b.get(cb + "?code=" + code + "&state=" + url.QueryEscape(state[:len(state)-1]+"x"))
		wantLoginErrorPage(t, "wrong state", p, http.StatusBadRequest, "does not match", code, state)
		if codeCalls() != 0 {
			t.Error("the code was exchanged with a wrong state")
		}
		if b.cookie() != nil {
			t.Error("a refused callback left the state cookie in place")
		}
	})

	t.Run("tampered cookie", func(t *testing.T) {
		b := newLoginBrowser(t, site)
		_, state := b.login()
		c := b.cookie()
		u, _ := url.Parse(cb)
		b.jar.SetCookies(u, []*http.Cookie{{Name: c.Name, Value: c.Value[:len(c.Value)-4] + "AAAA", Path: "/restream/"}})
		code := site.fake.IssueCode(cb)
		p := b.get(cb + "?code=" + code + "&state=" + state)
		wantLoginErrorPage(t, "tampered cookie", p, http.StatusBadRequest, "The state cookie is not valid", code)
		if codeCalls() != 0 {
			t.Error("the code was exchanged with a forged cookie")
		}
	})

	t.Run("denied consent", func(t *testing.T) {
		b := newLoginBrowser(t, site)
		loc, _ := b.login()
		back := b.consent(loc + "&deny=1")
		if back != cb {
			t.Fatalf("the fake's denial should redirect to %s with no parameters, got %s", cb, back)
		}
		p := b.get(back)
		wantLoginErrorPage(t, "denied", p, http.StatusForbidden, "Authorization was not granted")
		if b.cookie() != nil {
			t.Error("the denial left the state cookie in place")
		}
	})

	t.Run("access_denied and other OAuth errors", func(t *testing.T) {
		b := newLoginBrowser(t, site)
		_, state := b.login()
		wantLoginErrorPage(t, "access_denied", b.get(cb+"?error=access_denied&state="+state), http.StatusForbidden, "Authorization was not granted")
		p := b.get(cb + "?error=%3Cscript%3Ealert(1)%3C%2Fscript%3E")
		wantLoginErrorPage(t, "odd error", p, http.StatusBadGateway, "Restream returned an error")
		if strings.Contains(p.body, "<script>") {
			t.Errorf("the page echoes markup:\n%s", p.body)
		}
		p = b.get(cb + "?error=server_error")
		wantLoginErrorPage(t, "server_error", p, http.StatusBadGateway, "error=server_error")
	})

	t.Run("incomplete callback", func(t *testing.T) {
		b := newLoginBrowser(t, site)
		_, state := b.login()
		wantLoginErrorPage(t, "state only", b.get(cb+"?state="+state), http.StatusBadRequest, "Incomplete callback")
	})

	var used string
	t.Run("reused code", func(t *testing.T) {
		b := newLoginBrowser(t, site)
		first, code := b.flow()
		if first.status != http.StatusSeeOther {
			t.Fatalf("first use: status %d\n%s", first.status, first.body)
		}
		used = code
		before := site.record()
		_, state := b.login()
		p := b.get(cb + "?code=" + code + "&state=" + state)
		wantLoginErrorPage(t, "reused code", p, http.StatusBadRequest, "Restream rejected the authorization code", append(site.fake.IssuedTokens(), code)...)
		if st := site.fake.Stats(); st.InvalidGrant != 1 || st.CodeCalls != 2 {
			t.Errorf("fake stats %+v: want the reused code sent once and refused", st)
		}
		if after := site.record(); after.Generation != before.Generation || after.Chain != before.Chain {
			t.Errorf("a failed exchange changed the stored chain")
		}
		// The chain installed by the first use still serves.
		if status, body, _ := do(t, http.MethodGet, site.base()+"/v2/user/profile", nil, nil); status != http.StatusOK {
			t.Errorf("proxied request after a refused code: %d %s", status, body)
		}
	})

	t.Run("methods and paths", func(t *testing.T) {
		b := newLoginBrowser(t, site)
		for _, tc := range []struct {
			method, path, allow string
		}{
			{http.MethodPost, "/restream/login", "GET, HEAD"},
			{http.MethodPut, "/restream/login", "GET, HEAD"},
			{http.MethodPost, "/restream/callback", "GET"},
			{http.MethodHead, "/restream/callback", "GET"},
			{http.MethodDelete, "/restream/callback", "GET"},
		} {
			p := b.do(tc.method, site.base()+tc.path)
			if p.status != http.StatusMethodNotAllowed || p.header.Get("Allow") != tc.allow {
				t.Errorf("%s %s: status %d Allow %q, want 405 Allow %q", tc.method, tc.path, p.status, p.header.Get("Allow"), tc.allow)
			}
			wantLoginNoStore(t, tc.method+" "+tc.path, p)
		}
		if p := b.do(http.MethodHead, site.base()+"/restream/login"); p.status != http.StatusFound || p.loc == "" || p.body != "" {
			t.Errorf("HEAD login: status %d, Location %q, body %d bytes", p.status, p.loc, len(p.body))
		}
		for _, path := range []string{"/restream/other", "/restream/login/", "/restream/callback/"} {
			p := b.get(site.base() + path)
			if p.status != http.StatusNotFound {
				t.Errorf("GET %s: status %d, want 404", path, p.status)
			}
			wantLoginNoStore(t, path, p)
		}
		for _, m := range []string{http.MethodPost, http.MethodDelete} {
			if p := b.do(m, site.base()+"/restream/"); p.status != http.StatusMethodNotAllowed || p.header.Get("Allow") != "GET, HEAD" {
				t.Errorf("%s /restream/: status %d Allow %q", m, p.status, p.header.Get("Allow"))
			}
		}
	})

	if st := site.fake.Stats(); st.CodeCalls != 2 || st.RefreshCalls != 0 {
		t.Errorf("fake stats %+v: want exactly the two exchanges of the reused-code case", st)
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	logs := site.logs()
	for _, want := range []string{`"msg":"login callback refused"`, `"reason":"state mismatch"`, `"reason":"consent denied"`, `"reason":"code exchange failed"`} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %q", want)
		}
	}
	mustContainNone(t, "logs", logs, append(site.fake.IssuedTokens(), used, loginSecret, loginPassword)...)
}

// Without a restream_auth of the account in the config, the login installs
// the chain in storage with its own credentials, and a restream_auth started
// later (without a seed) serves with it.
func TestLoginWithoutRunningHandlerStoresChain(t *testing.T) {
	site := newLoginSite(t, false)
	runInProcess(t, site.caddyfile())
	p := newLoginBrowser(t, site).connect()
	if !strings.Contains(p.body, "Restream account stored") || !strings.Contains(p.body, "<dt>Generation</dt><dd>1</dd>") ||
		!strings.Contains(p.body, "fake-streamer (id 1001)") {
		t.Fatalf("account page: status %d\n%s", p.status, p.body)
	}
	if n := caddymodule.SourcesInPool(); n != 0 {
		t.Errorf("the login's own token source must stay out of the shared pool (admin status, health): %d sources", n)
	}
	rec := site.record()
	if rec == nil || rec.Generation != 1 {
		t.Fatalf("stored record: %+v", rec)
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	cfg := siteConfig{Port: testproc.Port(t), StorageDir: site.storageDir, Fake: site.fake,
		Extra: "client_secret {env." + loginSecretEnv + "}"}
	loadInProcess(t, cfg.Caddyfile())
	status, body, _ := do(t, http.MethodGet, "http://127.0.0.1:"+itoa(cfg.Port)+"/v2/user/profile", nil, nil)
	if status != http.StatusOK || decodeEcho(t, body).Authorization != "Bearer "+rec.AccessToken {
		t.Fatalf("restream_auth started after the login: %d %s", status, body)
	}
}

// With encryption_key, a login that stores the chain itself (no
// restream_auth in the process) writes it encrypted, as restream_auth would.
func TestLoginEncryptedStorage(t *testing.T) {
	site := newLoginSite(t, false)
	key := make([]byte, 32)
	for i := range key {
		key[i] = byte(i * 7)
	}
	t.Setenv("RESTREAM_LOGIN_TEST_KEY", base64.StdEncoding.EncodeToString(key))
	site.loginExtra = "encryption_key {env.RESTREAM_LOGIN_TEST_KEY}"
	runInProcess(t, site.caddyfile())
	newLoginBrowser(t, site).connect()
	st := &certmagic.FileStorage{Path: site.storageDir}
	if _, err := tokensource.LoadRecord(context.Background(), st, "default"); !errors.Is(err, tokensource.ErrUnreadableRecord) {
		t.Fatalf("reading the record without the key: %v, want it encrypted", err)
	}
	kr, err := tokensource.NewKeyring(key)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := tokensource.LoadRecordKeyring(context.Background(), st, "default", kr)
	if err != nil || rec == nil || rec.Generation != 1 || !site.fake.ValidAccessToken(rec.AccessToken) {
		t.Fatalf("encrypted record: %+v, %v", rec, err)
	}
	// A second authorization reads the encrypted record for the next generation.
	if p := newLoginBrowser(t, site).connect(); !strings.Contains(p.body, "<dt>Generation</dt><dd>2</dd>") {
		t.Fatalf("second callback: status %d\n%s", p.status, p.body)
	}
}

// Provisioning refuses what the Caddyfile parser would have caught, for
// JSON configs, and names the field.
func TestLoginProvisionErrors(t *testing.T) {
	t.Setenv("LOGIN_EMPTY_VAR", "")
	base := map[string]any{
		"handler": "restream_auth_login", "client_id": "id", "client_secret": "cs_provision_literal_77",
		"redirect_uri": "https://sidecar.example.com/restream/callback",
	}
	for _, tc := range []struct {
		name   string
		change map[string]any
		want   string
	}{
		{"no redirect_uri", map[string]any{"redirect_uri": nil}, "redirect_uri is required"},
		{"redirect_uri path", map[string]any{"redirect_uri": "https://sidecar.example.com/restream/cb"}, "must end in /callback"},
		{"redirect_uri http", map[string]any{"redirect_uri": "http://sidecar.example.com/restream/callback"}, "plain http is allowed only for loopback"},
		{"authorize_url http", map[string]any{"authorize_url": "http://api.restream.io/login"}, "plain http is allowed only for loopback"},
		{"empty secret", map[string]any{"client_secret": "{env.LOGIN_EMPTY_VAR}"}, "client_secret: evaluated placeholder {env.LOGIN_EMPTY_VAR} is empty"},
		{"unset secret", map[string]any{"client_secret": "{file./nonexistent/restream_secret}"}, "client_secret: "},
		{"bad account", map[string]any{"account": "a/b"}, `account "a/b"`},
		{"bad client_auth", map[string]any{"client_auth": "digest"}, `client_auth "digest"`},
		{"bad encryption_key", map[string]any{"encryption_key": "not-a-key"}, "encryption_key: "},
		{"previous key alone", map[string]any{"encryption_key_previous": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}, "encryption_key_previous needs encryption_key"},
		{"expected_user_id not numeric", map[string]any{"expected_user_id": "alice"}, `expected_user_id "alice": want Restream's numeric user id`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := map[string]any{}
			for k, v := range base {
				h[k] = v
			}
			for k, v := range tc.change {
				if v == nil {
					delete(h, k)
				} else {
					h[k] = v
				}
			}
			cfg := map[string]any{
				"admin":   map[string]any{"disabled": true},
				"storage": map[string]any{"module": "file_system", "root": t.TempDir()},
				"apps": map[string]any{"http": map[string]any{"servers": map[string]any{"s": map[string]any{
					"listen": []string{"127.0.0.1:0"},
					"routes": []any{map[string]any{"handle": []any{h}}},
				}}}},
			}
			raw, _ := json.Marshal(cfg)
			var c caddy.Config
			if err := json.Unmarshal(raw, &c); err != nil {
				t.Fatal(err)
			}
			err := caddy.Validate(&c)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want %q", err, tc.want)
			}
			mustContainNone(t, "error", fmt.Sprint(err), "cs_provision_literal_77")
		})
	}
}
