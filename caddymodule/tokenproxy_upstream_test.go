package caddymodule_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
)

// Tests of what restream_token_proxy relays from upstream: never the client
// secret, however the endpoint echoes it, and never a redirect.

// echoedSecret has what an endpoint's echo needs: characters that JSON and
// URL encodings change.
const echoedSecret = `cs_T0p/s3cr3t+&="é x<y>`

// newEchoUpstream is a token endpoint that echoes the request it got (headers,
// raw form, the decoded Basic secret, in several encodings) in its answer:
// 401 invalid_client for /oauth/token?, 200 with a token for a form with
// code=ok, 429 for code=slow; it also echoes the secret in headers.
func newEchoUpstream(t *testing.T) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		raw, _ := io.ReadAll(r.Body)
		form, _ := url.ParseQuery(string(raw))
		_, basicSecret, _ := r.BasicAuth()
		secret := form.Get("client_secret") + basicSecret
		echo := map[string]any{
			"authorization": r.Header.Get("Authorization"),
			"form":          string(raw),
			"secret":        secret,
			"path_escaped":  url.PathEscape(secret),
			"query_escaped": url.QueryEscape(secret),
			"basic":         base64.StdEncoding.EncodeToString([]byte("test-client:" + secret)),
			"list":          []string{secret, "x" + secret + "x"},
		}
		b, _ := json.Marshal(echo)
		// Then by hand: every character of the secret as \uXXXX, and the
		// query-escaped form with its '%' as \u0025.
		var u strings.Builder
		for _, c := range secret {
			fmt.Fprintf(&u, `\u%04X`, c)
		}
		b = append(b[:len(b)-1], fmt.Sprintf(`,"u_escaped":"%s","pct_escaped":"%s"}`,
			u.String(), strings.ReplaceAll(url.QueryEscape(secret), "%", `\u0025`))...)
		h := w.Header()
		h.Set("Content-Type", "application/json")
		h.Set("X-Echo", secret)
		h.Set("WWW-Authenticate", `Basic realm="`+secret+`"`)
		status := http.StatusUnauthorized
		switch form.Get("code") {
		case "ok":
			status = http.StatusOK
			b = append(b[:len(b)-1], `,"access_token":"at_echo","refresh_token":"rt_echo","token_type":"Bearer","expires_in":3600}`...)
		case "slow":
			status = http.StatusTooManyRequests
			h.Set("Retry-After", secret)
		case "slow-basic":
			status = http.StatusTooManyRequests
			h.Set("Retry-After", base64.StdEncoding.EncodeToString([]byte("test-client:"+secret)))
		}
		w.WriteHeader(status)
		_, _ = w.Write(b)
	}))
	t.Cleanup(srv.Close)
	return srv
}

