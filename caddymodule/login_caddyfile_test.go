package caddymodule

import (
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"go.uber.org/zap/zapcore"
)

func TestLoginCaddyfile(t *testing.T) {
	for _, tc := range []struct {
		name, input string
		want        Login
	}{
		{
			name: "every subdirective",
			input: `restream_auth_login main-acct {
	client_id {env.RESTREAM_CLIENT_ID}
	client_secret {file./run/secrets/restream_secret}
	token_url https://api.restream.io/oauth/token
	client_auth body
	authorize_url https://api.restream.io/login
	redirect_uri https://sidecar.example.com/restream/callback
	encryption_key {env.RESTREAM_KEY}
	encryption_key_previous {file./run/secrets/old_key}
	expected_user_id 123456789
	allow_account_change
	allow_unauthenticated
}`,
			want: Login{
				Account:      "main-acct",
				ClientID:     "{env.RESTREAM_CLIENT_ID}",
				ClientSecret: "{file./run/secrets/restream_secret}",
				TokenURL:     "https://api.restream.io/oauth/token",
				ClientAuth:   "body",
				AuthorizeURL: "https://api.restream.io/login",
				RedirectURI:  "https://sidecar.example.com/restream/callback",

				EncryptionKey:         "{env.RESTREAM_KEY}",
				EncryptionKeyPrevious: "{file./run/secrets/old_key}",
				ExpectedUserID:        "123456789",
				AllowAccountChange:    true,
				AllowUnauthenticated:  true,
			},
		},
		{
			name: "minimal, no account",
			input: `restream_auth_login {
	client_id id
	client_secret secret
	redirect_uri https://sidecar.example.com/callback
}`,
			want: Login{ClientID: "id", ClientSecret: "secret", RedirectURI: "https://sidecar.example.com/callback"},
		},
		{
			name: "loopback http for local fakes",
			input: `restream_auth_login acct_2 {
	client_id id
	client_secret secret
	client_auth basic
	token_url http://127.0.0.1:9/oauth/token
	authorize_url http://localhost:9/login?prompt=x
	redirect_uri http://[::1]:8080/onboard/restream/callback
}`,
			want: Login{Account: "acct_2", ClientID: "id", ClientSecret: "secret", ClientAuth: "basic",
				TokenURL: "http://127.0.0.1:9/oauth/token", AuthorizeURL: "http://localhost:9/login?prompt=x",
				RedirectURI: "http://[::1]:8080/onboard/restream/callback"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got Login
			if err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input)); err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got\n%+v\nwant\n%+v", got, tc.want)
			}
		})
	}
}

