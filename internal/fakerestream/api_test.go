package fakerestream

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
)

func TestAPI(t *testing.T) {
	s := newServer(t, Options{})
	for _, p := range []string{"/v2/platform/all", "/v2/server/all"} {
		r := call(t, "GET", s.URL()+p, "", "", nil)
		if r.status != 200 || !strings.HasPrefix(r.raw, "[") {
			t.Errorf("%s: %d %s", p, r.status, r.raw)
		}
	}

	at, _ := s.SeedPair()
	body := strings.Repeat("x", 1<<20)
	sum := sha256.Sum256([]byte(body))
	r := call(t, "PATCH", s.URL()+"/v2/user/channel/1?a=1&b=2", "text/plain", body, map[string]string{"Authorization": "Bearer " + at})
	if r.status != 200 || r.body["method"] != "PATCH" || r.body["path"] != "/v2/user/channel/1" || r.body["query"] != "a=1&b=2" ||
		r.body["body_sha256"] != hex.EncodeToString(sum[:]) || r.body["body_len"] != float64(len(body)) ||
		r.body["authorization"] != "Bearer "+at || r.body["access_token_query"] != "" {
		t.Fatalf("echo: %d %s", r.status, r.raw)
	}

	// Query parameter is used only without an Authorization header.
	r = call(t, "GET", s.URL()+"/v2/user/profile?accessToken="+at, "", "", nil)
	if r.status != 200 || r.body["access_token_query"] != at || r.body["authorization"] != "" {
		t.Fatalf("query token: %s", r.raw)
	}
	r = call(t, "GET", s.URL()+"/v2/user/profile?accessToken="+at, "", "", map[string]string{"Authorization": "Bearer at_wrong"})
	if r.status != 401 {
		t.Fatalf("header should win over query: %s", r.raw)
	}
	r = call(t, "POST", s.URL()+"/v2/user/profile", "", body, nil)
	e, _ := r.body["error"].(map[string]any)
	if r.status != 401 || e["statusCode"] != 401.0 || e["message"] != "Invalid token: access token is invalid" {
		t.Fatalf("missing token: %s", r.raw)
	}
	if st := s.Stats(); st.APICalls != 6 || st.API401 != 2 {
		t.Errorf("stats %+v", st)
	}
}

func TestCloseAPIConnections(t *testing.T) {
	s := newServer(t, Options{})
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr}
	for range 2 {
		res, err := c.Get(s.URL() + "/v2/platform/all")
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, res.Body)
		res.Body.Close()
	}
	if st := s.Stats(); st.OpenAPIConns != 1 || st.OpenTokenConns != 0 {
		t.Fatalf("OpenAPIConns = %d, OpenTokenConns = %d with one kept-alive API connection", st.OpenAPIConns, st.OpenTokenConns)
	}
	if status, _, _, err := post(c, s.TokenURL(), "rt_unknown"); err != nil || status != 400 {
		t.Fatalf("token call: %d %v", status, err)
	}
	if n := s.Stats().OpenTokenConns; n != 1 {
		t.Fatalf("OpenTokenConns = %d with one kept-alive token connection", n)
	}
	s.CloseAPIConnections()
	waitUntil(t, "the connection to close", func() bool { return s.Stats().OpenAPIConns == 0 })
	if n := s.Stats().OpenTokenConns; n != 1 {
		t.Fatalf("CloseAPIConnections closed token connections: %d left", n)
	}
	if res, err := c.Get(s.URL() + "/v2/platform/all"); err != nil || res.StatusCode != 200 {
		t.Fatalf("after CloseAPIConnections: %v", err)
	} else {
		res.Body.Close()
	}
}

