package tokensource

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

const (
	endpointTestID     = "endpoint-client"
	endpointTestSecret = "cs_endpoint_0123456789"
)

// endpointRequest is what an endpoint test server received.
type endpointRequest struct {
	header http.Header
	form   url.Values
}

// newEndpointServer is an endpoint on 127.0.0.1 that records each request
// and answers it with answer.
func newEndpointServer(t *testing.T, answer http.HandlerFunc) (*httptest.Server, chan endpointRequest) {
	t.Helper()
	seen := make(chan endpointRequest, 16)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = r.ParseForm()
		seen <- endpointRequest{header: r.Header.Clone(), form: r.PostForm}
		answer(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv, seen
}

func testEndpoint(url string, style AuthStyle) *Endpoint {
	return &Endpoint{URL: url, ClientID: endpointTestID, ClientSecret: endpointTestSecret, AuthStyle: style, Client: &http.Client{}}
}

func asCallError(t *testing.T, err error) *CallError {
	t.Helper()
	var ce *CallError
	if !errors.As(err, &ce) {
		t.Fatalf("error %v (%T), want a *CallError", err, err)
	}
	if msg := err.Error(); strings.Contains(msg, endpointTestSecret) || strings.Contains(msg, "http://") {
		t.Fatalf("the error text carries a secret or the URL: %s", msg)
	}
	return ce
}

// A redirect is never followed, whatever the client would do: the form
// and the credentials would go wherever the Location points.
func TestEndpointRefusesRedirects(t *testing.T) {
	t.Parallel()
	var trapped atomic.Int32
	trap := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { trapped.Add(1) }))
	t.Cleanup(trap.Close)
	for _, code := range []int{http.StatusMovedPermanently, http.StatusFound, http.StatusSeeOther,
		http.StatusTemporaryRedirect, http.StatusPermanentRedirect} {
		srv, _ := newEndpointServer(t, func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, trap.URL+"/oauth/token", code)
		})
		e := testEndpoint(srv.URL+"/oauth/token", AuthBody)
		// A client that would follow any redirect.
		e.Client = &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return nil }}
		answer, err := e.Post(context.Background(), url.Values{"grant_type": {"refresh_token"}})
		if answer != nil {
			t.Fatalf("%d: got an answer %+v", code, answer)
		}
		ce := asCallError(t, err)
		if ce.Failure != CallRedirected || ce.Status != code || !strings.Contains(err.Error(), fmt.Sprintf("answered %d, a redirect", code)) {
			t.Errorf("%d: failure %v status %d: %v", code, ce.Failure, ce.Status, err)
		}
	}
	if n := trapped.Load(); n != 0 {
		t.Fatalf("the redirect target received %d requests", n)
	}
}

// The answer is read up to MaxResponseBytes; one byte more is an error.
func TestEndpointBodyCap(t *testing.T) {
	t.Parallel()
	for _, size := range []int{MaxResponseBytes, MaxResponseBytes + 1} {
		srv, _ := newEndpointServer(t, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write([]byte(strings.Repeat(" ", size)))
		})
		answer, err := testEndpoint(srv.URL, AuthBasic).Post(context.Background(), url.Values{})
		if size <= MaxResponseBytes {
			if err != nil || len(answer.Body) != size || answer.Status != http.StatusOK || answer.Elapsed <= 0 {
				t.Fatalf("%d bytes: %v, %+v", size, err, answer)
			}
			continue
		}
		ce := asCallError(t, err)
		if ce.Failure != CallTooLarge || ce.Status != http.StatusOK || ce.Limit != MaxResponseBytes ||
			!strings.Contains(err.Error(), "larger than 1048576 bytes") {
			t.Errorf("%d bytes: %+v: %v", size, ce, err)
		}
	}
}

