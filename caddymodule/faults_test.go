package caddymodule_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// Timing of the fault matrix. Tokens live faultTTL; restream_auth renews
// them faultAhead before expiry (capped at half the lifetime) and bounds one
// token call by faultTimeout, so a hang costs one second per attempt.
const (
	faultTTL     = 4 * time.Second
	faultAhead   = 2 * time.Second
	faultTimeout = time.Second
	// faultLead is how long before the proactive refresh the fault starts.
	faultLead = 700 * time.Millisecond
	// expiredFor is how long the fault is kept once the token has expired.
	expiredFor = time.Second
	// edge keeps the phases clear of the expiry instant.
	edge = 150 * time.Millisecond
	// recoverySlack is added to the backoff bound for the successful attempt
	// and the polling interval.
	recoverySlack = 500 * time.Millisecond
)

// The backoff schedule restream_auth promises (README, "Failures").
const (
	minBackoff = time.Second
	maxBackoff = time.Minute
	jitterLow  = 0.8
	jitterHigh = 1.2
)

type faultCase struct {
	name       string
	fault      fakerestream.Fault
	retryAfter int // seconds, for 429
}

// faultFigures are what one fault case measured.
type faultFigures struct {
	name              string
	duration          time.Duration // fault set to fault cleared
	callsDuringFault  int64         // token endpoint calls (refused: connection attempts, from the sidecar's log)
	maxCalls          int64         // the backoff bound on callsDuringFault
	failuresValid     int64         // non-200 answers while the token was valid
	okValid           int64
	expired503        int64 // conforming 503s past expiry
	expiredBad        int64 // anything else past expiry
	recovery          time.Duration
	recoveryBound     time.Duration
	invalidGrant      int64
	maxConcurrentCall int64
}

func (f faultFigures) String() string {
	return fmt.Sprintf("fault=%s duration=%.1fs calls_during_fault=%d (bound %d) failures_while_valid=%d (of %d) 503s=%d bad_after_expiry=%d recovery=%.1fs (bound %.1fs) invalid_grant=%d max_concurrent_refresh=%d",
		f.name, f.duration.Seconds(), f.callsDuringFault, f.maxCalls, f.failuresValid, f.failuresValid+f.okValid,
		f.expired503, f.expiredBad, f.recovery.Seconds(), f.recoveryBound.Seconds(), f.invalidGrant, f.maxConcurrentCall)
}

// TestFaultMatrix runs one sidecar per token endpoint fault. For each:
//
//	(a) the fault starts faultLead before the proactive refresh and lasts
//	    past it: while the token is valid, no request fails;
//	(b) the fault outlives the token: requests get 503, Retry-After and a
//	    JSON body with "temporarily_unavailable";
//	(c) the fault clears: a 200 within the backoff bound.
//
// Token endpoint calls during the fault must respect the backoff: at most
// one plus the number of backoff steps (1 s doubling, -20% jitter, at least
// Retry-After for 429, plus the call timeout for a hang) that fit in the
// fault's duration. Recovery must come within the backoff pending when the
// fault clears: 1.2 × 2^(n-1) s after n failed attempts (or Retry-After if
// longer), plus recoverySlack.
func TestFaultMatrix(t *testing.T) {
	skipIfShort(t, "six token endpoint faults, each held through a token lifetime (about 40 s)")
	cases := []faultCase{
		{"500", fakerestream.Fault500, 0},
		{"hang", fakerestream.FaultHang, 0},
		{"garbage", fakerestream.FaultGarbage, 0},
		{"html", fakerestream.FaultHTML, 0},
		{"429", fakerestream.Fault429, 2},
		{"refused", fakerestream.FaultRefuse, 0},
	}
	var summary []string
	for _, fc := range cases {
		t.Run(fc.name, func(t *testing.T) {
			f := runFaultCase(t, fc)
			t.Log(f)
			summary = append(summary, f.String())
		})
	}
	t.Logf("fault matrix summary:\n%s", strings.Join(summary, "\n"))
}

