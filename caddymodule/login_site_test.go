package caddymodule_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// The onboarding route sits behind basic_auth, as documented. The hash is
// `caddy hash-password --plaintext onboard-pass-7 --bcrypt-cost 4` (a low
// cost keeps the race-enabled tests fast).
const (
	loginUser      = "onboard"
	loginPassword  = "onboard-pass-7"
	loginHash      = "$2a$04$nESADfBpr9SyWODZCFi6feiPC8D6rT8jNV7dARYBvFLA4Hd27BI8u"
	loginSecret    = "cs_login_secret_5a4b3c2d"
	loginSecretEnv = "RESTREAM_LOGIN_TEST_CLIENT_SECRET"
	loginCookie    = "restream_auth_login_default"
)

// loginSite is a sidecar with the onboarding route under /restream/ (behind
// basic_auth unless noAuth) and, with proxy, a restream_auth route (no seed)
// for the same account.
type loginSite struct {
	t          *testing.T
	port       int
	adminPort  int // 0: admin off
	storageDir string
	fake       *fakerestream.Server
	authorize  string // the fake consent page
	proxy      bool
	noAuth     bool // no basic_auth in front of the login
	logFile    string
	accessLog  string
	loginExtra string // more restream_auth_login subdirectives
	proxyExtra string // more restream_auth subdirectives
	redirect   string // redirect_uri; default <base>/restream/callback
	extraSite  string // more lines in the site block, after the login's route
	global     string // more global options
}

func (s *loginSite) base() string { return "http://127.0.0.1:" + itoa(s.port) }

func (s *loginSite) redirectURI() string {
	if s.redirect != "" {
		return s.redirect
	}
	return s.base() + "/restream/callback"
}

// loginRoute is a handle block with a restream_auth_login under prefix,
// behind basic_auth unless noAuth, with the fake's endpoints and the
// site's credentials.
func (s *loginSite) loginRoute(prefix, redirectURI, extra string) string {
	auth := fmt.Sprintf("basic_auth {\n\t\t\t%s %s\n\t\t}", loginUser, loginHash)
	if s.noAuth {
		auth = "# no authentication"
	}
	return fmt.Sprintf(`	handle %s* {
		%s
		restream_auth_login {
			client_id test-client
			client_secret {env.%s}
			token_url %s
			authorize_url %s
			redirect_uri %s
			%s
		}
	}
`, prefix, auth, loginSecretEnv, s.fake.TokenURL(), s.authorize, redirectURI, extra)
}

func (s *loginSite) caddyfile() string {
	var b strings.Builder
	admin := "admin off"
	if s.adminPort != 0 {
		admin = "admin 127.0.0.1:" + itoa(s.adminPort)
	}
	fmt.Fprintf(&b, `{
	%s
	storage file_system %s
	auto_https off
	persist_config off
	%s
	%s
}

http://127.0.0.1:%d {
	# The callback's query carries the authorization code: keep it (and the
	# state) out of the access log, as the README recommends.
	log {
		output file %s
		format filter {
			request>uri query {
				replace code REDACTED
				replace state REDACTED
			}
		}
	}
`, admin, s.storageDir, debugLogOptions(s.logFile), s.global, s.port, s.accessLog)
	b.WriteString(s.loginRoute("/restream/", s.redirectURI(), s.loginExtra))
	b.WriteString(s.extraSite)
	if s.proxy {
		fmt.Fprintf(&b, `	handle {
		restream_auth {
			client_id test-client
			client_secret {env.%s}
			token_url %s
			%s
		}
		reverse_proxy %s
	}
`, loginSecretEnv, s.fake.TokenURL(), s.proxyExtra, s.fake.URL())
	}
	b.WriteString("}\n")
	return b.String()
}

func (s *loginSite) record() *tokensource.Record {
	s.t.Helper()
	rec, err := tokensource.LoadRecord(context.Background(), &certmagic.FileStorage{Path: s.storageDir}, "default")
	if err != nil {
		s.t.Fatal(err)
	}
	return rec
}

