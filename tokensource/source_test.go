package tokensource

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
)

const testAccount = "acct"

// testEnv is one hermetic world: a fake clock, the strict fake Restream
// server running on it, and a file_system storage in a temp dir.
type testEnv struct {
	clk  *fakeClock
	fake *fakerestream.Server
	st   *spyStorage
}

func newTestEnv(t *testing.T, opts fakerestream.Options) *testEnv {
	t.Helper()
	clk := newFakeClock()
	if opts.Now == nil {
		opts.Now = clk.Now
	}
	opts.ClientID, opts.ClientSecret = testClientID, testClientSecret
	fake := fakerestream.New(opts)
	t.Cleanup(fake.Close)
	return &testEnv{clk: clk, fake: fake, st: &spyStorage{FileStorage: &certmagic.FileStorage{Path: t.TempDir()}}}
}

func (e *testEnv) config(seed, owner string) Config {
	return Config{
		Account:      testAccount,
		ClientID:     testClientID,
		ClientSecret: testClientSecret,
		TokenURL:     e.fake.TokenURL(),
		AuthStyle:    AuthBasic,
		Seed:         seed,
		Timeout:      5 * time.Second,
		Storage:      e.st,
		Clock:        e.clk,
		Owner:        owner,
	}
}

// source builds a Source that is closed when the test ends.
func (e *testEnv) source(t *testing.T, cfg Config) *Source {
	t.Helper()
	s, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(s.Close)
	return s
}

func (e *testEnv) record(t *testing.T) *Record {
	t.Helper()
	rec, err := LoadRecord(context.Background(), e.st, testAccount)
	if err != nil {
		t.Fatalf("LoadRecord: %v", err)
	}
	return rec
}

// wantCalls asserts the refresh call count, and that the fake never saw a
// reused refresh token or bad client credentials.
func (e *testEnv) wantCalls(t *testing.T, refreshCalls int64) {
	t.Helper()
	st := e.fake.Stats()
	if st.RefreshCalls != refreshCalls {
		t.Fatalf("token endpoint got %d refresh calls, want %d (stats %+v)", st.RefreshCalls, refreshCalls, st)
	}
	if st.InvalidGrant != 0 || st.InvalidClient != 0 {
		t.Fatalf("token endpoint saw a reused or wrong credential: %+v", st)
	}
}

// revoke kills a pair at the fake, as a user revoking access would.
func (e *testEnv) revoke(t *testing.T, token string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, e.fake.URL()+"/oauth/revoke", strings.NewReader(url.Values{"token": {token}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(testClientID, testClientSecret)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("revoke: %d", res.StatusCode)
	}
}

// spyStorage is the real file_system storage with optional hooks to watch
// (or break) individual operations.
type spyStorage struct {
	*certmagic.FileStorage
	onStore atomic.Pointer[func(key string, value []byte) error]
	onLoad  atomic.Pointer[func(key string)]
	onLock  atomic.Pointer[func(name string)]
}

func (s *spyStorage) Lock(ctx context.Context, name string) error {
	if h := s.onLock.Load(); h != nil {
		(*h)(name)
	}
	return s.FileStorage.Lock(ctx, name)
}

func (s *spyStorage) Store(ctx context.Context, key string, value []byte) error {
	if h := s.onStore.Load(); h != nil {
		if err := (*h)(key, value); err != nil {
			return err
		}
	}
	return s.FileStorage.Store(ctx, key, value)
}

func (s *spyStorage) Load(ctx context.Context, key string) ([]byte, error) {
	if h := s.onLoad.Load(); h != nil {
		(*h)(key)
	}
	return s.FileStorage.Load(ctx, key)
}

func (s *spyStorage) setOnStore(f func(key string, value []byte) error) { s.onStore.Store(&f) }
func (s *spyStorage) setOnLoad(f func(key string))                      { s.onLoad.Store(&f) }
func (s *spyStorage) setOnLock(f func(name string))                     { s.onLock.Store(&f) }

// gateTransport holds each token request until the test lets it through.
type gateTransport struct {
	entered chan struct{}
	release chan struct{}
}

func (g *gateTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	g.entered <- struct{}{}
	<-g.release
	return http.DefaultTransport.RoundTrip(r)
}

// eventually polls cond, for conditions reached in another goroutine that
// signals nothing; it fails the test after a real-time bound.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func mustToken(t *testing.T, s *Source) *Token {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tok, err := s.Token(ctx)
	if err != nil {
		t.Fatalf("Token: %v", err)
	}
	return tok
}

func wantGeneration(t *testing.T, tok *Token, gen uint64) {
	t.Helper()
	if tok == nil || tok.Generation != gen {
		var got any = "nil"
		if tok != nil {
			got = tok.Generation
		}
		t.Fatalf("token generation %v, want %d", got, gen)
	}
}

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