func runFaultCase(t *testing.T, fc faultCase) faultFigures {
	fake := newFake(t, fakerestream.Options{AccessTTL: faultTTL, Logf: func(string, ...any) {}})
	if fc.retryAfter > 0 {
		fake.SetRetryAfter(fc.retryAfter)
	}
	site := startFaultSite(t, fake)
	url, logFile, useUntil, refreshAt := site.url, site.logFile, site.useUntil, site.refreshAt
	fig := faultFigures{name: fc.name}

	sleepUntil(refreshAt.Add(-faultLead))
	if time.Now().After(refreshAt.Add(-faultLead / 2)) {
		t.Fatalf("too late to set the fault before the proactive refresh (due %s)", time.Until(refreshAt))
	}
	before := fake.Stats()
	faultStart := time.Now()
	fake.SetFault(fc.fault)

	// (a) The token is still valid: the proactive refresh fails, nobody notices.
	var valid tally
	hammer(t, url, 4, useUntil.Add(-edge), valid.count)
	fig.okValid, fig.failuresValid = valid.ok.Load(), valid.total()-valid.ok.Load()
	if fig.failuresValid != 0 {
		t.Errorf("(a) %d of %d requests failed while the token was valid; first: %s", fig.failuresValid, valid.total(), valid.firstBad())
	}
	if fc.fault != fakerestream.FaultRefuse && fake.Stats().RefreshCalls == before.RefreshCalls {
		t.Errorf("(a) no refresh attempt reached the faulty endpoint while the token was valid: the case tests nothing")
	}

	// (b) The token has expired and the endpoint still fails: 503s.
	sleepUntil(useUntil.Add(edge))
	var expired tally
	hammer(t, url, 4, time.Now().Add(expiredFor), expired.count503)
	fig.expired503, fig.expiredBad = expired.ok.Load(), expired.total()-expired.ok.Load()
	if fig.expiredBad != 0 || fig.expired503 == 0 {
		t.Errorf("(b) past expiry: %d conforming 503s, %d other answers; first: %s", fig.expired503, fig.expiredBad, expired.firstBad())
	}

	// (c) The fault clears: back to 200 within the pending backoff.
	during := fake.Stats()
	faultEnd := time.Now()
	fake.SetFault(fakerestream.FaultNone)
	fig.duration = faultEnd.Sub(faultStart)
	failed := during.RefreshCalls - before.RefreshCalls
	if fc.fault == fakerestream.FaultRefuse {
		// Refused connections never reach the fake: count the failed
		// attempts the sidecar logged.
		failed = int64(len(refreshFailures(t, logFile, faultStart, faultEnd)))
	}
	fig.callsDuringFault = failed
	fig.maxCalls = maxCallsInFault(fig.duration, time.Duration(fc.retryAfter)*time.Second, fc.fault == fakerestream.FaultHang)
	if failed > fig.maxCalls {
		t.Errorf("%d token endpoint calls during %.1fs of fault, more than the backoff allows (%d)", failed, fig.duration.Seconds(), fig.maxCalls)
	}
	if least := minCallsInFault(fig.duration, time.Duration(fc.retryAfter)*time.Second, fc.fault == fakerestream.FaultHang); failed < least {
		t.Errorf("only %d token endpoint calls during %.1fs of fault, want at least %d: the sidecar stopped retrying", failed, fig.duration.Seconds(), least)
	}
	pending := maxPendingBackoff(failed)
	if ra := time.Duration(fc.retryAfter) * time.Second; ra > pending {
		pending = ra
	}
	fig.recoveryBound = pending + recoverySlack
	deadline := faultEnd.Add(fig.recoveryBound + 10*time.Second)
	for {
		status, body, _ := do(t, http.MethodGet, url, nil, nil)
		if status == http.StatusOK {
			fig.recovery = time.Since(faultEnd)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("(c) no 200 within %s after the fault cleared; last %d %s", time.Since(faultEnd), status, body)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if fig.recovery > fig.recoveryBound {
		t.Errorf("(c) recovery took %s, bound %s (%d failed attempts)", fig.recovery, fig.recoveryBound, failed)
	}
	st := fake.Stats()
	fig.invalidGrant, fig.maxConcurrentCall = st.InvalidGrant, st.MaxConcurrentRefresh
	if st.InvalidGrant != 0 || st.MaxConcurrentRefresh != 1 {
		t.Errorf("fake: invalid_grant=%d max concurrent refreshes=%d, want 0 and 1", st.InvalidGrant, st.MaxConcurrentRefresh)
	}
	if t.Failed() {
		t.Logf("sidecar log:\n%s", tail(logFile, 60))
	}
	return fig
}

// faultSite is a sidecar in this process in front of the fake, with the
// fault matrix's timing (faultAhead, faultTimeout) and its log in a file.
type faultSite struct {
	url, logFile string
	// useUntil and refreshAt are those of the pair the warm-up got: see
	// tokenTimes.
	useUntil, refreshAt time.Time
}

// startFaultSite starts the site and sends one request, which must be
// answered 200.
func startFaultSite(t *testing.T, fake *fakerestream.Server) faultSite {
	t.Helper()
	dir := t.TempDir()
	cfg := siteConfig{
		Port: testproc.Port(t), StorageDir: filepath.Join(dir, "storage"), Fake: fake, Seed: fake.Seed(), LogFile: filepath.Join(dir, "caddy.log"),
		Extra: fmt.Sprintf("refresh_ahead %s\ntimeout %s", faultAhead, faultTimeout),
	}
	runInProcess(t, cfg.Caddyfile())
	site := faultSite{url: cfg.profileURL(), logFile: cfg.LogFile}
	if status, body, _ := do(t, http.MethodGet, site.url, nil, nil); status != http.StatusOK {
		t.Fatalf("warm-up: %d %s", status, body)
	}
	site.useUntil, site.refreshAt = tokenTimes(t, cfg.StorageDir)
	return site
}

// tokenTimes reads the stored pair and returns when restream_auth stops
// using its access token and when it renews it (tokensource's own rules:
// a margin of a tenth of the lifetime, at most 5 s; renewal refresh_ahead
// before expiry, at most half the lifetime).
func tokenTimes(t *testing.T, storageDir string) (useUntil, refreshAt time.Time) {
	t.Helper()
	rec, err := tokensource.LoadRecord(context.Background(), &certmagic.FileStorage{Path: storageDir}, "default")
	if err != nil || rec == nil {
		t.Fatalf("stored record: %v %v", rec, err)
	}
	life := rec.Expiry.Sub(rec.IssuedAt)
	useUntil = rec.Expiry.Add(-min(life/10, 5*time.Second))
	refreshAt = rec.Expiry.Add(-min(faultAhead, life/2))
	return useUntil, refreshAt
}

// maxCallsInFault is the most token endpoint calls the backoff allows
// during a fault of duration d: the first call, plus one per backoff step
// that fits, each step at its shortest (-20% jitter), at least retryAfter,
// and after a call that takes the whole timeout when the endpoint hangs.
func maxCallsInFault(d, retryAfter time.Duration, hangs bool) int64 {
	calls, elapsed := int64(1), time.Duration(0)
	for i := 1; ; i++ {
		step := max(time.Duration(jitterLow*float64(backoffStep(i))), retryAfter)
		if hangs {
			step += faultTimeout
		}
		if elapsed += step; elapsed > d {
			return calls
		}
		calls++
	}
}

// minCallsInFault is the fewest calls a sidecar that keeps retrying makes
// during a fault of duration d that starts faultLead before the proactive
// refresh: each backoff step at its longest (+20% jitter, or retryAfter),
// with some slack for scheduling.
func minCallsInFault(d, retryAfter time.Duration, hangs bool) int64 {
	const slack = 300 * time.Millisecond
	calls, at := int64(0), faultLead+slack
	for i := 1; at <= d; i++ {
		calls++
		step := max(time.Duration(jitterHigh*float64(backoffStep(i))), retryAfter) + slack
		if hangs {
			step += faultTimeout
		}
		at += step
	}
	return calls
}

// maxPendingBackoff is the longest wait after the n-th consecutive failure.
func maxPendingBackoff(n int64) time.Duration {
	return time.Duration(jitterHigh * float64(backoffStep(int(max(n, 1)))))
}

func backoffStep(i int) time.Duration {
	return min(time.Duration(float64(minBackoff)*math.Pow(2, float64(i-1))), maxBackoff)
}

// tally counts answers; ok counts the wanted ones.
type tally struct {
	ok, bad atomic.Int64
	mu      sync.Mutex
	first   string
}

func (c *tally) total() int64 { return c.ok.Load() + c.bad.Load() }

func (c *tally) firstBad() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.first
}

func (c *tally) fail(format string, args ...any) {
	c.bad.Add(1)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.first == "" {
		c.first = fmt.Sprintf(format, args...)
	}
}

// count wants 200.
func (c *tally) count(status int, body []byte, _ http.Header) {
	if status == http.StatusOK {
		c.ok.Add(1)
		return
	}
	c.fail("%d %s", status, body)
}

// count503 wants restream_auth's 503: Retry-After in whole seconds and a JSON
// body with error "temporarily_unavailable".
func (c *tally) count503(status int, body []byte, hdr http.Header) {
	var e struct {
		Error       string `json:"error"`
		Description string `json:"error_description"`
	}
	ra, raErr := strconv.Atoi(hdr.Get("Retry-After"))
	switch {
	case status != http.StatusServiceUnavailable:
		c.fail("status %d %s", status, body)
	case raErr != nil || ra < 1 || ra > 120:
		c.fail("Retry-After %q", hdr.Get("Retry-After"))
	case json.Unmarshal(body, &e) != nil || e.Error != "temporarily_unavailable" || e.Description == "":
		c.fail("body %s", body)
	default:
		c.ok.Add(1)
	}
}

// hammer sends GETs from workers until the deadline.
func hammer(t *testing.T, url string, workers int, until time.Time, check func(int, []byte, http.Header)) {
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for time.Now().Before(until) {
				status, body, hdr := do(t, http.MethodGet, url, nil, nil)
				check(status, body, hdr)
			}
		})
	}
	wg.Wait()
}

