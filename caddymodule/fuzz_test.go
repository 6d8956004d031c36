package caddymodule

import (
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// FuzzUnmarshalCaddyfile feeds arbitrary text to every directive's
// unmarshaler: it must return a value or an error with a line, never panic.
func FuzzUnmarshalCaddyfile(f *testing.F) {
	for _, seed := range []string{
		"restream_auth {\n client_id a\n client_secret b\n refresh_ahead 1m\n max_replay_body 1MiB\n}",
		"restream_auth acct {\n client_id a\n client_secret b\n token_url http://127.0.0.1/t\n replay_401 off\n query_param accessToken\n}",
		"restream_auth_health acct",
		"restream_token_proxy {\n client_id a\n client_secret b\n timeout 5s\n client_auth body\n}",
		"restream_auth_login {\n client_id a\n client_secret b\n redirect_uri https://x/cb/callback\n}",
		"restream_auth {\n}", "restream_auth a b", "restream_auth {\n timeout -1s\n}", "restream_auth {\n max_replay_body 9999999999GiB\n}",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, input string) {
		tokens, err := caddyfile.Tokenize([]byte(input), "Testfile")
		if err != nil || len(tokens) == 0 {
			return
		}
		for _, u := range []caddyfile.Unmarshaler{new(Handler), new(Health), new(TokenProxy), new(Login)} {
			err := u.UnmarshalCaddyfile(caddyfile.NewDispenser(tokens))
			if err != nil && !strings.Contains(err.Error(), "Testfile:") {
				t.Fatalf("%T: error without a line: %v", u, err)
			}
		}
	})
}