func TestSeedExchangedOnFirstAttempt(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	seedAccess, seed := env.fake.SeedPair()
	s := env.source(t, env.config(seed, "o"))

	tok := mustToken(t, s)
	wantGeneration(t, tok, 1)
	env.wantCalls(t, 1)
	if !env.fake.ValidAccessToken(tok.AccessToken) || env.fake.ValidAccessToken(seedAccess) {
		t.Fatal("the token handed out is not the live one")
	}
	if tok.Authorization() != "Bearer "+tok.AccessToken || tok.TokenType != "Bearer" {
		t.Fatalf("Authorization %q TokenType %q", tok.Authorization(), tok.TokenType)
	}
	if want := env.clk.Now().Add(time.Hour); !tok.Expiry.Equal(want) || !tok.IssuedAt.Equal(env.clk.Now()) {
		t.Fatalf("Expiry %v IssuedAt %v", tok.Expiry, tok.IssuedAt)
	}
	if !slices.Equal(tok.Scope, strings.Fields(fakerestream.Scope)) {
		t.Fatalf("Scope %q", tok.Scope)
	}

	rec := env.record(t)
	switch {
	case rec == nil:
		t.Fatal("nothing persisted")
	case rec.Generation != 1:
		t.Fatalf("stored generation %d", rec.Generation)
	case !slices.Equal(rec.ConsumedSeeds, []string{Fingerprint(seed)}):
		t.Fatalf("consumed_seeds %q, want the seed's fingerprint", rec.ConsumedSeeds)
	case rec.RefreshToken == seed || rec.RefreshToken == "":
		t.Fatalf("stored refresh token is not the NEW one")
	case rec.AccessToken != tok.AccessToken:
		t.Fatal("stored access token differs from the published one")
	}
	raw, err := env.st.FileStorage.Load(context.Background(), RecordKey(testAccount))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(raw), seed) {
		t.Fatal("the spent seed itself is stored")
	}
	if !strings.Contains(string(raw), `"consumed_seeds"`) || !strings.Contains(string(raw), Fingerprint(seed)) {
		t.Fatalf("record JSON lacks the consumed seed: %s", raw)
	}

	st := s.Status()
	if st.State != "ok" || st.Generation != 1 || st.LastResult != "ok" || !st.LastRefresh.Equal(env.clk.Now()) ||
		!st.AccessExpiry.Equal(tok.Expiry) || !st.NextRefresh.Equal(tok.Expiry.Add(-DefaultRefreshAhead)) || st.LastError != "" {
		t.Fatalf("Status %+v", st)
	}
	if strings.Contains(fmt.Sprintf("%+v", st), tok.AccessToken) {
		t.Fatal("Status carries the access token")
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
	eventually(t, "the seed exchange's lease to be released", func() bool {
		b, err := env.st.FileStorage.Load(context.Background(), LeaseKey(testAccount))
		return err == nil && strings.Contains(string(b), `"owner":""`)
	})
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
	s := env.source(t, env.config(env.fake.Seed(), "o"))
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
	s := env.source(t, env.config(env.fake.Seed(), "o"))
	s.Start()
	mustToken(t, s)
	env.clk.waitForWaiter(t, clockStart.Add(55*time.Minute))
	s.Close()
	s.Close() // idempotent
	env.clk.Advance(2 * time.Hour)
	env.wantCalls(t, 1) // Close waited for the refresher: nothing can run any more
	wantGeneration(t, s.Current(), 1)
}

// TestRestartAdoptsStoredChain: a restarted process keeps the original
// (now spent) seed in its configuration; it must use the stored chain and
// never send the seed again.
func TestRestartAdoptsStoredChain(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	seed := env.fake.Seed()
	a := env.source(t, env.config(seed, "first-process"))
	tokA := mustToken(t, a)
	a.Close()

	// Restart while the stored token is still good: adopt it, no call at all.
	b := env.source(t, env.config(seed, "second-process"))
	tokB := mustToken(t, b)
	wantGeneration(t, tokB, 1)
	if tokB.AccessToken != tokA.AccessToken {
		t.Fatal("restart did not adopt the stored token")
	}
	env.wantCalls(t, 1)
	if st := b.Status(); st.LastResult != "adopted" || st.State != "ok" {
		t.Fatalf("Status %+v", st)
	}

	// When it is due, the stored refresh token (not the seed) is used.
	env.clk.Advance(time.Hour)
	wantGeneration(t, mustToken(t, b), 2)
	env.wantCalls(t, 2)
	b.Close()

	// Restart again with the stored token already expired, and with the
	// refresher running.
	env.clk.Advance(2 * time.Hour)
	c := env.source(t, env.config(seed, "third-process"))
	c.Start()
	wantGeneration(t, mustToken(t, c), 3)
	env.wantCalls(t, 2+1)
	rec := env.record(t)
	if rec.Generation != 3 || !slices.Equal(rec.ConsumedSeeds, []string{Fingerprint(seed)}) {
		t.Fatalf("record generation %d consumed %q", rec.Generation, rec.ConsumedSeeds)
	}
}

// TestNewSeedStartsNewChain: a never-seen seed wins over a stored chain, even
// a valid one, and generations keep growing.
func TestNewSeedStartsNewChain(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	seed1 := env.fake.Seed()
	a := env.source(t, env.config(seed1, "o1"))
	mustToken(t, a)
	env.clk.Advance(time.Hour)
	old := mustToken(t, a)
	wantGeneration(t, old, 2)
	a.Close()

	seed2 := env.fake.Seed()
	b := env.source(t, env.config(seed2, "o2"))
	tok := mustToken(t, b)
	wantGeneration(t, tok, 3)
	env.wantCalls(t, 3)
	if tok.AccessToken == old.AccessToken || !env.fake.ValidAccessToken(tok.AccessToken) {
		t.Fatal("the new seed was not exchanged")
	}
	rec := env.record(t)
	if rec.Generation != 3 || !slices.Equal(rec.ConsumedSeeds, []string{Fingerprint(seed1), Fingerprint(seed2)}) {
		t.Fatalf("record generation %d consumed %q", rec.Generation, rec.ConsumedSeeds)
	}

	// Restarting with the first seed configured again must not resend it
	// either: it is in the consumed list, so the stored chain is used.
	b.Close()
	c := env.source(t, env.config(seed1, "o3"))
	if got := mustToken(t, c); got.AccessToken != tok.AccessToken {
		t.Fatal("did not adopt the stored chain")
	}
	env.clk.Advance(time.Hour)
	wantGeneration(t, mustToken(t, c), 4)
	env.wantCalls(t, 4)
}

