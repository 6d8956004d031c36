package caddymodule_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
)

// Tests of restream_token_proxy: real Caddy (in process) in front of the
// strict fake, usually through upstreamRecorder, a pass-through that keeps what
// the proxy sent upstream and the exact bytes upstream answered.

const deviceRedirectURI = "https://device.example/callback"

// upstreamCall is one call that went through the recorder.
type upstreamCall struct {
	Path          string
	ContentType   string
	Form          url.Values
	Authorization string
	Status        int
	Body          []byte // exactly as upstream sent it
}

// upstreamRecorder forwards /oauth/token and /oauth/revoke to the fake's token
// listener and records each call.
type upstreamRecorder struct {
	srv   *httptest.Server
	mu    sync.Mutex
	calls []upstreamCall
}

func newUpstreamRecorder(t *testing.T, fake *fakerestream.Server) *upstreamRecorder {
	t.Helper()
	upstream := strings.TrimSuffix(fake.TokenURL(), "/oauth/token")
	rec := &upstreamRecorder{}
	hc := &http.Client{Timeout: time.Minute}
	rec.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		raw, _ := io.ReadAll(r.Body)
		form, _ := url.ParseQuery(string(raw))
		call := upstreamCall{Path: r.URL.Path, ContentType: r.Header.Get("Content-Type"), Form: form, Authorization: r.Header.Get("Authorization")}
		req, _ := http.NewRequestWithContext(r.Context(), r.Method, upstream+r.URL.Path, bytes.NewReader(raw))
		for _, k := range []string{"Content-Type", "Authorization", "Accept"} {
			if v := r.Header.Get(k); v != "" {
				req.Header.Set(k, v)
			}
		}
		resp, err := hc.Do(req)
		if err != nil {
			// Pass the failure on as what it is: no answer.
			panic(http.ErrAbortHandler)
		}
		defer resp.Body.Close()
		call.Body, _ = io.ReadAll(resp.Body)
		call.Status = resp.StatusCode
		rec.mu.Lock()
		rec.calls = append(rec.calls, call)
		rec.mu.Unlock()
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
		w.WriteHeader(resp.StatusCode)
		_, _ = w.Write(call.Body)
	}))
	t.Cleanup(rec.srv.Close)
	return rec
}

func (rec *upstreamRecorder) tokenURL() string  { return rec.srv.URL + "/oauth/token" }
func (rec *upstreamRecorder) revokeURL() string { return rec.srv.URL + "/oauth/revoke" }

func (rec *upstreamRecorder) count() int {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return len(rec.calls)
}

func (rec *upstreamRecorder) last(t *testing.T) upstreamCall {
	t.Helper()
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.calls) == 0 {
		t.Fatal("no call reached the upstream")
	}
	return rec.calls[len(rec.calls)-1]
}

// proxySite is one site of a test Caddyfile: restream_token_proxy on /oauth/*
// next to a reverse_proxy to the fake's API, outside any route block, so the
// directive order is exercised.
type proxySite struct {
	Port        int
	Lines       []string // restream_token_proxy subdirectives
	APIUpstream string   // reverse_proxy target for everything else, if set
	Extra       []string // more directives of the site
	// Guarded leaves out allow_unauthenticated: the site answers only
	// callers an authentication handler in Extra identified. Other sites
	// serve the tests' unauthenticated clients.
	Guarded bool
}

func (s proxySite) base() string { return "http://127.0.0.1:" + itoa(s.Port) }

func proxyCaddyfile(global []string, sites ...proxySite) string {
	var b strings.Builder
	b.WriteString("{\n\tadmin off\n\tauto_https off\n\tpersist_config off\n")
	for _, g := range global {
		b.WriteString("\t" + g + "\n")
	}
	b.WriteString("}\n")
	for _, s := range sites {
		fmt.Fprintf(&b, "\nhttp://127.0.0.1:%d {\n", s.Port)
		for _, l := range s.Extra {
			b.WriteString("\t" + l + "\n")
		}
		b.WriteString("\trestream_token_proxy /oauth/* {\n")
		for _, l := range s.Lines {
			b.WriteString("\t\t" + l + "\n")
		}
		if !s.Guarded {
			b.WriteString("\t\tallow_unauthenticated\n")
		}
		b.WriteString("\t}\n")
		if s.APIUpstream != "" {
			fmt.Fprintf(&b, "\treverse_proxy %s\n", s.APIUpstream)
		}
		b.WriteString("}\n")
	}
	return b.String()
}

