package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Defaults of the restream_auth handler.
const (
	DefaultAccount       = "default"
	DefaultTokenURL      = "https://api.restream.io/oauth/token"
	DefaultMaxReplayBody = 1 << 20
)

// Handler puts a valid Restream access token on every request it passes on
// (typically to reverse_proxy), and replays a request once when the upstream
// rejects its token with 401. Handlers of one account with the same settings
// share one token source (see pool.go), across routes and config reloads.
//
// The secrets (client_id, client_secret, refresh_token and the encryption
// keys) resolve {env.*} and {file.*} placeholders at provisioning; prefer
// them to literals, which stay visible in the config (the admin /config/
// endpoint, `caddy adapt` output). No other field resolves placeholders.
type Handler struct {
	// The name of the token chain: its record and lease are kept under
	// restream_auth/<account>/ in Caddy storage (or in the restream_auth
	// app's Redis). 1 to 64 letters, digits, '.', '_' or '-'. Default:
	// "default".
	Account string `json:"account,omitempty"`

	// The Restream application's client id. Required. {env.*} and {file.*}
	// placeholders are resolved at provisioning.
	ClientID string `json:"client_id,omitempty"`

	// The Restream application's client secret. Required. {env.*} and
	// {file.*} placeholders are resolved at provisioning.
	ClientSecret string `json:"client_secret,omitempty"`

	// A refresh token to start the chain from (the seed). It is exchanged
	// once; its fingerprint is stored, so a restart with the same seed uses
	// the stored chain, and a seed never seen before starts a new chain.
	// Default: none; without a seed or a stored chain, requests get 503
	// no_chain until a chain is installed (restream_auth_login or `caddy
	// restream-auth seed`). {env.*} and {file.*} placeholders are resolved
	// at provisioning.
	RefreshToken string `json:"refresh_token,omitempty"`

	// Restream's token endpoint: https, or http to a loopback host (local
	// fakes), without credentials. The chain's Restream user is read at
	// /v2/user/profile on the same host. Default:
	// https://api.restream.io/oauth/token.
	TokenURL string `json:"token_url,omitempty"`

	// How the client credentials reach the token endpoint: "basic" (HTTP
	// Basic, as Restream recommends) or "body" (form fields). Default:
	// "basic".
	ClientAuth string `json:"client_auth,omitempty"`

	// How long before the access token expires the pair is renewed, never
	// more than half the token's lifetime. Default: 5m.
	RefreshAhead caddy.Duration `json:"refresh_ahead,omitempty"`

	// Whether a request is replayed once, with a newer token, when the
	// upstream answers 401. Default: true.
	Replay401 *bool `json:"replay_401,omitempty"`

	// The largest request body, in bytes, kept for a replay; at most 1 GiB.
	// A larger body, or one of unknown length, is streamed without a copy,
	// and a 401 answer to it goes to the client. Default: 1048576 (1 MiB).
	MaxReplayBody int64 `json:"max_replay_body,omitempty"`

	// The cap, in bytes, on the request bodies held for replays by all
	// restream_auth handlers of the process together; at least
	// max_replay_body, at most 1 TiB. Bodies are read and counted as they
	// arrive; a request that would take the total past the cap is proxied
	// without a replay copy, as a body over max_replay_body is: an upstream
	// 401 on it goes to the client. Default: 67108864 (64 MiB).
	MaxReplayTotal int64 `json:"max_replay_total,omitempty"`

	// The name of a query parameter that also carries the access token,
	// replacing any the client sent (Restream's websockets take it as
	// accessToken). Default: none; the token goes in the Authorization
	// header only.
	QueryParam string `json:"query_param,omitempty"`

	// How long one call to the token endpoint may take, answer included;
	// also the longest a request waits for a token. Default: 10s.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// The key that encrypts the stored token record at rest (AES-256-GCM):
	// 32 random bytes in standard base64. Default: none, the record is
	// stored unencrypted. {env.*} and {file.*} placeholders are resolved at
	// provisioning.
	EncryptionKey string `json:"encryption_key,omitempty"`

	// A former encryption_key, accepted for reading only, so the key can be
	// rotated. Needs encryption_key. Default: none. {env.*} and {file.*}
	// placeholders are resolved at provisioning.
	EncryptionKeyPrevious string `json:"encryption_key_previous,omitempty"`

	// Resolved secrets stay unexported: `servers { trace }` logs handler structs.
	clientID, clientSecret, seed string
	keyring                      *tokensource.Keyring

	src     *tokensource.Source
	poolKey string
	replay  bool
	skips   *skipLog // requests sent without a replay copy (max_replay_total)
	logger  *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.restream_auth",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision resolves placeholders, applies defaults and attaches the shared
// token source for the account. It does not contact the token endpoint.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	cfg, err := h.tokenConfig()
	if err != nil {
		return err
	}
	backend, err := storeFor(ctx, h.Account, h.keyring, guardStorage(ctx.Storage(), h.logger), h.logger)
	if err != nil {
		return err
	}
	cfg.HTTPClient = &http.Client{Transport: tokenTransport()}
	cfg.Logger = h.logger.Named("tokensource")
	cfg.Observer = metricsObserver{}
	if err := registerMetrics(ctx.GetMetricsRegistry(), h.Account); err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	if err := h.provisionReplay(ctx.GetMetricsRegistry()); err != nil {
		return err
	}
	h.poolKey = poolKey(cfg, backend.poolIdentity())
	val, _, err := sources.LoadOrNew(h.poolKey, func() (caddy.Destructor, error) {
		return newPooledSource(cfg, backend)
	})
	if err != nil {
		h.poolKey = ""
		return fmt.Errorf("account %q: %w", h.Account, err)
	}
	h.src = val.(pooledSource).Source
	app, err := ctx.App("restream_auth")
	if err != nil {
		return err
	}
	app.(*App).add(h.src)
	return checkLogins(ctx, h.src) // a restream_auth_login of the account must be bound alike
}

