package fakerestream

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
)

// The consent page checks the request strictly, approves as the signed-in
// user with a code, the comma-separated granted scope and the state, and
// denies with a bare redirect.
func TestAuthorize(t *testing.T) {
	s := newServer(t, Options{})
	page := httptest.NewServer(s.AuthorizeHandler())
	t.Cleanup(page.Close)
	noRedirects := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	visit := func(q url.Values) *http.Response {
		t.Helper()
		res, err := noRedirects.Get(page.URL + "/login?" + q.Encode())
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		return res
	}
	good := func() url.Values {
		return url.Values{"response_type": {"code"}, "client_id": {"test-client"}, "redirect_uri": {"https://app.example/cb?x=1"}, "state": {"st4te"}}
	}

	for name, change := range map[string]func(url.Values){
		"response_type":         func(q url.Values) { q.Set("response_type", "token") },
		"client_id":             func(q url.Values) { q.Set("client_id", "other") },
		"relative redirect_uri": func(q url.Values) { q.Set("redirect_uri", "/cb") },
		"ftp redirect_uri":      func(q url.Values) { q.Set("redirect_uri", "ftp://app.example/cb") },
	} {
		q := good()
		change(q)
		if res := visit(q); res.StatusCode != http.StatusBadRequest {
			t.Errorf("bad %s: %d, want 400", name, res.StatusCode)
		}
	}

	res := visit(good())
	to, err := url.Parse(res.Header.Get("Location"))
	if res.StatusCode != http.StatusFound || err != nil || to.Host != "app.example" || to.Path != "/cb" {
		t.Fatalf("approve: %d to %q (%v)", res.StatusCode, res.Header.Get("Location"), err)
	}
	cb := to.Query()
	if cb.Get("x") != "1" || cb.Get("state") != "st4te" || cb.Get("scope") != strings.ReplaceAll(Scope, " ", ",") || cb.Get("code") == "" {
		t.Fatalf("approve: callback query %v", cb)
	}
	r := token(t, s, url.Values{"grant_type": {"authorization_code"}, "code": {cb.Get("code")}, "redirect_uri": {"https://app.example/cb?x=1"}})
	if u, ok := s.UserOf(r.str("access_token")); r.status != 200 || !ok || u != DefaultUser {
		t.Fatalf("redeeming the code: %d %s, user %v", r.status, r.raw, u)
	}

	q := good()
	q.Set("deny", "1")
	if res := visit(q); res.StatusCode != http.StatusFound || res.Header.Get("Location") != "https://app.example/cb?x=1" {
		t.Fatalf("deny: %d to %q, want the bare redirect_uri", res.StatusCode, res.Header.Get("Location"))
	}
}

// The callback's scope lists Options.Scopes, comma separated.
func TestAuthorizeScopes(t *testing.T) {
	s := newServer(t, Options{Scopes: []string{"profile.default.read", "chat.default.read"}})
	rec := httptest.NewRecorder()
	s.AuthorizeHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/login?response_type=code&client_id=test-client&redirect_uri=http://127.0.0.1/cb", nil))
	to, err := url.Parse(rec.Header().Get("Location"))
	if rec.Code != http.StatusFound || err != nil || to.Query().Get("scope") != "profile.default.read,chat.default.read" {
		t.Fatalf("%d to %q", rec.Code, rec.Header().Get("Location"))
	}
}
