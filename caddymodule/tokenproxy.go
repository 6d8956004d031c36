package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"path"
	"slices"
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
	caddy.RegisterModule(TokenProxy{})
}

// Defaults and limits of the restream_token_proxy handler.
const (
	DefaultRevokeURL         = tokensource.DefaultRevokeURL
	DefaultTokenProxyTimeout = 10 * time.Second
	// TokenProxyMaxRequestBody is the largest form a device may send.
	TokenProxyMaxRequestBody = 64 << 10
	// TokenProxyMaxResponseBody is the largest token endpoint answer relayed.
	TokenProxyMaxResponseBody = tokensource.MaxResponseBytes
	// DefaultTokenProxyMaxConcurrent is max_concurrent's default.
	DefaultTokenProxyMaxConcurrent = 16
	// tokenProxyBusyRetryAfter is the Retry-After, in seconds, of the 429 a
	// device gets while max_concurrent calls are in flight: a token call
	// usually takes well under a second.
	tokenProxyBusyRetryAfter = "1"
)

// TokenProxy lets devices refresh (and redeem authorization codes, and
// revoke) without holding the client secret: it takes a form POST without
// client credentials, adds the configured ones and forwards only the fields
// of the grant to Restream's token (or revoke) endpoint, then relays the
// answer. It is terminal: it answers every request itself.
//
// client_id and client_secret resolve {env.*} and {file.*} placeholders at
// provisioning; prefer them to literals, which stay visible in the config
// (admin /config/ endpoint, `caddy adapt` output). No other field resolves
// placeholders.
type TokenProxy struct {
	// The Restream application's client id, added to every forwarded call.
	// Required. {env.*} and {file.*} placeholders are resolved at
	// provisioning.
	ClientID string `json:"client_id,omitempty"`

	// The Restream application's client secret, added to every forwarded
	// call and redacted from every relayed answer. Required. {env.*} and
	// {file.*} placeholders are resolved at provisioning.
	ClientSecret string `json:"client_secret,omitempty"`

	// Restream's token endpoint, where grants go: https, or http to a
	// loopback host. Default: https://api.restream.io/oauth/token.
	TokenURL string `json:"token_url,omitempty"`

	// Restream's revocation endpoint, where …/revoke calls go; same URL
	// rules. Default: token_url with its last segment "token" replaced by
	// "revoke" (https://api.restream.io/oauth/revoke).
	RevokeURL string `json:"revoke_url,omitempty"`

	// How the client credentials reach the endpoints: "basic" (HTTP Basic)
	// or "body" (form fields). Default: "basic".
	ClientAuth string `json:"client_auth,omitempty"`

	// How long one upstream call may take, answer included; a call cut by
	// it is answered 504. Default: 10s.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// How many device calls of this client_id may be at Restream at once.
	// Restream limits calls per client_id, and the sidecar's own refreshes
	// use the same client_id: a flood of devices must not spend that
	// limit. The count is shared by every restream_token_proxy of the
	// client_id in the process (other sites, and the old config during a
	// reload); each handler admits a call only while the shared count is
	// below its own max_concurrent. A call beyond it is answered 429 with
	// Retry-After and not forwarded. Default: 16.
	MaxConcurrent int `json:"max_concurrent,omitempty"`

	// The redirect_uri values with which a device may redeem an
	// authorization code, matched exactly: absolute URIs without a
	// fragment. The refresh grant needs none. Default: none, and the
	// authorization_code grant is refused, so the proxy lends the client
	// secret only to the application's own login flows.
	RedirectURIs []string `json:"redirect_uris,omitempty"`

	// Serve requests that no Caddy authentication handler identified. By
	// default the proxy answers only requests for which an authentication
	// handler before it (basic_auth with a credential per device, or
	// forward_auth setting {http.auth.user.id}) identified the caller,
	// because every call it forwards spends the application's credentials
	// and its rate limit at Restream. Set it only when something in front
	// of Caddy already admits nothing but your devices. Default: false.
	AllowUnauthenticated bool `json:"allow_unauthenticated,omitempty"`

	// Resolved secrets stay unexported: `servers { trace }` logs handler structs.
	clientID, clientSecret string

	style     tokensource.AuthStyle
	transport *http.Transport
	logger    *zap.Logger
	// inFlight counts the client_id's calls at Restream, shared with every
	// token proxy handler of the client_id (tokenproxy_limit.go).
	inFlight *inFlightCalls
	busyBody []byte                // the 429 answer's JSON, made once
	redactor *tokensource.Redactor // the client secret in answers and headers
	endpoint *tokensource.Endpoint // the token and revocation endpoints
	// strangers logs refused unauthenticated requests, rate-limited at WARN.
	strangers *strangerLog
}

