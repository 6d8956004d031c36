package caddymodule_test

import (
	"net/http"
	"net/url"
	"strings"
	"testing"
)

// Tests of the grants restream_token_proxy lets through: authorization
// codes only for the configured redirect_uris, with PKCE verifiers passed
// on unchanged.

const appRedirectURI = "com.example.app:/oauth2redirect"

// The code grant is refused (and not forwarded) without redirect_uris, and
// with them for any redirect_uri not listed exactly; the refresh grant
// needs no list.
func TestTokenProxyRedirectURIs(t *testing.T) {
	rig := startProxySites(t, nil, []string{"redirect_uris " + deviceRedirectURI, "redirect_uris " + appRedirectURI})
	fake, rec, none, listed := rig.fake, rig.rec, rig.sites[0], rig.sites[1]
	codeForm := func(code, redirect string) url.Values {
		return url.Values{"grant_type": {"authorization_code"}, "code": {code}, "redirect_uri": {redirect}}
	}

	t.Run("no list", func(t *testing.T) {
		code := fake.IssueCode(deviceRedirectURI)
		status, body, hdr := postForm(t, none.base()+"/oauth/token", codeForm(code, deviceRedirectURI), nil)
		if errCode, desc := oauthError(t, body, hdr); status != http.StatusBadRequest || errCode != "invalid_request" || !strings.Contains(desc, "configure redirect_uris") {
			t.Errorf("code grant without redirect_uris: status %d: %s", status, body)
		}
		if n := rec.count(); n != 0 {
			t.Fatalf("%d calls forwarded", n)
		}
		_, refresh := fake.SeedPair()
		if st, b, _ := postForm(t, none.base()+"/oauth/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}}, nil); st != http.StatusOK {
			t.Errorf("refresh grant without redirect_uris: status %d: %s", st, b)
		}
	})

	t.Run("listed", func(t *testing.T) {
		code := fake.IssueCode(deviceRedirectURI)
		before := rec.count()
		for _, bad := range []string{
			"https://evil.example/callback",
			deviceRedirectURI + "/",
			deviceRedirectURI + "?next=https://evil.example",
			deviceRedirectURI + "#x",
			"HTTPS://device.example/callback",
			"https://DEVICE.example/callback",
			"https://device.example/Callback",
			"https://device.example/callback/../callback",
			"https://device.example:443/callback",
			" " + deviceRedirectURI,
			deviceRedirectURI + "%20",
			"https://device.example/callbac",
			"com.example.app:/oauth2redirect/x",
		} {
			status, body, hdr := postForm(t, listed.base()+"/oauth/token", codeForm(code, bad), nil)
			if errCode, desc := oauthError(t, body, hdr); status != http.StatusBadRequest || errCode != "invalid_request" || !strings.Contains(desc, "redirect_uris") {
				t.Errorf("redirect_uri %q: status %d: %s", bad, status, body)
			}
			mustContainNone(t, "refusal", string(body), code, bad)
		}
		if n := rec.count() - before; n != 0 {
			t.Fatalf("%d refused calls were forwarded", n)
		}
		// The refusals spent nothing: the code still works with its URI.
		status, body, _ := postForm(t, listed.base()+"/oauth/token", codeForm(code, deviceRedirectURI), nil)
		if status != http.StatusOK {
			t.Fatalf("listed redirect_uri: status %d: %s", status, body)
		}
		code = fake.IssueCode(appRedirectURI)
		if status, body, _ = postForm(t, listed.base()+"/oauth/token", codeForm(code, appRedirectURI), nil); status != http.StatusOK {
			t.Fatalf("second listed redirect_uri: status %d: %s", status, body)
		}
		if st := fake.Stats(); st.CodeCalls != 2 || st.InvalidGrant != 0 {
			t.Errorf("fake stats %+v, want exactly the 2 good code calls", st)
		}
	})
}

// A device's PKCE code_verifier goes upstream unchanged with the code
// grant, and only with it.
func TestTokenProxyForwardsCodeVerifier(t *testing.T) {
	rig := startProxySites(t, []string{"redirect_uris " + deviceRedirectURI}, []string{"redirect_uris " + deviceRedirectURI, "client_auth body"})
	fake, rec, site, body := rig.fake, rig.rec, rig.sites[0], rig.sites[1]
	verifier := "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk.~" + strings.Repeat("Z", 83) // 128 characters

	for _, s := range []struct {
		name string
		site proxySite
	}{{"basic", site}, {"body", body}} {
		t.Run(s.name, func(t *testing.T) {
			code := fake.IssueCode(deviceRedirectURI)
			status, b, _ := postForm(t, s.site.base()+"/oauth/token", url.Values{"grant_type": {"authorization_code"}, "code": {code},
				"redirect_uri": {deviceRedirectURI}, "code_verifier": {verifier}}, nil)
			if status != http.StatusOK {
				t.Fatalf("status %d: %s", status, b)
			}
			wantForwarded(t, rec.last(t), url.Values{"grant_type": {"authorization_code"}, "code": {code},
				"redirect_uri": {deviceRedirectURI}, "code_verifier": {verifier}}, s.name == "body")
		})
	}
	t.Run("not with the refresh grant", func(t *testing.T) {
		_, refresh := fake.SeedPair()
		status, b, _ := postForm(t, site.base()+"/oauth/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}, "code_verifier": {verifier}}, nil)
		if status != http.StatusOK {
			t.Fatalf("status %d: %s", status, b)
		}
		if got := rec.last(t).Form; got.Has("code_verifier") {
			t.Errorf("upstream got %v", got)
		}
	})
}