// proxySiteFor is a site proxying to rec with the fake's default credentials.
func proxySiteFor(t *testing.T, rec *upstreamRecorder, fake *fakerestream.Server, extra ...string) proxySite {
	return proxySite{
		Port: testproc.Port(t),
		Lines: append([]string{
			"client_id test-client",
			"client_secret test-secret",
			"token_url " + rec.tokenURL(),
			"revoke_url " + rec.revokeURL(),
		}, extra...),
		APIUpstream: fake.URL(),
	}
}

// proxyRig is token proxy sites running in this process in front of one
// upstream recorder on the fake.
type proxyRig struct {
	fake  *fakerestream.Server
	rec   *upstreamRecorder
	sites []proxySite
}

// startProxySites runs one site per list of extra restream_token_proxy
// subdirectives (nil for none), with the fake's default credentials.
func startProxySites(t *testing.T, extra ...[]string) proxyRig {
	t.Helper()
	rig := proxyRig{fake: newFake(t, fakerestream.Options{})}
	rig.rec = newUpstreamRecorder(t, rig.fake)
	for _, lines := range extra {
		rig.sites = append(rig.sites, proxySiteFor(t, rig.rec, rig.fake, lines...))
	}
	runInProcess(t, proxyCaddyfile(nil, rig.sites...))
	return rig
}

const formContentType = "application/x-www-form-urlencoded"

// postForm posts a form; hdr may add or override headers.
func postForm(t *testing.T, u string, form url.Values, hdr map[string]string) (status int, body []byte, header http.Header) {
	t.Helper()
	h := map[string]string{"Content-Type": formContentType}
	for k, v := range hdr {
		h[k] = v
	}
	return do(t, http.MethodPost, u, []byte(form.Encode()), h)
}

func basicCredentials(id, secret string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(id+":"+secret))
}

// wantForwarded checks a call that reached the upstream: the device's
// fields in want, and the configured client credentials, as Basic or, with
// client_auth body, as form fields.
func wantForwarded(t *testing.T, up upstreamCall, want url.Values, bodyAuth bool) {
	t.Helper()
	want = maps.Clone(want)
	wantAuthorization := basicCredentials("test-client", "test-secret")
	if bodyAuth {
		want.Set("client_id", "test-client")
		want.Set("client_secret", "test-secret")
		wantAuthorization = ""
	}
	if !reflect.DeepEqual(up.Form, want) || up.Authorization != wantAuthorization {
		t.Errorf("upstream got form %v and Authorization %q; want %v and %q", up.Form, up.Authorization, want, wantAuthorization)
	}
}

// tokenPair decodes a token answer.
func tokenPair(t *testing.T, body []byte) (access, refresh string) {
	t.Helper()
	var v struct {
		AccessToken  string `json:"access_token"`
		RefreshToken string `json:"refresh_token"`
	}
	if err := json.Unmarshal(body, &v); err != nil || v.AccessToken == "" || v.RefreshToken == "" {
		t.Fatalf("not a token answer (%v): %s", err, body)
	}
	return v.AccessToken, v.RefreshToken
}

// oauthError decodes an OAuth error answer and checks the headers every
// answer of the proxy carries.
func oauthError(t *testing.T, body []byte, hdr http.Header) (code, desc string) {
	t.Helper()
	checkNoStoreHeaders(t, hdr, true)
	var v struct {
		Error            string `json:"error"`
		ErrorDescription string `json:"error_description"`
	}
	if err := json.Unmarshal(body, &v); err != nil || v.Error == "" {
		t.Fatalf("not an OAuth error (%v): %q", err, body)
	}
	return v.Error, v.ErrorDescription
}

func checkNoStoreHeaders(t *testing.T, hdr http.Header, withBody bool) {
	t.Helper()
	if hdr == nil {
		t.Fatal("no answer")
	}
	if got := hdr.Get("Cache-Control"); got != "no-store" {
		t.Errorf("Cache-Control %q, want no-store", got)
	}
	if got := hdr.Get("Pragma"); got != "no-cache" {
		t.Errorf("Pragma %q, want no-cache", got)
	}
	if got := hdr.Get("Content-Type"); withBody && got != "application/json" {
		t.Errorf("Content-Type %q, want application/json", got)
	}
}

