package tokensource

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
)

const (
	testClientID     = "test-client"
	testClientSecret = "test-secret-0123456789"
	// testRefresh is what the exchanger sends in the odd-answer tests; it must
	// never show up in an error text.
	testRefresh = "rt_d3adb33fd3adb33fd3adb33fd3adb33f"
)

func newTestExchanger(tokenURL string, style AuthStyle, now func() time.Time) *exchanger {
	return &exchanger{
		client:       &http.Client{},
		tokenURL:     tokenURL,
		clientID:     testClientID,
		clientSecret: testClientSecret,
		style:        style,
		timeout:      5 * time.Second,
		clock:        funcClock(now),
	}
}

// funcClock is a Clock that reads now; its timers follow the wall clock.
type funcClock func() time.Time

func (f funcClock) Now() time.Time                  { return f() }
func (f funcClock) At(t time.Time) <-chan time.Time { return realClock{}.At(t) }
func (f funcClock) AfterFunc(t time.Time, fn func()) func() bool {
	return realClock{}.AfterFunc(t, fn)
}

// seenRequest is what an odd-answer server received.
type seenRequest struct {
	method, contentType, accept, authorization string
	basicOK                                    bool
	basicID, basicSecret                       string
	form                                       map[string][]string
}

// answerServer is a token endpoint on 127.0.0.1 that answers every request
// with the given status, headers and body, and records what it got.
type answerServer struct {
	*httptest.Server
	mu   sync.Mutex
	seen []seenRequest
}

func newAnswerServer(t *testing.T, status int, header map[string]string, body string) *answerServer {
	t.Helper()
	as := &answerServer{}
	as.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = r.ParseForm()
		id, secret, ok := r.BasicAuth()
		as.mu.Lock()
		as.seen = append(as.seen, seenRequest{
			method: r.Method, contentType: r.Header.Get("Content-Type"), accept: r.Header.Get("Accept"),
			authorization: r.Header.Get("Authorization"), basicOK: ok, basicID: id, basicSecret: secret,
			form: r.PostForm,
		})
		as.mu.Unlock()
		for k, v := range header {
			w.Header().Set(k, v)
		}
		w.WriteHeader(status)
		_, _ = w.Write([]byte(body))
	}))
	t.Cleanup(as.Close)
	return as
}

func (as *answerServer) requests() []seenRequest {
	as.mu.Lock()
	defer as.mu.Unlock()
	return slices.Clone(as.seen)
}

// exchangeAnswer runs one exchange against a server giving the answer.
func exchangeAnswer(t *testing.T, status int, header map[string]string, body string) (*Record, error) {
	t.Helper()
	as := newAnswerServer(t, status, header, body)
	x := newTestExchanger(as.URL+"/oauth/token", AuthBasic, func() time.Time { return clockStart })
	rec, err := x.exchange(context.Background(), testRefresh)
	if n := len(as.requests()); n != 1 {
		t.Fatalf("token endpoint got %d requests, want exactly 1", n)
	}
	return rec, err
}

// asError asserts err is an *Error and returns it.
func asError(t *testing.T, err error) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T) is not an *Error", err, err)
	}
	return e
}

// assertNoSecrets fails if an error text contains the refresh token sent or
// the client secret.
func assertNoSecrets(t *testing.T, msg string, secrets ...string) {
	t.Helper()
	for _, s := range append([]string{testRefresh, testClientSecret}, secrets...) {
		if strings.Contains(msg, s) {
			t.Errorf("error text leaks a secret %q: %s", s, msg)
		}
	}
}

func tokenJSON(fields map[string]any) string {
	b, err := json.Marshal(fields)
	if err != nil {
		panic(err)
	}
	return string(b)
}