// tokenConfig applies defaults, resolves placeholders and checks the
// settings, returning the token source configuration without the parts
// that depend on where it runs (storage, HTTP client, logger). Provision and
// the restream-auth command share it.
func (h *Handler) tokenConfig() (tokensource.Config, error) {
	if h.Account == "" {
		h.Account = DefaultAccount
	}
	if err := checkAccountName(h.Account); err != nil {
		return tokensource.Config{}, err
	}
	repl := caddy.NewReplacer()
	client, err := resolveClient(repl, fmt.Sprintf("account %q", h.Account), h.ClientID, h.ClientSecret, &h.TokenURL, h.ClientAuth)
	if err != nil {
		return tokensource.Config{}, err
	}
	h.clientID, h.clientSecret = client.id, client.secret
	if h.seed, err = resolveSecret(repl, "refresh_token", h.RefreshToken); err != nil {
		return tokensource.Config{}, err
	}
	if h.seed != "" {
		if h.seed, err = parseRefreshToken("refresh_token", h.seed); err != nil {
			return tokensource.Config{}, err
		}
	}
	if h.keyring, err = resolveKeyring(repl, h.EncryptionKey, h.EncryptionKeyPrevious); err != nil {
		return tokensource.Config{}, err
	}
	if h.RefreshAhead < 0 || h.Timeout < 0 || h.MaxReplayBody < 0 {
		return tokensource.Config{}, errors.New("refresh_ahead, timeout and max_replay_body must not be negative")
	}
	if h.RefreshAhead == 0 {
		h.RefreshAhead = caddy.Duration(tokensource.DefaultRefreshAhead)
	}
	if h.Timeout == 0 {
		h.Timeout = caddy.Duration(tokensource.DefaultTimeout)
	}
	if h.MaxReplayBody == 0 {
		h.MaxReplayBody = DefaultMaxReplayBody
	}
	h.replay = h.Replay401 == nil || *h.Replay401
	return tokensource.Config{
		Account:      h.Account,
		ClientID:     h.clientID,
		ClientSecret: h.clientSecret,
		TokenURL:     h.TokenURL,
		AuthStyle:    client.style,
		Seed:         h.seed,
		RefreshAhead: time.Duration(h.RefreshAhead),
		Timeout:      time.Duration(h.Timeout),
		Keyring:      h.keyring,
		ProfileURL:   tokensource.ProfileURLFor(h.TokenURL), // a seed's chain records its Restream user
	}, nil
}