// A device refreshes through the proxy: the pair rotates, the new pair
// works, the old refresh token is then rejected with the fake's own
// invalid_grant answer, byte for byte, and status 400.
func TestTokenProxyRefreshRotates(t *testing.T) {
	rig := startProxySites(t, nil)
	fake, rec, site := rig.fake, rig.rec, rig.sites[0]
	access0, refresh0 := fake.SeedPair()

	// Fields other than the grant's (scope, junk) are not forwarded.
	status, body, hdr := postForm(t, site.base()+"/oauth/token", url.Values{
		"grant_type": {"refresh_token"}, "refresh_token": {refresh0}, "scope": {"everything"}, "foo": {"bar"},
	}, nil)
	if status != http.StatusOK {
		t.Fatalf("refresh: status %d: %s", status, body)
	}
	checkNoStoreHeaders(t, hdr, true)
	up := rec.last(t)
	if !bytes.Equal(body, up.Body) {
		t.Errorf("relayed body differs from upstream's:\n got %q\nwant %q", body, up.Body)
	}
	if want := (url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh0}}); !reflect.DeepEqual(up.Form, want) {
		t.Errorf("upstream got form %v, want %v", up.Form, want)
	}
	if up.Authorization != basicCredentials("test-client", "test-secret") || up.ContentType != formContentType {
		t.Errorf("upstream got Authorization %q, Content-Type %q", up.Authorization, up.ContentType)
	}
	access1, refresh1 := tokenPair(t, body)
	if access1 == access0 || refresh1 == refresh0 {
		t.Fatal("the pair did not rotate")
	}

	// The new access token works (through the same sidecar's reverse_proxy);
	// the old one is dead.
	if st, b, _ := do(t, http.MethodGet, site.base()+"/v2/user/profile", nil, map[string]string{"Authorization": "Bearer " + access1}); st != http.StatusOK {
		t.Errorf("new access token: status %d: %s", st, b)
	}
	if st, _, _ := do(t, http.MethodGet, site.base()+"/v2/user/profile", nil, map[string]string{"Authorization": "Bearer " + access0}); st != http.StatusUnauthorized {
		t.Errorf("old access token: status %d, want 401", st)
	}

	// The old refresh token: invalid_grant, relayed unchanged.
	status, body, hdr = postForm(t, site.base()+"/oauth/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh0}}, nil)
	if status != http.StatusBadRequest {
		t.Fatalf("old refresh token: status %d, want 400: %s", status, body)
	}
	if code, _ := oauthError(t, body, hdr); code != "invalid_grant" {
		t.Errorf("old refresh token: error %q, want invalid_grant", code)
	}
	if up := rec.last(t); up.Status != http.StatusBadRequest || !bytes.Equal(body, up.Body) {
		t.Errorf("relayed error differs from upstream's %d:\n got %q\nwant %q", up.Status, body, up.Body)
	}

	// The chain goes on with the new refresh token.
	status, body, _ = postForm(t, site.base()+"/oauth/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh1}}, nil)
	if status != http.StatusOK {
		t.Fatalf("second refresh: status %d: %s", status, body)
	}
	if access2, _ := tokenPair(t, body); !fake.ValidAccessToken(access2) || fake.ValidAccessToken(access1) {
		t.Error("second rotation: the new access token is not the only valid one")
	}
	if st := fake.Stats(); st.RefreshOK != 2 || st.InvalidGrant != 1 || st.InvalidClient != 0 {
		t.Errorf("fake stats %+v, want 2 rotations, 1 invalid_grant, 0 invalid_client", st)
	}
}

// An authorization code is redeemed through the proxy, with Basic and with
// body client authentication; a second use of the code is invalid_grant.
func TestTokenProxyAuthorizationCode(t *testing.T) {
	rig := startProxySites(t, []string{"redirect_uris " + deviceRedirectURI}, []string{"client_auth body", "redirect_uris " + deviceRedirectURI})
	fake, rec, basic, body := rig.fake, rig.rec, rig.sites[0], rig.sites[1]

	for _, tc := range []struct {
		name string
		site proxySite
		mode string
	}{{"basic", basic, "basic"}, {"body", body, "body"}} {
		t.Run(tc.name, func(t *testing.T) {
			code := fake.IssueCode(deviceRedirectURI)
			form := url.Values{"grant_type": {"authorization_code"}, "code": {code}, "redirect_uri": {deviceRedirectURI}}
			status, b, hdr := postForm(t, tc.site.base()+"/oauth/token", form, nil)
			if status != http.StatusOK {
				t.Fatalf("status %d: %s", status, b)
			}
			checkNoStoreHeaders(t, hdr, true)
			up := rec.last(t)
			if !bytes.Equal(b, up.Body) {
				t.Errorf("relayed body differs from upstream's")
			}
			if access, _ := tokenPair(t, b); !fake.ValidAccessToken(access) {
				t.Error("the issued access token is not valid at the fake")
			}
			wantForwarded(t, up, url.Values{"grant_type": {"authorization_code"}, "code": {code}, "redirect_uri": {deviceRedirectURI}}, tc.mode == "body")

			status, b, hdr = postForm(t, tc.site.base()+"/oauth/token", form, nil)
			if status != http.StatusBadRequest {
				t.Fatalf("reused code: status %d, want 400: %s", status, b)
			}
			if code, _ := oauthError(t, b, hdr); code != "invalid_grant" || !bytes.Equal(b, rec.last(t).Body) {
				t.Errorf("reused code: got %s, want the fake's invalid_grant unchanged", b)
			}
		})
	}
	if st := fake.Stats(); st.CodeCalls != 4 || st.InvalidGrant != 2 || st.InvalidClient != 0 {
		t.Errorf("fake stats %+v, want 4 code calls, 2 invalid_grant, 0 invalid_client", st)
	}
}

// Whatever client credentials a device sends (a wrong secret as form fields,
// as Basic, or both) are dropped; the configured ones are used.
func TestTokenProxyIgnoresDeviceCredentials(t *testing.T) {
	rig := startProxySites(t, nil, []string{"client_auth body"})
	fake, rec, basic, body := rig.fake, rig.rec, rig.sites[0], rig.sites[1]

	for _, site := range []struct {
		name string
		proxySite
	}{{"basic", basic}, {"body", body}} {
		for _, dev := range []struct {
			name      string
			form      url.Values
			authorize string
		}{
			{"form fields", url.Values{"client_id": {"evil-client"}, "client_secret": {"wrong-secret"}}, ""},
			{"basic", nil, basicCredentials("evil-client", "wrong-secret")},
			{"both", url.Values{"client_secret": {"wrong-secret"}}, basicCredentials("test-client", "wrong-secret")},
		} {
			t.Run(site.name+"/"+dev.name, func(t *testing.T) {
				_, refresh := fake.SeedPair()
				form := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}}
				for k, v := range dev.form {
					form[k] = v
				}
				var hdr map[string]string
				if dev.authorize != "" {
					hdr = map[string]string{"Authorization": dev.authorize}
				}
				status, b, _ := postForm(t, site.base()+"/oauth/token", form, hdr)
				if status != http.StatusOK {
					t.Fatalf("status %d: %s", status, b)
				}
				wantForwarded(t, rec.last(t), url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}}, site.name == "body")
			})
		}
	}
	if st := fake.Stats(); st.InvalidClient != 0 || st.RefreshOK != 6 {
		t.Errorf("fake stats %+v, want 6 rotations and 0 invalid_client", st)
	}
}