func TestExchangeAgainstFakeRestream(t *testing.T) {
	t.Parallel()
	for _, style := range []AuthStyle{AuthBasic, AuthBody} {
		t.Run(map[AuthStyle]string{AuthBasic: "basic", AuthBody: "body"}[style], func(t *testing.T) {
			t.Parallel()
			clk := newFakeClock()
			fake := fakerestream.New(fakerestream.Options{ClientSecret: testClientSecret, Now: clk.Now})
			t.Cleanup(fake.Close)
			seedAccess, seed := fake.SeedPair()
			x := newTestExchanger(fake.TokenURL(), style, clk.Now)

			rec, err := x.exchange(context.Background(), seed)
			if err != nil {
				t.Fatalf("exchange: %v", err)
			}
			switch {
			case !fake.ValidAccessToken(rec.AccessToken):
				t.Errorf("fake does not accept the new access token")
			case fake.ValidAccessToken(seedAccess):
				t.Errorf("the seed's access token survived the rotation")
			case rec.RefreshToken == "" || rec.RefreshToken == seed:
				t.Errorf("refresh token not rotated: %q", rec.RefreshToken)
			}
			if want := clk.Now().Add(time.Hour); !rec.Expiry.Equal(want) {
				t.Errorf("Expiry = %v, want %v", rec.Expiry, want)
			}
			if want := clk.Now().Add(365 * 24 * time.Hour); !rec.RefreshExpiry.Equal(want) {
				t.Errorf("RefreshExpiry = %v, want %v", rec.RefreshExpiry, want)
			}
			if !rec.IssuedAt.Equal(clk.Now()) || rec.TokenType != "Bearer" || rec.Version != recordVersion {
				t.Errorf("IssuedAt/TokenType/Version = %v/%q/%d", rec.IssuedAt, rec.TokenType, rec.Version)
			}
			if want := strings.Fields(fakerestream.Scope); !slices.Equal(rec.Scope, want) {
				t.Errorf("Scope = %q, want %q", rec.Scope, want)
			}

			// The seed is spent now: the strict fake says invalid_grant.
			_, err = x.exchange(context.Background(), seed)
			e := asError(t, err)
			if e.Kind != Terminal || e.Code != "invalid_grant" || e.Status != http.StatusBadRequest {
				t.Errorf("reused seed: kind %v code %q status %d, want terminal invalid_grant 400 (%s)", e.Kind, e.Code, e.Status, e.Msg)
			}
			assertNoSecrets(t, e.Msg, seed, rec.RefreshToken)
			if st := fake.Stats(); st.RefreshOK != 1 || st.InvalidGrant != 1 || st.InvalidClient != 0 {
				t.Errorf("fake stats %+v", st)
			}
		})
	}
}

func TestExchangeWrongClientSecret(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		style  AuthStyle
		status int
	}{
		{"basic", AuthBasic, http.StatusUnauthorized},
		{"body", AuthBody, http.StatusBadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			fake := fakerestream.New(fakerestream.Options{ClientSecret: "the-real-secret"})
			t.Cleanup(fake.Close)
			seed := fake.Seed()
			x := newTestExchanger(fake.TokenURL(), tc.style, time.Now)
			_, err := x.exchange(context.Background(), seed)
			e := asError(t, err)
			// A configuration error, not a dead chain.
			if e.Kind != Misconfigured || e.Code != "invalid_client" || e.Status != tc.status {
				t.Errorf("kind %v code %q status %d, want misconfigured invalid_client %d (%s)", e.Kind, e.Code, e.Status, tc.status, e.Msg)
			}
			assertNoSecrets(t, e.Msg, seed)
			if st := fake.Stats(); st.InvalidClient != 1 || st.RefreshOK != 0 {
				t.Errorf("fake stats %+v", st)
			}
		})
	}
}

func TestExchangeSendsCredentialsAsConfigured(t *testing.T) {
	t.Parallel()
	ok := tokenJSON(map[string]any{"access_token": "at_x", "refresh_token": "rt_y", "expires_in": 3600, "token_type": "Bearer"})
	for _, style := range []AuthStyle{AuthBasic, AuthBody} {
		as := newAnswerServer(t, http.StatusOK, map[string]string{"Content-Type": "application/json"}, ok)
		x := newTestExchanger(as.URL, style, time.Now)
		if _, err := x.exchange(context.Background(), testRefresh); err != nil {
			t.Fatalf("style %d: %v", style, err)
		}
		reqs := as.requests()
		if len(reqs) != 1 {
			t.Fatalf("style %d: %d requests, want 1 (no retry with the other style)", style, len(reqs))
		}
		r := reqs[0]
		if r.method != http.MethodPost || r.contentType != "application/x-www-form-urlencoded" || r.accept != "application/json" {
			t.Errorf("style %d: method %q content-type %q accept %q", style, r.method, r.contentType, r.accept)
		}
		if g, rt := r.form["grant_type"], r.form["refresh_token"]; !slices.Equal(g, []string{"refresh_token"}) || !slices.Equal(rt, []string{testRefresh}) {
			t.Errorf("style %d: grant_type %q refresh_token %q", style, g, rt)
		}
		_, formID := r.form["client_id"]
		_, formSecret := r.form["client_secret"]
		switch style {
		case AuthBasic:
			if !r.basicOK || r.basicID != testClientID || r.basicSecret != testClientSecret {
				t.Errorf("basic: Authorization %q does not carry the client credentials", r.authorization)
			}
			if formID || formSecret {
				t.Errorf("basic: credentials also sent as form fields: %v", r.form)
			}
		case AuthBody:
			if r.authorization != "" {
				t.Errorf("body: Authorization header sent: %q", r.authorization)
			}
			if !slices.Equal(r.form["client_id"], []string{testClientID}) || !slices.Equal(r.form["client_secret"], []string{testClientSecret}) {
				t.Errorf("body: form credentials %q / %q", r.form["client_id"], r.form["client_secret"])
			}
		}
	}
}

