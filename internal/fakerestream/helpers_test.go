package fakerestream

import (
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"
)

type resp struct {
	status int
	header http.Header
	body   map[string]any
	raw    string
}

// call performs a request and decodes a JSON object body if there is one.
// It reports failures with Errorf (not Fatal) so goroutines may use it.
func call(t *testing.T, method, u, contentType, body string, hdr map[string]string) resp {
	t.Helper()
	req, err := http.NewRequest(method, u, strings.NewReader(body))
	if err != nil {
		t.Errorf("%s %s: %v", method, u, err)
		return resp{}
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Errorf("%s %s: %v", method, u, err)
		return resp{}
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Errorf("%s %s: read body: %v", method, u, err)
	}
	r := resp{status: res.StatusCode, header: res.Header, raw: string(b)}
	if len(b) > 0 && b[0] == '{' {
		if err := json.Unmarshal(b, &r.body); err != nil {
			t.Errorf("bad JSON %q: %v", b, err)
		}
	}
	return r
}

// Typed field accessors; they return zero values instead of panicking.
func (r resp) str(k string) string  { v, _ := r.body[k].(string); return v }
func (r resp) num(k string) float64 { v, _ := r.body[k].(float64); return v }
func (r resp) list(k string) []any  { v, _ := r.body[k].([]any); return v }

const form = "application/x-www-form-urlencoded"

// basicAuth returns an Authorization header for HTTP Basic client auth.
func basicAuth(id, secret string) map[string]string {
	req, _ := http.NewRequest("POST", "http://x", nil)
	req.SetBasicAuth(id, secret)
	return map[string]string{"Authorization": req.Header.Get("Authorization")}
}

// token posts f to the token endpoint with the default Basic credentials.
func token(t *testing.T, s *Server, f url.Values) resp {
	t.Helper()
	return call(t, "POST", s.TokenURL(), form, f.Encode(), basicAuth("test-client", "test-secret"))
}

func refresh(t *testing.T, s *Server, rt string) resp {
	t.Helper()
	return token(t, s, url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}})
}

func api(t *testing.T, s *Server, at string) resp {
	t.Helper()
	return call(t, "GET", s.URL()+"/v2/user/profile", "", "", map[string]string{"Authorization": "Bearer " + at})
}

func wantErr(t *testing.T, r resp, status int, code string) {
	t.Helper()
	if r.status != status || r.body["error"] != code {
		t.Fatalf("got %d %s, want %d %s", r.status, r.raw, status, code)
	}
}

func newServer(t *testing.T, o Options) *Server {
	o.Logf = t.Logf
	s := New(o)
	t.Cleanup(s.Close)
	return s
}

// post sends a refresh grant with its own client, returning transport errors
// instead of failing the test.
func post(c *http.Client, u, rt string) (status int, header http.Header, body []byte, err error) {
	req, err := http.NewRequest("POST", u, strings.NewReader(url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}}.Encode()))
	if err != nil {
		return 0, nil, nil, err
	}
	req.Header.Set("Content-Type", form)
	req.SetBasicAuth("test-client", "test-secret")
	res, err := c.Do(req)
	if err != nil {
		return 0, nil, nil, err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	return res.StatusCode, res.Header, b, err
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// mustStillWork checks that rt was not rotated by the faulted calls: it
// refreshes once, successfully.
func mustStillWork(t *testing.T, s *Server, rt string) {
	t.Helper()
	if r := refresh(t, s, rt); r.status != 200 {
		t.Fatalf("refresh token unusable after the fault: %d %s", r.status, r.raw)
	}
}