// Every refusal is answered by the proxy itself, as an OAuth JSON error, and
// nothing reaches upstream.
func TestTokenProxyRefusals(t *testing.T) {
	rig := startProxySites(t, []string{"redirect_uris " + deviceRedirectURI})
	fake, rec, site := rig.fake, rig.rec, rig.sites[0]
	_, refresh := fake.SeedPair()
	tokenURL, revokeURL := site.base()+"/oauth/token", site.base()+"/oauth/revoke"
	form := func(kv ...string) []byte {
		v := url.Values{}
		for i := 0; i < len(kv); i += 2 {
			v.Add(kv[i], kv[i+1])
		}
		return []byte(v.Encode())
	}
	formHdr := map[string]string{"Content-Type": formContentType}
	// The padding goes last, after the grant's fields.
	padded := func(size int) []byte {
		b := []byte("grant_type=refresh_token&refresh_token=" + refresh + "&pad=")
		return append(b, bytes.Repeat([]byte("x"), size-len(b))...)
	}
	big := padded(64<<10 + 1)

	for _, tc := range []struct {
		name, method, url string
		body              []byte
		hdr               map[string]string
		chunked           bool
		status            int
		code, descPart    string
	}{
		{"GET", http.MethodGet, tokenURL, nil, nil, false, 405, "invalid_request", "POST"},
		{"PUT", http.MethodPut, tokenURL, form("grant_type", "refresh_token", "refresh_token", refresh), formHdr, false, 405, "invalid_request", "POST"},
		{"GET revoke", http.MethodGet, revokeURL, nil, nil, false, 405, "invalid_request", "POST"},
		{"JSON body", http.MethodPost, tokenURL, []byte(`{"grant_type":"refresh_token","refresh_token":"` + refresh + `"}`),
			map[string]string{"Content-Type": "application/json"}, false, 400, "invalid_request", "x-www-form-urlencoded"},
		{"no content type", http.MethodPost, tokenURL, form("grant_type", "refresh_token", "refresh_token", refresh), nil, false, 400, "invalid_request", "x-www-form-urlencoded"},
		{"password grant", http.MethodPost, tokenURL, form("grant_type", "password", "username", "u", "password", "p"), formHdr, false, 400, "unsupported_grant_type", ""},
		{"client_credentials grant", http.MethodPost, tokenURL, form("grant_type", "client_credentials"), formHdr, false, 400, "unsupported_grant_type", ""},
		{"no grant_type", http.MethodPost, tokenURL, form("refresh_token", refresh), formHdr, false, 400, "invalid_request", "grant_type"},
		{"empty body", http.MethodPost, tokenURL, []byte{}, formHdr, false, 400, "invalid_request", "grant_type"},
		{"no refresh_token", http.MethodPost, tokenURL, form("grant_type", "refresh_token"), formHdr, false, 400, "invalid_request", "refresh_token"},
		{"empty refresh_token", http.MethodPost, tokenURL, form("grant_type", "refresh_token", "refresh_token", ""), formHdr, false, 400, "invalid_request", "refresh_token"},
		{"repeated refresh_token", http.MethodPost, tokenURL, form("grant_type", "refresh_token", "refresh_token", refresh, "refresh_token", "rt_other"), formHdr, false, 400, "invalid_request", "repeated"},
		{"no code", http.MethodPost, tokenURL, form("grant_type", "authorization_code", "redirect_uri", deviceRedirectURI), formHdr, false, 400, "invalid_request", "code"},
		{"no redirect_uri", http.MethodPost, tokenURL, form("grant_type", "authorization_code", "code", "c"), formHdr, false, 400, "invalid_request", "redirect_uri"},
		{"unlisted redirect_uri", http.MethodPost, tokenURL, form("grant_type", "authorization_code", "code", "c", "redirect_uri", "https://evil.example/callback"), formHdr, false, 400, "invalid_request", "redirect_uris"},
		{"short code_verifier", http.MethodPost, tokenURL, form("grant_type", "authorization_code", "code", "c", "redirect_uri", deviceRedirectURI, "code_verifier", "abc"), formHdr, false, 400, "invalid_request", "RFC 7636"},
		{"empty code_verifier", http.MethodPost, tokenURL, form("grant_type", "authorization_code", "code", "c", "redirect_uri", deviceRedirectURI, "code_verifier", ""), formHdr, false, 400, "invalid_request", "code_verifier"},
		{"repeated code_verifier", http.MethodPost, tokenURL, form("grant_type", "authorization_code", "code", "c", "redirect_uri", deviceRedirectURI,
			"code_verifier", strings.Repeat("v", 43), "code_verifier", strings.Repeat("w", 43)), formHdr, false, 400, "invalid_request", "repeated"},
		{"malformed form", http.MethodPost, tokenURL, []byte("grant_type=refresh_token&refresh_token=%zz"), formHdr, false, 400, "invalid_request", "malformed"},
		{"body over 64 KiB", http.MethodPost, tokenURL, big, formHdr, false, 413, "invalid_request", "64 KiB"},
		{"chunked body over 64 KiB", http.MethodPost, tokenURL, big, formHdr, true, 413, "invalid_request", "64 KiB"},
		{"revoke without token", http.MethodPost, revokeURL, form("token_type_hint", "refresh_token"), formHdr, false, 400, "invalid_request", "token"},
		{"revoke with a bad hint", http.MethodPost, revokeURL, form("token", refresh, "token_type_hint", "id_token"), formHdr, false, 400, "invalid_request", "token_type_hint"},
		{"revoke JSON", http.MethodPost, revokeURL, []byte(`{"token":"x"}`), map[string]string{"Content-Type": "application/json"}, false, 400, "invalid_request", "x-www-form-urlencoded"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var rd io.Reader
			if tc.body != nil {
				rd = bytes.NewReader(tc.body)
				if tc.chunked {
					rd = io.MultiReader(rd) // hides the length: sent chunked
				}
			}
			req, err := http.NewRequest(tc.method, tc.url, rd)
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range tc.hdr {
				req.Header.Set(k, v)
			}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, b)
			}
			code, desc := oauthError(t, b, resp.Header)
			if code != tc.code || !strings.Contains(desc, tc.descPart) {
				t.Errorf("got %s, want error %q with %q in the description", b, tc.code, tc.descPart)
			}
			if tc.status == http.StatusMethodNotAllowed && resp.Header.Get("Allow") != http.MethodPost {
				t.Errorf("Allow %q, want POST", resp.Header.Get("Allow"))
			}
			mustContainNone(t, "refusal", string(b), refresh, "test-secret")
		})
	}
	if n, st := rec.count(), fake.Stats(); n != 0 || st.RefreshCalls != 0 || st.CodeCalls != 0 {
		t.Fatalf("refused requests reached upstream: %d calls, fake stats %+v", n, st)
	}

	// Exactly 64 KiB is allowed, and reaches the endpoint.
	status, b, _ := do(t, http.MethodPost, tokenURL, padded(64<<10), formHdr)
	if status != http.StatusOK {
		t.Fatalf("a 64 KiB body: status %d: %s", status, b)
	}
	if up := rec.last(t); len(up.Form) != 2 {
		t.Errorf("the padding reached upstream: %d fields", len(up.Form))
	}
}

