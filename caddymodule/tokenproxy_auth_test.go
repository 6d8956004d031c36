package caddymodule_test

import (
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
)

// restream_token_proxy spends the application's credentials, so by default
// it answers only callers a Caddy authentication handler identified: a
// stranger gets 403 and nothing reaches Restream; a device known to
// basic_auth is forwarded, with the application's credentials in place of
// its own; allow_unauthenticated (what every other token proxy test sets)
// opens it.
func TestTokenProxyRequiresAuthentication(t *testing.T) {
	fake := newFake(t, fakerestream.Options{})
	rec := newUpstreamRecorder(t, fake)
	bare := proxySiteFor(t, rec, fake)
	bare.Guarded = true
	withBasicAuth := proxySiteFor(t, rec, fake)
	withBasicAuth.Guarded = true
	withBasicAuth.Extra = []string{"basic_auth /oauth/* {\n\t\t" + loginUser + " " + loginHash + "\n\t}"}
	open := proxySiteFor(t, rec, fake)
	runInProcess(t, proxyCaddyfile(nil, bare, withBasicAuth, open))

	refresh := func() url.Values {
		_, rt := fake.SeedPair()
		return url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}}
	}
	device := map[string]string{"Authorization": basicCredentials(loginUser, loginPassword)}

	t.Run("no authentication handler", func(t *testing.T) {
		before := rec.count()
		for _, target := range []string{"/oauth/token", "/oauth/revoke"} {
			// A Basic header no handler checked identifies nobody.
			status, body, hdr := postForm(t, bare.base()+target, refresh(), device)
			if status != http.StatusForbidden {
				t.Fatalf("%s: status %d, want 403: %s", target, status, body)
			}
			code, desc := oauthError(t, body, hdr)
			if code != "unauthorized_client" || !strings.Contains(desc, "allow_unauthenticated") || !strings.Contains(desc, "basic_auth") {
				t.Errorf("%s: %s, want unauthorized_client naming basic_auth and allow_unauthenticated", target, body)
			}
		}
		if n := rec.count() - before; n != 0 {
			t.Fatalf("%d refused calls reached the token endpoint", n)
		}
	})
	t.Run("basic_auth identifies the device", func(t *testing.T) {
		if status, body, _ := postForm(t, withBasicAuth.base()+"/oauth/token", refresh(), nil); status != http.StatusUnauthorized {
			t.Fatalf("without credentials: status %d, want basic_auth's 401: %s", status, body)
		}
		before := rec.count()
		form := refresh()
		status, body, _ := postForm(t, withBasicAuth.base()+"/oauth/token", form, device)
		if status != http.StatusOK || rec.count() != before+1 {
			t.Fatalf("an identified device: status %d, %d calls forwarded: %s", status, rec.count()-before, body)
		}
		wantForwarded(t, rec.last(t), form, false) // the app's credentials, not the device's
	})
	t.Run("allow_unauthenticated", func(t *testing.T) {
		before := rec.count()
		status, body, _ := postForm(t, open.base()+"/oauth/token", refresh(), nil)
		if status != http.StatusOK || rec.count() != before+1 {
			t.Fatalf("status %d, %d calls forwarded: %s", status, rec.count()-before, body)
		}
	})
}
