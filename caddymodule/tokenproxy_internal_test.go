package caddymodule

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap/zapcore"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// Provision resolves placeholders into unexported fields, applies defaults,
// and checks what JSON configs (which skip the Caddyfile checks) can get wrong.
func TestTokenProxyProvision(t *testing.T) {
	const secret = "provisioned-secret-4f3e2d"
	t.Setenv("TP_PROV_ID", "  prov-client\n")
	secretFile := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secretFile, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()

	p := &TokenProxy{ClientID: "{env.TP_PROV_ID}", ClientSecret: "{file." + secretFile + "}", ClientAuth: "body"}
	if err := p.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	defer p.Cleanup()
	if p.clientID != "prov-client" || p.clientSecret != secret {
		t.Errorf("resolved %q / %q", p.clientID, p.clientSecret)
	}
	if p.ClientSecret != "{file."+secretFile+"}" {
		t.Errorf("the exported field changed to %q", p.ClientSecret)
	}
	if p.TokenURL != DefaultTokenURL || p.RevokeURL != DefaultRevokeURL || time.Duration(p.Timeout) != 10*time.Second || p.style != tokensource.AuthBody ||
		p.MaxConcurrent != 16 || p.inFlight == nil {
		t.Errorf("defaults not applied: %+v", p)
	}
	enc := zapcore.NewMapObjectEncoder()
	if err := p.MarshalLogObject(enc); err != nil {
		t.Fatal(err)
	}
	logged := fmt.Sprint(enc.Fields)
	if strings.Contains(logged, secret) || strings.Contains(logged, "prov-client") {
		t.Errorf("MarshalLogObject logs credentials: %s", logged)
	}
	if enc.Fields["client_auth"] != "body" || enc.Fields["token_url"] != DefaultTokenURL {
		t.Errorf("MarshalLogObject fields %v", enc.Fields)
	}

	for _, tc := range []struct {
		name   string
		p      TokenProxy
		reason string
	}{
		{"unset env secret", TokenProxy{ClientID: "id", ClientSecret: "{env.TP_PROV_UNSET_XYZ}"}, "client_secret: evaluated placeholder {env.TP_PROV_UNSET_XYZ} is empty"},
		{"missing file", TokenProxy{ClientID: "id", ClientSecret: "{file./nonexistent/tp-secret}"}, "client_secret"},
		{"no client_id", TokenProxy{ClientSecret: "secret"}, "client_id and client_secret are required"},
		{"short client secret", TokenProxy{ClientID: "id", ClientSecret: "abc"}, "client_secret is 3 bytes"},
		{"http token_url", TokenProxy{ClientID: "id", ClientSecret: "secret", TokenURL: "http://api.restream.io/oauth/token"}, "plain http is allowed only for loopback"},
		{"http revoke_url", TokenProxy{ClientID: "id", ClientSecret: "secret", RevokeURL: "http://api.restream.io/oauth/revoke"}, "revoke_url"},
		{"bad mode", TokenProxy{ClientID: "id", ClientSecret: "secret", ClientAuth: "header"}, "want basic or body"},
		{"negative timeout", TokenProxy{ClientID: "id", ClientSecret: "secret", Timeout: caddy.Duration(-time.Second)}, "timeout must not be negative"},
		{"negative max_concurrent", TokenProxy{ClientID: "id", ClientSecret: "secret", MaxConcurrent: -1}, "max_concurrent must be positive (got -1)"},
		{"relative redirect URI", TokenProxy{ClientID: "id", ClientSecret: "secret", RedirectURIs: []string{"/cb"}}, `redirect_uris "/cb": not an absolute URI`},
		{"redirect URI with a fragment", TokenProxy{ClientID: "id", ClientSecret: "secret", RedirectURIs: []string{"https://a.example/cb#f"}}, "must not contain a fragment"},
		{"redirect URI twice", TokenProxy{ClientID: "id", ClientSecret: "secret", RedirectURIs: []string{"https://a.example/cb", "https://a.example/cb"}}, "listed twice"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := tc.p
			err := p.Provision(ctx)
			if err == nil || !strings.Contains(err.Error(), tc.reason) {
				t.Fatalf("error %v, want one with %q", err, tc.reason)
			}
			if strings.Contains(err.Error(), secret) {
				t.Errorf("error shows a secret: %v", err)
			}
		})
	}
}

func TestTokenProxyUsableAnswer(t *testing.T) {
	for _, tc := range []struct {
		call   string
		status int
		body   string
		want   bool
	}{
		{"refresh_token", 200, `{"access_token":"at","refresh_token":"rt"}`, true},
		{"refresh_token", 200, `{"accessToken":"at"}`, true},
		{"refresh_token", 200, `{"token_type":"Bearer"}`, false},
		{"refresh_token", 200, `{"access_token":""}`, false},
		{"refresh_token", 200, `{"access_token":42}`, false},
		{"refresh_token", 200, ``, false},
		{"refresh_token", 200, `[1,2]`, false},
		{"refresh_token", 200, `null`, false},
		{"authorization_code", 400, `{"error":"invalid_grant"}`, true},
		{"authorization_code", 400, `{"error":{"name":"invalid_grant","message":"x"}}`, true},
		{"refresh_token", 503, `{"error":"server_error"}`, true},
		{"refresh_token", 502, `<html>bad gateway</html>`, false},
		{"refresh_token", 302, `{"error":"x"}`, false},
		{"refresh_token", 400, ``, false},
		{"revoke", 200, ``, true},
		{"revoke", 204, "  \n", true},
		{"revoke", 200, `{}`, true},
		{"revoke", 200, `ok`, false},
		{"revoke", 503, ``, false},
		{"revoke", 401, `{"error":"invalid_client"}`, true},
	} {
		if got := usableAnswer(tc.call, tc.status, []byte(tc.body)); got != tc.want {
			t.Errorf("usableAnswer(%s, %d, %q) = %v, want %v", tc.call, tc.status, tc.body, got, tc.want)
		}
	}
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