func TestParseTokenResponseNamingStylesAndExpiry(t *testing.T) {
	t.Parallel()
	now := clockStart
	epoch := func(d time.Duration) int64 { return now.Add(d).Unix() }
	tests := []struct {
		name         string
		fields       map[string]any
		wantExpiry   time.Time
		wantRefresh  time.Time
		wantScope    []string
		wantAccess   string
		wantRefToken string
	}{
		{
			name: "restream answer with both styles",
			fields: map[string]any{
				"access_token": "at_1", "refresh_token": "rt_1", "token_type": "Bearer", "expires_in": 3600, "expires": epoch(time.Hour),
				"scope": "a.read b.read", "accessToken": "at_1", "refreshToken": "rt_1", "tokenType": "Bearer",
				"accessTokenExpiresIn": 3600, "accessTokenExpiresEpoch": epoch(time.Hour),
				"accessTokenExpiresAt":  now.Add(time.Hour).Format("2006-01-02T15:04:05.000Z07:00"),
				"refreshTokenExpiresIn": 31536000, "refreshTokenExpiresEpoch": epoch(8760 * time.Hour), "scopeJson": []string{"a.read", "b.read"},
			},
			wantExpiry: now.Add(time.Hour), wantRefresh: now.Add(8760 * time.Hour), wantScope: []string{"a.read", "b.read"},
			wantAccess: "at_1", wantRefToken: "rt_1",
		},
		{
			name: "only camelCase fields",
			fields: map[string]any{
				"accessToken": "at_c", "refreshToken": "rt_c", "tokenType": "Bearer", "accessTokenExpiresIn": 3600,
				"refreshTokenExpiresIn": 31536000, "scopeJson": []string{"chat.default.read"},
			},
			wantExpiry: now.Add(time.Hour), wantRefresh: now.Add(31536000 * time.Second), wantScope: []string{"chat.default.read"},
			wantAccess: "at_c", wantRefToken: "rt_c",
		},
		{
			name: "only camelCase with epochs",
			fields: map[string]any{
				"accessToken": "at_c", "refreshToken": "rt_c", "accessTokenExpiresEpoch": epoch(50 * time.Minute),
				"refreshTokenExpiresEpoch": epoch(48 * time.Hour),
			},
			wantExpiry: now.Add(50 * time.Minute), wantRefresh: now.Add(48 * time.Hour), wantAccess: "at_c", wantRefToken: "rt_c",
		},
		{
			name: "only camelCase with ISO time",
			fields: map[string]any{
				"accessToken": "at_c", "refreshToken": "rt_c", "accessTokenExpiresAt": now.Add(20 * time.Minute).Format(time.RFC3339),
			},
			wantExpiry: now.Add(20 * time.Minute), wantAccess: "at_c", wantRefToken: "rt_c",
		},
		{
			name: "snake_case only, space separated scope, lower-case bearer",
			fields: map[string]any{
				"access_token": "at_s", "refresh_token": "rt_s", "token_type": "bearer", "expires_in": 3600, "scope": "x.read  y.write",
			},
			wantExpiry: now.Add(time.Hour), wantScope: []string{"x.read", "y.write"}, wantAccess: "at_s", wantRefToken: "rt_s",
		},
		{
			name:       "expires_in wins over an earlier epoch (this host's clock is ahead)",
			fields:     map[string]any{"access_token": "a", "refresh_token": "r", "expires": epoch(100 * time.Second), "expires_in": 3600},
			wantExpiry: now.Add(time.Hour), wantAccess: "a", wantRefToken: "r",
		},
		{
			name:       "expires_in earlier than a skewed epoch wins",
			fields:     map[string]any{"access_token": "a", "refresh_token": "r", "expires": epoch(2 * time.Hour), "expires_in": 3600},
			wantExpiry: now.Add(time.Hour), wantAccess: "a", wantRefToken: "r",
		},
		{
			name:       "an epoch in the past (a clock far ahead) yields to expires_in",
			fields:     map[string]any{"access_token": "a", "refresh_token": "r", "expires": epoch(-10 * time.Minute), "expires_in": 3600},
			wantExpiry: now.Add(time.Hour), wantAccess: "a", wantRefToken: "r",
		},
		{
			name:       "only an epoch in the past: the pair is kept, expired",
			fields:     map[string]any{"access_token": "a", "refresh_token": "r", "expires": epoch(-time.Minute)},
			wantExpiry: now.Add(-time.Minute), wantAccess: "a", wantRefToken: "r",
		},
		{
			name:       "only expires",
			fields:     map[string]any{"access_token": "a", "refresh_token": "r", "expires": epoch(42 * time.Minute)},
			wantExpiry: now.Add(42 * time.Minute), wantAccess: "a", wantRefToken: "r",
		},
		{
			name:       "numbers as strings",
			fields:     map[string]any{"access_token": "a", "refresh_token": "r", "expires_in": "600", "expires": fmt.Sprint(epoch(time.Hour))},
			wantExpiry: now.Add(10 * time.Minute), wantAccess: "a", wantRefToken: "r",
		},
		{
			name:       "snake_case wins over camelCase when both differ",
			fields:     map[string]any{"access_token": "a_snake", "accessToken": "a_camel", "refresh_token": "r_snake", "refreshToken": "r_camel", "expires_in": 60},
			wantExpiry: now.Add(time.Minute), wantAccess: "a_snake", wantRefToken: "r_snake",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rec, err := parseTokenResponse([]byte(tokenJSON(tc.fields)), "application/json", now)
			if err != nil {
				t.Fatalf("parse: %v", err)
			}
			if rec.AccessToken != tc.wantAccess || rec.RefreshToken != tc.wantRefToken {
				t.Errorf("tokens %q/%q, want %q/%q", rec.AccessToken, rec.RefreshToken, tc.wantAccess, tc.wantRefToken)
			}
			if !rec.Expiry.Equal(tc.wantExpiry) {
				t.Errorf("Expiry = %v, want %v", rec.Expiry, tc.wantExpiry)
			}
			if !rec.RefreshExpiry.Equal(tc.wantRefresh) {
				t.Errorf("RefreshExpiry = %v, want %v", rec.RefreshExpiry, tc.wantRefresh)
			}
			if !slices.Equal(rec.Scope, tc.wantScope) {
				t.Errorf("Scope = %q, want %q", rec.Scope, tc.wantScope)
			}
			if rec.TokenType != "Bearer" || !rec.IssuedAt.Equal(now) || rec.Generation != 0 {
				t.Errorf("TokenType %q IssuedAt %v Generation %d", rec.TokenType, rec.IssuedAt, rec.Generation)
			}
		})
	}
}