// The profile names the user of the token's chain, on the API and on the
// token listener, and a chain keeps its user through rotations.
func TestProfileUsers(t *testing.T) {
	alice := User{ID: 4242, Username: "alice", Email: "alice@example.com"}
	s := newServer(t, Options{User: alice})
	profileOn := func(base, at string) resp {
		return call(t, "GET", base+"/v2/user/profile", "", "", map[string]string{"Authorization": "Bearer " + at})
	}
	tokenBase := strings.TrimSuffix(s.TokenURL(), "/oauth/token")

	atA, rtA := s.SeedPair()
	for _, base := range []string{s.URL(), tokenBase} {
		r := profileOn(base, atA)
		if r.status != 200 || r.num("id") != 4242 || r.str("username") != "alice" || r.str("email") != "alice@example.com" {
			t.Fatalf("profile on %s: %d %s", base, r.status, r.raw)
		}
		if r.str("authorization") != "Bearer "+atA {
			t.Errorf("profile lost the echo fields: %s", r.raw)
		}
	}

	bob := User{ID: 7, Username: "bob"}
	s.SetUser(bob)
	cb := "https://sidecar.example/restream/callback"
	r := token(t, s, url.Values{"grant_type": {"authorization_code"}, "code": {s.IssueCode(cb)}, "redirect_uri": {cb}})
	if r.status != 200 {
		t.Fatal(r.raw)
	}
	if p := profileOn(s.URL(), r.str("access_token")); p.num("id") != 7 || p.str("username") != "bob" {
		t.Fatalf("a code approved by bob: %s", p.raw)
	}
	// Alice's chain stays hers through a rotation, whoever is signed in.
	rot := refresh(t, s, rtA)
	if p := profileOn(s.URL(), rot.str("access_token")); p.num("id") != 4242 {
		t.Fatalf("rotated chain changed user: %s", p.raw)
	}
	if u, ok := s.UserOf(rot.str("access_token")); !ok || u != alice {
		t.Fatalf("UserOf = %+v, %v", u, ok)
	}
	if p := profileOn(s.URL(), atA); p.status != 401 {
		t.Fatalf("rotated-away token read the profile: %d", p.status)
	}
	carol := User{ID: 99, Username: "carol"}
	if p := profileOn(s.URL(), refresh(t, s, s.SeedFor(carol)).str("access_token")); p.num("id") != 99 {
		t.Fatalf("SeedFor: %s", p.raw)
	}
	codeC := s.IssueCodeFor(cb, carol)
	r = token(t, s, url.Values{"grant_type": {"authorization_code"}, "code": {codeC}, "redirect_uri": {cb}})
	if p := profileOn(s.URL(), r.str("access_token")); p.num("id") != 99 {
		t.Fatalf("IssueCodeFor: %s", p.raw)
	}
	// Reads on the token listener are not API traffic.
	if st := s.Stats(); st.ProfileCalls != 7 || st.APICalls != 6 || st.API401 != 1 {
		t.Errorf("ProfileCalls = %d, APICalls = %d, API401 = %d, want 7, 6, 1", st.ProfileCalls, st.APICalls, st.API401)
	}
}

// Each profile fault answers as documented, for valid tokens only; a bad
// token still gets 401.
func TestProfileFaults(t *testing.T) {
	s := newServer(t, Options{})
	var hits atomic.Int64
	target := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { hits.Add(1) }))
	t.Cleanup(target.Close)
	at, _ := s.SeedPair()
	noFollow := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	get := func(tok string) (*http.Response, string) {
		req, _ := http.NewRequest("GET", s.URL()+"/v2/user/profile", nil)
		req.Header.Set("Authorization", "Bearer "+tok)
		res, err := noFollow.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		var b strings.Builder
		buf := make([]byte, 32<<10)
		for {
			n, err := res.Body.Read(buf)
			b.Write(buf[:n])
			if err != nil {
				break
			}
		}
		return res, b.String()
	}
	for _, tc := range []struct {
		f      ProfileFault
		status int
		says   string
	}{
		{ProfileForbidden, 403, `"name":"insufficient_scope"`},
		{Profile500, 500, `"name":"server_error"`},
		{ProfileGarbage, 200, "<!DOCTYPE html>"},
		{ProfileHuge, 200, `{"id":1,"username":"xxxx`},
	} {
		s.SetProfileFault(tc.f)
		res, body := get(at)
		if res.StatusCode != tc.status || !strings.Contains(body, tc.says) {
			t.Errorf("fault %d: %d %.80s", tc.f, res.StatusCode, body)
		}
		if tc.f == ProfileHuge && len(body) <= HugeBodyBytes {
			t.Errorf("huge profile is %d bytes", len(body))
		}
		if res, _ := get("at_bogus"); res.StatusCode != 401 {
			t.Errorf("fault %d: bad token got %d", tc.f, res.StatusCode)
		}
	}
	s.SetProfileRedirect(target.URL + "/elsewhere")
	if res, _ := get(at); res.StatusCode != 302 || res.Header.Get("Location") != target.URL+"/elsewhere" {
		t.Errorf("redirect: %d %q", res.StatusCode, res.Header.Get("Location"))
	}
	s.SetProfileRedirect("")
	if res, body := get(at); res.StatusCode != 200 || !strings.Contains(body, `"username":"fake-streamer"`) {
		t.Errorf("after clearing the faults: %d %s", res.StatusCode, body)
	}
	if hits.Load() != 0 {
		t.Error("the redirect target was called by the fake itself")
	}
}
