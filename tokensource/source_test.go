package tokensource

// The Source's API (source.go): New, Token's hot path and its single flight,
// TokenNewerThan, the refresher's schedule, Close, backoff and Status.

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
)

func TestNewValidatesAndTouchesNothing(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	good := env.config(env.fake.Seed(), "o")
	for _, tc := range []struct {
		name string
		mut  func(*Config)
	}{
		{"account", func(c *Config) { c.Account = "" }},
		{"client_id", func(c *Config) { c.ClientID = "" }},
		{"client_secret", func(c *Config) { c.ClientSecret = "" }},
		{"client_secret is 3 bytes", func(c *Config) { c.ClientSecret = "abc" }},
		{"token_url", func(c *Config) { c.TokenURL = "" }},
		{"storage", func(c *Config) { c.Storage = nil }},
	} {
		cfg := good
		tc.mut(&cfg)
		if _, err := New(cfg); err == nil || !strings.Contains(err.Error(), tc.name) {
			t.Errorf("missing %s: err = %v", tc.name, err)
		}
	}
	var loads, stores atomic.Int64
	env.st.setOnLoad(func(string) { loads.Add(1) })
	env.st.setOnStore(func(string, []byte) error { stores.Add(1); return nil })
	s := env.source(t, good)
	if loads.Load() != 0 || stores.Load() != 0 || env.fake.Stats().RefreshCalls != 0 {
		t.Fatalf("New touched storage (%d loads, %d stores) or the endpoint (%+v)", loads.Load(), stores.Load(), env.fake.Stats())
	}
	if s.Current() != nil || s.Account() != testAccount {
		t.Fatalf("Current %v Account %q", s.Current(), s.Account())
	}
	if st := s.Status(); st.State != "no_chain" || st.Generation != 0 {
		t.Fatalf("Status before any attempt: %+v", st)
	}
}

func TestTokenHotPathDoesNotCallEndpoint(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	// The refresher is told to renew only at expiry, so that every read
	// counted below is the caller's.
	cfg := env.config(env.fake.Seed(), "o")
	cfg.RefreshAhead = time.Nanosecond
	s := env.source(t, cfg)
	first := mustToken(t, s)
	env.waitLeaseReleased(t, "the seed exchange's lease to be released")
	var loads atomic.Int64
	env.st.setOnLoad(func(string) { loads.Add(1) })

	// Valid until the expiry margin (5s for an hour-long token): the caller
	// never renews, that is the refresher's job.
	for _, at := range []time.Duration{0, 30 * time.Minute, 56 * time.Minute, time.Hour - 5*time.Second - time.Nanosecond} {
		env.clk.AdvanceTo(clockStart.Add(at))
		for range 1000 {
			if tok, err := s.Token(context.Background()); err != nil || tok != first {
				t.Fatalf("at +%v: Token = %p, %v; want the same token %p", at, tok, err, first)
			}
		}
	}
	env.wantCalls(t, 1)
	if loads.Load() != 0 {
		t.Fatalf("the hot path read storage %d times", loads.Load())
	}

	// Inside the margin the token is no longer handed out: a refresh runs.
	env.clk.AdvanceTo(first.Expiry.Add(-5 * time.Second))
	if first.ValidAt(env.clk.Now()) {
		t.Fatal("token still valid inside its expiry margin")
	}
	wantGeneration(t, mustToken(t, s), 2)
	env.wantCalls(t, 2)
}

func TestExpiryMarginForShortTokens(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{AccessTTL: 20 * time.Second})
	s := env.seededSource(t, "o")
	tok := mustToken(t, s)
	// A tenth of the lifetime (2s), not the 5s cap.
	if !tok.ValidAt(clockStart.Add(18*time.Second-time.Nanosecond)) || tok.ValidAt(clockStart.Add(18*time.Second)) {
		t.Fatal("short token's margin is not a tenth of its lifetime")
	}
	var nilTok *Token
	if nilTok.ValidAt(clockStart) {
		t.Fatal("a nil token is valid")
	}
}

