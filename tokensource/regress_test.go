package tokensource

// Regression tests, through the Source and the strict fake, for defects of
// the earlier protocol in one instance's behaviour. The cross-instance ones
// are in sim_regress_test.go; the Caddy-level ones in caddymodule.

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
)

// A new source (a restart, a reload adding a seed) serves a stored
// token that is due for renewal but still valid, even while the token
// endpoint is down.
func TestDueButValidStoredTokenServedDuringOutage(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	seed := env.fake.Seed()
	a := env.source(t, env.config(seed, "a"))
	first := mustToken(t, a)
	a.Close()
	env.clk.Advance(57 * time.Minute) // due (refresh_ahead 5m), valid for 3 more minutes
	env.fake.SetFault(fakerestream.Fault500)

	b := env.source(t, env.config(seed, "b"))
	tok, err := b.Token(context.Background())
	if err != nil || tok.AccessToken != first.AccessToken {
		t.Fatalf("a due but valid stored token was not served during an outage: %v", err)
	}
}

// Invalid_client is a configuration error of this instance: the
// chain is kept (no dead token stored), the state says misconfigured, and an
// instance with the right secret goes on with the same chain.
func TestInvalidClientKeepsChain(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	seed := env.fake.Seed()
	good := env.source(t, env.config(seed, "good"))
	mustToken(t, good)
	good.Close()
	env.clk.Advance(time.Hour)

	badCfg := env.config(seed, "bad")
	badCfg.ClientSecret = "wrong-secret"
	bad := env.source(t, badCfg)
	_, err := bad.Token(context.Background())
	if e := asError(t, err); e.Kind != Misconfigured || e.Code != "invalid_client" {
		t.Fatalf("kind %v code %q", e.Kind, e.Code)
	}
	if st := bad.Status(); st.State != StateMisconfigured || st.LastResult != ResultInvalidClient || bad.RetryAfter() < time.Minute {
		t.Fatalf("state %q, last result %q, retry after %s", st.State, st.LastResult, bad.RetryAfter())
	}
	// The refusal is an answer, not an unknown outcome: the token is not
	// spent, so neither the lease nor its mark outlives it, and the next
	// refusal is reported as itself again (not as a transient failure
	// resent under a kept mark).
	for round := 1; round <= 2; round++ {
		env.waitLeaseReleased(t, "the lease after invalid_client")
		if l := env.lease(); l.Mark != "" {
			t.Fatalf("round %d: the mark outlived an invalid_client answer: %+v", round, l)
		}
		if round == 2 {
			break
		}
		env.clk.Advance(bad.RetryAfter())
		_, err := bad.Token(context.Background())
		if e := asError(t, err); e.Kind != Misconfigured || e.Unknown {
			t.Fatalf("second refusal: kind %v unknown %v (%s)", e.Kind, e.Unknown, e.Msg)
		}
		if st := bad.Status(); st.LastResult != ResultInvalidClient {
			t.Fatalf("second refusal reported as %q", st.LastResult)
		}
	}
	if rec := env.record(t); len(rec.DeadTokens) != 0 || rec.Generation != 1 {
		t.Fatalf("the chain was marked dead by a wrong secret: %+v", rec.DeadTokens)
	}
	bad.Close()
	again := env.source(t, env.config(seed, "fixed"))
	wantGeneration(t, mustToken(t, again), 2)
	if st := env.fake.Stats(); st.InvalidGrant != 0 {
		t.Fatalf("fake %+v", st)
	}
}

// An upstream that keeps rejecting the token costs no storage
// writes and no timers: the 401 rate limit is decided before any lease.
func TestSteadyRejectionDoesNotChurn(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	s := env.seededSource(t, "o")
	first := mustToken(t, s)
	second, refreshed, err := s.TokenNewerThan(context.Background(), first)
	if err != nil || !refreshed {
		t.Fatalf("first 401: %v", err)
	}
	env.waitLeaseReleased(t, "the refresh's lease to be released")
	var stores atomic.Int64
	env.st.setOnStore(func(string, []byte) error { stores.Add(1); return nil })
	timers := env.clk.pendingFuncs()
	for range 50 {
		if _, _, err := s.TokenNewerThan(context.Background(), second); !errors.Is(err, ErrRejectedAgain) {
			t.Fatalf("a just-refreshed token rejected again: %v", err)
		}
	}
	if n := stores.Load(); n != 0 {
		t.Fatalf("%d storage writes for rate-limited 401s", n)
	}
	if n := env.clk.pendingFuncs(); n != timers {
		t.Fatalf("armed timers grew from %d to %d", timers, n)
	}
	env.wantCalls(t, 2)
}