// An endpoint that echoes the request in its answer (error or success, body
// or headers) never gets the client secret to the device: raw, JSON- or
// URL-encoded, or inside the Basic credentials, it is redacted; the answer
// stays JSON with its status, and the log says so without the secret.
func TestTokenProxyRedactsEchoedSecret(t *testing.T) {
	echo := newEchoUpstream(t)
	t.Setenv("TP_ECHO_SECRET", echoedSecret)
	logFile := filepath.Join(t.TempDir(), "server.log")
	basic, body := testproc.Port(t), testproc.Port(t)
	site := func(port int, auth string) string {
		return fmt.Sprintf(`
http://127.0.0.1:%d {
	restream_token_proxy {
		allow_unauthenticated
		client_id test-client
		client_secret {env.TP_ECHO_SECRET}
		token_url %s/oauth/token
		client_auth %s
		redirect_uris %s
	}
}
`, port, echo.URL, auth, deviceRedirectURI)
	}
	runInProcess(t, fmt.Sprintf("{\n\tadmin off\n\tauto_https off\n\tpersist_config off\n\tlog {\n\t\toutput file %s\n\t\tlevel DEBUG\n\t}\n}\n", logFile)+
		site(basic, "basic")+site(body, "body"))

	basicCred := base64.StdEncoding.EncodeToString([]byte("test-client:" + echoedSecret))
	forms := []string{echoedSecret, url.QueryEscape(echoedSecret), url.PathEscape(echoedSecret), basicCred, strings.TrimRight(basicCred, "=")}
	for _, port := range []int{basic, body} {
		for _, tc := range []struct {
			code   string
			status int
		}{{"bad", http.StatusUnauthorized}, {"ok", http.StatusOK}, {"slow", http.StatusTooManyRequests}, {"slow-basic", http.StatusTooManyRequests}} {
			t.Run(fmt.Sprintf("%d/%s", port, tc.code), func(t *testing.T) {
				status, b, hdr := postForm(t, "http://127.0.0.1:"+itoa(port)+"/token", url.Values{"grant_type": {"authorization_code"},
					"code": {tc.code}, "redirect_uri": {deviceRedirectURI}}, nil)
				if status != tc.status {
					t.Fatalf("status %d, want %d: %s", status, tc.status, b)
				}
				var v map[string]any
				if err := json.Unmarshal(b, &v); err != nil {
					t.Fatalf("the relayed answer is no longer JSON: %v: %s", err, b)
				}
				// Everything the device can read, decoded every way.
				var seen []string
				var walk func(any)
				walk = func(x any) {
					switch x := x.(type) {
					case string:
						seen = append(seen, x)
						if u, err := url.QueryUnescape(x); err == nil {
							seen = append(seen, u)
						}
					case []any:
						for _, y := range x {
							walk(y)
						}
					case map[string]any:
						for _, y := range x {
							walk(y)
						}
					}
				}
				walk(v)
				for k, vals := range hdr {
					seen = append(seen, k+": "+strings.Join(vals, ","))
				}
				all := string(b) + "\n" + strings.Join(seen, "\n")
				mustContainNone(t, "the device's answer", all, forms...)
				if n := strings.Count(string(b), "[REDACTED]"); n < 9 {
					t.Errorf("%d redactions, want one per echo (9 or more): %s", n, b)
				}
				if tc.code == "ok" && v["access_token"] != "at_echo" {
					t.Errorf("the token answer lost its token: %s", b)
				}
				if ra := hdr.Get("Retry-After"); ra != "" {
					t.Errorf("a Retry-After that is no delay was relayed: %q", ra)
				}
			})
		}
	}

	if err := caddy.Stop(); err != nil { // flush the log
		t.Fatal(err)
	}
	logs, err := os.ReadFile(logFile)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(logs), "echoed the client secret; redacted before relaying") {
		t.Error("the log does not report the echo")
	}
	mustContainNone(t, "logs", string(logs), forms...)
}

// redirectTrap is a server that must never be called: it counts what reaches it.
type redirectTrap struct {
	srv   *httptest.Server
	mu    sync.Mutex
	calls []string
}

func newRedirectTrap(t *testing.T) *redirectTrap {
	trap := &redirectTrap{}
	trap.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		trap.mu.Lock()
		trap.calls = append(trap.calls, r.Method+" "+r.URL.Path+" "+string(b))
		trap.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"access_token":"at_trap","refresh_token":"rt_trap","token_type":"Bearer","expires_in":3600}`)
	}))
	t.Cleanup(trap.srv.Close)
	return trap
}

func (trap *redirectTrap) count() int {
	trap.mu.Lock()
	defer trap.mu.Unlock()
	return len(trap.calls)
}

// A 3xx from the token (or revocation) endpoint is not followed: the device
// gets a 502 that says so, the log names the failure, and the redirect
// target receives nothing.
func TestTokenProxyRefusesRedirects(t *testing.T) {
	trap := newRedirectTrap(t)
	var status int
	var mu sync.Mutex
	redirector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		st := status
		mu.Unlock()
		w.Header().Set("Location", trap.srv.URL+r.URL.Path)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(st)
		_, _ = io.WriteString(w, `{"error":"moved"}`)
	}))
	t.Cleanup(redirector.Close)
	logFile := filepath.Join(t.TempDir(), "server.log")
	port := testproc.Port(t)
	for _, auth := range []string{"basic", "body"} {
		t.Run(auth, func(t *testing.T) {
			runInProcess(t, fmt.Sprintf(`{
	admin off
	auto_https off
	persist_config off
	log {
		output file %s
		level DEBUG
	}
}