// CaddyModule returns the Caddy module information.
func (TokenProxy) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.restream_token_proxy",
		New: func() caddy.Module { return new(TokenProxy) },
	}
}

// Provision resolves placeholders and applies defaults. It contacts nobody.
func (p *TokenProxy) Provision(ctx caddy.Context) error {
	p.logger = ctx.Logger()
	p.strangers = new(strangerLog)
	client, err := resolveClient(caddy.NewReplacer(), "restream_token_proxy", p.ClientID, p.ClientSecret, &p.TokenURL, p.ClientAuth)
	if err != nil {
		return err
	}
	p.clientID, p.clientSecret, p.style = client.id, client.secret, client.style
	if p.RevokeURL == "" {
		// Beside the token endpoint, so pointing token_url elsewhere
		// moves both.
		p.RevokeURL = tokensource.RevokeURLFor(p.TokenURL)
	}
	if err := checkEndpointURL("revoke_url", p.RevokeURL); err != nil {
		return err
	}
	if p.Timeout < 0 {
		return errors.New("restream_token_proxy: timeout must not be negative")
	}
	if p.Timeout == 0 {
		p.Timeout = caddy.Duration(DefaultTokenProxyTimeout)
	}
	if p.MaxConcurrent < 0 {
		return fmt.Errorf("restream_token_proxy: max_concurrent must be positive (got %d)", p.MaxConcurrent)
	}
	if p.MaxConcurrent == 0 {
		p.MaxConcurrent = DefaultTokenProxyMaxConcurrent
	}
	for i, u := range p.RedirectURIs {
		if err := checkDeviceRedirectURI(u); err != nil {
			return errors.New("restream_token_proxy: " + err.Error())
		}
		if slices.Contains(p.RedirectURIs[:i], u) {
			return fmt.Errorf("restream_token_proxy: redirect_uris %q is listed twice", u)
		}
	}
	if err := registerTokenProxyMetrics(ctx.GetMetricsRegistry()); err != nil {
		return err
	}
	p.inFlight = loadInFlightCalls(p.clientID)
	p.busyBody = oauthJSON("temporarily_unavailable", fmt.Sprintf(
		"%d calls of this client_id are already in progress at the token endpoint (max_concurrent); retry after %s s",
		p.MaxConcurrent, tokenProxyBusyRetryAfter))
	p.redactor = tokensource.NewRedactor(p.clientID, p.clientSecret)
	p.transport = http.DefaultTransport.(*http.Transport).Clone()
	// Enough idle connections for the calls max_concurrent lets through.
	p.transport.MaxIdleConnsPerHost = min(p.MaxConcurrent, 32)
	// The endpoint follows no redirect: it would resend the form (and its
	// credentials) elsewhere; a 3xx is reported as an unusable answer.
	p.endpoint = &tokensource.Endpoint{URL: p.TokenURL, ClientID: p.clientID, ClientSecret: p.clientSecret,
		AuthStyle: p.style, Client: &http.Client{Transport: p.transport}}
	if p.AllowUnauthenticated {
		p.logger.Warn("allow_unauthenticated is set: anyone who reaches this route can spend the application's credentials " +
			"and its rate limit at Restream; make sure something in front of it admits only your devices")
	}
	return nil
}

// Cleanup closes the idle upstream connections of this config.
func (p *TokenProxy) Cleanup() error {
	if p.transport != nil {
		p.transport.CloseIdleConnections()
	}
	if p.inFlight != nil {
		_, _ = deviceCallCounters.Delete(p.clientID)
	}
	return nil
}

