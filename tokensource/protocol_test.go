package tokensource

// The refresh protocol's rules about the chain (protocol.go), through the
// Source and the strict fake: a seed is exchanged once and remembered, a
// restart adopts the stored chain, a pair is stored before it is used, and
// a dead token is never sent again.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
)

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
	s := env.seededSource(t, "o")
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
	if tok, ok, err := tokenNewerThan(context.Background(), a, rejectedGeneration(a, 1)); err != nil || !ok || tok.Generation != 2 {
		t.Fatalf("a: %v %v", ok, err)
	}
	env.wantCalls(t, 2)
	// b still holds generation 1, now dead; its 401 must not rotate again.
	tok, ok, err := tokenNewerThan(context.Background(), b, rejectedGeneration(b, 1))
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
	if fakeStats := env.fake.Stats(); fakeStats.RefreshCalls != 2 || fakeStats.InvalidGrant != 1 {
		t.Fatalf("fake stats %+v", fakeStats)
	}

	// Later attempts, from callers and from the refresher, never resend the
	// dead refresh token.
	for range 3 {
		if _, err := s.Token(context.Background()); !IsTerminal(err) {
			t.Fatalf("Token: %v", err)
		}
		if _, ok, err := tokenNewerThan(context.Background(), s, rejectedGeneration(s, 1)); ok || !IsTerminal(err) {
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
	if fakeStats := env.fake.Stats(); fakeStats.RefreshCalls != 2 || fakeStats.InvalidGrant != 1 {
		t.Fatalf("the dead refresh token was sent again: %+v", fakeStats)
	}
	if st := s.Status(); st.State != "reauth_required" {
		t.Fatalf("State %q", st.State)
	}

	// Another instance starts a new chain from a new seed; this one picks it
	// up at its next poll, without any call of its own.
	other := env.seededSource(t, "other")
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
	if fakeStats := env.fake.Stats(); fakeStats.RefreshCalls != 3 || fakeStats.InvalidGrant != 1 {
		t.Fatalf("fake stats %+v", fakeStats)
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
	if fakeStats := env.fake.Stats(); fakeStats.RefreshCalls != 1 || fakeStats.InvalidGrant != 1 {
		t.Fatalf("a rejected seed was sent again: %+v", fakeStats)
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
	if fakeStats := env.fake.Stats(); fakeStats.RefreshCalls != 1 {
		t.Fatalf("a restart sent the dead seed again: %+v", fakeStats)
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
	other := env.seededSource(t, "other")
	want := mustToken(t, other)
	env.clk.Advance(ReauthPollInterval)
	if tok := mustToken(t, s); tok.AccessToken != want.AccessToken {
		t.Fatal("did not adopt the stored chain")
	}
	env.wantCalls(t, 1)
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
		s := env.seededSource(t, "o")
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
		s := env.seededSource(t, "o")
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
		tok, ok, err := tokenNewerThan(context.Background(), s, rejectedGeneration(s, 2))
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

// A record deleted while its refresh is in flight (an operator's rm, a
// restore that lost the file) is written back: the token just sent is
// spent, so the new pair is the chain's only live one and dropping it would
// end the chain. A storage fault in the steps of the write-back (the read
// after the conflict, the lease renewal before the write, the write) keeps
// the pair in memory and retries them; it is never dropped.
func TestRefreshWritesOverDeletedRecord(t *testing.T) {
	t.Parallel()
	recordKey, leaseKey := RecordKey(testAccount), LeaseKey(testAccount)
	// failOnce fails the nth matching call, counted from when it is armed.
	failOnce := func(n int32, match func(op, key string) bool) func(op, key string) error {
		var calls atomic.Int32
		return func(op, key string) error {
			if match(op, key) && calls.Add(1) == n {
				return errors.New("disk on fire")
			}
			return nil
		}
	}
	for _, tc := range []struct {
		name  string
		fault func() func(op, key string) error
	}{
		{"no fault", func() func(op, key string) error { return func(string, string) error { return nil } }},
		// The first record read is the compare-and-set's own: failed, the
		// pair waits in memory for a retry that finds the record gone.
		{"the compare-and-set's read fails", func() func(op, key string) error {
			return failOnce(1, func(op, key string) bool { return op == "load" && key == recordKey })
		}},
		// The second is the write-back's, after the conflict.
		{"the read after the conflict fails", func() func(op, key string) error {
			return failOnce(2, func(op, key string) bool { return op == "load" && key == recordKey })
		}},
		{"the lease renewal fails", func() func(op, key string) error {
			return failOnce(1, func(op, key string) bool { return op == "store" && key == leaseKey })
		}},
		{"the write-back fails", func() func(op, key string) error {
			return failOnce(1, func(op, key string) bool { return op == "store" && key == recordKey })
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			env := newTestEnv(t, fakerestream.Options{})
			s, gate := env.refreshHeldInTokenCall(t, func(*Config) {})
			if err := env.st.FileStorage.Delete(context.Background(), recordKey); err != nil {
				t.Fatal(err)
			}
			fault := tc.fault()
			env.st.setFailLoad(func(key string) error { return fault("load", key) })
			env.st.setOnStore(func(key string, _ []byte) error { return fault("store", key) })
			close(gate.release)

			eventually(t, "the new pair written over the deleted record", func() bool {
				if s.Status().State == StateDegraded {
					env.clk.Advance(time.Second) // the write's retry
				}
				// Read past the spy, so the faults count the refresher's calls only.
				rec, err := LoadRecord(context.Background(), env.st.FileStorage, testAccount)
				return err == nil && rec != nil && rec.Generation == 2
			})
			wantGeneration(t, mustToken(t, s), 2)
			env.clk.Advance(time.Hour) // the chain goes on from the written-back pair
			waitSignal(t, "the next refresh's token call", gate.entered)
			eventually(t, "generation 3", func() bool { return env.record(t).Generation == 3 })
			if st := env.fake.Stats(); st.InvalidGrant != 0 || st.RefreshCalls != 3 {
				t.Fatalf("want 3 token calls and no spent token sent: %+v", st)
			}
		})
	}
}

// A record deleted mid-refresh is not written back when the lease has become
// another instance's meanwhile: that instance may be exchanging a new seed
// (an account change), and its new chain must not lose to the old one.
func TestDeletedRecordNotWrittenBackUnderAnotherInstancesLease(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	logger, logs := observedLogger(zapcore.WarnLevel)
	_, gate := env.refreshHeldInTokenCall(t, func(cfg *Config) { cfg.Logger = logger })
	ctx := context.Background()
	if err := env.st.FileStorage.Delete(ctx, RecordKey(testAccount)); err != nil {
		t.Fatal(err)
	}
	other, _ := json.Marshal(leaseRecord{Owner: "installer", Nonce: "n", TTLMillis: 30_000})
	if err := env.st.FileStorage.Store(ctx, LeaseKey(testAccount), other); err != nil {
		t.Fatal(err)
	}
	close(gate.release)

	eventually(t, "the refresher to drop the pair", func() bool {
		return logs.FilterMessage("the stored record changed while refreshing; the refreshed pair is dropped").Len() == 1
	})
	if rec, err := LoadRecord(ctx, env.st.FileStorage, testAccount); err != nil || rec != nil {
		t.Fatalf("a record was written under another instance's lease: %+v, %v", rec, err)
	}
	if l := env.lease(); l == nil || l.Owner != "installer" {
		t.Fatalf("the other instance's lease was touched: %+v", l)
	}
}

// refreshHeldInTokenCall stores generation 1 of a chain (with another
// source, closed since), starts a source of it configured by configure, and
// returns once that source's refresh of generation 1 is held in its token
// call; closing gate.release lets each token call through.
func (e *testEnv) refreshHeldInTokenCall(t *testing.T, configure func(*Config)) (*Source, *gateTransport) {
	t.Helper()
	seed := e.fake.Seed()
	seeder := e.source(t, e.config(seed, "seeder"))
	wantGeneration(t, mustToken(t, seeder), 1)
	seeder.Close()

	gate := &gateTransport{entered: make(chan struct{}, 1), release: make(chan struct{})}
	cfg := e.config(seed, "refresher")
	cfg.HTTPClient = &http.Client{Transport: gate}
	configure(&cfg)
	s := e.source(t, cfg)
	wantGeneration(t, mustToken(t, s), 1)
	e.clk.Advance(time.Hour) // due: the refresher sends the stored token
	waitSignal(t, "the refresh's token call", gate.entered)
	return s, gate
}