// TestExchangeUnusableSuccess covers 200 answers that are not a usable pair:
// they are transient (nothing better than retrying exists) but flagged
// Unknown, because the endpoint may well have rotated the pair.
func TestExchangeUnusableSuccess(t *testing.T) {
	t.Parallel()
	const marker = "SECRET-MARKER-in-the-body"
	bigPad := strings.Repeat(" ", MaxResponseBytes)
	tests := []struct {
		name        string
		contentType string
		body        string
		wantIn      []string // substrings the error text must contain
	}{
		{"missing access_token", "application/json", `{"refresh_token":"rt_n","expires_in":3600}`, []string{"no access_token"}},
		{"missing refresh_token", "application/json", `{"access_token":"at_n","expires_in":3600}`, []string{"no refresh_token"}},
		{"missing both", "application/json", `{"expires_in":3600}`, []string{"no access_token and no refresh_token"}},
		{"camelCase missing refreshToken", "application/json", `{"accessToken":"at_n","accessTokenExpiresIn":3600}`, []string{"no refresh_token"}},
		{"token_type mac", "application/json", `{"access_token":"a","refresh_token":"r","expires_in":3600,"token_type":"mac"}`, []string{`"mac"`, "Bearer"}},
		{"tokenType mac", "application/json", `{"accessToken":"a","refreshToken":"r","accessTokenExpiresIn":3600,"tokenType":"MAC"}`, []string{`"MAC"`}},
		{"no expiry", "application/json", `{"access_token":"a","refresh_token":"r"}`, []string{"no expiry"}},
		{"non-JSON", "text/plain", "access_token=" + marker, []string{"not a token", "non-JSON", "text/plain"}},
		{"HTML page", "text/html; charset=utf-8", "<!DOCTYPE html><html><body><h1>Welcome</h1>" + marker + "</body></html>", []string{"HTML"}},
		{"HTML page without content type", "", "<html><head><title>" + marker + "</title></head></html>", []string{"HTML"}},
		{"empty body", "application/json", "", []string{"empty body"}},
		{"whitespace body", "application/json", " \n\t", []string{"empty body"}},
		{"unexpected JSON", "application/json", `["` + marker + `"]`, []string{"unexpected JSON"}},
		{"over 1 MiB", "application/json", `{"access_token":"a","refresh_token":"` + marker + `","expires_in":3600}` + bigPad, []string{"larger than 1048576 bytes"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rec, err := exchangeAnswer(t, http.StatusOK, map[string]string{"Content-Type": tc.contentType}, tc.body)
			if rec != nil {
				t.Fatalf("got a record from an unusable answer: %+v", rec)
			}
			e := asError(t, err)
			if e.Kind != Transient || !e.Unknown || e.Status != http.StatusOK {
				t.Errorf("kind %v unknown %v status %d, want transient, unknown, 200", e.Kind, e.Unknown, e.Status)
			}
			for _, w := range tc.wantIn {
				if !strings.Contains(e.Msg, w) {
					t.Errorf("error %q does not mention %q", e.Msg, w)
				}
			}
			if strings.Contains(e.Msg, marker) || (len(tc.body) > 8 && strings.Contains(e.Msg, tc.body)) {
				t.Errorf("error text quotes the body: %s", e.Msg)
			}
			if len(e.Msg) > 400 {
				t.Errorf("error text is %d bytes long", len(e.Msg))
			}
			assertNoSecrets(t, e.Msg)
		})
	}
}