// The 401 rate limit is per account (it reads the record, so
// another instance honours it), and an operator's refresh does not use it up.
func TestRejectionRateLimitPerAccount(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	seed := env.fake.Seed()
	a := env.source(t, env.config(seed, "a"))
	b := env.source(t, env.config(seed, "b"))
	first := mustToken(t, a)
	second, _, err := a.TokenNewerThan(context.Background(), first)
	if err != nil {
		t.Fatal(err)
	}
	// b never forced a refresh, but the generation was issued for a 401.
	if got, _, err := b.TokenNewerThan(context.Background(), first); err != nil || got.AccessToken != second.AccessToken {
		t.Fatalf("b did not adopt a's pair: %v", err)
	}
	if _, _, err := b.TokenNewerThan(context.Background(), second); !errors.Is(err, ErrRejectedAgain) {
		t.Fatalf("b refreshed again within the interval: %v", err)
	}
	env.clk.Advance(ForcedRefreshInterval)
	// An operator refresh, then a revocation noticed right after it.
	if err := a.Refresh(context.Background()); err != nil {
		t.Fatal(err)
	}
	third := a.Current()
	wantGeneration(t, third, 3)
	fourth, refreshed, err := a.TokenNewerThan(context.Background(), third)
	if err != nil || !refreshed {
		t.Fatalf("a 401 right after an operator refresh was rate-limited: %v", err)
	}
	wantGeneration(t, fourth, 4)
	env.wantCalls(t, 4)
}

// While the served pair lives only in memory, the status says so.
func TestMemoryOnlyPairIsDegraded(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	s := env.seededSource(t, "o")
	mustToken(t, s)
	var broken atomic.Bool
	broken.Store(true)
	env.st.setOnStore(func(key string, _ []byte) error {
		if key == RecordKey(testAccount) && broken.Load() {
			return errors.New("disk full")
		}
		return nil
	})
	env.clk.Advance(time.Hour)
	tok := mustToken(t, s)
	wantGeneration(t, tok, 2)
	if st := s.Status(); st.State != StateDegraded || st.Persisted {
		t.Fatalf("a memory-only pair shows state %q, persisted %v", st.State, st.Persisted)
	}
	broken.Store(false)
	env.clk.Advance(2 * time.Second) // the write's retry
	eventually(t, "the pair to reach storage", func() bool { return s.Status().Persisted })
	if st := s.Status(); st.State != StateOK || env.record(t).AccessToken != tok.AccessToken {
		t.Fatalf("after the write: state %q", st.State)
	}
}

// An answer without a refresh-token expiry leaves it unknown: no
// zero time in logs or status.
func TestUnknownRefreshExpiry(t *testing.T) {
	t.Parallel()
	endpoint := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"access_token":"at_plain_oauth","refresh_token":"rt_plain_oauth_next","token_type":"Bearer","expires_in":3600}`))
	}))
	t.Cleanup(endpoint.Close)
	env := newTestEnv(t, fakerestream.Options{})
	logger, logs := observedLogger(zapcore.DebugLevel)
	cfg := env.config("rt_plain_oauth", "o")
	cfg.TokenURL, cfg.Logger = endpoint.URL, logger
	s := env.source(t, cfg)
	mustToken(t, s)
	if st := s.Status(); !st.RefreshExpiry.IsZero() {
		t.Fatalf("status refresh expiry %v", st.RefreshExpiry)
	}
	// The refresher logs after it publishes: Close waits for its round.
	s.Close()
	entries := logs.FilterMessage("refreshed token pair").All()
	if len(entries) != 1 {
		t.Fatalf("%d refresh log lines", len(entries))
	}
	if _, ok := entries[0].ContextMap()["refresh_expires_at"]; ok {
		t.Fatalf("an unknown refresh expiry is logged: %v", entries[0].ContextMap())
	}
}
