package tokensource

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
	"unicode"
)

// ErrorKind classifies a failed refresh by what the caller should do next.
type ErrorKind int

const (
	// Transient failures (5xx, 429, timeouts, unusable answers) are retried with backoff.
	Transient ErrorKind = iota
	// Terminal failures (invalid_grant) need a human: a new seed or re-authorization.
	Terminal
	// NoChain means there is neither a seed nor a stored chain for the account.
	NoChain
	// Misconfigured means the endpoint refused the client credentials
	// (invalid_client, unauthorized_client): a configuration error of this
	// instance. The chain is kept, and retried slowly.
	Misconfigured
)

func (k ErrorKind) String() string {
	switch k {
	case Terminal:
		return "terminal"
	case NoChain:
		return "no_chain"
	case Misconfigured:
		return "misconfigured"
	default:
		return "transient"
	}
}

// Error is a refresh failure. A Source's errors name its account (once), and
// their text never contains a token or the client secret: token-endpoint descriptions are redacted and truncated, and unusable
// bodies are described by type and size only.
type Error struct {
	Kind ErrorKind
	// Code is the OAuth error code when the endpoint sent one (invalid_grant, …).
	Code string
	// Status is the token endpoint's HTTP status, 0 if no answer arrived.
	Status int
	// Msg says what happened, in words safe to log and show.
	Msg string
	// RetryAfter is the endpoint's Retry-After hint, if any.
	RetryAfter time.Duration
	// Unknown is set when the request may have reached the endpoint but no
	// answer came back: the pair may have been rotated server-side.
	Unknown bool
}

func (e *Error) Error() string { return e.Msg }

// Terminal reports whether err is a refresh failure that retrying cannot fix.
func IsTerminal(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Kind == Terminal
}

// exchanger performs refresh_token grants against one token endpoint.
type exchanger struct {
	client       *http.Client
	tokenURL     string
	clientID     string
	clientSecret string
	style        AuthStyle
	timeout      time.Duration
	clock        Clock
}

// tokenResponse carries both of Restream's naming styles. Only the tokens
// and an expiry are required; the other fields are decoded leniently, because
// a 200 means the old pair is already dead, and a malformed optional field
// must not throw the new pair away.
type tokenResponse struct {
	AccessToken       string         `json:"access_token"`
	AccessTokenCamel  string         `json:"accessToken"`
	RefreshToken      string         `json:"refresh_token"`
	RefreshTokenCamel string         `json:"refreshToken"`
	TokenType         string         `json:"token_type"`
	TokenTypeCamel    string         `json:"tokenType"`
	Scope             string         `json:"scope"`
	ScopeJSON         lenientStrings `json:"scopeJson"`
	Expires           flexInt        `json:"expires"`
	ExpiresIn         flexInt        `json:"expires_in"`
	AccessExpiresIn   flexInt        `json:"accessTokenExpiresIn"`
	AccessExpiresEp   flexInt        `json:"accessTokenExpiresEpoch"`
	AccessExpiresAt   lenientTime    `json:"accessTokenExpiresAt"`
	RefreshExpiresIn  flexInt        `json:"refreshTokenExpiresIn"`
	RefreshExpiresEp  flexInt        `json:"refreshTokenExpiresEpoch"`
	RefreshExpiresAt  lenientTime    `json:"refreshTokenExpiresAt"`
}

// flexInt accepts a JSON number or a numeric string; 0 means absent or
// unusable.
type flexInt int64

func (f *flexInt) UnmarshalJSON(b []byte) error {
	*f = 0
	if v, err := strconv.ParseFloat(strings.Trim(string(b), `"`), 64); err == nil && v > 0 && v < 1e15 {
		*f = flexInt(v)
	}
	return nil
}

// lenientTime accepts RFC 3339 text; anything else counts as absent.
type lenientTime struct{ time.Time }

func (t *lenientTime) UnmarshalJSON(b []byte) error {
	var s string
	t.Time = time.Time{}
	if json.Unmarshal(b, &s) == nil {
		if v, err := time.Parse(time.RFC3339, s); err == nil {
			t.Time = v
		}
	}
	return nil
}

// lenientStrings accepts an array of strings; anything else counts as absent.
type lenientStrings []string

func (l *lenientStrings) UnmarshalJSON(b []byte) error {
	var v []string
	*l = nil
	if json.Unmarshal(b, &v) == nil {
		*l = v
	}
	return nil
}

// exchange sends one refresh_token grant. The refresh token may be spent as
// soon as the request is written, so callers must not cancel ctx for reasons
// of their own clients.
func (x *exchanger) exchange(ctx context.Context, refreshToken string) (*Record, error) {
	return x.grant(ctx, url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refreshToken}}, refreshToken)
}