// TestProactiveRefresh: the refresher renews RefreshAhead before expiry, and
// callers keep getting the current token without waiting meanwhile.
func TestProactiveRefresh(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		ttl   time.Duration
		ahead time.Duration
		want  time.Duration // after issue
	}{
		{"configured ahead", time.Hour, 10 * time.Minute, 50 * time.Minute},
		{"default ahead", time.Hour, 0, 55 * time.Minute},
		{"ahead capped at half the lifetime", time.Hour, 50 * time.Minute, 30 * time.Minute},
		{"default ahead capped for short tokens", 4 * time.Minute, 0, 2 * time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			env := newTestEnv(t, fakerestream.Options{AccessTTL: tc.ttl})
			cfg := env.config(env.fake.Seed(), "o")
			cfg.RefreshAhead = tc.ahead
			s := env.source(t, cfg)
			s.Start()
			s.Start() // idempotent

			// The refresher exchanges the seed at once; Token joins or adopts it.
			first := mustToken(t, s)
			wantGeneration(t, first, 1)

			at := clockStart.Add(tc.want)
			env.clk.waitForWaiter(t, at)
			if st := s.Status(); !st.NextRefresh.Equal(at) {
				t.Fatalf("Status.NextRefresh %v, want %v", st.NextRefresh, at)
			}
			env.wantCalls(t, 1)

			// One second early: nothing happens, the refresher keeps sleeping.
			env.clk.AdvanceTo(at.Add(-time.Second))
			if !env.clk.hasWaiter(at) {
				t.Fatal("the refresher's wake-up moved")
			}
			if tok := mustToken(t, s); tok != first {
				t.Fatal("token changed before the refresh time")
			}
			env.wantCalls(t, 1)

			// On time: one refresh, persisted and published, next one scheduled.
			env.clk.AdvanceTo(at)
			next := at.Add(tc.want)
			env.clk.waitForWaiter(t, next)
			env.wantCalls(t, 2)
			tok := mustToken(t, s)
			wantGeneration(t, tok, 2)
			if !tok.IssuedAt.Equal(at) || !tok.Expiry.Equal(at.Add(tc.ttl)) {
				t.Fatalf("IssuedAt %v Expiry %v", tok.IssuedAt, tok.Expiry)
			}
			if rec := env.record(t); rec.Generation != 2 || rec.AccessToken != tok.AccessToken {
				t.Fatalf("stored generation %d", rec.Generation)
			}
			if env.fake.ValidAccessToken(first.AccessToken) || !env.fake.ValidAccessToken(tok.AccessToken) {
				t.Fatal("rotation not reflected at the fake")
			}

			// And again, on the new pair's schedule.
			env.clk.AdvanceTo(next)
			env.clk.waitForWaiter(t, next.Add(tc.want))
			env.wantCalls(t, 3)
			wantGeneration(t, s.Current(), 3)
		})
	}
}

func TestCloseStopsRefresher(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	s := env.seededSource(t, "o")
	s.Start()
	mustToken(t, s)
	env.clk.waitForWaiter(t, clockStart.Add(55*time.Minute))
	s.Close()
	s.Close() // idempotent
	env.clk.Advance(2 * time.Hour)
	env.wantCalls(t, 1) // Close waited for the refresher: nothing can run any more
	wantGeneration(t, s.Current(), 1)
}

func TestSingleFlight(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{Latency: 50 * time.Millisecond})
	s := env.seededSource(t, "o")
	first := mustToken(t, s)
	env.clk.Advance(time.Hour)
	if first.ValidAt(env.clk.Now()) {
		t.Fatal("token should be expired")
	}

	const n = 1000
	var failed atomic.Int64
	toks := make([]*Token, n)
	concurrently(n, func(i int) {
		tok, err := s.Token(context.Background())
		if err != nil {
			failed.Add(1)
		}
		toks[i] = tok
	})
	if failed.Load() != 0 {
		t.Fatalf("%d callers failed", failed.Load())
	}
	for _, tok := range toks {
		if tok != toks[0] {
			t.Fatal("callers got different tokens")
		}
	}
	wantGeneration(t, toks[0], 2)
	env.wantCalls(t, 2)
	if st := env.fake.Stats(); st.MaxConcurrentRefresh != 1 {
		t.Fatalf("concurrent refreshes: %+v", st)
	}
}