func TestLoginCaddyfileErrors(t *testing.T) {
	// block wraps subdirective lines into a valid block; the first of them
	// is on line 5.
	block := func(lines ...string) string {
		// A case that sets redirect_uri replaces the base one (a comment
		// keeps the line numbers): a subdirective may be given once.
		redirect := "redirect_uri https://s.example.com/restream/callback"
		for _, l := range lines {
			if strings.HasPrefix(l, "redirect_uri") {
				redirect = "# redirect_uri set below"
			}
		}
		return "restream_auth_login {\n\tclient_id id\n\tclient_secret secret\n\t" + redirect + "\n\t" +
			strings.Join(lines, "\n\t") + "\n}"
	}
	for _, tc := range []struct {
		name, input string
		reason      string // substring of the error
		line        int
	}{
		{"unknown subdirective", block("refresh_token x"), `unknown subdirective "refresh_token"`, 5},
		{"missing value", block("client_auth basic", "authorize_url"), "authorize_url: expected one value", 6},
		{"extra value", block("redirect_uri https://a.example/callback https://b.example/callback"), "redirect_uri: expected one value, got more", 5},
		{"bad client_auth", block("client_auth digest"), `client_auth "digest": want basic or body`, 5},
		{"token_url http", block("token_url http://api.restream.io/oauth/token"), "plain http is allowed only for loopback hosts", 5},
		{"authorize_url http", block("authorize_url http://api.restream.io/login"), `authorize_url "http://api.restream.io/login": plain http is allowed only for loopback hosts`, 5},
		{"authorize_url relative", block("authorize_url /login"), `authorize_url "/login" is not an absolute URL`, 5},
		{"authorize_url fragment", block("authorize_url https://api.restream.io/login#x"), "must not have a fragment", 5},
		{"redirect_uri http", block("redirect_uri http://sidecar.example.com/restream/callback"), `redirect_uri "http://sidecar.example.com/restream/callback": plain http is allowed only for loopback hosts`, 5},
		{"redirect_uri not the callback", block("redirect_uri https://sidecar.example.com/restream/login"), "the path must end in /callback", 5},
		{"redirect_uri no path", block("redirect_uri https://sidecar.example.com"), "the path must end in /callback", 5},
		{"redirect_uri relative", block("redirect_uri /restream/callback"), "is not an absolute URL", 5},
		{"redirect_uri placeholder", block("redirect_uri {env.REDIRECT}"), "is not an absolute URL", 5},
		{"redirect_uri fragment", block("redirect_uri https://s.example.com/callback#top"), "must not have a fragment", 5},
		{"redirect_uri credentials", block("redirect_uri https://u:p@s.example.com/callback"), "redirect_uri must not contain credentials", 5},
		{"missing client_id", "restream_auth_login {\n\tclient_secret s\n\tredirect_uri https://s.example.com/callback\n}", "client_id is required", 4},
		{"missing client_secret", "restream_auth_login {\n\tclient_id id\n\tredirect_uri https://s.example.com/callback\n}", "client_secret is required", 4},
		{"missing redirect_uri", "restream_auth_login {\n\tclient_id id\n\tclient_secret s\n}", "redirect_uri is required", 4},
		{"flag with a value", block("allow_unauthenticated yes"), "allow_unauthenticated takes no value", 5},
		{"account change flag with a value", block("allow_account_change on"), "allow_account_change takes no value", 5},
		{"expected_user_id not a number", block("expected_user_id alice"), `expected_user_id "alice": want Restream's numeric user id`, 5},
		{"expected_user_id negative", block("expected_user_id -4"), `expected_user_id "-4": want Restream's numeric user id`, 5},
		{"expected_user_id placeholder", block("expected_user_id {env.RESTREAM_USER}"), "want Restream's numeric user id", 5},
		{"expected_user_id missing", block("expected_user_id"), "expected_user_id: expected one value", 5},
		{"expected_user_id two", block("expected_user_id 1 2"), "expected_user_id: expected one value, got more", 5},
		{"no block at all", "restream_auth_login acct", "client_id is required", 1},
		{"bad account name", "restream_auth_login ../etc {\n\tclient_id id\n}", `account "../etc": use 1-64 letters`, 1},
		{"two account args", "restream_auth_login one two {\n\tclient_id id\n}", "wrong argument count or unexpected line ending after 'two'", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var l Login
			err := l.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
			if err == nil {
				t.Fatalf("no error for\n%s", tc.input)
			}
			msg := err.Error()
			if !strings.Contains(msg, tc.reason) {
				t.Errorf("error %q does not give the reason %q", msg, tc.reason)
			}
			if at := fmt.Sprintf(", at Testfile:%d", tc.line); !strings.HasSuffix(msg, at) {
				t.Errorf("error %q does not end with the line %q", msg, at)
			}
		})
	}
}

func testLoginState(t *testing.T, secret, account string) *Login {
	t.Helper()
	return testLoginStateFor(t, secret, account, "https://s.example.com/restream/callback")
}

func testLoginStateFor(t *testing.T, secret, account, redirectURI string) *Login {
	t.Helper()
	key, err := loginStateKey(secret, "id", account)
	if err != nil {
		t.Fatal(err)
	}
	return &Login{Account: account, RedirectURI: redirectURI, stateKey: key}
}

// The state cookie: only a cookie signed with the same key, for the same
// account and redirect_uri, before its expiry, gives back its state.
func TestLoginStateCookie(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	l := testLoginState(t, "secret-1", "default")
	const state = "c3RhdGUtZm9yLXRlc3RzLW9ubHktMDEyMzQ1Njc4OWFi"
	exp := now.Add(loginStateTTL).Unix()
	v := l.signState(state, exp)

	if got, gotExp, err := l.verifyState(v, now); err != nil || got != state || gotExp.Unix() != exp {
		t.Fatalf("valid cookie: %q, %v, %v", got, gotExp, err)
	}
	// Another instance with the same client secret accepts it (load balancers).
	if got, _, err := testLoginState(t, "secret-1", "default").verifyState(v, now.Add(9*time.Minute)); err != nil || got != state {
		t.Fatalf("same secret, other instance: %q, %v", got, err)
	}
	if _, _, err := l.verifyState(v, now.Add(loginStateTTL)); err != errStateExpired {
		t.Errorf("expired cookie: %v", err)
	}
	for name, bad := range map[string]string{
		"other secret":    testLoginState(t, "secret-2", "default").signState(state, exp),
		"other account":   testLoginState(t, "secret-1", "other").signState(state, exp),
		"other redirect":  testLoginStateFor(t, "secret-1", "default", "https://other.example.com/restream/callback").signState(state, exp),
		"later expiry":    strings.Replace(v, fmt.Sprint(exp), fmt.Sprint(exp+3600), 1),
		"other state":     strings.Replace(v, state, state[:len(state)-1]+"x", 1),
		"truncated MAC":   v[:len(v)-2],
		"not base64 MAC":  v[:len(v)-2] + "!!",
		"no version":      strings.TrimPrefix(v, "v2."),
		"other version":   "v1" + strings.TrimPrefix(v, "v2"),
		"empty state":     l.signState("", exp),
		"empty":           "",
		"extra part":      v + ".x",
		"non-numeric exp": strings.Replace(v, fmt.Sprint(exp), "soon", 1),
	} {
		if got, _, err := l.verifyState(bad, now); err == nil {
			t.Errorf("%s: accepted, state %q", name, got)
		}
	}
}