// exchangeCode redeems an authorization code (the onboarding callback).
func (x *exchanger) exchangeCode(ctx context.Context, code, redirectURI string) (*Record, error) {
	return x.grant(ctx, url.Values{"grant_type": {"authorization_code"}, "code": {code}, "redirect_uri": {redirectURI}}, code)
}

// grant posts one token request; secret is the grant's own secret (refresh
// token or code), redacted from any error text.
func (x *exchanger) grant(ctx context.Context, form url.Values, secret string) (*Record, error) {
	ctx, cancel := withTimeout(ctx, x.clock, x.timeout)
	defer cancel()
	// Lifetimes count from the moment the request left: the pair was issued
	// after it, so however long the answer takes, the expiry is not late.
	sentAt := x.clock.Now()
	answer, err := x.endpoint().Post(ctx, form)
	if err != nil {
		return nil, callFailure(err)
	}
	if answer.Status != http.StatusOK {
		return nil, x.errorFromAnswer(answer, secret)
	}
	rec, err := parseTokenResponse(answer.Body, answer.Header.Get("Content-Type"), sentAt)
	if err != nil {
		// The endpoint said 200: the old pair is probably dead, but the answer
		// is unusable. Nothing better than retrying with the same token exists.
		return nil, &Error{Kind: Transient, Status: answer.Status, Unknown: true, Msg: err.Error()}
	}
	return rec, nil
}

// endpoint is the token endpoint as the exchanger's client.
func (x *exchanger) endpoint() *Endpoint {
	return &Endpoint{URL: x.tokenURL, ClientID: x.clientID, ClientSecret: x.clientSecret, AuthStyle: x.style, Client: x.client}
}

// callFailure is the refresh failure of a call that brought no usable
// answer (a *CallError, whose text is safe to show).
func callFailure(err error) *Error {
	var ce *CallError
	if !errors.As(err, &ce) {
		return &Error{Kind: Transient, Msg: "token endpoint call failed"}
	}
	switch ce.Failure {
	case CallUnbuildable:
		return &Error{Kind: Terminal, Msg: "building token request: bad token_url"}
	case CallNoAnswer:
		// A timeout may strike after the server rotated the pair.
		return &Error{Kind: Transient, Unknown: ce.Timeout(), Msg: "token endpoint " + ce.Error()}
	}
	// A 200 whose body was lost or refused may have rotated the pair.
	return &Error{Kind: Transient, Status: ce.Status, Unknown: ce.Status == http.StatusOK, Msg: "token endpoint " + ce.Error()}
}

func parseTokenResponse(body []byte, contentType string, now time.Time) (*Record, error) {
	var tr tokenResponse
	if err := json.Unmarshal(body, &tr); err != nil {
		return nil, fmt.Errorf("token endpoint answer is not a token: %s", DescribeBody(contentType, body))
	}
	access := firstNonEmpty(tr.AccessToken, tr.AccessTokenCamel)
	refresh := firstNonEmpty(tr.RefreshToken, tr.RefreshTokenCamel)
	switch {
	case access == "" && refresh == "":
		return nil, errors.New("token endpoint answer has no access_token and no refresh_token")
	case access == "":
		return nil, errors.New("token endpoint answer has no access_token")
	case refresh == "":
		return nil, errors.New("token endpoint answer has no refresh_token")
	}
	tokenType := firstNonEmpty(tr.TokenType, tr.TokenTypeCamel, "Bearer")
	if !strings.EqualFold(tokenType, "bearer") {
		return nil, fmt.Errorf("token endpoint answer has token_type %q, want Bearer", truncate(sanitize(tokenType), 32))
	}
	expiry := accessExpiry(&tr, now)
	if expiry.IsZero() {
		return nil, errors.New("token endpoint answer has no expiry (expires, expires_in)")
	}
	// An expiry in the past (a clock far off) does not make the answer
	// unusable: the old pair is dead and this refresh token is the chain.
	// The caller stores the pair, then treats the access token as expired.
	scope := tr.ScopeJSON
	if len(scope) == 0 && tr.Scope != "" {
		scope = strings.Fields(tr.Scope)
	}
	rec := &Record{
		Version:       recordVersion,
		AccessToken:   access,
		RefreshToken:  refresh,
		TokenType:     "Bearer",
		Scope:         scope,
		Expiry:        expiry,
		RefreshExpiry: refreshExpiry(&tr, now),
		IssuedAt:      now,
	}
	return rec, nil
}

