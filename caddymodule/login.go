package caddymodule

import (
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"net/http"
	"net/url"
	"path"
	"regexp"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

func init() {
	caddy.RegisterModule(Login{})
}

// DefaultAuthorizeURL is Restream's authorization (login and consent) page.
const DefaultAuthorizeURL = "https://api.restream.io/login"

// loginStateTTL bounds the time between opening …/login and arriving at
// …/callback.
const loginStateTTL = 10 * time.Minute

// Login is the onboarding flow: it sends a browser to Restream's consent page
// and, on the way back, exchanges the authorization code, reads which
// Restream user authorized it, and installs the new pair as the account's
// chain (under the account's lease, as the next generation). A running
// restream_auth of the account serves with it at once.
//
//	GET  <prefix>/           the account's state, with a button to connect or re-authorize
//	GET  <prefix>/login      302 to Restream's authorize URL, state in a signed cookie
//	GET  <prefix>/callback   verifies the state, exchanges the code, installs the chain, 303 to <prefix>/
//
// Whoever completes the flow decides which Restream account the sidecar acts
// as, so every page answers 403 unless Caddy authenticated the request
// (basic_auth, or forward_auth that sets {http.auth.user.id}) or
// allow_unauthenticated is set. expected_user_id pins the Restream user;
// without allow_account_change, a chain whose user is known is never
// replaced by another user's.
//
// The state cookie is signed with a key derived from the client secret, so a
// flow may start on one instance and finish on another behind a load
// balancer, as long as they share the client secret.
type Login struct {
	// The account whose chain the flow installs. 1 to 64 letters, digits,
	// '.', '_' or '-'. Default: "default".
	Account string `json:"account,omitempty"`

	// The Restream application's client id, as restream_auth's of the
	// account. Required. {env.*} and {file.*} placeholders are resolved at
	// provisioning.
	ClientID string `json:"client_id,omitempty"`

	// The Restream application's client secret, as restream_auth's of the
	// account; the state cookie's key is derived from it. Required.
	// {env.*} and {file.*} placeholders are resolved at provisioning.
	ClientSecret string `json:"client_secret,omitempty"`

	// Restream's token endpoint, as restream_auth's: https, or http to a
	// loopback host. The profile that says which user authorized is read
	// on its host, at /v2/user/profile. Default:
	// https://api.restream.io/oauth/token.
	TokenURL string `json:"token_url,omitempty"`

	// How the client credentials reach the token endpoint: "basic" or
	// "body". Default: "basic".
	ClientAuth string `json:"client_auth,omitempty"`

	// Restream's consent page, where …/login sends the browser: https, or
	// http to a loopback host, without a fragment. Default:
	// https://api.restream.io/login.
	AuthorizeURL string `json:"authorize_url,omitempty"`

	// The public URL of <prefix>/callback, exactly as registered with the
	// Restream application: https, or http to a loopback host, no
	// fragment, and a path ending in /callback. Required.
	RedirectURI string `json:"redirect_uri,omitempty"`

	// restream_auth's at-rest encryption key for the account. It matters
	// when no restream_auth of the account runs in the same process: the
	// login then writes (and, for the next generation, reads) the stored
	// record itself. Default: none. {env.*} and {file.*} placeholders are
	// resolved at provisioning.
	EncryptionKey string `json:"encryption_key,omitempty"`

	// restream_auth's former encryption key, accepted for reading only.
	// Needs encryption_key. Default: none. {env.*} and {file.*}
	// placeholders are resolved at provisioning.
	EncryptionKeyPrevious string `json:"encryption_key_previous,omitempty"`

	// Whether the flow is served to requests that no Caddy authentication
	// handler identified. Default: false; they get 403, as whoever
	// completes the flow decides which account the sidecar acts as.
	AllowUnauthenticated bool `json:"allow_unauthenticated,omitempty"`

	// The numeric id of the only Restream user the account may act as; an
	// authorization by another user, or one whose user cannot be read,
	// installs nothing. Default: none, any user.
	ExpectedUserID string `json:"expected_user_id,omitempty"`

	// Whether an authorization may replace a chain that acts as another
	// Restream user. Default: false, refused.
	AllowAccountChange bool `json:"allow_account_change,omitempty"`

	// Resolved secrets stay unexported: `servers { trace }` logs handler structs.
	clientID, clientSecret string
	keyring                *tokensource.Keyring

	authorize  *url.URL
	cookieName string
	cookiePath string
	secure     bool
	stateKey   []byte
	own        *tokensource.Source // exchanges codes; installs when no restream_auth of the account runs
	ownPool    pooledSource        // own with its backend (Caddy storage or the app's Redis)
	app        *App                // this config's restream_auth sources, the ones the callback installs into
	logger     *zap.Logger
	strangers  *strangerLog // refused unauthenticated requests, rate-limited at WARN
	now        func() time.Time
}

// CaddyModule returns the Caddy module information.
func (Login) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.restream_auth_login",
		New: func() caddy.Module { return new(Login) },
	}
}