// ServeHTTP checks the device's request, forwards the grant (or the
// revocation) with the configured client credentials, and relays the answer.
// It never calls next.
func (p *TokenProxy) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	revoke := path.Base(r.URL.Path) == "revoke"
	if !p.AllowUnauthenticated && authenticatedUser(r) == "" {
		tokenProxyMetrics.unauthenticated.Inc()
		p.strangers.refused(p.logger, "token proxy refused a request that no authentication handler identified",
			zap.String("remote_ip", remoteIP(r)), zap.Bool("revoke", revoke))
		writeOAuthBody(w, http.StatusForbidden, unauthenticatedDeviceBody)
		return nil
	}
	call, refusal := p.parseRequest(w, r, revoke)
	if refusal != nil {
		p.logger.Debug("refused token proxy request", zap.Int("status", refusal.status), zap.String("error", refusal.code),
			zap.Bool("revoke", revoke))
		if refusal.allowHeader {
			w.Header().Set("Allow", http.MethodPost)
		}
		writeOAuthJSON(w, refusal.status, refusal.code, refusal.desc)
		return nil
	}
	if !p.inFlight.acquire(p.MaxConcurrent) {
		// Refused before anything goes upstream: the client_id's rate
		// limit at Restream is shared with the sidecar's own refreshes.
		tokenProxyMetrics.throttled.Inc()
		p.logger.Debug("token proxy busy: call refused", zap.String("grant_type", call.name), zap.Int("max_concurrent", p.MaxConcurrent))
		w.Header().Set("Retry-After", tokenProxyBusyRetryAfter)
		writeOAuthBody(w, http.StatusTooManyRequests, p.busyBody)
		return nil
	}
	tokenProxyMetrics.inFlight.Inc()
	defer func() {
		tokenProxyMetrics.inFlight.Dec()
		p.inFlight.release()
	}()
	p.forward(w, r, call)
	return nil
}

// unauthenticatedDeviceBody answers a request no authentication handler
// identified; it says how to fix the Caddyfile.
var unauthenticatedDeviceBody = oauthJSON("unauthorized_client",
	"restream_token_proxy answers only requests a Caddy authentication handler identified "+
		"(basic_auth with a credential per device, or forward_auth setting {http.auth.user.id}); "+
		"set allow_unauthenticated if something in front of Caddy admits only your devices")

// checkDeviceRedirectURI accepts an absolute URI without a fragment (RFC 6749
// 3.1.2), such as https://app.example/callback or a native app's
// com.example.app:/callback.
func checkDeviceRedirectURI(raw string) error {
	if strings.ContainsFunc(raw, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
		return fmt.Errorf("redirect_uris %q: must not contain spaces or control characters", raw)
	}
	u, err := url.Parse(raw)
	switch {
	case err != nil || !u.IsAbs():
		return fmt.Errorf("redirect_uris %q: not an absolute URI (it needs a scheme, as in https://app.example/callback)", raw)
	case strings.Contains(raw, "#"):
		return fmt.Errorf("redirect_uris %q: must not contain a fragment (#...)", raw)
	case (u.Scheme == "http" || u.Scheme == "https") && u.Host == "":
		return fmt.Errorf("redirect_uris %q: an %s URI needs a host", raw, u.Scheme)
	}
	return nil
}

// forward sends the call upstream with the client credentials and relays the
// answer. The call is detached from the device's connection: a refresh the
// endpoint may already have applied must not be abandoned halfway; it is
// bounded by Timeout only.
func (p *TokenProxy) forward(w http.ResponseWriter, r *http.Request, call deviceCall) {
	timeout := time.Duration(p.Timeout)
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), timeout)
	defer cancel()
	start := time.Now()
	answer, failure := p.roundTrip(ctx, call)
	elapsed := time.Since(start)

	status := failure.upstreamStatusOr(answer)
	fields := []zap.Field{zap.String("grant_type", call.name), zap.Int("upstream_status", status), zap.Duration("duration", elapsed)}
	level := zapcore.InfoLevel
	if failure != nil {
		fields = append(fields, zap.String("failure", failure.kind))
		level = zapcore.WarnLevel
	} else if status >= 500 {
		level = zapcore.WarnLevel
	}
	if r.Context().Err() != nil {
		// The device went away: whatever the endpoint issued is lost with it.
		fields = append(fields, zap.Bool("client_gone", true))
		level = zapcore.WarnLevel
	}
	p.logger.Log(level, "token proxy call", fields...)

	if failure != nil {
		writeOAuthJSON(w, failure.status, failure.code, failure.desc)
		return
	}
	h := w.Header()
	h.Set("Cache-Control", "no-store")
	h.Set("Pragma", "no-cache")
	if len(answer.Body) > 0 {
		h.Set("Content-Type", "application/json")
	}
	if status == http.StatusTooManyRequests || status == http.StatusServiceUnavailable {
		if ra, ok := p.relayableRetryAfter(answer.Header.Get("Retry-After")); ok {
			h.Set("Retry-After", ra)
		}
	}
	h.Set("Content-Length", strconv.Itoa(len(answer.Body)))
	w.WriteHeader(status)
	_, _ = w.Write(answer.Body) // the device may be gone; nothing to do about it
}