func TestTokenNewerThan(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{Latency: 20 * time.Millisecond})
	s := env.seededSource(t, "o")
	mustToken(t, s)
	env.clk.Advance(time.Hour)
	gen2 := mustToken(t, s)
	wantGeneration(t, gen2, 2)
	env.wantCalls(t, 2)
	ctx := context.Background()

	// A request that carried generation 1 got a 401: generation 2 exists, use it.
	tok, ok, err := tokenNewerThan(ctx, s, rejectedGeneration(s, 1))
	if err != nil || !ok || tok != gen2 {
		t.Fatalf("TokenNewerThan(1) = gen %v, %v, %v; want the existing generation 2", tok.Generation, ok, err)
	}
	env.wantCalls(t, 2)

	// The current generation was rejected: exactly one forced refresh, shared.
	const n = 100
	results := make([]*Token, n)
	var notNewer atomic.Int64
	concurrently(n, func(i int) {
		tok, ok, err := tokenNewerThan(ctx, s, rejectedGeneration(s, 2))
		if err != nil || !ok {
			notNewer.Add(1)
		}
		results[i] = tok
	})
	if notNewer.Load() != 0 {
		t.Fatalf("%d callers got no newer token", notNewer.Load())
	}
	for _, tok := range results {
		wantGeneration(t, tok, 3)
	}
	env.wantCalls(t, 3)
	if env.fake.ValidAccessToken(gen2.AccessToken) || !env.fake.ValidAccessToken(results[0].AccessToken) {
		t.Fatal("the forced refresh did not rotate")
	}
	if rec := env.record(t); rec.Generation != 3 {
		t.Fatalf("stored generation %d", rec.Generation)
	}

	// Generation 3 rejected right away too: rate-limited, no new refresh; the
	// current token comes back with ok=false.
	tok, ok, err = tokenNewerThan(ctx, s, rejectedGeneration(s, 3))
	if err != nil || ok {
		t.Fatalf("rate-limited TokenNewerThan(3) = %v, %v", ok, err)
	}
	wantGeneration(t, tok, 3)
	env.wantCalls(t, 3)
	if st := s.Status(); st.LastResult != "rate_limited" {
		t.Fatalf("LastResult %q", st.LastResult)
	}
	env.clk.Advance(ForcedRefreshInterval - time.Second)
	if _, ok, _ := tokenNewerThan(ctx, s, rejectedGeneration(s, 3)); ok {
		t.Fatal("forced refresh allowed before ForcedRefreshInterval")
	}
	env.wantCalls(t, 3)

	// Once the interval has passed, a forced refresh is allowed again.
	env.clk.Advance(time.Second)
	tok, ok, err = tokenNewerThan(ctx, s, rejectedGeneration(s, 3))
	if err != nil || !ok {
		t.Fatalf("TokenNewerThan(3) after the interval = %v, %v", ok, err)
	}
	wantGeneration(t, tok, 4)
	env.wantCalls(t, 4)
	// The hot path serves the forced token, no further refresh.
	if got := mustToken(t, s); got != tok {
		t.Fatal("Token() does not serve the forced refresh's token")
	}
	env.wantCalls(t, 4)
}