// Provision resolves placeholders, checks the URLs and derives the state
// key. It does not contact the token endpoint.
func (l *Login) Provision(ctx caddy.Context) error {
	l.logger = ctx.Logger()
	l.strangers = new(strangerLog)
	l.now = time.Now
	style, err := l.resolveSettings()
	if err != nil {
		return err
	}
	if err := l.openSource(ctx, style); err != nil {
		return err
	}
	if err := l.attach(ctx); err != nil {
		return err
	}
	if l.AllowUnauthenticated {
		l.logger.Warn("allow_unauthenticated is set: anyone who reaches this route decides which Restream account the sidecar acts as; "+
			"make sure something in front of it authenticates operators", zap.String("account", l.Account), zap.String("redirect_uri", l.RedirectURI))
	}
	return nil
}

// resolveSettings applies defaults, resolves placeholders, checks every
// setting and derives the state cookie's name, path and key. It returns how
// the client authenticates.
func (l *Login) resolveSettings() (tokensource.AuthStyle, error) {
	if l.Account == "" {
		l.Account = DefaultAccount
	}
	if err := checkAccountName(l.Account); err != nil {
		return 0, err
	}
	var err error
	repl := caddy.NewReplacer()
	client, err := resolveClient(repl, fmt.Sprintf("restream_auth_login %q", l.Account), l.ClientID, l.ClientSecret, &l.TokenURL, l.ClientAuth)
	if err != nil {
		return 0, err
	}
	l.clientID, l.clientSecret = client.id, client.secret
	if l.keyring, err = resolveKeyring(repl, l.EncryptionKey, l.EncryptionKeyPrevious); err != nil {
		return 0, err
	}
	if l.AuthorizeURL == "" {
		l.AuthorizeURL = DefaultAuthorizeURL
	}
	if l.authorize, err = checkAuthorizeURL(l.AuthorizeURL); err != nil {
		return 0, err
	}
	if l.RedirectURI == "" {
		return 0, fmt.Errorf("restream_auth_login %q: redirect_uri is required", l.Account)
	}
	redirect, err := checkRedirectURI(l.RedirectURI)
	if err != nil {
		return 0, err
	}
	if l.ExpectedUserID != "" && !userIDPattern.MatchString(l.ExpectedUserID) {
		return 0, fmt.Errorf("restream_auth_login %q: expected_user_id %q: want Restream's numeric user id", l.Account, l.ExpectedUserID)
	}
	l.nameCookie(redirect)
	if l.stateKey, err = loginStateKey(l.clientSecret, l.clientID, l.Account); err != nil {
		return 0, fmt.Errorf("deriving the state key: %v", err)
	}
	return client.style, nil
}