// TestExchangeBodyOfExactlyMaxBytes checks the limit is not off by one: an
// answer of exactly MaxResponseBytes is still read and used.
func TestExchangeBodyOfExactlyMaxBytes(t *testing.T) {
	t.Parallel()
	body := `{"access_token":"at_big","refresh_token":"rt_big","expires_in":3600}`
	body += strings.Repeat(" ", MaxResponseBytes-len(body))
	rec, err := exchangeAnswer(t, http.StatusOK, map[string]string{"Content-Type": "application/json"}, body)
	if err != nil {
		t.Fatalf("exchange of a %d-byte answer: %v", len(body), err)
	}
	if rec.AccessToken != "at_big" || rec.RefreshToken != "rt_big" {
		t.Fatalf("record %+v", rec)
	}
}

func TestExchangeErrorAnswers(t *testing.T) {
	t.Parallel()
	retryDate := clockStart.Add(2 * time.Minute).Format(http.TimeFormat)
	tests := []struct {
		name       string
		status     int
		header     map[string]string
		body       string
		kind       ErrorKind
		code       string
		retryAfter time.Duration
		wantIn     []string
	}{
		{
			name: "invalid_grant flat", status: 400,
			body: `{"error":"invalid_grant","error_description":"Invalid grant: refresh token is invalid"}`,
			kind: Terminal, code: "invalid_grant", wantIn: []string{"400", "invalid_grant", "refresh token is invalid"},
		},
		{
			name: "invalid_grant nested", status: 400,
			body: `{"error":{"statusCode":400,"status":400,"code":400,"name":"invalid_grant","message":"Invalid grant: refresh token has expired"}}`,
			kind: Terminal, code: "invalid_grant", wantIn: []string{"invalid_grant", "refresh token has expired"},
		},
		{
			name: "invalid_client flat 400", status: 400,
			body: `{"error":"invalid_client","error_description":"Invalid client: cannot retrieve client credentials"}`,
			kind: Misconfigured, code: "invalid_client",
		},
		{
			name: "invalid_client nested 401", status: 401, header: map[string]string{"WWW-Authenticate": `Basic realm="Service"`},
			body: `{"error":{"name":"invalid_client","message":"Invalid client: client is invalid"}}`,
			kind: Misconfigured, code: "invalid_client",
		},
		{
			name: "invalid_client 401 with WWW-Authenticate and no JSON", status: 401,
			header: map[string]string{"WWW-Authenticate": `Basic realm="restream"`, "Content-Type": "text/plain"},
			body:   "Unauthorized",
			kind:   Misconfigured, code: "invalid_client", wantIn: []string{"401", "invalid_client"},
		},
		{
			name: "invalid_client 401 with WWW-Authenticate and empty body", status: 401,
			header: map[string]string{"WWW-Authenticate": `Basic realm="restream"`},
			kind:   Misconfigured, code: "invalid_client",
		},
		{
			name: "unauthorized_client", status: 400, body: `{"error":"unauthorized_client"}`,
			kind: Misconfigured, code: "unauthorized_client",
		},
		{
			name: "500 with Retry-After seconds", status: 500, header: map[string]string{"Retry-After": "7"},
			body: `{"error":"server_error"}`, kind: Transient, code: "server_error", retryAfter: 7 * time.Second,
		},
		{
			name: "429 with Retry-After date", status: 429, header: map[string]string{"Retry-After": retryDate},
			body: `{"error":{"name":"too_many_requests","message":"slow down"}}`, kind: Transient, code: "too_many_requests",
			retryAfter: 2 * time.Minute,
		},
		{
			name: "429 without JSON", status: 429, header: map[string]string{"Retry-After": "30", "Content-Type": "text/plain"},
			body: "Too Many Requests", kind: Transient, retryAfter: 30 * time.Second, wantIn: []string{"429", "non-JSON"},
		},
		{
			name: "503 garbage Retry-After", status: 503, header: map[string]string{"Retry-After": "soon"},
			body: `{"error":"server_error"}`, kind: Transient, code: "server_error",
		},
		{
			name: "502 HTML from a proxy", status: 502, header: map[string]string{"Content-Type": "text/html"},
			body: "<html><body>Bad Gateway " + testRefresh + "</body></html>", kind: Transient, wantIn: []string{"502", "HTML"},
		},
		{
			name: "5xx is never terminal, even saying invalid_grant", status: 503,
			body: `{"error":"invalid_grant","error_description":"maintenance"}`, kind: Transient, code: "invalid_grant",
		},
		{
			name: "invalid_request is not terminal", status: 400,
			body: `{"error":"invalid_request","error_description":"Missing parameter"}`, kind: Transient, code: "invalid_request",
		},
		{
			name: "401 without WWW-Authenticate or JSON", status: 401, body: "nope", kind: Transient, wantIn: []string{"401"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rec, err := exchangeAnswer(t, tc.status, tc.header, tc.body)
			if rec != nil {
				t.Fatalf("got a record from an error answer")
			}
			e := asError(t, err)
			if e.Kind != tc.kind || e.Code != tc.code || e.Status != tc.status {
				t.Errorf("kind %v code %q status %d, want %v %q %d (%s)", e.Kind, e.Code, e.Status, tc.kind, tc.code, tc.status, e.Msg)
			}
			if e.RetryAfter != tc.retryAfter {
				t.Errorf("RetryAfter = %v, want %v", e.RetryAfter, tc.retryAfter)
			}
			if e.Unknown {
				t.Errorf("an error answer is a definite outcome, but Unknown is set")
			}
			if IsTerminal(err) != (tc.kind == Terminal) {
				t.Errorf("IsTerminal = %v", IsTerminal(err))
			}
			for _, w := range tc.wantIn {
				if !strings.Contains(e.Msg, w) {
					t.Errorf("error %q does not mention %q", e.Msg, w)
				}
			}
			if e.Error() != e.Msg {
				t.Errorf("Error() = %q, Msg = %q", e.Error(), e.Msg)
			}
			assertNoSecrets(t, e.Msg)
		})
	}
}