// tokenProxyFailure is the proxy's own answer when upstream gave none usable.
type tokenProxyFailure struct {
	status         int
	code, desc     string
	kind           string // for the log line
	upstreamStatus int    // for the log line; 0 if no answer arrived
}

// upstreamStatusOr is the upstream status to log: the failure's, or else
// the answer's.
func (f *tokenProxyFailure) upstreamStatusOr(answer *tokensource.Answer) int {
	if f != nil {
		return f.upstreamStatus
	}
	return answer.Status
}

// roundTrip makes the upstream call and returns the answer to relay, its
// body redacted, or a failure. Error texts never include the form or the
// answer.
func (p *TokenProxy) roundTrip(ctx context.Context, call deviceCall) (*tokensource.Answer, *tokenProxyFailure) {
	endpoint := "token endpoint"
	if call.name == "revoke" {
		endpoint = "revocation endpoint"
	}
	answer, err := p.endpoint.PostTo(ctx, call.target, call.form)
	if err != nil {
		return nil, upstreamFailure(err, endpoint, time.Duration(p.Timeout))
	}
	if !usableAnswer(call.name, answer.Status, answer.Body) {
		return nil, &tokenProxyFailure{http.StatusBadGateway, "server_error",
			fmt.Sprintf("the %s answered %d with %s", endpoint, answer.Status, tokensource.DescribeBody(answer.Header.Get("Content-Type"), answer.Body)),
			"unusable", answer.Status}
	}
	if clean, n := p.redactor.Redact(answer.Body, true); n > 0 {
		tokenProxyMetrics.redactions.Inc()
		p.logger.Warn("the token endpoint's answer echoed the client secret; redacted before relaying",
			zap.String("grant_type", call.name), zap.Int("upstream_status", answer.Status), zap.Int("occurrences", n))
		if json.Valid(answer.Body) && !json.Valid(clean) {
			return nil, &tokenProxyFailure{http.StatusBadGateway, "server_error",
				fmt.Sprintf("the %s answered %d with a body that echoed the client secret and could not be redacted", endpoint, answer.Status),
				"secret_echo", answer.Status}
		}
		answer.Body = clean
	}
	return answer, nil
}

// upstreamFailure is the proxy's answer to a call that brought no usable answer
// (a *tokensource.CallError): 504 when the timeout cut it, else 502.
func upstreamFailure(err error, endpoint string, timeout time.Duration) *tokenProxyFailure {
	var ce *tokensource.CallError
	if !errors.As(err, &ce) {
		return &tokenProxyFailure{http.StatusBadGateway, "server_error", "the " + endpoint + " call failed", "unusable", 0}
	}
	switch {
	case ce.Failure == tokensource.CallUnbuildable:
		return &tokenProxyFailure{http.StatusBadGateway, "server_error", "the upstream request could not be built", "bad_url", 0}
	case ce.Failure == tokensource.CallNoAnswer && ce.Timeout():
		return &tokenProxyFailure{http.StatusGatewayTimeout, "temporarily_unavailable",
			fmt.Sprintf("the %s did not answer within %s", endpoint, timeout), "timeout", 0}
	case ce.Failure == tokensource.CallNoAnswer:
		return &tokenProxyFailure{http.StatusBadGateway, "temporarily_unavailable", "the " + endpoint + " is unreachable", "unreachable", 0}
	case ce.Failure == tokensource.CallUnreadable && ce.Timeout():
		return &tokenProxyFailure{http.StatusGatewayTimeout, "temporarily_unavailable",
			fmt.Sprintf("the %s did not finish its answer within %s", endpoint, timeout), "timeout", ce.Status}
	case ce.Failure == tokensource.CallUnreadable:
		return &tokenProxyFailure{http.StatusBadGateway, "server_error",
			fmt.Sprintf("the %s answer %d could not be read", endpoint, ce.Status), "unreadable", ce.Status}
	case ce.Failure == tokensource.CallTooLarge:
		return &tokenProxyFailure{http.StatusBadGateway, "server_error",
			fmt.Sprintf("the %s answered %d with more than %d bytes", endpoint, ce.Status, ce.Limit), "too_large", ce.Status}
	default: // tokensource.CallRedirected: the form would go, credentials and all, wherever the Location points
		return &tokenProxyFailure{http.StatusBadGateway, "server_error",
			fmt.Sprintf("the %s answered %d, a redirect, which the proxy does not follow", endpoint, ce.Status), "redirect", ce.Status}
	}
}