// logEntry is the part of a Caddy JSON log line the tests read.
type logEntry struct {
	TS    float64 `json:"ts"`
	Level string  `json:"level"`
	Msg   string  `json:"msg"`
	Err   string  `json:"error"`
}

func (e logEntry) time() time.Time {
	sec, frac := math.Modf(e.TS)
	return time.Unix(int64(sec), int64(frac*1e9))
}

func readLog(t *testing.T, path string) []logEntry {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatalf("reading the sidecar log: %v", err)
	}
	defer f.Close()
	var out []logEntry
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var e logEntry
		if json.Unmarshal(sc.Bytes(), &e) == nil {
			out = append(out, e)
		}
	}
	return out
}

// refreshFailures returns the failed refresh attempts logged in [from, to].
func refreshFailures(t *testing.T, path string, from, to time.Time) []logEntry {
	var out []logEntry
	for _, e := range readLog(t, path) {
		if at := e.time(); e.Msg == "token refresh failed; retrying" && !at.Before(from) && !at.After(to) {
			out = append(out, e)
		}
	}
	return out
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// FaultRotateThenHang: the endpoint rotates the pair and the answer never
// arrives (a timeout after the server did the work). The sidecar cannot
// know the new pair; its refresh token is dead. This test reports what the
// sidecar does and asserts only that it ends clean: at most one
// invalid_grant (the dead refresh token is sent once, never again), and
// once the old token has expired, 503 reauth_required with a message that
// says to re-authorize.
func TestFaultRotateThenHang(t *testing.T) {
	skipIfShort(t, "waits past a 4-second token's expiry")
	fake := newFake(t, fakerestream.Options{AccessTTL: faultTTL, Logf: func(string, ...any) {}})
	site := startFaultSite(t, fake)
	url, logFile, useUntil, refreshAt := site.url, site.logFile, site.useUntil, site.refreshAt
	sleepUntil(refreshAt.Add(-faultLead))
	fake.SetFault(fakerestream.FaultRotateThenHang)
	waitFor(t, 5*time.Second, "the proactive refresh to rotate and hang", func() bool { return fake.Stats().RefreshOK == 2 })
	waitFor(t, 5*time.Second, "the sidecar to give up on the hanging call", func() bool { return fake.Stats().Hanging == 0 })
	fake.SetFault(fakerestream.FaultNone)

	// Observe every answer until well past the old token's expiry.
	answers := map[string]int{}
	var order []string
	observeUntil := useUntil.Add(2 * time.Second)
	var last string
	for time.Now().Before(observeUntil) {
		status, body, _ := do(t, http.MethodGet, url, nil, nil)
		key := strconv.Itoa(status)
		var e struct {
			Error any `json:"error"`
		}
		if json.Unmarshal(body, &e) == nil && e.Error != nil {
			if m, ok := e.Error.(map[string]any); ok {
				key += " " + fmt.Sprint(m["name"])
			} else {
				key += " " + fmt.Sprint(e.Error)
			}
		}
		if answers[key] == 0 {
			order = append(order, fmt.Sprintf("%s (first at %+.1fs from expiry)", key, time.Since(useUntil).Seconds()))
		}
		answers[key]++
		last = string(body)
		time.Sleep(50 * time.Millisecond)
	}
	st := fake.Stats()
	t.Logf("rotate_then_hang: answers %v; in order: %s; fake: refresh calls=%d ok=%d invalid_grant=%d api401=%d",
		answers, strings.Join(order, ", "), st.RefreshCalls, st.RefreshOK, st.InvalidGrant, st.API401)
	t.Logf("rotate_then_hang: final answer %s", strings.TrimSpace(last))
	if st.InvalidGrant > 1 {
		t.Errorf("the dead refresh token was sent %d times", st.InvalidGrant)
	}
	status, body, hdr := do(t, http.MethodGet, url, nil, nil)
	var e struct {
		Error       string `json:"error"`
		Description string `json:"error_description"`
	}
	_ = json.Unmarshal(body, &e)
	if status != http.StatusServiceUnavailable || e.Error != "reauth_required" || !strings.Contains(e.Description, "re-authorize") || hdr.Get("Retry-After") == "" {
		t.Errorf("after the unknown outcome and expiry: %d %s, want 503 reauth_required", status, body)
	}
	if t.Failed() {
		t.Logf("sidecar log:\n%s", tail(logFile, 60))
	}
}