// Cleanup releases this handler's use of the shared source.
func (h *Handler) Cleanup() error {
	if h.poolKey == "" {
		return nil
	}
	_, err := sources.Delete(h.poolKey)
	return err
}

// ServeHTTP sets the token and passes the request on; see replayServe for 401s.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	tok, err := h.src.Token(r.Context())
	if err != nil {
		return h.unavailable(w, r, err)
	}
	if !h.replay {
		h.setToken(r, tok)
		return next.ServeHTTP(w, r)
	}
	st := getReplayState()
	defer st.release()
	fit := bodyTooLarge // CONNECT and upgrades with a body are streamed
	if replayable(r) {
		var err error
		if fit, err = st.readBody(r, h.MaxReplayBody, h.MaxReplayTotal); err != nil {
			return caddyhttp.Error(http.StatusBadRequest, fmt.Errorf("reading request body: %w", err))
		}
	}
	if fit != bodyKept {
		if fit == bodyOverTotal {
			h.skips.note(h.logger, h.Account, h.MaxReplayTotal)
		}
		// Streamed as is; a 401 passes through, and is counted.
		h.setToken(r, tok)
		st.w.reset(w)
		st.w.passThrough = true
		err := next.ServeHTTP(&st.w, r)
		if st.w.status == http.StatusUnauthorized {
			metrics.replays.WithLabelValues(h.Account, "not_replayable").Inc()
			h.src.Rejected(tok) // so the client's retry finds a new token
		}
		return err
	}
	return h.replayServe(w, r, next, tok, st)
}

// replayServe sends the request and, if the upstream answers 401, replays it
// once: with an already newer token if one exists (a rotation raced the
// request), otherwise after one forced refresh shared with all callers.
func (h *Handler) replayServe(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, tok *tokensource.Token, st *replayState) error {
	// Headers written by the first attempt go straight into w's map; the
	// snapshot lets a replay start from the same headers.
	st.saveHeaders(w.Header())
	h.setToken(r, tok)
	st.rewind(r)
	st.w.reset(w)
	if err := next.ServeHTTP(&st.w, r); err != nil {
		return err
	}
	if !st.w.held {
		return nil
	}
	newer, refreshed, err := h.src.TokenNewerThan(r.Context(), tok)
	switch {
	case errors.Is(err, tokensource.ErrRejectedAgain):
		// A token just refreshed because of a 401 was rejected again: the
		// 401 is about the request, not the sidecar's token.
		metrics.replays.WithLabelValues(h.Account, "second_401").Inc()
		return st.w.release()
	case errors.Is(err, context.Canceled):
		return st.w.release() // the client is gone
	case err != nil:
		// The 401 is about the sidecar's token, which could not be renewed:
		// the client gets the documented 503 with Retry-After.
		h.logger.Warn("upstream answered 401 and no newer token could be had", zap.String("account", h.Account), zap.Error(err))
		st.restoreHeaders(w.Header())
		st.w.held = false
		return h.unavailable(w, r, err)
	}
	reason := "newer_token"
	if refreshed {
		reason = "refreshed"
	}
	metrics.replays.WithLabelValues(h.Account, reason).Inc()
	h.logger.Debug("replaying request after 401", zap.String("account", h.Account), zap.String("reason", reason),
		zap.Uint64("rejected_generation", tok.Generation), zap.Uint64("generation", newer.Generation))
	st.restoreHeaders(w.Header())
	h.setToken(r, newer)
	st.rewind(r)
	st.w.reset(w)
	st.w.passThrough = true
	err = next.ServeHTTP(&st.w, r)
	if st.w.status == http.StatusUnauthorized {
		metrics.replays.WithLabelValues(h.Account, "second_401").Inc()
	}
	return err
}