// relayableRetryAfter passes on a Retry-After that is what RFC 9110 allows
// (delay seconds or an HTTP date) and echoes no secret; anything else is
// dropped.
func (p *TokenProxy) relayableRetryAfter(v string) (string, bool) {
	v = strings.TrimSpace(v)
	if v == "" || len(v) > 64 || p.redactor.Contains(v) {
		return "", false
	}
	if _, err := strconv.ParseUint(v, 10, 32); err == nil {
		return v, true
	}
	if _, err := http.ParseTime(v); err == nil {
		return v, true
	}
	return "", false
}

// usableAnswer accepts a 2xx, 4xx or 5xx answer whose body is a JSON object;
// a successful token answer must carry an access token. The revocation
// endpoint may answer 2xx with an empty body (Restream does).
func usableAnswer(call string, status int, body []byte) bool {
	if status < 200 || (status >= 300 && status < 400) || status > 599 {
		return false
	}
	ok2xx := status < 300
	if call == "revoke" && ok2xx && len(bytes.TrimSpace(body)) == 0 {
		return true
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(body, &obj); err != nil || obj == nil {
		return false
	}
	if call == "revoke" || !ok2xx {
		return true
	}
	for _, k := range []string{"access_token", "accessToken"} {
		var s string
		if json.Unmarshal(obj[k], &s) == nil && s != "" {
			return true
		}
	}
	return false
}

// writeOAuthJSON answers {"error":…,"error_description":…}, never cached.
func writeOAuthJSON(w http.ResponseWriter, status int, code, desc string) {
	writeOAuthBody(w, status, oauthJSON(code, desc))
}

func oauthJSON(code, desc string) []byte {
	b, _ := json.Marshal(map[string]string{"error": code, "error_description": desc})
	return b
}

// writeOAuthBody answers with an OAuth JSON error made by oauthJSON.
func writeOAuthBody(w http.ResponseWriter, status int, b []byte) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Set("Pragma", "no-cache")
	h.Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// MarshalLogObject keeps the client secret out of logs that print the
// handler, such as `servers { trace }`, even when it was written literally.
func (p *TokenProxy) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("token_url", p.TokenURL)
	enc.AddString("revoke_url", p.RevokeURL)
	mode := "basic"
	if p.style == tokensource.AuthBody {
		mode = "body"
	}
	enc.AddString("client_auth", mode)
	enc.AddDuration("timeout", time.Duration(p.Timeout))
	enc.AddInt("max_concurrent", p.MaxConcurrent)
	enc.AddBool("allow_unauthenticated", p.AllowUnauthenticated)
	return enc.AddArray("redirect_uris", zapcore.ArrayMarshalerFunc(func(a zapcore.ArrayEncoder) error {
		for _, u := range p.RedirectURIs {
			a.AppendString(u)
		}
		return nil
	}))
}

// Interface guards
var (
	_ caddy.Provisioner           = (*TokenProxy)(nil)
	_ caddy.CleanerUpper          = (*TokenProxy)(nil)
	_ caddyhttp.MiddlewareHandler = (*TokenProxy)(nil)
	_ zapcore.ObjectMarshaler     = (*TokenProxy)(nil)
)