func TestConsumedSeedsBounded(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	var seeds []string
	for i := range maxConsumedSeeds + 3 {
		seed := env.fake.Seed()
		seeds = append(seeds, Fingerprint(seed))
		s := env.source(t, env.config(seed, fmt.Sprint("o", i)))
		wantGeneration(t, mustToken(t, s), uint64(i+1))
		s.Close()
	}
	rec := env.record(t)
	if want := seeds[len(seeds)-maxConsumedSeeds:]; !slices.Equal(rec.ConsumedSeeds, want) {
		t.Fatalf("consumed_seeds has %d entries, want the newest %d", len(rec.ConsumedSeeds), maxConsumedSeeds)
	}
	env.wantCalls(t, int64(len(seeds)))
}

// TestPersistBeforeUse: the new pair is in storage before anyone can get it,
// and what is stored is always what is published.
func TestPersistBeforeUse(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	var src atomic.Pointer[Source]
	var checked atomic.Int64
	env.st.setOnStore(func(key string, value []byte) error {
		if key != RecordKey(testAccount) {
			return nil
		}
		var rec Record
		if err := json.Unmarshal(value, &rec); err != nil {
			t.Errorf("storing an unreadable record: %v", err)
			return nil
		}
		if s := src.Load(); s != nil {
			if cur := s.Current(); cur != nil && cur.Generation >= rec.Generation {
				t.Errorf("generation %d was published before it was stored", rec.Generation)
			}
		}
		checked.Add(1)
		return nil
	})
	s := env.source(t, env.config(env.fake.Seed(), "o"))
	src.Store(s)
	s.Start()
	for gen := uint64(1); gen <= 6; gen++ {
		if gen > 1 {
			env.clk.Advance(time.Hour)
		}
		tok := mustToken(t, s)
		wantGeneration(t, tok, gen)
		rec := env.record(t)
		if rec.Generation != s.Current().Generation || rec.AccessToken != s.Current().AccessToken {
			t.Fatalf("stored generation %d, published %d", rec.Generation, s.Current().Generation)
		}
		if !env.fake.ValidAccessToken(rec.AccessToken) {
			t.Fatal("stored pair is not the live one")
		}
	}
	if checked.Load() != 6 {
		t.Fatalf("%d record writes, want 6", checked.Load())
	}
	env.wantCalls(t, 6)
}

// TestSourcesSharingStorage: two processes (different owners) on one storage,
// both needing a new token at the same moment, round after round. The strict
// fake counts any reuse of a rotated refresh token and any overlap.
func TestSourcesSharingStorage(t *testing.T) {
	t.Parallel()
	// The latency outlasts file_system's 1 s lock poll, so the replica that
	// loses the race for the storage lock finds the other one mid-refresh.
	env := newTestEnv(t, fakerestream.Options{Latency: 1100 * time.Millisecond})
	seed := env.fake.Seed()
	sources := []*Source{
		env.source(t, env.config(seed, "replica-a")),
		env.source(t, env.config(seed, "replica-b")),
	}
	for _, s := range sources {
		s.Start() // the refreshers join in too
	}
	env.clk.runRealtime(t) // the replica that loses the lease polls it on the clock
	const rounds, callers = 4, 20
	for round := uint64(1); round <= rounds; round++ {
		if round > 1 {
			env.clk.Advance(time.Hour) // every token is expired now
		}
		start := make(chan struct{})
		var wg sync.WaitGroup
		toks := make([][]*Token, len(sources))
		errs := make(chan error, len(sources)*callers)
		for i, s := range sources {
			toks[i] = make([]*Token, callers)
			for j := range callers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
					defer cancel()
					tok, err := s.Token(ctx)
					if err != nil {
						errs <- err
					}
					toks[i][j] = tok
				}()
			}
		}
		close(start)
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatalf("round %d: Token: %v", round, err)
		}
		want := toks[0][0]
		for i := range toks {
			for _, tok := range toks[i] {
				if tok.Generation != round || tok.AccessToken != want.AccessToken {
					t.Fatalf("round %d: replica %d got generation %d, want %d, one token for all", round, i, tok.Generation, round)
				}
			}
		}
		if !env.fake.ValidAccessToken(want.AccessToken) {
			t.Fatalf("round %d: the shared token is not live", round)
		}
		if rec := env.record(t); rec.Generation != round {
			t.Fatalf("round %d: stored generation %d", round, rec.Generation)
		}
	}
	st := env.fake.Stats()
	if st.InvalidGrant != 0 || st.MaxConcurrentRefresh != 1 || st.RefreshOK != rounds || st.RefreshCalls != rounds {
		t.Fatalf("fake stats %+v: want no invalid_grant, no overlap, exactly one refresh per round", st)
	}
}

