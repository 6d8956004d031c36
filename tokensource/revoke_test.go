package tokensource

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
)

func TestRevokeURLFor(t *testing.T) {
	for in, want := range map[string]string{
		"https://api.restream.io/oauth/token": "https://api.restream.io/oauth/revoke",
		"http://127.0.0.1:9/oauth/token":      "http://127.0.0.1:9/oauth/revoke",
		"https://idp.example/v1/tokens":       DefaultRevokeURL,
	} {
		if got := RevokeURLFor(in); got != want {
			t.Errorf("RevokeURLFor(%q) = %q, want %q", in, got, want)
		}
	}
}

// Revoke ends the whole pair at the fake; a refusal is an error that never
// quotes the token.
func TestRevoke(t *testing.T) {
	env := newTestEnv(t, fakerestream.Options{})
	access, refresh := env.fake.SeedPair()
	s := env.source(t, env.config("", "revoker"))
	if err := s.Revoke(context.Background(), refresh); err != nil {
		t.Fatal(err)
	}
	if env.fake.ValidAccessToken(access) {
		t.Fatal("the pair is still valid after its refresh token was revoked")
	}

	refusing := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusInternalServerError)
	}))
	defer refusing.Close()
	cfg := env.config("", "refused")
	cfg.TokenURL = refusing.URL + "/oauth/token"
	err := env.source(t, cfg).Revoke(context.Background(), refresh)
	if err == nil || !strings.Contains(err.Error(), "500") || strings.Contains(err.Error(), refresh) {
		t.Fatalf("Revoke against a failing endpoint = %v", err)
	}
}