// Basic sends the credentials in the Authorization header only; body sends
// them as form fields only. The caller's form is never modified.
func TestEndpointClientAuth(t *testing.T) {
	t.Parallel()
	srv, seen := newEndpointServer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"ok":true}`))
	})
	for _, style := range []AuthStyle{AuthBasic, AuthBody} {
		form := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {"rt_x"}}
		answer, err := testEndpoint(srv.URL, style).Post(context.Background(), form)
		if err != nil || answer.Status != http.StatusOK || string(answer.Body) != `{"ok":true}` ||
			answer.Header.Get("Content-Type") != "application/json" {
			t.Fatalf("style %d: %v, %+v", style, err, answer)
		}
		if len(form) != 2 {
			t.Errorf("style %d: the caller's form was modified: %v", style, form)
		}
		got := <-seen
		if got.header.Get("Content-Type") != "application/x-www-form-urlencoded" || got.header.Get("Accept") != "application/json" {
			t.Errorf("style %d: headers %v", style, got.header)
		}
		if got.form.Get("grant_type") != "refresh_token" || got.form.Get("refresh_token") != "rt_x" {
			t.Errorf("style %d: form %v", style, got.form)
		}
		basic := "Basic " + base64.StdEncoding.EncodeToString([]byte(endpointTestID+":"+endpointTestSecret))
		switch style {
		case AuthBasic:
			if got.header.Get("Authorization") != basic || got.form.Has("client_id") || got.form.Has("client_secret") {
				t.Errorf("basic: Authorization %q, form %v", got.header.Get("Authorization"), got.form)
			}
		case AuthBody:
			if got.header.Get("Authorization") != "" || got.form.Get("client_id") != endpointTestID || got.form.Get("client_secret") != endpointTestSecret {
				t.Errorf("body: Authorization %q, form %v", got.header.Get("Authorization"), got.form)
			}
		}
	}
	// PostTo reaches another endpoint of the client, authenticated alike.
	if _, err := testEndpoint(srv.URL+"/oauth/token", AuthBasic).PostTo(context.Background(), srv.URL+"/oauth/revoke", url.Values{"token": {"t"}}); err != nil {
		t.Fatal(err)
	}
	if got := <-seen; got.header.Get("Authorization") == "" || got.form.Get("token") != "t" {
		t.Errorf("revoke: %v %v", got.header, got.form)
	}
}

// An answer that cannot be used is described by kind, type and size, never
// quoted.
func TestDescribeBody(t *testing.T) {
	t.Parallel()
	const marker = "rt_must_not_be_quoted"
	for _, tc := range []struct {
		contentType, body, want string
	}{
		{"text/html; charset=utf-8", "<html><body>" + marker + "</body></html>", "an HTML page (text/html, 47 bytes)"},
		{"", "<!DOCTYPE html><p>" + marker, "an HTML page (text/html, 39 bytes)"},
		{"text/plain", "access_token=" + marker, "a non-JSON body (text/plain, 34 bytes)"},
		{"application/json", `["` + marker + `"]`, "unexpected JSON (application/json, 25 bytes)"},
		{"application/json", "", "an empty body"},
		{"application/json", " \n\t", "an empty body"},
		{"bogus type with " + marker, "x" + marker, "a non-JSON body (text/plain, 22 bytes)"},
		{"application/" + strings.Repeat("x", 80), marker, "a non-JSON body (unnamed type, 21 bytes)"},
	} {
		got := DescribeBody(tc.contentType, []byte(tc.body))
		if got != tc.want {
			t.Errorf("DescribeBody(%q, %q) = %q, want %q", tc.contentType, tc.body, got, tc.want)
		}
		if strings.Contains(got, marker) {
			t.Errorf("DescribeBody quotes the body: %q", got)
		}
	}
}

// A call cut by its deadline is a timeout (the request may have been acted
// on); the description says so and how long it waited, without the URL.
func TestEndpointTimeoutDescribed(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	srv, _ := newEndpointServer(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-release:
		}
	})
	t.Cleanup(func() { close(release) })
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := testEndpoint(srv.URL+"/oauth/token?client_secret="+endpointTestSecret, AuthBasic).Post(ctx, url.Values{})
	ce := asCallError(t, err)
	if ce.Failure != CallNoAnswer || !ce.Timeout() || ce.Status != 0 || !strings.Contains(err.Error(), "unreachable: timed out after") {
		t.Fatalf("failure %v timeout %v status %d: %v", ce.Failure, ce.Timeout(), ce.Status, err)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("the cause is not kept: %v", err)
	}
	if d := DescribeTransportError(context.Canceled, time.Second); d != "cancelled" {
		t.Errorf("cancelled: %q", d)
	}
	urlErr := &url.Error{Op: "Post", URL: "https://x.example/?client_secret=" + endpointTestSecret, Err: errors.New("connection\nrefused")}
	if d := DescribeTransportError(urlErr, time.Second); d != "connection refused" {
		t.Errorf("url.Error: %q, want the cause without the URL or control characters", d)
	}
}

// Nothing listening, a bad URL and an answer cut short are told apart.
func TestEndpointNoAnswer(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	_, err = testEndpoint("http://"+addr+"/oauth/token", AuthBody).Post(context.Background(), url.Values{})
	if ce := asCallError(t, err); ce.Failure != CallNoAnswer || ce.Timeout() || !strings.Contains(err.Error(), "unreachable") {
		t.Errorf("closed port: %+v: %v", ce, err)
	}

	_, err = testEndpoint("http://[::1]:namedport/\x7f", AuthBasic).Post(context.Background(), url.Values{})
	if ce := asCallError(t, err); ce.Failure != CallUnbuildable {
		t.Errorf("bad URL: %+v: %v", ce, err)
	}

	srv, _ := newEndpointServer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "100")
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write([]byte(`{"access`))
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			conn.Close()
		}
	})
	_, err = testEndpoint(srv.URL, AuthBasic).Post(context.Background(), url.Values{})
	if ce := asCallError(t, err); ce.Failure != CallUnreadable || ce.Status != http.StatusOK || !strings.Contains(err.Error(), "answered 200 and its body could not be read") {
		t.Errorf("cut answer: %+v: %v", ce, err)
	}
}

// The redactor finds every secret it is given, and the client secret inside
// the Basic credentials too; a secret under 4 bytes is not looked for.
func TestRedactorSecrets(t *testing.T) {
	t.Parallel()
	r := NewRedactor("id", endpointTestSecret, "rt_refresh_token", "abc", "")
	basic := base64.StdEncoding.EncodeToString([]byte("id:" + endpointTestSecret))
	in := "secret " + url.QueryEscape(endpointTestSecret+"/+") + ", refresh rt_refresh_token, Basic " + basic + ", abc, id"
	got := r.RedactString(in)
	for _, s := range []string{endpointTestSecret, "rt_refresh_token", basic[:20]} {
		if strings.Contains(got, s) {
			t.Errorf("%q survives in %q", s, got)
		}
	}
	if !strings.Contains(got, ", abc, id") || strings.Count(got, RedactedMark) != 3 {
		t.Errorf("got %q", got)
	}
	if !r.Contains("Basic "+basic) || r.Contains("nothing here") {
		t.Error("Contains")
	}
	if empty := NewRedactor("id", ""); empty.RedactString("id:abc") != "id:abc" {
		t.Error("a redactor without secrets changed the text")
	}
}
