package caddymodule

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

func init() {
	caddy.RegisterModule(Login{})
	httpcaddyfile.RegisterHandlerDirective("restream_auth_login", parseLoginCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("restream_auth_login", httpcaddyfile.Before, "reverse_proxy")
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
	// Account names the chain to install; default "default".
	Account      string `json:"account,omitempty"`
	ClientID     string `json:"client_id,omitempty"`
	ClientSecret string `json:"client_secret,omitempty"`
	// TokenURL is Restream's token endpoint (default
	// https://api.restream.io/oauth/token). The profile that says which
	// user authorized is read on its host, at /v2/user/profile.
	TokenURL string `json:"token_url,omitempty"`
	// ClientAuth is "basic" (default) or "body".
	ClientAuth string `json:"client_auth,omitempty"`
	// AuthorizeURL is Restream's consent page (default https://api.restream.io/login).
	AuthorizeURL string `json:"authorize_url,omitempty"`
	// RedirectURI is the public URL of <prefix>/callback, exactly as
	// registered with the Restream application.
	RedirectURI string `json:"redirect_uri,omitempty"`
	// EncryptionKey and EncryptionKeyPrevious are restream_auth's at-rest
	// encryption keys. They matter when no restream_auth of the account runs
	// in the same process: the login then writes (and, for the next
	// generation, reads) the stored record itself.
	EncryptionKey         string `json:"encryption_key,omitempty"`
	EncryptionKeyPrevious string `json:"encryption_key_previous,omitempty"`
	// AllowUnauthenticated serves the flow to requests that no Caddy
	// authentication handler identified. Default false: they get 403, as
	// whoever completes the flow decides which account the sidecar acts as.
	AllowUnauthenticated bool `json:"allow_unauthenticated,omitempty"`
	// ExpectedUserID is the numeric id of the only Restream user the account
	// may act as; an authorization by another user, or one whose user cannot
	// be read, installs nothing. Default: none.
	ExpectedUserID string `json:"expected_user_id,omitempty"`
	// AllowAccountChange lets an authorization replace a chain that acts as
	// another Restream user. Default false: refused.
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
	l.now = time.Now
	if l.Account == "" {
		l.Account = DefaultAccount
	}
	if !accountPattern.MatchString(l.Account) {
		return fmt.Errorf("account %q: use 1-64 letters, digits, '.', '_' or '-'", l.Account)
	}
	var err error
	repl := caddy.NewReplacer()
	client, err := resolveClient(repl, fmt.Sprintf("restream_auth_login %q", l.Account), l.ClientID, l.ClientSecret, &l.TokenURL, l.ClientAuth)
	if err != nil {
		return err
	}
	l.clientID, l.clientSecret = client.id, client.secret
	if l.keyring, err = resolveKeyring(repl, l.EncryptionKey, l.EncryptionKeyPrevious); err != nil {
		return err
	}
	if l.AuthorizeURL == "" {
		l.AuthorizeURL = DefaultAuthorizeURL
	}
	if l.authorize, err = checkAuthorizeURL(l.AuthorizeURL); err != nil {
		return err
	}
	if l.RedirectURI == "" {
		return fmt.Errorf("restream_auth_login %q: redirect_uri is required", l.Account)
	}
	redirect, err := checkRedirectURI(l.RedirectURI)
	if err != nil {
		return err
	}
	if l.ExpectedUserID != "" && !userIDPattern.MatchString(l.ExpectedUserID) {
		return fmt.Errorf("restream_auth_login %q: expected_user_id %q: want Restream's numeric user id", l.Account, l.ExpectedUserID)
	}
	l.secure = redirect.Scheme == "https"
	if l.secure {
		// A __Host- cookie: browsers take it only Secure, for the whole
		// host and from this host alone, so no sibling (sub)domain can
		// plant or overwrite the state.
		l.cookieName, l.cookiePath = "__Host-restream_auth_login_"+l.Account, "/"
	} else {
		// The cookie must reach the callback wherever the flow started;
		// with login and callback in one route this is the route's prefix.
		l.cookieName, l.cookiePath = "restream_auth_login_"+l.Account, path.Dir(redirect.Path)
		if !strings.HasSuffix(l.cookiePath, "/") {
			l.cookiePath += "/"
		}
	}
	if l.stateKey, err = loginStateKey(l.clientSecret, l.clientID, l.Account); err != nil {
		return fmt.Errorf("deriving the state key: %v", err)
	}
	// The login's own source keeps the chain where restream_auth does:
	// Caddy storage, or the restream_auth app's Redis.
	backend, err := storeFor(ctx, l.Account, l.keyring, guardStorage(ctx.Storage(), l.logger), l.logger)
	if err != nil {
		return err
	}
	l.ownPool, err = newPooledSource(tokensource.Config{
		Account:      l.Account,
		ClientID:     l.clientID,
		ClientSecret: l.clientSecret,
		TokenURL:     l.TokenURL,
		AuthStyle:    client.style,
		HTTPClient:   &http.Client{Transport: tokenTransport()},
		Logger:       l.logger.Named("tokensource"),
		Keyring:      l.keyring,
		ProfileURL:   tokensource.ProfileURLFor(l.TokenURL),
	}, backend)
	if err != nil {
		return fmt.Errorf("restream_auth_login %q: %w", l.Account, err)
	}
	l.own = l.ownPool.Source
	if err := l.attach(ctx); err != nil {
		return err
	}
	if l.AllowUnauthenticated {
		l.logger.Warn("allow_unauthenticated is set: anyone who reaches this route decides which Restream account the sidecar acts as; "+
			"make sure something in front of it authenticates operators", zap.String("account", l.Account), zap.String("redirect_uri", l.RedirectURI))
	}
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

// checkBinding refuses a restream_auth of the account that is bound
// otherwise than this login: the chain the login installs would be
// refreshed with other credentials, or stored where, or as, that source
// cannot read it. Secrets are compared by fingerprint and keys by key id;
// neither is printed.
func (l *Login) checkBinding(srcs []*tokensource.Source) error {
	mine := l.own.Binding()
	for _, src := range srcs {
		b := src.Binding()
		if b.Account != l.Account {
			continue
		}
		there := fmt.Sprintf("restream_auth %q", b.Account)
		var diffs []string
		if b.ClientID != mine.ClientID {
			diffs = append(diffs, fmt.Sprintf("client_id differs from %s (%q here, %q there)", there, mine.ClientID, b.ClientID))
		}
		if b.SecretFingerprint != mine.SecretFingerprint {
			diffs = append(diffs, fmt.Sprintf("client_secret differs from %s (values not shown)", there))
		}
		if b.TokenURL != mine.TokenURL {
			diffs = append(diffs, fmt.Sprintf("token_url differs from %s (%q here, %q there)", there, mine.TokenURL, b.TokenURL))
		}
		if a, z := storageIdentity(mine.Storage), storageIdentity(b.Storage); a != z {
			diffs = append(diffs, fmt.Sprintf("storage differs from %s (%s here, %s there)", there, a, z))
		}
		if b.KeyIDs != mine.KeyIDs {
			diffs = append(diffs, fmt.Sprintf("encryption keys differ from %s (key ids %s here, %s there)", there, keyIDsText(mine.KeyIDs), keyIDsText(b.KeyIDs)))
		}
		if len(diffs) > 0 {
			return fmt.Errorf("restream_auth_login %q: %s; the login installs the chain that restream_auth refreshes: "+
				"give both the same client_id, client_secret, token_url, storage and encryption keys", l.Account, strings.Join(diffs, "; "))
		}
	}
	return nil
}

func keyIDsText(ids string) string {
	if ids == "" {
		return "none"
	}
	return strconv.Quote(ids)
}

// appSources lists the sources a config's restream_auth handlers registered.
func appSources(a *App) []*tokensource.Source {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.sources)
}

// installer is the source the callback installs into: this config's
// restream_auth of the account, bound like the login (as checked when the
// config loaded), so it serves the new chain at once; without one, the
// login's own source stores the chain for the sources that will read it.
func (l *Login) installer() (src *tokensource.Source, live bool) {
	for _, s := range appSources(l.app) {
		if s.Account() == l.Account && l.checkBinding([]*tokensource.Source{s}) == nil {
			return s, true
		}
	}
	return l.own, false
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
	if !l.AllowUnauthenticated && loginAuthUser(r) == "" {
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

// unauthenticated refuses a request that no Caddy authentication handler
// identified: the flow decides which Restream account the sidecar acts as.
func (l *Login) unauthenticated(w http.ResponseWriter, r *http.Request) error {
	l.logger.Warn("login route refused a request that no authentication handler identified",
		zap.String("account", l.Account), zap.String("remote_ip", loginRemoteIP(r)))
	return l.page(w, r, http.StatusForbidden, loginPage{
		Title: "Sign-in required",
		Paragraphs: []string{
			"Whoever completes this flow decides which Restream account the sidecar acts as, so it answers only requests that Caddy authenticated.",
			"Put basic_auth in front of restream_auth_login in the Caddyfile (create the hash with caddy hash-password), for example:",
		},
		Code: "handle /restream/* {\n\tbasic_auth {\n\t\toperator <hash from caddy hash-password>\n\t}\n\trestream_auth_login {\n\t\t…\n\t}\n}",
		After: []string{
			"With forward_auth, copy the user header and set {http.auth.user.id} from it before restream_auth_login " +
				"(inside a route block: vars http.auth.user.id {http.request.header.Remote-User}).",
			"If something in front of Caddy already authenticates every request to this route, add allow_unauthenticated to restream_auth_login.",
		},
	})
}

func (l *Login) methodNotAllowed(w http.ResponseWriter, r *http.Request, allow string) error {
	w.Header().Set("Allow", allow)
	return l.page(w, r, http.StatusMethodNotAllowed, loginPage{
		Title:      "Method not allowed",
		Paragraphs: []string{"Use " + allow + "."},
	})
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

// callbackFailure is a refused callback: what the page and the log say.
type callbackFailure struct {
	status int
	reason string // short, for the log
	title  string
	text   []string
	detail string // redacted, shown and logged
}

// refusal carries a callbackFailure through an install check.
type refusal struct{ f *callbackFailure }

func (e *refusal) Error() string { return e.f.reason }

// callback verifies the state, exchanges the code, identifies the Restream
// user, installs the chain and sends the browser to <prefix>/, so that the
// spent code leaves the address bar.
func (l *Login) callback(w http.ResponseWriter, r *http.Request) error {
	// The state is single-use whatever happens next.
	http.SetCookie(w, l.cookie("", -1))
	q := r.URL.Query()
	code, state, oauthErr := q.Get("code"), q.Get("state"), q.Get("error")
	if f := l.checkCallback(r, code, state, oauthErr); f != nil {
		return l.fail(w, r, f)
	}
	if f := l.checkStoredRecord(r.Context()); f != nil {
		return l.fail(w, r, f)
	}
	rec, err := l.own.ExchangeCode(r.Context(), code, l.RedirectURI)
	if err != nil {
		return l.fail(w, r, exchangeFailure(err, l.redact(err.Error(), code, state)))
	}
	secrets := []string{code, state, rec.AccessToken, rec.RefreshToken}
	// The pair is not the account's chain yet: the user it acts as decides
	// whether it may become so.
	user, profileErr := l.own.ReadUser(r.Context(), rec.AccessToken)
	var profileDetail string
	if profileErr != nil {
		profileDetail = l.redact(profileErr.Error(), secrets...)
	}
	rec.User = user
	if f := l.checkExpectedUser(user, profileDetail); f != nil {
		return l.fail(w, r, f)
	}
	installer, live := l.installer()
	tok, err := installer.InstallPair(r.Context(), rec, func(stored *tokensource.Record) error {
		if f := l.checkAccountChange(stored, user, profileDetail); f != nil {
			return &refusal{f}
		}
		return nil
	})
	var refused *refusal
	switch {
	case errors.As(err, &refused):
		return l.fail(w, r, refused.f)
	case err != nil:
		return l.fail(w, r, &callbackFailure{
			status: http.StatusInternalServerError, reason: "storing the new chain failed",
			title: "The authorization could not be stored",
			text: []string{"Restream authorized the account, but the sidecar could not store the new token chain, so it is not in use. " +
				"Check the storage, then start again."},
			detail: l.redact(err.Error(), secrets...),
		})
	}
	fields := []zap.Field{zap.String("account", l.Account), zap.Uint64("generation", tok.Generation),
		zap.Time("access_expires_at", tok.Expiry), zap.Bool("served_at_once", live),
		zap.String("operator", loginAuthUser(r)), zap.String("remote_ip", loginRemoteIP(r))}
	if user != nil {
		l.logger.Info("installed a new token chain from the login flow",
			append(fields, zap.String("restream_user_id", user.ID), zap.String("restream_username", user.Username))...)
	} else {
		l.logger.Warn("installed a new token chain from the login flow; its Restream user is unknown (the next rotation tries again)",
			append(fields, zap.String("profile_error", profileDetail))...)
	}
	w.Header().Set("Location", "./")
	return l.page(w, r, http.StatusSeeOther, loginPage{
		Title: "Restream account connected",
		Links: []pageLink{{URL: "./", Text: "Show the account"}},
	})
}

// checkCallback refuses denied consent, errors from Restream, and a state
// that is missing, forged, expired, bound to another flow or used before.
// A state that passes is spent.
func (l *Login) checkCallback(r *http.Request, code, state, oauthErr string) *callbackFailure {
	again := "Start again to authorize the account."
	switch {
	case oauthErr == "access_denied" || (oauthErr == "" && code == "" && state == ""):
		// Restream redirects with no parameters at all when consent is denied.
		return &callbackFailure{status: http.StatusForbidden, reason: "consent denied",
			title: "Authorization was not granted",
			text:  []string{"Restream did not authorize the sidecar (consent was denied or cancelled). Nothing was changed.", again}}
	case oauthErr != "":
		return &callbackFailure{status: http.StatusBadGateway, reason: "Restream returned an error",
			title:  "Restream returned an error",
			text:   []string{"Restream did not issue an authorization code. Nothing was changed.", again},
			detail: "error=" + loginOAuthCode(oauthErr)}
	case code == "" || state == "":
		return &callbackFailure{status: http.StatusBadRequest, reason: "incomplete callback",
			title: "Incomplete callback",
			text:  []string{"The callback lacks the authorization code or the state. Nothing was changed.", again}}
	}
	c, err := r.Cookie(l.cookieName)
	if err != nil || c.Value == "" {
		return &callbackFailure{status: http.StatusBadRequest, reason: "no state cookie",
			title: "No authorization in progress in this browser",
			text: []string{"This browser did not start the authorization here, or its cookie expired (after " +
				humanDuration(loginStateTTL) + "), was used already, or was blocked. Start and finish the flow in the same browser, " +
				"on the host of the configured redirect_uri. Nothing was changed.", again}}
	}
	now := l.now()
	want, exp, err := l.verifyState(c.Value, now)
	if err != nil {
		f := &callbackFailure{status: http.StatusBadRequest, reason: "invalid state cookie",
			title: "The authorization could not be verified",
			text: []string{"The state cookie is not valid (tampered with, signed with another client secret, " +
				"or issued for another redirect_uri or account). Nothing was changed.", again}}
		if errors.Is(err, errStateExpired) {
			f.reason, f.title = "state expired", "The authorization took too long"
			f.text = []string{"More than " + humanDuration(loginStateTTL) + " passed since the authorization started. Nothing was changed.", again}
		}
		return f
	}
	if subtle.ConstantTimeCompare([]byte(want), []byte(state)) != 1 {
		return &callbackFailure{status: http.StatusBadRequest, reason: "state mismatch",
			title: "The authorization could not be verified",
			text: []string{"The state returned by Restream does not match the one this browser started with " +
				"(an old or forged link, or a flow started in another tab). Nothing was changed.", again}}
	}
	if !spentStates.spend(l.Account+"\x00"+state, exp, now) {
		return &callbackFailure{status: http.StatusBadRequest, reason: "state replayed",
			title: "This authorization was used already",
			text: []string{"This callback (its state) was completed before; a state works once. " +
				"Nothing was changed. Reloading a finished callback does this: the account's page shows what is connected.", again}}
	}
	return nil
}

// checkStoredRecord refuses, before the code is spent, to replace a stored
// record that exists but cannot be read: it is never overwritten, as it may
// hold the only live refresh token.
func (l *Login) checkStoredRecord(ctx context.Context) *callbackFailure {
	ctx, cancel := context.WithTimeout(ctx, tokensource.StorageTimeout)
	defer cancel()
	_, err := l.ownPool.loadRecord(ctx)
	if !errors.Is(err, tokensource.ErrCorruptRecord) && !errors.Is(err, tokensource.ErrUnreadableRecord) {
		return nil // a transient read error is the install's to report
	}
	return &callbackFailure{
		status: http.StatusConflict, reason: "stored record unreadable",
		title: "The stored token record cannot be read",
		text: []string{"The account's stored token record exists but cannot be read with this configuration. It is never " +
			"overwritten, as it may hold the only live refresh token: fix it (for example, configure the encryption key it " +
			"was written with) or delete it, then start again. The authorization code was not used."},
		detail: err.Error(),
	}
}

// checkExpectedUser refuses a user other than expected_user_id, and a user
// that could not be read while expected_user_id is set.
func (l *Login) checkExpectedUser(user *tokensource.User, profileErr string) *callbackFailure {
	switch {
	case l.ExpectedUserID == "":
		return nil
	case user == nil:
		return unidentified(profileErr, "restream_auth_login is pinned to Restream user id "+l.ExpectedUserID+" (expected_user_id)")
	case user.ID != l.ExpectedUserID:
		return &callbackFailure{status: http.StatusForbidden, reason: "not the expected Restream user",
			title: "This is not the expected Restream account",
			text: []string{"You authorized Restream user " + userText(user) + ", but restream_auth_login is pinned to Restream user id " +
				l.ExpectedUserID + " (expected_user_id). Nothing was installed.",
				"Sign in to Restream as that account (sign out of Restream first if another account is signed in), then start again."}}
	}
	return nil
}

// checkAccountChange runs under the account's lease with the stored record:
// a chain whose user is known is replaced only by the same user's, unless
// allow_account_change is set.
func (l *Login) checkAccountChange(stored *tokensource.Record, user *tokensource.User, profileErr string) *callbackFailure {
	if l.AllowAccountChange || !stored.HasPair() || stored.User == nil {
		return nil
	}
	switch {
	case user == nil:
		return unidentified(profileErr, "the sidecar acts as Restream user "+userText(stored.User))
	case user.ID != stored.User.ID:
		return &callbackFailure{status: http.StatusConflict, reason: "another Restream user",
			title: "This is another Restream account",
			text: []string{"The sidecar acts as Restream user " + userText(stored.User) + "; you authorized Restream user " +
				userText(user) + ". Nothing was installed.",
				"To connect that account instead, add allow_account_change to restream_auth_login, reload Caddy and start again. " +
					"To re-authorize the current account, sign in to Restream as " + userText(stored.User) + " and start again."}}
	}
	return nil
}

// unidentified refuses an authorization whose user could not be read while
// the account is pinned (pin says how).
func unidentified(profileErr, pin string) *callbackFailure {
	return &callbackFailure{status: http.StatusBadGateway, reason: "Restream user unknown",
		title: "The Restream account could not be identified",
		text: []string{"Restream authorized the sidecar, but its profile could not be read, so the sidecar cannot tell which " +
			"Restream account this is; " + pin + ". Nothing was installed.",
			"Check that the Restream application has the profile read scope and that Restream is reachable, then start again."},
		detail: profileErr}
}

func userText(u *tokensource.User) string {
	if u.Username == "" {
		return "id " + u.ID
	}
	return u.Username + " (id " + u.ID + ")"
}

// exchangeFailure describes a failed code exchange.
func exchangeFailure(err error, detail string) *callbackFailure {
	f := &callbackFailure{status: http.StatusBadGateway, reason: "code exchange failed",
		title:  "Restream did not accept the authorization",
		text:   []string{"The token endpoint could not be reached or answered with an error. Nothing was changed. Start again to authorize the account."},
		detail: detail}
	var te *tokensource.Error
	if errors.As(err, &te) {
		switch te.Code {
		case "invalid_grant":
			f.status = http.StatusBadRequest
			f.text = []string{"Restream rejected the authorization code: it was already used, it expired, or it was issued " +
				"for another redirect URI. Nothing was changed. Start again to get a new code."}
		case "invalid_client", "unauthorized_client":
			f.text = []string{"Restream rejected the sidecar's client credentials: check client_id and client_secret " +
				"of restream_auth_login. Nothing was changed."}
		}
	}
	return f
}

func (l *Login) fail(w http.ResponseWriter, r *http.Request, f *callbackFailure) error {
	fields := []zap.Field{zap.String("account", l.Account), zap.String("reason", f.reason),
		zap.Int("status", f.status), zap.String("operator", loginAuthUser(r)), zap.String("remote_ip", loginRemoteIP(r))}
	if f.detail != "" {
		fields = append(fields, zap.String("detail", f.detail))
	}
	l.logger.Warn("login callback refused", fields...)
	return l.page(w, r, f.status, loginPage{
		Title:      f.title,
		Paragraphs: f.text,
		Detail:     f.detail,
		Links:      []pageLink{{URL: "./login", Text: "Start again"}, {URL: "./", Text: "Show the account"}},
	})
}

// redact removes the flow's secrets from a message; tokensource errors carry
// none, this is a second line of defence.
func (l *Login) redact(msg string, secrets ...string) string {
	for _, s := range append(secrets, l.clientSecret) {
		if len(s) >= 4 {
			msg = strings.ReplaceAll(msg, s, "[redacted]")
		}
	}
	return msg
}

// loginOAuthCode keeps an OAuth error code only if it looks like one.
func loginOAuthCode(v string) string {
	if len(v) > 64 {
		return "(unrecognized)"
	}
	for _, c := range v {
		if (c < 'a' || c > 'z') && c != '_' {
			return "(unrecognized)"
		}
	}
	return v
}

// loginAuthUser is the user a Caddy authentication handler identified; ""
// if none did.
func loginAuthUser(r *http.Request) string {
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		return repl.ReplaceAll("{http.auth.user.id}", "")
	}
	return ""
}

func loginRemoteIP(r *http.Request) string {
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		if ip := repl.ReplaceAll("{http.vars.client_ip}", ""); ip != "" {
			return ip
		}
	}
	return r.RemoteAddr
}

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

func parseLoginCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Login)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

// loginFlags are the subdirectives that take no value.
var loginFlags = []string{"allow_unauthenticated", "allow_account_change"}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens:
//
//	restream_auth_login [<account>] {
//	    client_id     <id>
//	    client_secret <secret>
//	    token_url     <url>
//	    client_auth   basic|body
//	    authorize_url <url>
//	    redirect_uri  <url>
//	    encryption_key          <base64>
//	    encryption_key_previous <base64>
//	    expected_user_id <restream user id>
//	    allow_account_change
//	    allow_unauthenticated
//	}
func (l *Login) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	account, err := parseAccountArg(d)
	if err != nil {
		return err
	}
	l.Account = account
	client := clientConfig{&l.ClientID, &l.ClientSecret, &l.TokenURL, &l.ClientAuth}
	known := append(slices.Clone(clientOptions), "authorize_url", "redirect_uri", "encryption_key", "encryption_key_previous", "expected_user_id")
	for d.NextBlock(0) {
		sub := d.Val()
		if slices.Contains(loginFlags, sub) {
			if d.NextArg() {
				return d.Errf("%s takes no value", sub)
			}
			l.AllowUnauthenticated = l.AllowUnauthenticated || sub == "allow_unauthenticated"
			l.AllowAccountChange = l.AllowAccountChange || sub == "allow_account_change"
			continue
		}
		if !slices.Contains(known, sub) {
			return d.Errf("unknown subdirective %q", sub)
		}
		var val string
		if !d.Args(&val) {
			return d.Errf("%s: expected one value", sub)
		}
		if d.NextArg() {
			return d.Errf("%s: expected one value, got more", sub)
		}
		if val == "" {
			return d.Errf("%s: empty value", sub)
		}
		if err := l.setOption(client, sub, val); err != nil {
			return d.Err(err.Error())
		}
	}
	if err := requireCredentials(d, "restream_auth_login", l.ClientID, l.ClientSecret); err != nil {
		return err
	}
	if l.RedirectURI == "" {
		return d.Err("restream_auth_login: redirect_uri is required (the public URL of <prefix>/callback, as registered with the Restream application)")
	}
	return nil
}

// setOption stores one valued subdirective.
func (l *Login) setOption(client clientConfig, sub, val string) error {
	if ok, err := client.set(sub, val); ok {
		return err
	}
	switch sub {
	case "authorize_url":
		if _, err := checkAuthorizeURL(val); err != nil {
			return err
		}
		l.AuthorizeURL = val
	case "redirect_uri":
		if _, err := checkRedirectURI(val); err != nil {
			return err
		}
		l.RedirectURI = val
	case "encryption_key":
		l.EncryptionKey = val
	case "encryption_key_previous":
		l.EncryptionKeyPrevious = val
	case "expected_user_id":
		if !userIDPattern.MatchString(val) {
			return fmt.Errorf("expected_user_id %q: want Restream's numeric user id (GET /v2/user/profile, field id)", val)
		}
		l.ExpectedUserID = val
	}
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
	_ caddyfile.Unmarshaler       = (*Login)(nil)
)