func TestSingleFlight(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{Latency: 50 * time.Millisecond})
	s := env.source(t, env.config(env.fake.Seed(), "o"))
	first := mustToken(t, s)
	env.clk.Advance(time.Hour)
	if first.ValidAt(env.clk.Now()) {
		t.Fatal("token should be expired")
	}

	const n = 1000
	start := make(chan struct{})
	var wg sync.WaitGroup
	var failed atomic.Int64
	toks := make([]*Token, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			tok, err := s.Token(context.Background())
			if err != nil {
				failed.Add(1)
			}
			toks[i] = tok
		}()
	}
	close(start)
	wg.Wait()
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
	s := env.source(t, env.config(env.fake.Seed(), "o"))
	mustToken(t, s)
	env.clk.Advance(time.Hour)
	gen2 := mustToken(t, s)
	wantGeneration(t, gen2, 2)
	env.wantCalls(t, 2)
	ctx := context.Background()

	// A request that carried generation 1 got a 401: generation 2 exists, use it.
	tok, _, ok, err := tokenNewerThan(s, ctx, rej(s, 1))
	if err != nil || !ok || tok != gen2 {
		t.Fatalf("TokenNewerThan(1) = gen %v, %v, %v; want the existing generation 2", tok.Generation, ok, err)
	}
	env.wantCalls(t, 2)

	// The current generation was rejected: exactly one forced refresh, shared.
	const n = 100
	start := make(chan struct{})
	var wg sync.WaitGroup
	results := make([]*Token, n)
	var bad atomic.Int64
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			tok, _, ok, err := tokenNewerThan(s, ctx, rej(s, 2))
			if err != nil || !ok {
				bad.Add(1)
			}
			results[i] = tok
		}()
	}
	close(start)
	wg.Wait()
	if bad.Load() != 0 {
		t.Fatalf("%d callers got no newer token", bad.Load())
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
	tok, _, ok, err = tokenNewerThan(s, ctx, rej(s, 3))
	if err != nil || ok {
		t.Fatalf("rate-limited TokenNewerThan(3) = %v, %v", ok, err)
	}
	wantGeneration(t, tok, 3)
	env.wantCalls(t, 3)
	if st := s.Status(); st.LastResult != "rate_limited" {
		t.Fatalf("LastResult %q", st.LastResult)
	}
	env.clk.Advance(ForcedRefreshInterval - time.Second)
	if _, _, ok, _ := tokenNewerThan(s, ctx, rej(s, 3)); ok {
		t.Fatal("forced refresh allowed before ForcedRefreshInterval")
	}
	env.wantCalls(t, 3)

	// Once the interval has passed, a forced refresh is allowed again.
	env.clk.Advance(time.Second)
	tok, _, ok, err = tokenNewerThan(s, ctx, rej(s, 3))
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

// TestForcedRefreshAdoptsOtherReplicasPair: a 401 on one replica when
// another replica has already rotated is answered from storage.
func TestForcedRefreshAdoptsOtherReplicasPair(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	seed := env.fake.Seed()
	a := env.source(t, env.config(seed, "a"))
	b := env.source(t, env.config(seed, "b"))
	wantGeneration(t, mustToken(t, a), 1)
	wantGeneration(t, mustToken(t, b), 1)
	env.wantCalls(t, 1)

	// a's upstream rejected generation 1; a rotates.
	if tok, _, ok, err := tokenNewerThan(a, context.Background(), rej(a, 1)); err != nil || !ok || tok.Generation != 2 {
		t.Fatalf("a: %v %v", ok, err)
	}
	env.wantCalls(t, 2)
	// b still holds generation 1, now dead; its 401 must not rotate again.
	tok, _, ok, err := tokenNewerThan(b, context.Background(), rej(b, 1))
	if err != nil || !ok {
		t.Fatalf("b: %v %v", ok, err)
	}
	wantGeneration(t, tok, 2)
	env.wantCalls(t, 2)
	if !env.fake.ValidAccessToken(tok.AccessToken) {
		t.Fatal("b did not get the live token")
	}
}

// TestInvalidGrantIsTerminal: a dead chain stops all use of its refresh
// token; only a new chain (in storage) can revive the account.
func TestInvalidGrantIsTerminal(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	seed := env.fake.Seed()
	s := env.source(t, env.config(seed, "o"))
	mustToken(t, s)
	dead := env.record(t).RefreshToken
	env.revoke(t, dead) // e.g. the user revoked the app

	env.clk.Advance(time.Hour)
	_, err := s.Token(context.Background())
	e := asError(t, err)
	if e.Kind != Terminal || e.Code != "invalid_grant" || !IsTerminal(err) {
		t.Fatalf("Token: kind %v code %q (%v)", e.Kind, e.Code, err)
	}
	if !strings.Contains(e.Msg, testAccount) || !strings.Contains(e.Msg, "re-authorize") {
		t.Fatalf("error does not tell what to do: %s", e.Msg)
	}
	assertNoSecrets(t, e.Msg, dead, seed)
	st := s.Status()
	if st.State != "reauth_required" || st.LastError == "" || st.LastResult != "invalid_grant" {
		t.Fatalf("Status %+v", st)
	}
	assertNoSecrets(t, st.LastError, dead)
	if ra := s.RetryAfter(); ra != ReauthPollInterval {
		t.Fatalf("RetryAfter %v, want %v", ra, ReauthPollInterval)
	}
	if fs := env.fake.Stats(); fs.RefreshCalls != 2 || fs.InvalidGrant != 1 {
		t.Fatalf("fake stats %+v", fs)
	}

	// Later attempts, from callers and from the refresher, never resend the
	// dead refresh token.
	for range 3 {
		if _, err := s.Token(context.Background()); !IsTerminal(err) {
			t.Fatalf("Token: %v", err)
		}
		if _, _, ok, err := tokenNewerThan(s, context.Background(), rej(s, 1)); ok || !IsTerminal(err) {
			t.Fatalf("TokenNewerThan: %v %v", ok, err)
		}
		env.clk.Advance(ReauthPollInterval)
	}
	s.Start() // its first attempt is due at once
	for range 3 {
		next := env.clk.Now().Add(ReauthPollInterval)
		env.clk.waitForWaiter(t, next) // it tried and went back to sleep
		env.clk.AdvanceTo(next)
	}
	env.clk.waitForWaiter(t, env.clk.Now().Add(ReauthPollInterval))
	if fs := env.fake.Stats(); fs.RefreshCalls != 2 || fs.InvalidGrant != 1 {
		t.Fatalf("the dead refresh token was sent again: %+v", fs)
	}
	if st := s.Status(); st.State != "reauth_required" {
		t.Fatalf("State %q", st.State)
	}

	// Another instance starts a new chain from a new seed; this one picks it
	// up at its next poll, without any call of its own.
	other := env.source(t, env.config(env.fake.Seed(), "other"))
	fresh := mustToken(t, other)
	wantGeneration(t, fresh, 2)
	env.clk.Advance(ReauthPollInterval)
	tok := mustToken(t, s)
	if tok.AccessToken != fresh.AccessToken {
		t.Fatal("did not adopt the new chain")
	}
	// The refresher's own poll may run just after; wait until it sleeps
	// until the new token's renewal.
	env.clk.waitForWaiter(t, tok.Expiry.Add(-DefaultRefreshAhead))
	if st := s.Status(); st.State != "ok" || st.LastError != "" {
		t.Fatalf("Status after recovery %+v", st)
	}
	if fs := env.fake.Stats(); fs.RefreshCalls != 3 || fs.InvalidGrant != 1 {
		t.Fatalf("fake stats %+v", fs)
	}
}

func TestSpentSeedIsTerminal(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	s := env.source(t, env.config("rt_never_issued_by_restream", "o"))
	_, err := s.Token(context.Background())
	if e := asError(t, err); e.Kind != Terminal || e.Code != "invalid_grant" {
		t.Fatalf("kind %v code %q", e.Kind, e.Code)
	}
	assertNoSecrets(t, err.Error(), "rt_never_issued_by_restream")
	for range 3 {
		env.clk.Advance(ReauthPollInterval)
		if _, err := s.Token(context.Background()); !IsTerminal(err) {
			t.Fatalf("Token: %v", err)
		}
	}
	if fs := env.fake.Stats(); fs.RefreshCalls != 1 || fs.InvalidGrant != 1 {
		t.Fatalf("a rejected seed was sent again: %+v", fs)
	}
	// Only the dead seed's fingerprint is stored (I6), so a restart with the
	// same configuration does not send it again either.
	if rec := env.record(t); rec == nil || rec.HasPair() || !slices.Equal(rec.DeadTokens, []string{Fingerprint("rt_never_issued_by_restream")}) {
		t.Fatalf("stored record %+v", rec)
	}
	if st := s.Status(); st.State != "reauth_required" {
		t.Fatalf("State %q", st.State)
	}
	s.Close()
	again := env.source(t, env.config("rt_never_issued_by_restream", "restarted"))
	if _, err := again.Token(context.Background()); !IsTerminal(err) {
		t.Fatalf("after a restart: %v", err)
	}
	if fs := env.fake.Stats(); fs.RefreshCalls != 1 {
		t.Fatalf("a restart sent the dead seed again: %+v", fs)
	}
}

func TestNoChain(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	s := env.source(t, env.config("", "o"))
	_, err := s.Token(context.Background())
	if e := asError(t, err); e.Kind != NoChain || IsTerminal(err) {
		t.Fatalf("kind %v (%v)", e.Kind, err)
	}
	if st := s.Status(); st.State != "no_chain" {
		t.Fatalf("State %q", st.State)
	}
	env.wantCalls(t, 0)
	// A chain installed by another instance is picked up at the next poll.
	other := env.source(t, env.config(env.fake.Seed(), "other"))
	want := mustToken(t, other)
	env.clk.Advance(ReauthPollInterval)
	if tok := mustToken(t, s); tok.AccessToken != want.AccessToken {
		t.Fatal("did not adopt the stored chain")
	}
	env.wantCalls(t, 1)
}

// TestEndpointDownBacksOff: a 503 from the token endpoint with an expired
// token fails fast with a transient error, backs off without hammering the
// endpoint, and recovers when the endpoint does.
func TestEndpointDownBacksOff(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	s := env.source(t, env.config(env.fake.Seed(), "o"))
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
	ra1 := s.RetryAfter()
	if ra1 <= 0 || ra1 > 2*time.Second {
		t.Fatalf("RetryAfter %v after the first failure", ra1)
	}
	if st := s.Status(); st.State != "backoff" || st.LastError == "" || !st.NextRefresh.After(env.clk.Now()) ||
		st.NextRefresh.After(env.clk.Now().Add(ra1)) {
		t.Fatalf("Status %+v (RetryAfter %v)", st, ra1)
	}
	for range 50 {
		if _, err := s.Token(ctx); asError(t, err).Kind != Transient {
			t.Fatalf("Token during backoff: %v", err)
		}
	}
	if fs := env.fake.Stats(); fs.RefreshCalls != 2 {
		t.Fatalf("endpoint called %d times, want 2 (seed + one failed attempt)", fs.RefreshCalls)
	}

	// Still down after the backoff: one more call, and a longer backoff.
	env.clk.Advance(ra1)
	if _, err := s.Token(ctx); err == nil {
		t.Fatal("Token succeeded while the endpoint is down")
	}
	if ra2 := s.RetryAfter(); ra2 <= 1200*time.Millisecond {
		t.Fatalf("backoff did not grow: %v", ra2)
	}
	if fs := env.fake.Stats(); fs.RefreshCalls != 3 {
		t.Fatalf("endpoint called %d times, want 3", fs.RefreshCalls)
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
	if fs := env.fake.Stats(); fs.RefreshCalls != 4 || fs.InvalidGrant != 0 || fs.RefreshOK != 2 {
		t.Fatalf("fake stats %+v", fs)
	}
}

// TestValidTokenServesWhileEndpointDown: a failing proactive refresh does not
// take away a token that is still valid.
func TestValidTokenServesWhileEndpointDown(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	s := env.source(t, env.config(env.fake.Seed(), "o"))
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
	if fs := env.fake.Stats(); fs.RefreshCalls != 2 {
		t.Fatalf("fake stats %+v", fs)
	}

	env.fake.SetDown(0)
	retry := s.Status().NextRefresh
	env.clk.waitForWaiter(t, retry)
	env.clk.AdvanceTo(retry)
	eventually(t, "the retried refresh", func() bool { return s.Current().Generation == 2 })
	if fs := env.fake.Stats(); fs.RefreshCalls != 3 || fs.InvalidGrant != 0 {
		t.Fatalf("fake stats %+v", fs)
	}
}

// TestRefreshDetachedFromCaller: a caller giving up mid-refresh does not abort
// the refresh; the rotated pair is still persisted.
func TestRefreshDetachedFromCaller(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{Latency: 300 * time.Millisecond})
	s := env.source(t, env.config(env.fake.Seed(), "o"))

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

func TestCorruptStoredRecord(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	key := RecordKey(testAccount)
	for _, tc := range []struct {
		name, body, want string
	}{
		{"garbage", "\x00\x01not json at all", "corrupt"},
		{"truncated", `{"version":1,"generation":4,"access_token":"at_`, "corrupt"},
		{"empty", "", "corrupt"},
		{"future version", `{"version":99,"generation":4,"access_token":"a","refresh_token":"r","access_expires_at":"2030-01-01T00:00:00Z"}`, "version 99"},
		{"incomplete", `{"version":1,"generation":4,"access_token":"a","access_expires_at":"2030-01-01T00:00:00Z"}`, "incomplete"},
		{"wrong types", `{"version":"1","generation":-4}`, "corrupt"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			env := newTestEnv(t, fakerestream.Options{})
			if err := env.st.Store(ctx, key, []byte(tc.body)); err != nil {
				t.Fatal(err)
			}
			rec, err := LoadRecord(ctx, env.st, testAccount)
			if rec != nil || err == nil || !strings.Contains(err.Error(), key) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("LoadRecord = %v, %v; want an error naming %s and saying %q", rec, err, key, tc.want)
			}

			// A Source without a seed reports it (naming the key), no panic, no call.
			core, logs := observer.New(zapcore.ErrorLevel)
			cfg := env.config("", "o")
			cfg.Logger = zap.New(core)
			s := env.source(t, cfg)
			_, err = s.Token(ctx)
			if err == nil || !strings.Contains(err.Error(), key) {
				t.Fatalf("Token on a corrupt record: %v; want an error naming %s", err, key)
			}
			if st := s.Status(); !strings.Contains(st.LastError, key) {
				t.Fatalf("Status.LastError %q does not name %s", st.LastError, key)
			}
			if logs.FilterMessage("stored token record is unusable").Len() == 0 {
				t.Fatal("the corrupt record was not logged")
			}
			env.wantCalls(t, 0)

			// A fresh seed does not overwrite it (I5: it may be a record this
			// configuration cannot read) and is not spent; once the operator
			// deletes the record, the seed starts the chain.
			seed := env.fake.Seed()
			s2 := env.source(t, env.config(seed, "o2"))
			if _, err := s2.Token(ctx); err == nil || !strings.Contains(err.Error(), "fix or delete") {
				t.Fatalf("a seed over a corrupt record: %v", err)
			}
			env.wantCalls(t, 0)
			s2.Close()
			if err := env.st.Delete(ctx, key); err != nil {
				t.Fatal(err)
			}
			s3 := env.source(t, env.config(seed, "o3"))
			wantGeneration(t, mustToken(t, s3), 1)
			env.wantCalls(t, 1)
		})
	}
}

