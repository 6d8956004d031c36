package caddymodule

import (
	"context"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"html/template"
	"net/http"
	"net/url"
	"path"
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
// and, on the way back, exchanges the authorization code and installs the new
// pair as the account's chain (under the account's lease, as the next
// generation). A running restream_auth of the account serves with it at once.
//
//	GET  <prefix>/login      302 to Restream's authorize URL, state in a signed cookie
//	GET  <prefix>/callback   verifies the state, exchanges the code, installs the chain
//
// Whoever completes the flow decides which Restream account the sidecar acts
// as: put the route behind authentication (basic_auth).
//
// The state cookie is signed with a key derived from the client secret, so a
// flow may start on one instance and finish on another behind a load
// balancer, as long as they share the client secret.
type Login struct {
	// Account names the chain to install; default "default".
	Account      string `json:"account,omitempty"`
	ClientID     string `json:"client_id,omitempty"`
	ClientSecret string `json:"client_secret,omitempty"`
	TokenURL     string `json:"token_url,omitempty"`
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

	// Resolved secrets stay unexported: `servers { trace }` logs handler structs.
	clientID, clientSecret string
	keyring                *tokensource.Keyring

	authorize  *url.URL
	cookieName string
	cookiePath string
	secure     bool
	stateKey   []byte
	own        *tokensource.Source // exchanges codes; installs when no restream_auth of the account runs
	storage    tokensource.Storage
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
	style := client.style
	// The cookie must reach the callback wherever the flow started; with
	// login and callback in one route this is the route's prefix.
	l.cookiePath = path.Dir(redirect.Path)
	if !strings.HasSuffix(l.cookiePath, "/") {
		l.cookiePath += "/"
	}
	l.secure = redirect.Scheme == "https"
	l.cookieName = "restream_auth_login_" + l.Account
	if l.stateKey, err = loginStateKey(l.clientSecret, l.clientID, l.Account); err != nil {
		return fmt.Errorf("deriving the state key: %v", err)
	}
	l.storage = guardStorage(ctx.Storage(), l.logger)
	l.own, err = tokensource.New(tokensource.Config{
		Account:      l.Account,
		ClientID:     l.clientID,
		ClientSecret: l.clientSecret,
		TokenURL:     l.TokenURL,
		AuthStyle:    style,
		Storage:      l.storage,
		HTTPClient:   &http.Client{Transport: tokenTransport()},
		Logger:       l.logger.Named("tokensource"),
		Keyring:      l.keyring,
	})
	if err != nil {
		return fmt.Errorf("restream_auth_login %q: %w", l.Account, err)
	}
	return nil
}

// Cleanup closes the login's own token source (it never runs a refresher).
func (l *Login) Cleanup() error {
	if l.own != nil {
		l.own.Close()
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

// ServeHTTP serves …/login and …/callback; it is terminal and never calls next.
func (l *Login) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	h := w.Header()
	h.Set("Cache-Control", "no-store")
	h.Set("Pragma", "no-cache")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
	switch loginSegment(r.URL.Path) {
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
	}
	return l.page(w, r, http.StatusNotFound, loginPage{
		Title:      "Not found",
		Paragraphs: []string{"This route serves only …/login (start authorizing a Restream account) and …/callback."},
	})
}

func loginSegment(p string) string {
	return p[strings.LastIndexByte(p, '/')+1:]
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
	http.SetCookie(w, &http.Cookie{
		Name:     l.cookieName,
		Value:    l.signState(state, exp),
		Path:     l.cookiePath,
		MaxAge:   int(loginStateTTL / time.Second),
		HttpOnly: true,
		Secure:   l.secure || r.TLS != nil,
		SameSite: http.SameSiteLaxMode,
	})
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

// callbackFailure is a refused callback: what the page and the log say.
type callbackFailure struct {
	status int
	reason string // short, for the log
	title  string
	text   []string
	detail string // redacted, shown and logged
}

// callback verifies the state, exchanges the code and installs the chain.
func (l *Login) callback(w http.ResponseWriter, r *http.Request) error {
	// The state is single-use whatever happens next.
	http.SetCookie(w, &http.Cookie{
		Name: l.cookieName, Value: "", Path: l.cookiePath, MaxAge: -1,
		HttpOnly: true, Secure: l.secure || r.TLS != nil, SameSite: http.SameSiteLaxMode,
	})
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
	// A running restream_auth of the account installs it itself, so that it
	// serves with the new chain at once; without one, the chain is stored
	// for the sources that will read it.
	installer := l.own
	if live := sourcesFor(l.Account); len(live) > 0 {
		installer = live[0]
	}
	tok, err := installer.InstallPair(r.Context(), rec)
	if err != nil {
		return l.fail(w, r, &callbackFailure{
			status: http.StatusInternalServerError, reason: "storing the new chain failed",
			title: "The authorization could not be stored",
			text: []string{"Restream authorized the account, but the sidecar could not store the new token chain, so it is not in use. " +
				"Check the storage, then start again."},
			detail: l.redact(err.Error(), code, state, rec.AccessToken, rec.RefreshToken),
		})
	}
	l.logger.Info("installed a new token chain from the login flow",
		zap.String("account", l.Account), zap.Uint64("generation", tok.Generation),
		zap.Time("access_expires_at", tok.Expiry), zap.String("user", loginAuthUser(r)),
		zap.String("remote_ip", loginRemoteIP(r)))
	facts := []pageFact{
		{"Account", l.Account},
		{"Generation", strconv.FormatUint(tok.Generation, 10)},
		{"Access token expires", tok.Expiry.UTC().Format(time.RFC3339) + " (renewed automatically before then)"},
	}
	if len(tok.Scope) > 0 {
		facts = append(facts, pageFact{"Scopes", strings.Join(tok.Scope, " ")})
	}
	if !tok.RefreshExpiry.IsZero() {
		facts = append(facts, pageFact{"Chain valid until", tok.RefreshExpiry.UTC().Format(time.RFC3339) + " (re-authorize before then)"})
	}
	return l.page(w, r, http.StatusOK, loginPage{
		Title: "Restream account connected",
		Paragraphs: []string{"The sidecar now acts as this Restream account. Requests through restream_auth " +
			"use the new token chain at once; no restart is needed. You can close this page."},
		Facts: facts,
	})
}

// checkCallback refuses denied consent, errors from Restream and bad state.
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
				loginStateTTL.String() + ") or was blocked. Start and finish the flow in the same browser, " +
				"on the host of the configured redirect_uri. Nothing was changed.", again}}
	}
	want, err := l.verifyState(c.Value, l.now())
	if err != nil {
		f := &callbackFailure{status: http.StatusBadRequest, reason: "invalid state cookie",
			title: "The authorization could not be verified",
			text:  []string{"The state cookie is not valid (tampered with, or signed with another client secret). Nothing was changed.", again}}
		if errors.Is(err, errStateExpired) {
			f.reason, f.title = "state expired", "The authorization took too long"
			f.text = []string{"More than " + loginStateTTL.String() + " passed since the authorization started. Nothing was changed.", again}
		}
		return f
	}
	if subtle.ConstantTimeCompare([]byte(want), []byte(state)) != 1 {
		return &callbackFailure{status: http.StatusBadRequest, reason: "state mismatch",
			title: "The authorization could not be verified",
			text: []string{"The state returned by Restream does not match the one this browser started with " +
				"(an old or forged link, or a flow started in another tab). Nothing was changed.", again}}
	}
	return nil
}