// nameCookie sets the state cookie's name and path for the callback at
// redirect.
func (l *Login) nameCookie(redirect *url.URL) {
	l.secure = redirect.Scheme == "https"
	if l.secure {
		// A __Host- cookie: browsers take it only Secure, for the whole
		// host and from this host alone, so no sibling (sub)domain can
		// plant or overwrite the state.
		l.cookieName, l.cookiePath = "__Host-restream_auth_login_"+l.Account, "/"
		return
	}
	// The cookie must reach the callback wherever the flow started; with
	// login and callback in one route this is the route's prefix.
	l.cookieName, l.cookiePath = "restream_auth_login_"+l.Account, path.Dir(redirect.Path)
	if !strings.HasSuffix(l.cookiePath, "/") {
		l.cookiePath += "/"
	}
}

// openSource opens the login's own token source, which exchanges codes and
// installs when no restream_auth of the account runs. It keeps the chain
// where restream_auth does: Caddy storage, or the restream_auth app's Redis.
func (l *Login) openSource(ctx caddy.Context, style tokensource.AuthStyle) error {
	backend, err := storeFor(ctx, l.Account, l.keyring, guardStorage(ctx.Storage(), l.logger), l.logger)
	if err != nil {
		return err
	}
	l.ownPool, err = newPooledSource(tokensource.Config{
		Account:      l.Account,
		ClientID:     l.clientID,
		ClientSecret: l.clientSecret,
		TokenURL:     l.TokenURL,
		AuthStyle:    style,
		HTTPClient:   &http.Client{Transport: tokenTransport()},
		Logger:       l.logger.Named("tokensource"),
		Keyring:      l.keyring,
		ProfileURL:   tokensource.ProfileURLFor(l.TokenURL),
	}, backend)
	if err != nil {
		return fmt.Errorf("restream_auth_login %q: %w", l.Account, err)
	}
	l.own = l.ownPool.Source
	return nil
}

// attach finds the config's restream_auth sources and checks those
// provisioned so far; LoginApp lets the ones provisioned later check it.
func (l *Login) attach(ctx caddy.Context) error {
	app, err := ctx.App("restream_auth")
	if err != nil {
		return err
	}
	l.app = app.(*App)
	if err := l.checkBinding(appSources(l.app)); err != nil {
		return err
	}
	checker, err := ctx.App("restream_auth_login")
	if err != nil {
		return err
	}
	checker.(*LoginApp).add(l)
	return nil
}

// Cleanup closes the login's own token source (it never runs a refresher).
func (l *Login) Cleanup() error {
	if l.own != nil {
		return l.ownPool.Destruct() // and gives its backend back
	}
	return nil
}

// checkAuthorizeURL requires https (http only for loopback) and no fragment.
func checkAuthorizeURL(raw string) (*url.URL, error) {
	if err := checkEndpointURL("authorize_url", raw); err != nil {
		return nil, err
	}
	u, _ := url.Parse(raw)
	if u.Fragment != "" || strings.Contains(raw, "#") {
		return nil, fmt.Errorf("authorize_url %q must not have a fragment", raw)
	}
	return u, nil
}

// checkRedirectURI requires the public callback URL: https (http only for
// loopback), no fragment, and a path ending in /callback, the segment this
// handler serves.
func checkRedirectURI(raw string) (*url.URL, error) {
	if err := checkEndpointURL("redirect_uri", raw); err != nil {
		return nil, err
	}
	u, _ := url.Parse(raw)
	switch {
	case u.Fragment != "" || strings.Contains(raw, "#"):
		return nil, fmt.Errorf("redirect_uri %q must not have a fragment", raw)
	case !strings.HasSuffix(u.Path, "/callback"):
		return nil, fmt.Errorf("redirect_uri %q: the path must end in /callback (restream_auth_login serves <prefix>/login and <prefix>/callback)", raw)
	}
	return u, nil
}