// A literal client secret never reaches a log line that prints the handler
// (`servers { trace }`).
func TestLoginMarshalLogObject(t *testing.T) {
	l := &Login{Account: "a", ClientID: "id", ClientSecret: "cs_literal_in_config_1234", clientSecret: "cs_literal_in_config_1234",
		RedirectURI: "https://s.example.com/callback"}
	enc := zapcore.NewMapObjectEncoder()
	if err := l.MarshalLogObject(enc); err != nil {
		t.Fatal(err)
	}
	out := fmt.Sprint(enc.Fields)
	if strings.Contains(out, "cs_literal_in_config_1234") {
		t.Fatalf("log object contains the client secret: %s", out)
	}
	if enc.Fields["redirect_uri"] != "https://s.example.com/callback" || enc.Fields["account"] != "a" {
		t.Fatalf("log object lacks the useful fields: %s", out)
	}
}

func TestLoginPathHelpers(t *testing.T) {
	for in, want := range map[string]string{"/restream/login": "login", "/login": "login", "/restream/callback": "callback",
		"/restream/": "status", "/": "status", "/restream/login/": "", "/restream/callback/": "", "login": "login", "": "",
		"/restream/other": "", "/restream": "", "/restream/login.html": ""} {
		if got := loginRoute(in); got != want {
			t.Errorf("loginRoute(%q) = %q, want %q", in, got, want)
		}
	}
	for code, want := range map[string]string{"access_denied": "access_denied", "server_error": "server_error",
		"<script>": "(unrecognized)", "Bad": "(unrecognized)", strings.Repeat("a", 65): "(unrecognized)"} {
		if got := loginOAuthCode(code); got != want {
			t.Errorf("loginOAuthCode(%q) = %q, want %q", code, got, want)
		}
	}
}

// Durations read as people write them, rounded down.
func TestHumanDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		0:                                     "0 seconds",
		-time.Minute:                          "0 seconds",
		time.Second:                           "1 second",
		45*time.Second + 900*time.Millisecond: "45 seconds",
		loginStateTTL:                         "10 minutes",
		time.Hour - time.Second:               "59 minutes",
		time.Minute:                           "1 minute",
		time.Hour:                             "1 hour",
		23*time.Hour + 5*time.Minute + 30*time.Second: "23 hours 5 minutes",
		24 * time.Hour:                 "1 day",
		27*time.Hour + 59*time.Minute:  "1 day 3 hours",
		365*24*time.Hour - time.Second: "364 days",
		365 * 24 * time.Hour:           "365 days",
	} {
		if got := humanDuration(d); got != want {
			t.Errorf("humanDuration(%v) = %q, want %q", d, got, want)
		}
	}
	now := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	if got := whenText(now.Add(time.Hour-time.Second), now); got != "2026-12-01 00:59 UTC, in 59 minutes" {
		t.Errorf("whenText future: %q", got)
	}
	if got := whenText(now.Add(-90*time.Minute), now.In(time.FixedZone("x", 3600))); got != "2026-11-30 22:30 UTC, 1 hour 30 minutes ago" {
		t.Errorf("whenText past: %q", got)
	}
}

// A state is spent once, until it expires; expired ones are forgotten.
func TestStateLedger(t *testing.T) {
	l := &stateLedger{spent: make(map[string]time.Time)}
	now := time.Unix(1_800_000_000, 0)
	exp := now.Add(loginStateTTL)
	if !l.spend("a\x00s1", exp, now) || l.spend("a\x00s1", exp, now.Add(time.Minute)) {
		t.Fatal("a state was spent twice")
	}
	if !l.spend("b\x00s1", exp, now) {
		t.Fatal("the same state of another account is another state")
	}
	l.spend("a\x00s2", exp, exp.Add(time.Second))
	if len(l.spent) != 1 {
		t.Fatalf("expired states are kept: %d", len(l.spent))
	}
}