// checkStoredRecord refuses, before the code is spent, to replace a stored
// record that exists but cannot be read: it is never overwritten, as it may
// hold the only live refresh token.
func (l *Login) checkStoredRecord(ctx context.Context) *callbackFailure {
	ctx, cancel := context.WithTimeout(ctx, tokensource.StorageTimeout)
	defer cancel()
	_, err := tokensource.LoadRecordKeyring(ctx, l.storage, l.Account, l.keyring)
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
		zap.Int("status", f.status), zap.String("remote_ip", loginRemoteIP(r))}
	if f.detail != "" {
		fields = append(fields, zap.String("detail", f.detail))
	}
	l.logger.Warn("login callback refused", fields...)
	return l.page(w, r, f.status, loginPage{
		Title:      f.title,
		Paragraphs: f.text,
		Detail:     f.detail,
		Links:      []pageLink{{URL: "./login", Text: "Start again"}},
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

// The state cookie: "v1.<state>.<expiry unix>.<HMAC-SHA256>", the MAC over the
// account, the state and the expiry with a key derived from the client
// secret (see Provision).
var (
	errStateInvalid = errors.New("invalid state cookie")
	errStateExpired = errors.New("state cookie expired")
)

// loginStateKey derives the cookie key from the client secret with HKDF and a
// fixed label: every instance with the same application credentials derives
// the same key, and the key reveals nothing about the secret.
func loginStateKey(clientSecret, clientID, account string) ([]byte, error) {
	return hkdf.Key(sha256.New, []byte(clientSecret), nil, "caddy-restream-auth login state v1|"+clientID+"|"+account, 32)
}

func (l *Login) stateMAC(state string, exp int64) []byte {
	m := hmac.New(sha256.New, l.stateKey)
	fmt.Fprintf(m, "restream_auth_login v1\x00%s\x00%s\x00%d", l.Account, state, exp)
	return m.Sum(nil)
}

func (l *Login) signState(state string, exp int64) string {
	return "v1." + state + "." + strconv.FormatInt(exp, 10) + "." + base64.RawURLEncoding.EncodeToString(l.stateMAC(state, exp))
}

// verifyState returns the state a valid, unexpired cookie carries.
func (l *Login) verifyState(v string, now time.Time) (string, error) {
	parts := strings.Split(v, ".")
	if len(parts) != 4 || parts[0] != "v1" || parts[1] == "" {
		return "", errStateInvalid
	}
	exp, err := strconv.ParseInt(parts[2], 10, 64)
	if err != nil {
		return "", errStateInvalid
	}
	mac, err := base64.RawURLEncoding.DecodeString(parts[3])
	if err != nil || !hmac.Equal(mac, l.stateMAC(parts[1], exp)) {
		return "", errStateInvalid
	}
	if !now.Before(time.Unix(exp, 0)) {
		return "", errStateExpired
	}
	return parts[1], nil
}

// The pages: plain HTML, every value escaped by html/template.

type loginPage struct {
	Title      string
	Paragraphs []string
	Facts      []pageFact
	Detail     string
	Links      []pageLink
}

type pageFact struct{ Name, Value string }

type pageLink struct{ URL, Text string }

var loginTemplate = template.Must(template.New("page").Parse(`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{{.Title}} · restream_auth</title>
<style>body{font-family:system-ui,sans-serif;max-width:42rem;margin:3rem auto;padding:0 1rem;line-height:1.5}dt{font-weight:600}dd{margin:0 0 .5rem 0}code{word-break:break-all}</style>
</head>
<body>
<h1>{{.Title}}</h1>
{{range .Paragraphs}}<p>{{.}}</p>
{{end}}{{with .Facts}}<dl>
{{range .}}<dt>{{.Name}}</dt><dd>{{.Value}}</dd>
{{end}}</dl>
{{end}}{{with .Detail}}<p><small>Detail: <code>{{.}}</code></small></p>
{{end}}{{range .Links}}<p><a href="{{.URL}}">{{.Text}}</a></p>
{{end}}</body>
</html>
`))

func (l *Login) page(w http.ResponseWriter, r *http.Request, status int, p loginPage) error {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	if r.Method == http.MethodHead {
		return nil
	}
	if err := loginTemplate.Execute(w, p); err != nil {
		l.logger.Debug("writing the login page", zap.Error(err))
	}
	return nil
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
	return nil
}

func parseLoginCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Login)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

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
//	}
func (l *Login) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	account, err := parseAccountArg(d)
	if err != nil {
		return err
	}
	l.Account = account
	client := clientConfig{&l.ClientID, &l.ClientSecret, &l.TokenURL, &l.ClientAuth}
	known := append(slices.Clone(clientOptions), "authorize_url", "redirect_uri", "encryption_key", "encryption_key_previous")
	err = eachOption(d, known, func(sub, val string) error {
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
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := requireCredentials(d, "restream_auth_login", l.ClientID, l.ClientSecret); err != nil {
		return err
	}
	if l.RedirectURI == "" {
		return d.Err("restream_auth_login: redirect_uri is required (the public URL of <prefix>/callback, as registered with the Restream application)")
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Login)(nil)
	_ caddy.CleanerUpper          = (*Login)(nil)
	_ caddyhttp.MiddlewareHandler = (*Login)(nil)
	_ zapcore.ObjectMarshaler     = (*Login)(nil)
	_ caddyfile.Unmarshaler       = (*Login)(nil)
)