// TestExchangeErrorTextsRedactSecrets: an endpoint (or a proxy in front of it)
// may echo the request; the refresh token and client secret must never reach
// an error text, which ends up in logs and status pages.
func TestExchangeErrorTextsRedactSecrets(t *testing.T) {
	t.Parallel()
	echo := fmt.Sprintf("refresh_token=%s client_secret=%s client_id=%s", testRefresh, testClientSecret, testClientID)
	bodies := map[string]string{
		"flat description":    tokenJSON(map[string]any{"error": "invalid_grant", "error_description": "bad token " + echo}),
		"nested message":      tokenJSON(map[string]any{"error": map[string]any{"name": "invalid_grant", "message": "bad token " + echo}}),
		"both descriptions":   tokenJSON(map[string]any{"error": map[string]any{"name": "invalid_grant", "message": echo}, "error_description": echo}),
		"echo in error code":  tokenJSON(map[string]any{"error": "invalid " + testRefresh + " " + testClientSecret}),
		"echo in nested name": tokenJSON(map[string]any{"error": map[string]any{"name": "bad_" + testRefresh, "message": "x"}}),
		"unexpected JSON":     tokenJSON(map[string]any{"message": echo}),
		"plain text":          echo,
		"long description":    tokenJSON(map[string]any{"error": "invalid_grant", "error_description": strings.Repeat("x", 190) + testRefresh}),
	}
	for name, body := range bodies {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			for _, style := range []AuthStyle{AuthBasic, AuthBody} {
				as := newAnswerServer(t, http.StatusBadRequest, map[string]string{"Content-Type": "application/json"}, body)
				x := newTestExchanger(as.URL, style, time.Now)
				_, err := x.exchange(context.Background(), testRefresh)
				e := asError(t, err)
				assertNoSecrets(t, e.Msg)
				assertNoSecrets(t, e.Code)
				// Not even a prefix long enough to matter.
				if strings.Contains(e.Msg, testRefresh[:16]) || strings.Contains(e.Msg, testClientSecret[:12]) {
					t.Errorf("error text leaks part of a secret: %s", e.Msg)
				}
			}
		})
	}
}

