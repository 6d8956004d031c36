package tokensource

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
)

// A token endpoint that answers with a redirect must not get the refresh
// token and client credentials re-sent wherever it points (the form would go
// along with a 307/308): the refreshing source, and the CLI and the login,
// which call the endpoint through a Source, never follow one. The answer is
// unusable and transient; the redirect target receives nothing.
func TestRefreshRefusesRedirects(t *testing.T) {
	t.Parallel()
	for _, code := range []int{http.StatusMovedPermanently, http.StatusFound, http.StatusSeeOther,
		http.StatusTemporaryRedirect, http.StatusPermanentRedirect} {
		t.Run(http.StatusText(code), func(t *testing.T) {
			t.Parallel()
			var trapped atomic.Int32
			trap := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				trapped.Add(1)
			}))
			t.Cleanup(trap.Close)
			var calls atomic.Int32
			redirector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				calls.Add(1)
				http.Redirect(w, r, trap.URL+"/oauth/token", code)
			}))
			t.Cleanup(redirector.Close)

			env := newTestEnv(t, fakerestream.Options{})
			cfg := env.config("rt_redirected_seed", "o")
			cfg.TokenURL = redirector.URL + "/oauth/token"
			s := env.source(t, cfg)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := s.Token(ctx)
			if err == nil {
				t.Fatal("a redirect gave a token")
			}
			if IsTerminal(err) {
				t.Fatalf("a redirect is terminal: %v", err)
			}
			if calls.Load() != 1 {
				t.Fatalf("token endpoint calls %d, want 1", calls.Load())
			}
			if n := trapped.Load(); n != 0 {
				t.Fatalf("the redirect target received %d requests", n)
			}
			if msg := err.Error(); strings.Contains(msg, "rt_redirected_seed") || strings.Contains(msg, testClientSecret) {
				t.Fatalf("error leaks a secret: %s", msg)
			}
			if st := s.Status(); st.State != StateBackoff {
				t.Fatalf("state %q, want %q", st.State, StateBackoff)
			}
		})
	}
}