// logs returns the server log and the access log.
func (s *loginSite) logs() string {
	s.t.Helper()
	out := readFiles(s.t, s.logFile, s.accessLog)
	if !strings.Contains(out, `"uri":"/restream/callback?code=REDACTED`) {
		s.t.Error("the access log has no filtered callback line: the test would not see a leak there")
	}
	return out
}

func newLoginSite(t *testing.T, proxy bool) *loginSite {
	t.Helper()
	fake := fakerestream.New(fakerestream.Options{ClientSecret: loginSecret, Logf: func(string, ...any) {}})
	t.Cleanup(fake.Close)
	authz := httptest.NewServer(fake.AuthorizeHandler())
	t.Cleanup(authz.Close)
	t.Setenv(loginSecretEnv, loginSecret)
	dir := t.TempDir()
	return &loginSite{t: t, port: testproc.Port(t), storageDir: filepath.Join(dir, "storage"), fake: fake,
		authorize: authz.URL + "/login", proxy: proxy, logFile: filepath.Join(dir, "caddy.log"),
		accessLog: filepath.Join(dir, "access.log")}
}

// loginBrowser keeps cookies and follows no redirect on its own; it sends the
// basic_auth credentials to the sidecar only.
type loginBrowser struct {
	t    *testing.T
	site *loginSite
	jar  *cookiejar.Jar
	c    *http.Client
}