func TestExchangeSanitizesControlCharacters(t *testing.T) {
	t.Parallel()
	body := tokenJSON(map[string]any{"error": "invalid_grant", "error_description": "line one\nFAKE LOG LINE\r\x1b[31m"})
	_, err := exchangeAnswer(t, http.StatusBadRequest, nil, body)
	e := asError(t, err)
	if strings.ContainsAny(e.Msg, "\n\r\x1b") {
		t.Fatalf("error text carries control characters: %q", e.Msg)
	}
	if e.Kind != Terminal {
		t.Fatalf("kind %v", e.Kind)
	}
}

func TestExchangeTimeoutIsUnknown(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	var got sync.WaitGroup
	got.Add(1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = r.ParseForm()
		got.Done()
		select { // the server received the grant and may have rotated: hang
		case <-r.Context().Done():
		case <-release:
		}
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(release) })
	x := newTestExchanger(srv.URL+"/oauth/token?x="+testClientSecret, AuthBasic, time.Now)
	x.timeout = 150 * time.Millisecond

	start := time.Now()
	rec, err := x.exchange(context.Background(), testRefresh)
	took := time.Since(start)
	got.Wait()
	if rec != nil {
		t.Fatal("got a record")
	}
	e := asError(t, err)
	if e.Kind != Transient || !e.Unknown || e.Status != 0 {
		t.Errorf("kind %v unknown %v status %d, want transient, unknown, 0 (%s)", e.Kind, e.Unknown, e.Status, e.Msg)
	}
	if !strings.Contains(e.Msg, "timed out") {
		t.Errorf("error %q does not say it timed out", e.Msg)
	}
	if took > 3*time.Second {
		t.Errorf("exchange took %v with a 150ms timeout", took)
	}
	assertNoSecrets(t, e.Msg, srv.URL)
}

