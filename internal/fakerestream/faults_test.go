package fakerestream

import (
	"encoding/json"
	"errors"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestSetDown(t *testing.T) {
	s := newServer(t, Options{})
	rt := s.Seed()
	s.SetDown(http.StatusServiceUnavailable)
	wantErr(t, refresh(t, s, rt), 503, "server_error")
	s.SetDown(0)
	if r := refresh(t, s, rt); r.status != 200 {
		t.Fatalf("after outage: %s", r.raw) // the outage must not have consumed the token
	}
	if st := s.Stats(); st.RefreshCalls != 2 || st.RefreshOK != 1 {
		t.Errorf("stats %+v", st)
	}
}

// Faults that answer at once: status, content type and body shape; none
// rotates, each is counted.
func TestFaultAnswers(t *testing.T) {
	for _, tc := range []struct {
		fault  Fault
		status int
		ctype  string
		check  func(h http.Header, b []byte) bool
	}{
		{Fault500, 500, "application/json", func(_ http.Header, b []byte) bool { return strings.Contains(string(b), `"error":"server_error"`) }},
		{FaultGarbage, 200, "application/json", func(_ http.Header, b []byte) bool { return len(b) > 0 && !json.Valid(b) }},
		{FaultHTML, 502, "text/html", func(_ http.Header, b []byte) bool {
			return strings.HasPrefix(string(b), "<!DOCTYPE html>") && strings.Contains(string(b), "502 Bad Gateway")
		}},
		{Fault429, 429, "application/json", func(h http.Header, b []byte) bool {
			return h.Get("Retry-After") == "2" && strings.Contains(string(b), "too_many_requests")
		}},
		{FaultHuge, 200, "application/json", func(_ http.Header, b []byte) bool {
			return len(b) == HugeBodyBytes && strings.HasPrefix(string(b), `{"access_token":"at_`)
		}},
	} {
		t.Run(tc.fault.String(), func(t *testing.T) {
			s := newServer(t, Options{})
			rt := s.Seed()
			s.SetFault(tc.fault)
			if s.Fault() != tc.fault {
				t.Fatalf("Fault() = %v", s.Fault())
			}
			for range 2 {
				status, h, b, err := post(http.DefaultClient, s.TokenURL(), rt)
				if err != nil {
					t.Fatal(err)
				}
				if status != tc.status || !strings.HasPrefix(h.Get("Content-Type"), tc.ctype) || !tc.check(h, b) {
					t.Fatalf("got %d %q %d bytes: %.200q", status, h.Get("Content-Type"), len(b), b)
				}
			}
			// The API and the token endpoint on URL() fail alike (only FaultRefuse tells them apart).
			if status, _, _, _ := post(http.DefaultClient, s.URL()+"/oauth/token", rt); status != tc.status {
				t.Fatalf("URL()/oauth/token: %d, want %d", status, tc.status)
			}
			s.SetFault(FaultNone)
			mustStillWork(t, s, rt)
			if st := s.Stats(); st.RefreshCalls != 4 || st.RefreshOK != 1 || st.FaultedCalls != 3 || st.InvalidGrant != 0 {
				t.Errorf("stats %+v", st)
			}
		})
	}
}

func TestFault429RetryAfter(t *testing.T) {
	s := newServer(t, Options{})
	s.SetFault(Fault429)
	s.SetRetryAfter(7)
	status, h, _, err := post(http.DefaultClient, s.TokenURL(), s.Seed())
	if err != nil || status != 429 || h.Get("Retry-After") != "7" {
		t.Fatalf("got %d Retry-After %q (%v)", status, h.Get("Retry-After"), err)
	}
}

// SetDown keeps working and wins over a fault.
func TestSetDownWinsOverFault(t *testing.T) {
	s := newServer(t, Options{})
	rt := s.Seed()
	s.SetFault(FaultHang)
	s.SetDown(503)
	wantErr(t, refresh(t, s, rt), 503, "server_error")
	s.SetDown(0)
	s.SetFault(FaultNone)
	mustStillWork(t, s, rt)
}

// A hang answers nothing while the client waits, is counted as a refresh
// call, never rotates, and ends when the client gives up.
func TestFaultHang(t *testing.T) {
	s := newServer(t, Options{})
	rt := s.Seed()
	s.SetFault(FaultHang)
	c := &http.Client{Timeout: 300 * time.Millisecond}
	start := time.Now()
	_, _, _, err := post(c, s.TokenURL(), rt)
	if err == nil || time.Since(start) < 300*time.Millisecond {
		t.Fatalf("want a client timeout, got %v after %s", err, time.Since(start))
	}
	waitUntil(t, "the hang to end with its client", func() bool { return s.Stats().Hanging == 0 })
	if st := s.Stats(); st.RefreshCalls != 1 || st.Hangs != 1 || st.FaultedCalls != 1 || st.RefreshOK != 0 {
		t.Errorf("stats %+v", st)
	}

	// Clearing the fault releases a waiting client with a 503, still without rotating.
	done := make(chan int)
	go func() {
		status, _, b, err := post(http.DefaultClient, s.TokenURL(), rt)
		if err != nil || !strings.Contains(string(b), "server_error") {
			t.Errorf("released hang: %d %s %v", status, b, err)
		}
		done <- status
	}()
	waitUntil(t, "a hanging call", func() bool { return s.Stats().Hanging == 1 })
	select {
	case <-done:
		t.Fatal("a hanging call was answered")
	case <-time.After(200 * time.Millisecond):
	}
	s.SetFault(FaultNone)
	if status := <-done; status != 503 {
		t.Fatalf("released hang answered %d, want 503", status)
	}
	mustStillWork(t, s, rt)
}

// Close ends hanging calls at once and leaves no goroutine behind.
func TestFaultHangCloseNoLeak(t *testing.T) {
	before := runtime.NumGoroutine()
	s := New(Options{})
	s.SetFault(FaultHang)
	tr := &http.Transport{}
	c := &http.Client{Transport: tr}
	var wg sync.WaitGroup
	for i := range 6 {
		u := s.TokenURL()
		if i%2 == 1 {
			u = s.URL() + "/oauth/token" // the main listener hangs too
		}
		wg.Go(func() {
			if _, _, _, err := post(c, u, "rt_whatever"); err == nil {
				t.Errorf("a hanging call got an answer at Close")
			}
		})
	}
	waitUntil(t, "6 hanging calls", func() bool { return s.Stats().Hanging == 6 })
	closed := make(chan struct{})
	go func() { s.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("Close blocked on hanging calls")
	}
	wg.Wait()
	tr.CloseIdleConnections()
	const slack = 2
	var now int
	deadline := time.Now().Add(5 * time.Second)
	for now = runtime.NumGoroutine(); now > before+slack && time.Now().Before(deadline); now = runtime.NumGoroutine() {
		time.Sleep(20 * time.Millisecond)
	}
	if now > before+slack {
		buf := make([]byte, 1<<20)
		t.Fatalf("goroutines: %d before, %d after Close\n%s", before, now, buf[:runtime.Stack(buf, true)])
	}
}

// RotateThenHang rotates the pair and then answers nothing: the caller
// cannot tell, and its old refresh token is spent.
func TestFaultRotateThenHang(t *testing.T) {
	s := newServer(t, Options{})
	at0, rt0 := s.SeedPair()
	s.SetFault(FaultRotateThenHang)
	c := &http.Client{Timeout: 300 * time.Millisecond}
	if _, _, _, err := post(c, s.TokenURL(), rt0); err == nil {
		t.Fatal("want a client timeout")
	}
	waitUntil(t, "the hang to end with its client", func() bool { return s.Stats().Hanging == 0 })
	if s.ValidAccessToken(at0) || s.CurrentAccessTokens() != 1 {
		t.Fatalf("the pair was not rotated server-side")
	}
	// Invalid calls are answered as usual, even under the fault.
	wantErr(t, refresh(t, s, rt0), 400, "invalid_grant")
	if st := s.Stats(); st.RefreshCalls != 2 || st.RefreshOK != 1 || st.Hangs != 1 || st.FaultedCalls != 1 || st.InvalidGrant != 1 {
		t.Errorf("stats %+v", st)
	}

	// A client still waiting when the fault clears gets its pair late.
	rt1 := s.Seed()
	done := make(chan resp)
	go func() {
		status, _, b, err := post(http.DefaultClient, s.TokenURL(), rt1)
		r := resp{status: status, raw: string(b)}
		if err != nil || json.Unmarshal(b, &r.body) != nil {
			t.Errorf("late answer: %v %s", err, b)
		}
		done <- r
	}()
	waitUntil(t, "a hanging call", func() bool { return s.Stats().Hanging == 1 })
	s.SetFault(FaultNone)
	r := <-done
	if r.status != 200 || !s.ValidAccessToken(r.str("access_token")) {
		t.Fatalf("late answer %d %s", r.status, r.raw)
	}
	mustStillWork(t, s, r.str("refresh_token"))
}

// FaultRefuse takes the token port down (connection refused, kept-alive
// connections cut); URL() keeps serving; clearing it listens on the same port.
func TestFaultRefuse(t *testing.T) {
	s := newServer(t, Options{})
	rt := s.Seed()
	tokenURL := s.TokenURL()
	if strings.HasPrefix(tokenURL, s.URL()) {
		t.Fatalf("TokenURL %s is not on its own listener (URL %s)", tokenURL, s.URL())
	}
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr}
	r := refresh(t, s, rt) // warm a kept-alive connection on c too
	rt = r.str("refresh_token")
	if status, _, _, err := post(c, tokenURL, "rt_unknown"); err != nil || status != 400 {
		t.Fatalf("warm-up: %d %v", status, err)
	}
	before := s.Stats()

	s.SetFault(FaultRefuse)
	// A kept-alive connection is cut: its client may first see EOF or a
	// reset, then connection refused like everyone else.
	for i := range 3 {
		_, _, _, err := post(c, tokenURL, rt)
		if err == nil || (i > 0 && !errors.Is(err, syscall.ECONNREFUSED)) {
			t.Fatalf("call %d: want connection refused, got %v", i, err)
		}
	}
	if _, _, _, err := post(&http.Client{Transport: &http.Transport{}}, tokenURL, rt); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("new client: want connection refused, got %v", err)
	}
	if st := s.Stats(); st.RefreshCalls != before.RefreshCalls {
		t.Fatalf("refused calls reached the server: %+v", st)
	}
	// The API and URL()'s own token endpoint are unaffected.
	at, _ := s.SeedPair()
	if r := api(t, s, at); r.status != 200 {
		t.Fatalf("API during FaultRefuse: %d", r.status)
	}
	if status, _, _, err := post(c, s.URL()+"/oauth/token", "rt_unknown"); err != nil || status != 400 {
		t.Fatalf("URL()/oauth/token during FaultRefuse: %d %v", status, err)
	}

	s.SetFault(FaultNone)
	if s.TokenURL() != tokenURL {
		t.Fatalf("TokenURL moved: %s -> %s", tokenURL, s.TokenURL())
	}
	if status, _, b, err := post(c, tokenURL, rt); err != nil || status != 200 {
		t.Fatalf("after FaultRefuse: %d %s %v", status, b, err)
	}
	// Refuse and clear again: the port comes back every time.
	for range 3 {
		s.SetFault(FaultRefuse)
		s.SetFault(FaultNone)
	}
	if status, _, _, err := post(c, tokenURL, "rt_unknown"); err != nil || status != 400 {
		t.Fatalf("after repeated FaultRefuse: %d %v", status, err)
	}
}

// A call accepted before FaultRefuse is dropped unanswered and does not
// rotate, even if the fault clears before its latency ends.
func TestFaultRefuseDropsAcceptedCalls(t *testing.T) {
	s := newServer(t, Options{Latency: 300 * time.Millisecond})
	rt := s.Seed()
	errc := make(chan error)
	go func() {
		_, _, _, err := post(&http.Client{Transport: &http.Transport{}}, s.TokenURL(), rt)
		errc <- err
	}()
	waitUntil(t, "a call in flight", func() bool { return s.Stats().MaxConcurrentRefresh == 1 })
	s.SetFault(FaultRefuse)
	s.SetFault(FaultNone)
	if err := <-errc; err == nil {
		t.Fatal("a call accepted before FaultRefuse got an answer")
	}
	waitUntil(t, "the dropped call to be counted", func() bool { return s.Stats().FaultedCalls == 1 })
	mustStillWork(t, s, rt)
}