// accessExpiry prefers the relative lifetime (expires_in), which is right on
// this host's clock whatever its offset from Restream's: an epoch read by a
// clock running behind would keep a dead token in use, and by a clock
// running ahead would refresh far too early. The epoch serves when no
// lifetime is given.
func accessExpiry(tr *tokenResponse, now time.Time) time.Time {
	var abs time.Time
	switch {
	case tr.Expires > 0:
		abs = time.Unix(int64(tr.Expires), 0)
	case tr.AccessExpiresEp > 0:
		abs = time.Unix(int64(tr.AccessExpiresEp), 0)
	case !tr.AccessExpiresAt.IsZero():
		abs = tr.AccessExpiresAt.Time
	}
	var rel time.Time
	if in := max(tr.ExpiresIn, tr.AccessExpiresIn); in > 0 {
		rel = now.Add(time.Duration(in) * time.Second)
	}
	if rel.IsZero() {
		return abs
	}
	return rel
}

func refreshExpiry(tr *tokenResponse, now time.Time) time.Time {
	switch {
	case tr.RefreshExpiresEp > 0:
		return time.Unix(int64(tr.RefreshExpiresEp), 0)
	case !tr.RefreshExpiresAt.IsZero():
		return tr.RefreshExpiresAt.Time
	case tr.RefreshExpiresIn > 0:
		return now.Add(time.Duration(tr.RefreshExpiresIn) * time.Second)
	}
	return time.Time{}
}

// oauthErrorBody holds both error shapes Restream's server produces:
// {"error":"invalid_grant","error_description":"…"} and
// {"error":{"name":"invalid_grant","message":"…"}}.
type oauthErrorBody struct {
	Error            json.RawMessage `json:"error"`
	ErrorDescription string          `json:"error_description"`
}

type nestedError struct {
	Name    string `json:"name"`
	Message string `json:"message"`
}

// ParseOAuthError extracts the OAuth error code and description from a token
// endpoint error body; ok is false if the body has neither shape.
func ParseOAuthError(body []byte) (code, description string, ok bool) {
	var eb oauthErrorBody
	if json.Unmarshal(body, &eb) != nil || len(eb.Error) == 0 {
		return "", "", false
	}
	if err := json.Unmarshal(eb.Error, &code); err == nil {
		return code, eb.ErrorDescription, code != ""
	}
	var n nestedError
	if json.Unmarshal(eb.Error, &n) != nil || n.Name == "" {
		return "", "", false
	}
	return n.Name, firstNonEmpty(eb.ErrorDescription, n.Message), true
}

// errorFromAnswer classifies an answer other than 200; grantSecret is the
// grant's own secret (refresh token or code), redacted from the text.
func (x *exchanger) errorFromAnswer(answer *Answer, grantSecret string) *Error {
	e := &Error{Kind: Transient, Status: answer.Status}
	if ra := parseRetryAfter(answer.Header.Get("Retry-After"), x.clock.Now()); ra > 0 {
		e.RetryAfter = ra
	}
	code, desc, ok := ParseOAuthError(answer.Body)
	if !ok {
		if answer.Status == http.StatusUnauthorized && answer.Header.Get("WWW-Authenticate") != "" {
			code = "invalid_client"
		} else {
			e.Msg = fmt.Sprintf("token endpoint answered %d with %s", answer.Status, DescribeBody(answer.Header.Get("Content-Type"), answer.Body))
			return e
		}
	}
	// The code is endpoint text too: redact it before truncating, so not even
	// a prefix of a secret survives.
	redactor := NewRedactor(x.clientID, x.clientSecret, grantSecret, x.clientID)
	e.Code = truncate(sanitize(redactor.RedactString(code)), 64)
	if answer.Status >= 400 && answer.Status < 500 {
		switch e.Code {
		case "invalid_grant":
			e.Kind = Terminal
		case "invalid_client", "unauthorized_client":
			e.Kind = Misconfigured
		}
	}
	desc = redactor.RedactString(desc)
	e.Msg = fmt.Sprintf("token endpoint answered %d %s", answer.Status, e.Code)
	if desc != "" {
		e.Msg += ": " + truncate(sanitize(desc), 200)
	}
	return e
}

func parseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if s, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && s >= 0 {
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		return t.Sub(now)
	}
	return 0
}

// sanitize drops control characters so endpoint text cannot forge log lines.
func sanitize(s string) string {
	return strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

func firstNonEmpty(ss ...string) string {
	for _, s := range ss {
		if s != "" {
			return s
		}
	}
	return ""
}