// ServeHTTP serves <prefix>/, …/login and …/callback; it is terminal and
// never calls next.
func (l *Login) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	h := w.Header()
	h.Set("Cache-Control", "no-store")
	h.Set("Pragma", "no-cache")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
	if !l.AllowUnauthenticated && authenticatedUser(r) == "" {
		return l.unauthenticated(w, r)
	}
	switch loginRoute(r.URL.Path) {
	case "login":
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			return l.methodNotAllowed(w, r, "GET, HEAD")
		}
		return l.start(w, r)
	case "callback":
		if r.Method != http.MethodGet {
			return l.methodNotAllowed(w, r, "GET")
		}
		return l.callback(w, r)
	case "status":
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			return l.methodNotAllowed(w, r, "GET, HEAD")
		}
		return l.status(w, r)
	}
	return l.page(w, r, http.StatusNotFound, loginPage{
		Title:      "Not found",
		Paragraphs: []string{"This route serves only …/ (the account's state), …/login (start authorizing a Restream account) and …/callback."},
	})
}

// loginRoute names the page a path asks for: "login", "callback",
// "status" (a path ending in "/"), or "" for none.
func loginRoute(p string) string {
	switch seg := loginSegment(p); {
	case seg == "login", seg == "callback":
		return seg
	case seg == "" && strings.HasSuffix(p, "/"):
		if parent := loginSegment(strings.TrimSuffix(p, "/")); parent != "login" && parent != "callback" {
			return "status"
		}
	}
	return ""
}

func loginSegment(p string) string {
	return p[strings.LastIndexByte(p, '/')+1:]
}

// start binds a fresh state to the browser and sends it to Restream.
func (l *Login) start(w http.ResponseWriter, r *http.Request) error {
	var b [32]byte
	_, _ = rand.Read(b[:])
	state := base64.RawURLEncoding.EncodeToString(b[:])
	exp := l.now().Add(loginStateTTL).Unix()
	http.SetCookie(w, l.cookie(l.signState(state, exp), int(loginStateTTL/time.Second)))
	u := *l.authorize
	q := u.Query()
	q.Set("response_type", "code")
	q.Set("client_id", l.clientID)
	q.Set("redirect_uri", l.RedirectURI)
	q.Set("state", state)
	u.RawQuery = q.Encode()
	loc := u.String()
	w.Header().Set("Location", loc)
	l.logger.Debug("login started: redirecting to Restream", zap.String("account", l.Account), zap.String("authorize_url", l.authorize.Redacted()))
	return l.page(w, r, http.StatusFound, loginPage{
		Title: "Continue to Restream",
		Links: []pageLink{{URL: loc, Text: "Continue to Restream"}},
	})
}

// cookie is the state cookie; maxAge < 0 clears it.
func (l *Login) cookie(value string, maxAge int) *http.Cookie {
	return &http.Cookie{
		Name:     l.cookieName,
		Value:    value,
		Path:     l.cookiePath,
		MaxAge:   maxAge,
		HttpOnly: true,
		Secure:   l.secure,
		SameSite: http.SameSiteLaxMode,
	}
}

func (e *refusal) Error() string { return e.f.reason }

// MarshalLogObject keeps secrets out of logs that print the handler, such as
// `servers { trace }`, even when they were written as literals.
func (l *Login) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("account", l.Account)
	enc.AddString("token_url", l.TokenURL)
	enc.AddString("client_auth", l.ClientAuth)
	enc.AddString("authorize_url", l.AuthorizeURL)
	enc.AddString("redirect_uri", l.RedirectURI)
	enc.AddBool("encrypted", l.keyring != nil)
	enc.AddBool("allow_unauthenticated", l.AllowUnauthenticated)
	enc.AddString("expected_user_id", l.ExpectedUserID)
	enc.AddBool("allow_account_change", l.AllowAccountChange)
	return nil
}

// userIDPattern is a Restream user id: a positive integer.
var userIDPattern = regexp.MustCompile(`^[1-9][0-9]{0,19}$`)

// Interface guards
var (
	_ caddy.Provisioner           = (*Login)(nil)
	_ caddy.CleanerUpper          = (*Login)(nil)
	_ caddyhttp.MiddlewareHandler = (*Login)(nil)
	_ zapcore.ObjectMarshaler     = (*Login)(nil)
)