// TestEndpointDownBacksOff: a 503 from the token endpoint with an expired
// token fails fast with a transient error, backs off without hammering the
// endpoint, and recovers when the endpoint does.
func TestEndpointDownBacksOff(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	s := env.seededSource(t, "o")
	mustToken(t, s)
	env.fake.SetDown(http.StatusServiceUnavailable)
	env.clk.Advance(time.Hour)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	started := time.Now()
	_, err := s.Token(ctx)
	if took := time.Since(started); took > 5*time.Second {
		t.Fatalf("Token took %v to fail", took)
	}
	e := asError(t, err)
	if e.Kind != Transient || e.Status != http.StatusServiceUnavailable || IsTerminal(err) {
		t.Fatalf("kind %v status %d (%v)", e.Kind, e.Status, err)
	}
	firstBackoff := s.RetryAfter()
	if firstBackoff <= 0 || firstBackoff > 2*time.Second {
		t.Fatalf("RetryAfter %v after the first failure", firstBackoff)
	}
	if st := s.Status(); st.State != "backoff" || st.LastError == "" || !st.NextRefresh.After(env.clk.Now()) ||
		st.NextRefresh.After(env.clk.Now().Add(firstBackoff)) {
		t.Fatalf("Status %+v (RetryAfter %v)", st, firstBackoff)
	}
	for range 50 {
		if _, err := s.Token(ctx); asError(t, err).Kind != Transient {
			t.Fatalf("Token during backoff: %v", err)
		}
	}
	if fakeStats := env.fake.Stats(); fakeStats.RefreshCalls != 2 {
		t.Fatalf("endpoint called %d times, want 2 (seed + one failed attempt)", fakeStats.RefreshCalls)
	}

	// Still down after the backoff: one more call, and a longer backoff.
	env.clk.Advance(firstBackoff)
	if _, err := s.Token(ctx); err == nil {
		t.Fatal("Token succeeded while the endpoint is down")
	}
	if secondBackoff := s.RetryAfter(); secondBackoff <= 1200*time.Millisecond {
		t.Fatalf("backoff did not grow: %v", secondBackoff)
	}
	if fakeStats := env.fake.Stats(); fakeStats.RefreshCalls != 3 {
		t.Fatalf("endpoint called %d times, want 3", fakeStats.RefreshCalls)
	}

	// Recovery.
	env.fake.SetDown(0)
	env.clk.Advance(s.RetryAfter())
	tok := mustToken(t, s)
	wantGeneration(t, tok, 2)
	if st := s.Status(); st.State != "ok" || st.LastError != "" {
		t.Fatalf("Status after recovery %+v", st)
	}
	if rec := env.record(t); rec.Generation != 2 || !env.fake.ValidAccessToken(rec.AccessToken) {
		t.Fatal("recovered pair not persisted")
	}
	if fakeStats := env.fake.Stats(); fakeStats.RefreshCalls != 4 || fakeStats.InvalidGrant != 0 || fakeStats.RefreshOK != 2 {
		t.Fatalf("fake stats %+v", fakeStats)
	}
}

// TestValidTokenServesWhileEndpointDown: a failing proactive refresh does not
// take away a token that is still valid.
func TestValidTokenServesWhileEndpointDown(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	s := env.seededSource(t, "o")
	s.Start()
	first := mustToken(t, s)
	at := clockStart.Add(55 * time.Minute)
	env.clk.waitForWaiter(t, at)

	env.fake.SetDown(http.StatusBadGateway)
	env.clk.AdvanceTo(at)
	eventually(t, "the refresher to back off", func() bool { return s.Status().State == "backoff" })
	if tok := mustToken(t, s); tok != first {
		t.Fatal("the still-valid token is not served")
	}
	if fakeStats := env.fake.Stats(); fakeStats.RefreshCalls != 2 {
		t.Fatalf("fake stats %+v", fakeStats)
	}

	env.fake.SetDown(0)
	retry := s.Status().NextRefresh
	env.clk.waitForWaiter(t, retry)
	env.clk.AdvanceTo(retry)
	eventually(t, "the retried refresh", func() bool { return s.Current().Generation == 2 })
	if fakeStats := env.fake.Stats(); fakeStats.RefreshCalls != 3 || fakeStats.InvalidGrant != 0 {
		t.Fatalf("fake stats %+v", fakeStats)
	}
}

