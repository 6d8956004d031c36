package caddymodule

import (
	"net/http"
	"net/http/httptest"
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

// FuzzTokenProxyForm: any device request gets a well-formed answer from the
// token proxy's request parsing, and no client credential is ever passed on.
func FuzzTokenProxyForm(f *testing.F) {
	for _, seed := range []string{
		"grant_type=refresh_token&refresh_token=rt_1",
		"grant_type=authorization_code&code=c&redirect_uri=https%3A%2F%2Fx",
		"grant_type=authorization_code&code=c&redirect_uri=https%3A%2F%2Fapp.example%2Fcb&code_verifier=" + strings.Repeat("v", 43),
		"grant_type=authorization_code&code=c&redirect_uri=https%3A%2F%2Fapp.example%2Fcb%2F",
		"grant_type=refresh_token&refresh_token=rt_1&client_secret=evil&client_id=evil",
		"grant_type=password&username=a", "grant_type=refresh_token&grant_type=refresh_token", "%zz", "",
		"token=t&token_type_hint=refresh_token",
	} {
		f.Add(seed, "application/x-www-form-urlencoded", false)
	}
	p := &TokenProxy{TokenURL: "https://token.example/oauth/token", RevokeURL: "https://token.example/oauth/revoke",
		RedirectURIs: []string{"https://app.example/cb"}}
	f.Fuzz(func(t *testing.T, body, contentType string, revoke bool) {
		r := httptest.NewRequest(http.MethodPost, "/oauth/token", strings.NewReader(body))
		r.Header.Set("Content-Type", contentType)
		w := httptest.NewRecorder()
		accepted, ref := p.parseRequest(w, r, revoke)
		call, target, form := accepted.name, accepted.target, accepted.form
		if ref != nil {
			if ref.status < 400 || ref.status > 499 || ref.code == "" {
				t.Fatalf("refusal %+v", ref)
			}
			return
		}
		if call == "" || target == "" {
			t.Fatal("accepted without a call or target")
		}
		for k := range form {
			switch k {
			case "grant_type", "refresh_token", "code", "redirect_uri", "code_verifier", "token", "token_type_hint":
			default:
				t.Fatalf("forwarded field %q", k)
			}
		}
		if form.Get("grant_type") == "authorization_code" && form.Get("redirect_uri") != "https://app.example/cb" {
			t.Fatalf("code grant forwarded for redirect_uri %q", form.Get("redirect_uri"))
		}
	})
}