func TestExchangeCallerContextDeadlineIsUnknown(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = r.ParseForm() // a fully read body lets the server notice the client leaving
		select {
		case <-r.Context().Done():
		case <-release:
		}
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(release) })
	x := newTestExchanger(srv.URL, AuthBasic, time.Now)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := x.exchange(ctx, testRefresh)
	if e := asError(t, err); e.Kind != Transient || !e.Unknown {
		t.Fatalf("kind %v unknown %v (%s)", e.Kind, e.Unknown, e.Msg)
	}
}

func TestExchangeUnreachable(t *testing.T) {
	t.Parallel()
	// A port that was just free: nothing listens there.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	x := newTestExchanger("http://"+addr+"/oauth/token?client_secret="+testClientSecret, AuthBody, time.Now)
	_, err = x.exchange(context.Background(), testRefresh)
	e := asError(t, err)
	if e.Kind != Transient || e.Unknown || e.Status != 0 {
		t.Errorf("kind %v unknown %v status %d, want transient, known, 0 (%s)", e.Kind, e.Unknown, e.Status, e.Msg)
	}
	if !strings.Contains(e.Msg, "unreachable") {
		t.Errorf("error %q", e.Msg)
	}
	assertNoSecrets(t, e.Msg, "/oauth/token?")
}

func TestExchangeBadTokenURL(t *testing.T) {
	t.Parallel()
	x := newTestExchanger("http://[::1]:namedport/\x7f", AuthBasic, time.Now)
	_, err := x.exchange(context.Background(), testRefresh)
	if e := asError(t, err); e.Kind != Terminal {
		t.Fatalf("kind %v (%s)", e.Kind, e.Msg)
	}
}

func TestParseOAuthError(t *testing.T) {
	t.Parallel()
	tests := []struct {
		body, code, desc string
		ok               bool
	}{
		{`{"error":"invalid_grant","error_description":"d"}`, "invalid_grant", "d", true},
		{`{"error":{"name":"invalid_grant","message":"m"}}`, "invalid_grant", "m", true},
		{`{"error":{"name":"invalid_grant","message":"m"},"error_description":"d"}`, "invalid_grant", "d", true},
		{`{"error":""}`, "", "", false},
		{`{"error":{"message":"no name"}}`, "", "", false},
		{`{"error":42}`, "", "", false},
		{`{"message":"x"}`, "", "", false},
		{`<html>`, "", "", false},
		{``, "", "", false},
	}
	for _, tc := range tests {
		code, desc, ok := ParseOAuthError([]byte(tc.body))
		if code != tc.code || desc != tc.desc || ok != tc.ok {
			t.Errorf("ParseOAuthError(%s) = %q, %q, %v; want %q, %q, %v", tc.body, code, desc, ok, tc.code, tc.desc, tc.ok)
		}
	}
}

func TestParseRetryAfter(t *testing.T) {
	t.Parallel()
	now := clockStart
	tests := []struct {
		v    string
		want time.Duration
	}{
		{"", 0},
		{"0", 0},
		{"120", 2 * time.Minute},
		{" 5 ", 5 * time.Second},
		{"-3", 0},
		{"abc", 0},
		{now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second},
	}
	for _, tc := range tests {
		if got := parseRetryAfter(tc.v, now); got != tc.want {
			t.Errorf("parseRetryAfter(%q) = %v, want %v", tc.v, got, tc.want)
		}
	}
	if got := parseRetryAfter(now.Add(-time.Hour).Format(http.TimeFormat), now); got > 0 {
		t.Errorf("a date in the past gives %v", got)
	}
}

// A 200 has already rotated the pair: malformed optional fields must not
// throw the new pair away.
func TestParseTokenResponseLenientOptionalFields(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	body := `{"access_token":"at_x","refresh_token":"rt_x","expires_in":3600,"token_type":"Bearer",
		"accessTokenExpiresAt":"next tuesday","refreshTokenExpiresAt":17,"scopeJson":"chat.read",
		"expires":"soon","refreshTokenExpiresEpoch":{"a":1},"accessTokenExpiresIn":-5}`
	rec, err := parseTokenResponse([]byte(body), "application/json", now)
	if err != nil {
		t.Fatalf("lenient parse failed: %v", err)
	}
	if rec.AccessToken != "at_x" || rec.RefreshToken != "rt_x" || !rec.Expiry.Equal(now.Add(time.Hour)) || !rec.RefreshExpiry.IsZero() {
		t.Fatalf("parsed %+v", rec)
	}
}