// TestRefreshDetachedFromCaller: a caller giving up mid-refresh does not abort
// the refresh; the rotated pair is still persisted.
func TestRefreshDetachedFromCaller(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{Latency: 300 * time.Millisecond})
	s := env.seededSource(t, "o")

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := s.Token(ctx)
		done <- err
	}()
	// The fake counts a refresh as in flight from its arrival.
	eventually(t, "the refresh to reach the endpoint", func() bool { return env.fake.Stats().MaxConcurrentRefresh == 1 })
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled caller got %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("cancelled caller still waiting")
	}

	// Another caller joins (or follows) the same refresh.
	tok := mustToken(t, s)
	wantGeneration(t, tok, 1)
	env.wantCalls(t, 1)
	if rec := env.record(t); rec == nil || rec.Generation != 1 || rec.AccessToken != tok.AccessToken {
		t.Fatal("the refresh of a cancelled caller was not persisted")
	}
	if !env.fake.ValidAccessToken(tok.AccessToken) {
		t.Fatal("token not live")
	}
}

// TestForcedRefreshNotRefusedByARoundUnderWay: a round that began before
// the forced-refresh interval passed ends after a new 401 asks for a
// refresh. The round's "rate_limited" verdict is not the new request's: the
// round either judges the new 401 by a clock read after it, or leaves it to a
// round begun after the request asked. Both interleavings are held in place:
// the round stopped in its storage read (before it reads the marks) and
// stopped after its verdict (it read the old mark and the old clock).
func TestForcedRefreshNotRefusedByARoundUnderWay(t *testing.T) {
	t.Parallel()
	for _, heldIn := range []string{"storage read", "verdict"} {
		t.Run(heldIn, func(t *testing.T) {
			t.Parallel()
			env := newTestEnv(t, fakerestream.Options{})
			hold := &holdingObserver{}
			cfg := env.config(env.fake.Seed(), "o")
			cfg.Observer = hold
			s := env.source(t, cfg)
			mustToken(t, s)
			ctx := context.Background()
			gen2, ok, err := tokenNewerThan(ctx, s, rejectedGeneration(s, 1))
			if err != nil || !ok {
				t.Fatalf("forced refresh = %v, %v", ok, err)
			}
			wantGeneration(t, gen2, 2)
			if _, ok, _ := tokenNewerThan(ctx, s, gen2); ok {
				t.Fatal("a second 401 within the interval was not rate-limited")
			}
			env.wantCalls(t, 2)

			// Round A begins (a 401 that does not wait) and is held.
			env.clk.Advance(ForcedRefreshInterval - time.Second)
			entered, release := make(chan struct{}), make(chan struct{})
			var once sync.Once
			holdOnce := func() { once.Do(func() { close(entered); <-release }) }
			if heldIn == "storage read" {
				env.st.setOnLoad(func(string) { holdOnce() })
			} else {
				hold.set(holdOnce)
			}
			s.Rejected(gen2)
			waitSignal(t, "round A held in its "+heldIn, entered)

			// The interval passes; a request's 401 asks for the forced refresh.
			env.clk.Advance(2 * time.Second)
			type answer struct {
				tok *Token
				ok  bool
				err error
			}
			answered := make(chan answer, 1)
			go func() {
				tok, ok, err := tokenNewerThan(ctx, s, gen2)
				answered <- answer{tok, ok, err}
			}()
			eventually(t, "the request to wake the refresher", func() bool { return len(s.kick) == 1 })
			close(release)
			got := waitSignal(t, "the forced refresh's answer", answered)
			if got.err != nil || !got.ok {
				t.Fatalf("TokenNewerThan after the interval = %v, %v: a round begun before the 401 refused it", got.ok, got.err)
			}
			wantGeneration(t, got.tok, 3)
			env.wantCalls(t, 3)
		})
	}
}

// holdingObserver runs its hook (once set) when the refresher reports a
// state: a round that decided sends nothing holds there, after its verdict.
type holdingObserver struct {
	nopObserver
	hook atomic.Pointer[func()]
}

func (o *holdingObserver) set(f func()) { o.hook.Store(&f) }

func (o *holdingObserver) StateChanged(string, State) {
	if h := o.hook.Load(); h != nil {
		(*h)()
	}
}