func (b *loginBrowser) do(method, rawURL string) loginResp {
	b.t.Helper()
	req, err := http.NewRequest(method, rawURL, nil)
	if err != nil {
		b.t.Fatal(err)
	}
	if strings.HasPrefix(rawURL, b.site.base()+"/") && !b.site.noAuth {
		req.SetBasicAuth(loginUser, loginPassword)
	}
	resp, err := b.c.Do(req)
	if err != nil {
		b.t.Fatalf("%s %s: %v", method, rawURL, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return loginResp{status: resp.StatusCode, header: resp.Header, body: string(body), loc: resp.Header.Get("Location")}
}

func (b *loginBrowser) get(rawURL string) loginResp {
	b.t.Helper()
	return b.do(http.MethodGet, rawURL)
}

// login opens …/login and returns the Location (Restream's consent page)
// and the state in it.
func (b *loginBrowser) login() (location, state string) {
	b.t.Helper()
	p := b.get(b.site.base() + "/restream/login")
	if p.status != http.StatusFound {
		b.t.Fatalf("login: status %d\n%s", p.status, p.body)
	}
	u, err := url.Parse(p.loc)
	if err != nil {
		b.t.Fatal(err)
	}
	return p.loc, u.Query().Get("state")
}

// consent follows the consent page's redirect and returns the callback URL
// it sends the browser to.
func (b *loginBrowser) consent(location string) string {
	b.t.Helper()
	p := b.get(location)
	if p.status != http.StatusFound || !strings.HasPrefix(p.loc, b.site.redirectURI()) {
		b.t.Fatalf("consent page: status %d, Location %q\n%s", p.status, p.loc, p.body)
	}
	return p.loc
}

// flow runs a whole authorization and returns the callback's answer and
// the code it carried.
func (b *loginBrowser) flow() (loginResp, string) {
	b.t.Helper()
	loc, _ := b.login()
	cb := b.consent(loc)
	u, _ := url.Parse(cb)
	return b.get(cb), u.Query().Get("code")
}

// connect runs a whole authorization that must succeed: the callback sends
// the browser to the account's page (303 See Other), which it returns.
func (b *loginBrowser) connect() loginResp {
	b.t.Helper()
	p, _ := b.flow()
	if p.status != http.StatusSeeOther || p.loc != "./" {
		b.t.Fatalf("callback: status %d, Location %q, want 303 to ./\n%s", p.status, p.loc, p.body)
	}
	return b.get(b.site.base() + "/restream/")
}

func (b *loginBrowser) cookie() *http.Cookie {
	u, _ := url.Parse(b.site.redirectURI())
	for _, c := range b.jar.Cookies(u) {
		if c.Name == loginCookie {
			return c
		}
	}
	return nil
}

func newLoginBrowser(t *testing.T, site *loginSite) *loginBrowser {
	jar, err := cookiejar.New(nil)
	if err != nil {
		t.Fatal(err)
	}
	return &loginBrowser{t: t, site: site, jar: jar, c: &http.Client{
		Jar: jar, Timeout: 30 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}}
}

type loginResp struct {
	status int
	header http.Header
	body   string
	loc    string
}

func wantLoginNoStore(t *testing.T, what string, p loginResp) {
	t.Helper()
	if cc := p.header.Get("Cache-Control"); cc != "no-store" {
		t.Errorf("%s: Cache-Control %q, want no-store", what, cc)
	}
}

// wantLoginErrorPage checks a refusal: status, an HTML page that says why and
// links back to …/login, and no secret in it.
func wantLoginErrorPage(t *testing.T, what string, p loginResp, status int, says string, secrets ...string) {
	t.Helper()
	if p.status != status {
		t.Errorf("%s: status %d, want %d\n%s", what, p.status, status, p.body)
	}
	if ct := p.header.Get("Content-Type"); !strings.HasPrefix(ct, "text/html") {
		t.Errorf("%s: Content-Type %q", what, ct)
	}
	wantLoginNoStore(t, what, p)
	if !strings.Contains(p.body, says) {
		t.Errorf("%s: page does not say %q:\n%s", what, says, p.body)
	}
	if !strings.Contains(p.body, `<a href="./login">Start again</a>`) {
		t.Errorf("%s: page has no link to start again:\n%s", what, p.body)
	}
	mustContainNone(t, what+" page", p.body, append(secrets, loginSecret)...)
}

var (
	loginAlice = fakerestream.User{ID: 4242, Username: "alice", Email: "alice@example.com"}
	loginBob   = fakerestream.User{ID: 77, Username: "bob"}
)

// serverLog returns the server log (after Caddy stopped, so it is flushed).
func (s *loginSite) serverLog() string {
	s.t.Helper()
	b, err := os.ReadFile(s.logFile)
	if err != nil {
		s.t.Fatal(err)
	}
	return string(b)
}

// wantUnchanged checks that storage still holds before (nil: nothing).
func (s *loginSite) wantUnchanged(what string, before *tokensource.Record) {
	s.t.Helper()
	after := s.record()
	switch {
	case before == nil && after != nil:
		s.t.Errorf("%s: a record was stored (generation %d)", what, after.Generation)
	case before != nil && (after == nil || after.Chain != before.Chain || after.Generation != before.Generation || after.AccessToken != before.AccessToken):
		s.t.Errorf("%s: the stored record changed", what)
	}
}

// adminAccounts reads GET /restream_auth/ on the site's admin endpoint.
func (s *loginSite) adminAccounts() (string, []map[string]any) {
	s.t.Helper()
	resp, err := noKeepAlive.Get(fmt.Sprintf("http://127.0.0.1:%d/restream_auth/", s.adminPort))
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var out struct {
		Accounts []map[string]any `json:"accounts"`
	}
	if err := json.Unmarshal(raw, &out); err != nil {
		s.t.Fatalf("admin status %d: %s", resp.StatusCode, raw)
	}
	return string(raw), out.Accounts
}

// wantOnlyLive fails unless, of every access token the fake issued, only
// keep (the account's chain) is still valid: a pair the login refused was
// revoked, not just dropped.
func wantOnlyLive(t *testing.T, fake *fakerestream.Server, keep string) {
	t.Helper()
	for _, tok := range fake.IssuedTokens() {
		if strings.HasPrefix(tok, "at_") && tok != keep && fake.ValidAccessToken(tok) {
			t.Errorf("a refused pair is still valid at Restream (access token %.10s…)", tok)
		}
	}
}