// POST …/revoke forwards the token with the client credentials; the revoked
// pair stops working at the fake.
func TestTokenProxyRevoke(t *testing.T) {
	rig := startProxySites(t, nil, []string{"client_auth body"})
	fake, rec, site, body := rig.fake, rig.rec, rig.sites[0], rig.sites[1]

	for _, tc := range []struct {
		name string
		site proxySite
		hint string
	}{{"basic with hint", site, "refresh_token"}, {"body without hint", body, ""}, {"basic access_token hint", site, "access_token"}} {
		t.Run(tc.name, func(t *testing.T) {
			access, refresh := fake.SeedPair()
			tok := refresh
			if tc.hint == "access_token" {
				tok = access
			}
			form := url.Values{"token": {tok}, "client_secret": {"wrong-secret"}}
			want := url.Values{"token": {tok}}
			if tc.hint != "" {
				form.Set("token_type_hint", tc.hint)
				want.Set("token_type_hint", tc.hint)
			}
			status, b, hdr := postForm(t, tc.site.base()+"/oauth/revoke", form, map[string]string{"Authorization": basicCredentials("evil", "wrong-secret")})
			if status != http.StatusOK {
				t.Fatalf("revoke: status %d: %s", status, b)
			}
			checkNoStoreHeaders(t, hdr, false)
			up := rec.last(t)
			if up.Path != "/oauth/revoke" || !bytes.Equal(b, up.Body) {
				t.Errorf("upstream call %s answered %q, device got %q", up.Path, up.Body, b)
			}
			wantForwarded(t, up, want, tc.site.Port == body.Port)
			if fake.ValidAccessToken(access) {
				t.Error("the access token still works after revocation")
			}
			status, b, hdr = postForm(t, tc.site.base()+"/oauth/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}}, nil)
			if code, _ := oauthError(t, b, hdr); status != http.StatusBadRequest || code != "invalid_grant" {
				t.Errorf("refresh after revocation: status %d: %s", status, b)
			}
		})
	}
	if st := fake.Stats(); st.InvalidClient != 0 || st.RefreshOK != 0 {
		t.Errorf("fake stats %+v", st)
	}
}

// Secrets from {env.*} placeholders, tokens and codes passing through, and
// credentials a device sends never reach the logs, even at DEBUG with
// `servers { trace }` and access logs.
func TestTokenProxyNoSecretsInLogs(t *testing.T) {
	const secret = "cs_tokenproxy_secret_5d4c3b"
	fake := newFake(t, fakerestream.Options{ClientID: "tp-client", ClientSecret: secret, Logf: func(string, ...any) {}})
	t.Setenv("TP_TEST_CLIENT_ID", "tp-client")
	t.Setenv("TP_TEST_CLIENT_SECRET", secret)
	dir := t.TempDir()
	serverLog, accessLog := filepath.Join(dir, "server.log"), filepath.Join(dir, "access.log")
	port := testproc.Port(t)
	revokeURL := strings.TrimSuffix(fake.TokenURL(), "/token") + "/revoke"
	runInProcess(t, fmt.Sprintf(`{
	admin off
	auto_https off
	persist_config off
	%s
}

http://127.0.0.1:%d {
	log {
		output file %s
	}
	restream_token_proxy {
		allow_unauthenticated
		client_id {env.TP_TEST_CLIENT_ID}
		client_secret {env.TP_TEST_CLIENT_SECRET}
		token_url %s
		revoke_url %s
		timeout 2s
		redirect_uris %s
	}
}
`, debugLogOptions(serverLog), port, accessLog, fake.TokenURL(), revokeURL, deviceRedirectURI))
	base := "http://127.0.0.1:" + itoa(port)
	device := map[string]string{"Authorization": basicCredentials("device-id", "device-secret-must-not-log")}
	code := fake.IssueCode(deviceRedirectURI)
	_, refresh0 := fake.SeedPair()

	st, b, _ := postForm(t, base+"/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh0},
		"client_secret": {"form-secret-must-not-log"}}, device)
	if st != http.StatusOK {
		t.Fatalf("refresh: %d %s", st, b)
	}
	_, refresh1 := tokenPair(t, b)
	if st, b, _ = postForm(t, base+"/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh0}}, nil); st != http.StatusBadRequest {
		t.Fatalf("reuse: %d %s", st, b)
	}
	if st, b, _ = postForm(t, base+"/token", url.Values{"grant_type": {"authorization_code"}, "code": {code}, "redirect_uri": {deviceRedirectURI}}, device); st != http.StatusOK {
		t.Fatalf("code: %d %s", st, b)
	}
	if st, b, _ = postForm(t, base+"/revoke", url.Values{"token": {refresh1}}, nil); st != http.StatusOK {
		t.Fatalf("revoke: %d %s", st, b)
	}
	if st, _, _ = postForm(t, base+"/token", url.Values{"grant_type": {"password"}, "password": {"pw-must-not-log"}}, nil); st != http.StatusBadRequest {
		t.Fatalf("password grant: %d", st)
	}
	fake.SetDown(http.StatusInternalServerError)
	if st, _, _ = postForm(t, base+"/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh1}}, nil); st != http.StatusInternalServerError {
		t.Fatalf("down: %d", st)
	}
	fake.SetDown(0)
	fake.SetFault(fakerestream.FaultGarbage)
	if st, _, _ = postForm(t, base+"/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh1}}, nil); st != http.StatusBadGateway {
		t.Fatalf("garbage: %d", st)
	}
	fake.SetFault(fakerestream.FaultNone)

	if err := caddy.Stop(); err != nil { // flush logs
		t.Fatal(err)
	}
	logs := readFiles(t, serverLog, accessLog)
	for _, want := range []string{`"msg":"token proxy call"`, `"grant_type":"refresh_token"`, `"grant_type":"authorization_code"`,
		`"grant_type":"revoke"`, `"upstream_status":400`, `"failure":"unusable"`, "refused token proxy request", `"msg":"restream_token_proxy","module":{"token_url"`} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %q: the test would not see a leak there", want)
		}
	}
	secrets := append(fake.IssuedTokens(), secret, code, "device-secret-must-not-log", "form-secret-must-not-log", "pw-must-not-log",
		base64.StdEncoding.EncodeToString([]byte("tp-client:"+secret)))
	mustContainNone(t, "logs", logs, secrets...)
	if os.Getenv("LEAKDUMP") != "" {
		_ = os.WriteFile(os.Getenv("LEAKDUMP"), []byte(logs), 0o600)
	}
	t.Logf("checked %d bytes of logs against %d secrets", len(logs), len(secrets))
}
