package caddymodule

import (
	"strings"
	"testing"
)

func TestLoginCaddyfile(t *testing.T) {
	checkCaddyfileCases(t, []caddyfileCase[Login]{
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
	})
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
	checkCaddyfileErrors[Login](t, []caddyfileErrorCase{
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
	})
}