// setToken replaces any client-supplied credentials with the token.
//
// With QueryParam set the token goes only into r.URL.RawQuery, from which
// reverse_proxy builds the upstream URL (upgrades included). r.RequestURI is
// left as the client sent it: Caddy logs it as "uri" (e.g. in reverse_proxy's
// "upstream roundtrip" debug line), so setting it would put the token in the
// logs.
func (h *Handler) setToken(r *http.Request, tok *tokensource.Token) {
	r.Header.Set("Authorization", tok.Authorization())
	if h.QueryParam != "" {
		r.URL.RawQuery = setQueryParam(r.URL.RawQuery, h.QueryParam, tok.AccessToken)
	}
}

// setQueryParam replaces every occurrence of name in a raw query with
// name=value, leaving the other parameters in their order and encoding.
func setQueryParam(raw, name, value string) string {
	var b strings.Builder
	b.Grow(len(raw) + len(name) + len(value) + 2)
	for part := range strings.SplitSeq(raw, "&") {
		if part == "" {
			continue
		}
		key, _, _ := strings.Cut(part, "=")
		if k, err := url.QueryUnescape(key); err == nil && k == name {
			continue
		}
		b.WriteString(part)
		b.WriteByte('&')
	}
	b.WriteString(url.QueryEscape(name))
	b.WriteByte('=')
	b.WriteString(url.QueryEscape(value))
	return b.String()
}

func isUpgrade(r *http.Request) bool {
	return r.Method == http.MethodConnect || r.Header.Get("Upgrade") != ""
}

// replayable reports whether a request can be sent twice. A websocket
// handshake is a GET without a body: when it races a rotation (the old token
// dies at Restream a moment before the new pair is stored and published),
// its 401 arrives before any upgrade and it is replayed like any request, so
// clients never see the race. A 101 passes straight through the writer.
func replayable(r *http.Request) bool {
	if r.Method == http.MethodConnect {
		return false
	}
	return !isUpgrade(r) || r.ContentLength == 0 && len(r.TransferEncoding) == 0
}

// unavailable answers 503 with a JSON error naming the account and cause. The
// cause comes from tokensource errors, which never carry a secret.
func (h *Handler) unavailable(w http.ResponseWriter, r *http.Request, err error) error {
	// A token source's errors name the account already; others get it here.
	code, desc := "temporarily_unavailable", fmt.Sprintf("account %q: %v", h.Account, err)
	var te *tokensource.Error
	if errors.As(err, &te) {
		desc = te.Msg
	}
	switch {
	case te != nil && te.Kind == tokensource.Terminal:
		code = "reauth_required"
	case te != nil && te.Kind == tokensource.NoChain:
		code = "no_chain"
	case te != nil && te.Kind == tokensource.Misconfigured:
		// The endpoint refuses the client credentials: a configuration
		// error, retried slowly (Retry-After says when), not a dead chain.
		code = "misconfigured"
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		desc = fmt.Sprintf("account %q: timed out waiting for the token refresh", h.Account)
	}
	metrics.unavailable.WithLabelValues(h.Account).Inc()
	retry := h.src.RetryAfter()
	h.logger.Warn("no valid token; answering 503", zap.String("account", h.Account), zap.String("error", code),
		zap.String("cause", desc), zap.String("uri", r.URL.Path))
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Retry-After", strconv.Itoa(int((retry+time.Second-1)/time.Second)))
	w.WriteHeader(http.StatusServiceUnavailable)
	return json.NewEncoder(w).Encode(map[string]string{
		"error":             code,
		"error_description": "restream_auth " + desc,
	})
}

// MarshalLogObject keeps secrets out of logs that print the handler, such as
// `servers { trace }`, even when they were written as literals.
func (h *Handler) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("account", h.Account)
	enc.AddString("token_url", h.TokenURL)
	enc.AddString("client_auth", h.ClientAuth)
	enc.AddBool("replay_401", h.replay)
	enc.AddString("query_param", h.QueryParam)
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
	_ zapcore.ObjectMarshaler     = (*Handler)(nil)
)