// TestDeadOwnersLeaseDelaysRefresh: a lease left by a crashed process holds
// refreshes back until this process has seen it unchanged for its TTL; a
// request does not wait with it (item 18): it gets an error after Timeout,
// and the refresh goes on in the background.
func TestDeadOwnersLeaseDelaysRefresh(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	s := env.source(t, env.config(env.fake.Seed(), "alive"))
	mustToken(t, s)
	leaseKey := LeaseKey(testAccount)
	var l leaseRecord
	var raw []byte
	eventually(t, "the seed exchange's lease to be released", func() bool {
		var err error
		raw, err = env.st.FileStorage.Load(context.Background(), leaseKey)
		return err == nil && json.Unmarshal(raw, &l) == nil && l.Owner == ""
	})
	lease, _ := json.Marshal(leaseRecord{Owner: "crashed", Nonce: "n", TTLMillis: 30_000})
	if err := env.st.Store(context.Background(), leaseKey, lease); err != nil {
		t.Fatal(err)
	}
	env.clk.Advance(time.Hour) // the pair is expired now
	sighted := env.clk.Now()
	env.clk.waitForWaiter(t, sighted.Add(leasePoll))
	if st := s.Status(); st.State != "refreshing" {
		t.Fatalf("State %q while waiting for the lease", st.State)
	}

	done := make(chan error, 1)
	go func() {
		_, err := s.Token(context.Background())
		done <- err
	}()
	env.clk.waitForWaiter(t, env.clk.Now().Add(5*time.Second)) // the request's wait bound
	env.clk.Advance(5 * time.Second)
	select {
	case err := <-done:
		if e := asError(t, err); e.Kind != Transient || !strings.Contains(e.Msg, "refresh lease") {
			t.Fatalf("Token while a live lease is held: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Token waited past its bound while another instance holds the lease")
	}
	env.wantCalls(t, 1)

	env.clk.AdvanceTo(sighted.Add(29 * time.Second))
	env.clk.waitForWaiter(t, sighted.Add(29*time.Second).Add(leasePoll))
	env.wantCalls(t, 1)
	env.clk.AdvanceTo(sighted.Add(30 * time.Second)) // seen unchanged for its TTL
	wantGeneration(t, mustToken(t, s), 2)
	env.wantCalls(t, 2)
	eventually(t, "the lease to be released after the refresh", func() bool {
		var after leaseRecord
		raw, _ = env.st.FileStorage.Load(context.Background(), leaseKey)
		return json.Unmarshal(raw, &after) == nil && after.Owner == "" && after.Mark == ""
	})
}

// TestUnpersistedPairIsNeverBypassed: when the new pair could not be written,
// it lives only in memory and the stored pair is already spent. No refresh may
// start from the stored pair; the in-memory pair must reach storage first.
func TestUnpersistedPairIsNeverBypassed(t *testing.T) {
	t.Parallel()
	breakRecordWrites := func(env *testEnv, broken *atomic.Bool, failures *atomic.Int64) {
		env.st.setOnStore(func(key string, _ []byte) error {
			if key == RecordKey(testAccount) && broken.Load() {
				failures.Add(1)
				return errors.New("disk full")
			}
			return nil
		})
	}

	t.Run("token expiry", func(t *testing.T) {
		t.Parallel()
		env := newTestEnv(t, fakerestream.Options{})
		var broken atomic.Bool
		var failures atomic.Int64
		breakRecordWrites(env, &broken, &failures)
		s := env.source(t, env.config(env.fake.Seed(), "o"))
		mustToken(t, s)

		broken.Store(true)
		env.clk.Advance(time.Hour)
		gen2 := mustToken(t, s) // served from memory
		wantGeneration(t, gen2, 2)
		if rec := env.record(t); rec.Generation != 1 {
			t.Fatalf("stored generation %d", rec.Generation)
		}

		// Storage still broken when generation 2 expires: no refresh at all.
		env.clk.Advance(time.Hour)
		if _, err := s.Token(context.Background()); asError(t, err).Kind != Transient {
			t.Fatalf("Token: %v", err)
		}
		env.wantCalls(t, 2)

		// Storage healed: generation 2 is written, then refreshed.
		broken.Store(false)
		env.clk.Advance(s.RetryAfter())
		wantGeneration(t, mustToken(t, s), 3)
		env.wantCalls(t, 3)
		if rec := env.record(t); rec.Generation != 3 {
			t.Fatalf("stored generation %d", rec.Generation)
		}
	})

	t.Run("forced refresh while the refresher backs off", func(t *testing.T) {
		t.Parallel()
		env := newTestEnv(t, fakerestream.Options{})
		var broken atomic.Bool
		var failures atomic.Int64
		breakRecordWrites(env, &broken, &failures)
		s := env.source(t, env.config(env.fake.Seed(), "o"))
		s.Start()
		mustToken(t, s)
		at := clockStart.Add(55 * time.Minute)
		env.clk.waitForWaiter(t, at)

		broken.Store(true)
		env.clk.AdvanceTo(at) // proactive refresh: generation 2, write fails, retry fails
		eventually(t, "the refresh and one retried write", func() bool {
			env.clk.Advance(100 * time.Millisecond) // to the write's retry
			return failures.Load() >= 2
		})
		wantGeneration(t, s.Current(), 2)

		// Storage heals, but the refresher sleeps in its backoff; an upstream
		// rejects generation 2 meanwhile.
		broken.Store(false)
		tok, _, ok, err := tokenNewerThan(s, context.Background(), rej(s, 2))
		if err != nil || !ok {
			t.Fatalf("TokenNewerThan: %v %v (fake %+v)", ok, err, env.fake.Stats())
		}
		wantGeneration(t, tok, 3)
		env.wantCalls(t, 3)
		if rec := env.record(t); rec.Generation != 3 || rec.AccessToken != tok.AccessToken {
			t.Fatalf("stored generation %d", rec.Generation)
		}
	})
}

// TestLeaseWaiterAdoptsHoldersPair: a process waiting for another's lease
// takes the holder's new pair as soon as it is stored, without waiting for
// the lease to be released, and without a call of its own.
func TestLeaseWaiterAdoptsHoldersPair(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	seed := env.fake.Seed()
	aCfg := env.config(seed, "waiter")
	aCfg.RefreshAhead = time.Minute
	a := env.source(t, aCfg)
	mustToken(t, a)
	eventually(t, "a to release its lease", func() bool {
		var l leaseRecord
		raw, err := env.st.FileStorage.Load(context.Background(), LeaseKey(testAccount))
		return err == nil && json.Unmarshal(raw, &l) == nil && l.Owner == ""
	})

	// b shares the directory through its own storage value; its token call
	// and the release of its lease are held until the test says so.
	bStorage := &spyStorage{FileStorage: &certmagic.FileStorage{Path: env.st.Path}}
	gate := &gateTransport{entered: make(chan struct{}, 1), release: make(chan struct{})}
	bCfg := env.config(seed, "holder")
	bCfg.Storage = bStorage
	bCfg.HTTPClient = &http.Client{Transport: gate}
	bCfg.RefreshAhead = 10 * time.Minute
	b := env.source(t, bCfg)
	var stored atomic.Bool
	bStorage.setOnStore(func(key string, _ []byte) error {
		if key == RecordKey(testAccount) {
			stored.Store(true)
		}
		return nil
	})
	releaseLock := make(chan struct{})
	bStorage.setOnLock(func(string) {
		if stored.Load() { // the lock taken to release the lease
			<-releaseLock
		}
	})
	var releaseOnce, gateOnce sync.Once
	unblock := func() { releaseOnce.Do(func() { close(releaseLock) }) }
	openGate := func() { gateOnce.Do(func() { close(gate.release) }) }
	t.Cleanup(unblock)
	t.Cleanup(openGate)

	start := env.clk.Now()
	env.clk.Advance(50 * time.Minute) // due for b, not for a
	b.Start()
	select {
	case <-gate.entered: // b holds the lease and is calling the endpoint
	case <-time.After(10 * time.Second):
		t.Fatal("b never called the token endpoint")
	}
	env.clk.AdvanceTo(start.Add(59 * time.Minute)) // now due for a
	env.clk.waitForWaiter(t, start.Add(59*time.Minute).Add(leasePoll))

	openGate() // b's refresh completes and is stored; its lease stays held
	eventually(t, "b to store its pair", stored.Load)
	eventually(t, "b to publish its pair", func() bool { return b.Current().Generation == 2 })
	env.clk.Advance(leasePoll)
	eventually(t, "a to adopt b's pair", func() bool { return a.Current().Generation == 2 })
	if a.Current().AccessToken != b.Current().AccessToken {
		t.Fatal("a and b do not share the new pair")
	}
	unblock()
	env.wantCalls(t, 2)
}

// rej names the token of generation gen on s's current chain, as a request
// that got a 401 would.
func rej(s *Source, gen uint64) *Token {
	t := &Token{Generation: gen}
	if cur := s.Current(); cur != nil {
		t.Chain = cur.Chain
	}
	return t
}

// A storage read that fails (not a missing or corrupt record) stops the
// attempt: guessing "no record" could resend a consumed seed.
func TestStorageReadFailureIsTransient(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	seed := env.fake.Seed()
	mustToken(t, env.source(t, env.config(seed, "a")))
	failing := &failingLoad{Storage: env.st}
	cfg := env.config(seed, "b")
	cfg.Storage = failing
	env.clk.Advance(time.Hour) // the stored token is expired: a refresh is due
	_, err := env.source(t, cfg).Token(context.Background())
	if e := asError(t, err); e.Kind != Transient || !strings.Contains(e.Msg, "disk on fire") {
		t.Fatalf("kind %v: %v", e.Kind, err)
	}
	env.wantCalls(t, 1) // only the first source's seed exchange
}

type failingLoad struct{ Storage }

func (f *failingLoad) Load(ctx context.Context, key string) ([]byte, error) {
	if strings.HasSuffix(key, "/token.json") {
		return nil, errors.New("disk on fire")
	}
	return f.Storage.Load(ctx, key)
}

// A lease's timestamps mean nothing to other instances (I3): one that says
// it expires in a day lapses after its TTL of observation, and one that says
// it expired long ago is still honoured for its TTL.
func TestLeaseExpiryIgnoresTimestamps(t *testing.T) {
	t.Parallel()
	for _, expires := range []time.Duration{24 * time.Hour, -24 * time.Hour} {
		env := newTestEnv(t, fakerestream.Options{})
		s := env.source(t, env.config(env.fake.Seed(), "o"))
		b, _ := json.Marshal(leaseRecord{Owner: "skewed-host", Nonce: "n", TTLMillis: 20_000, ExpiresAt: env.clk.Now().Add(expires)})
		if err := env.st.Store(context.Background(), keysFor(testAccount).lease, b); err != nil {
			t.Fatal(err)
		}
		s.Start()
		// The refresher sees the lease and polls it.
		env.clk.waitForWaiter(t, env.clk.Now().Add(leasePoll))
		env.wantCalls(t, 0)
		env.clk.Advance(19 * time.Second)
		env.clk.waitForWaiter(t, env.clk.Now().Add(leasePoll))
		env.wantCalls(t, 0)
		env.clk.Advance(time.Second)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if _, err := s.Token(ctx); err != nil {
			t.Fatalf("expires_at %v: the lease did not lapse after its TTL: %v", expires, err)
		}
		cancel()
		env.wantCalls(t, 1)
	}
}

// tokenNewerThan is TokenNewerThan in the shape these tests were written
// for: ok reports a newer token; the rate-limited case is (current, false, nil).
func tokenNewerThan(s *Source, ctx context.Context, rejected *Token) (*Token, bool, bool, error) {
	t, refreshed, err := s.TokenNewerThan(ctx, rejected)
	if errors.Is(err, ErrRejectedAgain) {
		return s.Current(), refreshed, false, nil
	}
	return t, refreshed, err == nil, err
}