http://127.0.0.1:%d {
	restream_token_proxy {
		allow_unauthenticated
		client_id test-client
		client_secret test-secret
		token_url %s/oauth/token
		client_auth %s
	}
}
`, logFile, port, redirector.URL, auth))
			base := "http://127.0.0.1:" + itoa(port)
			for _, st := range []int{301, 302, 303, 307, 308} {
				mu.Lock()
				status = st
				mu.Unlock()
				for _, call := range []struct {
					path string
					form url.Values
				}{
					{"/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {"rt_device"}}},
					{"/revoke", url.Values{"token": {"rt_device"}}},
				} {
					got, b, hdr := postForm(t, base+call.path, call.form, nil)
					code, desc := oauthError(t, b, hdr)
					if got != http.StatusBadGateway || code != "server_error" || !strings.Contains(desc, "redirect") || !strings.Contains(desc, itoa(st)) {
						t.Errorf("%d on %s: device got %d: %s", st, call.path, got, b)
					}
					if hdr.Get("Location") != "" {
						t.Errorf("%d on %s: Location relayed", st, call.path)
					}
				}
			}
			if n := trap.count(); n != 0 {
				t.Fatalf("the redirect target received %d calls: %q", n, trap.calls)
			}
		})
	}
	logs, err := os.ReadFile(logFile)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(logs), `"failure":"redirect"`); n != 2*5*2 {
		t.Errorf("%d log lines name the redirect, want 20", n)
	}
	mustContainNone(t, "logs", string(logs), "test-secret", trap.srv.URL)
}

// Upstream failures: a JSON error answer (SetDown) is relayed unchanged;
// no answer, or an unusable one, is the proxy's own 502 (504 on timeout).
func TestTokenProxyUpstreamDown(t *testing.T) {
	fake := newFake(t, fakerestream.Options{})
	rec := newUpstreamRecorder(t, fake)
	site := proxySiteFor(t, rec, fake)
	short := proxySiteFor(t, rec, fake, "timeout 500ms")
	closed := proxySite{Port: testproc.Port(t), Lines: []string{
		"client_id test-client",
		"client_secret test-secret",
		fmt.Sprintf("token_url http://127.0.0.1:%d/oauth/token", testproc.Port(t)),
		fmt.Sprintf("revoke_url http://127.0.0.1:%d/oauth/revoke", testproc.Port(t)),
	}}
	runInProcess(t, proxyCaddyfile(nil, site, short, closed))
	_, refresh := fake.SeedPair()
	refreshForm := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}}

	t.Run("SetDown 503 relayed", func(t *testing.T) {
		fake.SetDown(http.StatusServiceUnavailable)
		defer fake.SetDown(0)
		status, b, hdr := postForm(t, site.base()+"/oauth/token", refreshForm, nil)
		if status != http.StatusServiceUnavailable {
			t.Fatalf("status %d, want 503: %s", status, b)
		}
		if code, _ := oauthError(t, b, hdr); code != "server_error" || !bytes.Equal(b, rec.last(t).Body) {
			t.Errorf("got %q, want the fake's body %q", b, rec.last(t).Body)
		}
	})
	t.Run("429 relayed with Retry-After", func(t *testing.T) {
		fake.SetRetryAfter(7)
		fake.SetFault(fakerestream.Fault429)
		defer fake.SetFault(fakerestream.FaultNone)
		status, b, hdr := postForm(t, site.base()+"/oauth/token", refreshForm, nil)
		if status != http.StatusTooManyRequests || hdr.Get("Retry-After") != "7" || !bytes.Equal(b, rec.last(t).Body) {
			t.Errorf("status %d, Retry-After %q: %s", status, hdr.Get("Retry-After"), b)
		}
	})
	for _, tc := range []struct {
		name     string
		site     proxySite
		fault    fakerestream.Fault
		url      string
		status   int
		code     string
		descPart string
	}{
		{"closed port", closed, fakerestream.FaultNone, "/oauth/token", 502, "temporarily_unavailable", "unreachable"},
		{"closed port revoke", closed, fakerestream.FaultNone, "/oauth/revoke", 502, "temporarily_unavailable", "unreachable"},
		{"refused", site, fakerestream.FaultRefuse, "/oauth/token", 502, "temporarily_unavailable", "unreachable"},
		{"HTML 502", site, fakerestream.FaultHTML, "/oauth/token", 502, "server_error", "HTML page"},
		{"200 garbage", site, fakerestream.FaultGarbage, "/oauth/token", 502, "server_error", "non-JSON"},
		{"200 over 1 MiB", site, fakerestream.FaultHuge, "/oauth/token", 502, "server_error", "more than 1048576 bytes"},
		{"hang", short, fakerestream.FaultHang, "/oauth/token", 504, "temporarily_unavailable", "within 500ms"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake.SetFault(tc.fault)
			defer fake.SetFault(fakerestream.FaultNone)
			form := refreshForm
			if strings.HasSuffix(tc.url, "revoke") {
				form = url.Values{"token": {refresh}}
			}
			start := time.Now()
			status, b, hdr := postForm(t, tc.site.base()+tc.url, form, nil)
			if status != tc.status {
				t.Fatalf("status %d, want %d: %s", status, tc.status, b)
			}
			code, desc := oauthError(t, b, hdr)
			if code != tc.code || !strings.Contains(desc, tc.descPart) {
				t.Errorf("got %s, want %q with %q", b, tc.code, tc.descPart)
			}
			if tc.fault == fakerestream.FaultHang && time.Since(start) > 5*time.Second {
				t.Errorf("the timeout did not bound the call: %s", time.Since(start))
			}
			mustContainNone(t, "error answer", string(b), append(fake.IssuedTokens(), "test-secret")...)
		})
	}
	// Nothing above rotated: the seed still works.
	if status, b, _ := postForm(t, site.base()+"/oauth/token", refreshForm, nil); status != http.StatusOK {
		t.Errorf("after the outages: status %d: %s", status, b)
	}
}

// A device that hangs up mid-refresh does not cancel the upstream call: the
// endpoint's rotation completes for the proxy (the fake counts rotations
// whose caller went away as lost).
func TestTokenProxyDetachedFromClient(t *testing.T) {
	fake := newFake(t, fakerestream.Options{Latency: 800 * time.Millisecond})
	site := proxySite{Port: testproc.Port(t), Lines: []string{
		"client_id test-client",
		"client_secret test-secret",
		"token_url " + fake.TokenURL(),
		"timeout 5s",
	}}
	runInProcess(t, proxyCaddyfile(nil, site))
	_, refresh := fake.SeedPair()

	// The device hangs up once its refresh is in progress at the fake.
	ctx, hangUp := context.WithCancel(context.Background())
	defer hangUp()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, site.base()+"/oauth/token",
		strings.NewReader(url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}}.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", formContentType)
	answered := make(chan error, 1)
	go func() {
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
			err = fmt.Errorf("the device got an answer (%d) before the fake's latency", resp.StatusCode)
		} else {
			err = nil
		}
		answered <- err
	}()
	waitFor(t, 10*time.Second, "the refresh to reach the fake", func() bool { return fake.Stats().RefreshInFlight == 1 })
	hangUp()
	if err := <-answered; err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the upstream refresh to finish", func() bool {
		st := fake.Stats()
		return st.RefreshCalls == 1 && st.RefreshInFlight == 0
	})
	if st := fake.Stats(); st.RefreshOK != 1 || st.LostRotations != 0 {
		t.Errorf("fake stats %+v: want one rotation, completed for a caller still there", st)
	}
}
