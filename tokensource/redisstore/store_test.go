package redisstore_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/restream-sidecar/caddy-restream-auth/internal/redistest"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource/redisstore"
)

const account = "acct"

// newStore is an instance's store on srv: its own client, as another
// process would have. Its background watch is off unless opts set it.
func newStore(t testing.TB, srv *redistest.Server, opts redisstore.Options) *redisstore.Store {
	t.Helper()
	return newStoreURL(t, srv.URL(), opts)
}

func newStoreURL(t testing.TB, url string, opts redisstore.Options) *redisstore.Store {
	t.Helper()
	opt, err := redisstore.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	c := redisstore.NewClient(opt)
	t.Cleanup(func() { _ = c.Close() })
	if opts.WatchInterval == 0 {
		opts.WatchInterval = -1 // unit tests write back only when they Load
	}
	s, err := redisstore.New(c, account, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// pair is a record of chain at generation gen, as a refresh stores it.
func pair(chain string, gen uint64) *tokensource.Record {
	now := time.Now()
	return &tokensource.Record{Version: 1, Generation: gen, Chain: chain,
		AccessToken: fmt.Sprintf("at-%s-%d", chain, gen), RefreshToken: fmt.Sprintf("rt-%s-%d", chain, gen),
		TokenType: "Bearer", Expiry: now.Add(time.Hour), IssuedAt: now}
}

func version(r *tokensource.Record) tokensource.Version {
	if r == nil {
		return tokensource.Version{}
	}
	return tokensource.Version{Generation: r.Generation, Chain: r.Chain}
}

func mustLoad(t testing.TB, s *redisstore.Store) *tokensource.Record {
	t.Helper()
	rec, err := s.Load(ctxT(t))
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	return rec
}

func mustStore(t testing.TB, s *redisstore.Store, rec *tokensource.Record, base tokensource.Version) {
	t.Helper()
	if err := s.CompareAndStore(ctxT(t), rec, base); err != nil {
		t.Fatalf("CompareAndStore generation %d on %d: %v", rec.Generation, base.Generation, err)
	}
}

func leaseKey() string  { return redisstore.DefaultKeyPrefix + "{" + account + "}/lease" }
func recordKey() string { return redisstore.DefaultKeyPrefix + "{" + account + "}/record" }

// expireLease ends the account's lease the way Redis does at its PX
// expiry, without waiting for it.
func expireLease(t testing.TB, srv *redistest.Server) {
	t.Helper()
	if n := srv.MustDo("PEXPIRE", leaseKey(), "1"); n != int64(1) {
		t.Fatalf("PEXPIRE on the lease: %v (no lease?)", n)
	}
	for srv.MustDo("EXISTS", leaseKey()) != int64(0) {
		time.Sleep(time.Millisecond) // Redis expires the key within a millisecond
	}
}

func TestConcurrentTakeLeaseHasOneHolder(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	for round := range 5 {
		stores := make([]*redisstore.Store, 8)
		for i := range stores {
			stores[i] = newStore(t, srv, redisstore.Options{})
		}
		var wg sync.WaitGroup
		var mu sync.Mutex
		var holders []string
		start := make(chan struct{})
		for i, s := range stores {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				l, err := s.TakeLease(context.Background(), fmt.Sprintf("owner-%d", i), time.Minute)
				switch {
				case err == nil:
					mu.Lock()
					holders = append(holders, l.Owner)
					mu.Unlock()
				case !errors.Is(err, tokensource.ErrLeaseHeld):
					t.Errorf("TakeLease: %v", err)
				}
			}()
		}
		close(start)
		wg.Wait()
		if len(holders) != 1 {
			t.Fatalf("round %d: %d holders %v, want exactly one", round, len(holders), holders)
		}
		srv.MustDo("DEL", leaseKey())
	}
}

func TestLeaseExpiresOnRedisClock(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	a, b := newStore(t, srv, redisstore.Options{}), newStore(t, srv, redisstore.Options{})
	l, err := a.TakeLease(ctxT(t), "a", 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if pttl := srv.MustDo("PTTL", leaseKey()).(int64); pttl <= 0 || pttl > 10000 {
		t.Fatalf("lease PTTL %d ms, want a server-side expiry of at most 10s", pttl)
	}
	if r := l.Remaining(time.Now()); r <= 9*time.Second || r > 10*time.Second {
		t.Fatalf("holder's Remaining %s, want just under the TTL", r)
	}
	if _, err := b.TakeLease(ctxT(t), "b", time.Minute); !errors.Is(err, tokensource.ErrLeaseHeld) {
		t.Fatalf("TakeLease while held: %v, want ErrLeaseHeld", err)
	}
	// The same owner takes over its own lease, as with the storage store.
	l2, err := a.TakeLease(ctxT(t), "a", 10*time.Second)
	if err != nil {
		t.Fatalf("same owner taking over: %v", err)
	}
	if l2.Nonce == l.Nonce {
		t.Fatal("a takeover must make a new token")
	}
	expireLease(t, srv)
	if _, err := b.TakeLease(ctxT(t), "b", time.Minute); err != nil {
		t.Fatalf("TakeLease after expiry: %v", err)
	}

	// A lease key without expiry (not written by a store) lapses after one TTL.
	srv.MustDo("SET", leaseKey(), "garbage")
	if _, err := a.TakeLease(ctxT(t), "a", 50*time.Millisecond); !errors.Is(err, tokensource.ErrLeaseHeld) {
		t.Fatalf("TakeLease over a foreign lease: %v, want ErrLeaseHeld", err)
	}
	if pttl := srv.MustDo("PTTL", leaseKey()).(int64); pttl <= 0 {
		t.Fatalf("a foreign lease key was not given an expiry (PTTL %d)", pttl)
	}
}

func TestRenewAndReleaseAreOwnerOnly(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	a, b := newStore(t, srv, redisstore.Options{}), newStore(t, srv, redisstore.Options{})
	la, err := a.TakeLease(ctxT(t), "a", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	// A forged lease: same owner name, another nonce.
	forged := &tokensource.Lease{Owner: "a", Nonce: "not-the-nonce", TTL: time.Minute, Mark: "x", MarkedBy: "b"}
	if err := b.RenewLease(ctxT(t), forged); !errors.Is(err, tokensource.ErrLeaseLost) {
		t.Fatalf("renewing a forged lease: %v, want ErrLeaseLost", err)
	}
	if err := b.ReleaseLease(ctxT(t), forged); err != nil {
		t.Fatalf("releasing a lease not held: %v, want nil", err)
	}
	if srv.MustDo("EXISTS", leaseKey()) != int64(1) {
		t.Fatal("a release by a non-owner removed the lease")
	}
	if m := srv.MustDo("HGET", redisstore.DefaultKeyPrefix+"{"+account+"}/mark", "mark"); m != nil {
		t.Fatalf("a non-owner wrote the mark: %v", m)
	}
	// The owner renews; once its lease expired and another took it, it
	// can neither renew nor release.
	before := la.Remaining(time.Now())
	time.Sleep(5 * time.Millisecond)
	if err := a.RenewLease(ctxT(t), la); err != nil {
		t.Fatalf("owner's renewal: %v", err)
	}
	if la.Remaining(time.Now()) <= before {
		t.Fatal("a renewal did not extend the holder's time")
	}
	expireLease(t, srv)
	lb, err := b.TakeLease(ctxT(t), "b", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.RenewLease(ctxT(t), la); !errors.Is(err, tokensource.ErrLeaseLost) {
		t.Fatalf("renewing an expired lease: %v, want ErrLeaseLost", err)
	}
	if err := a.ReleaseLease(ctxT(t), la); err != nil {
		t.Fatalf("releasing an expired lease: %v", err)
	}
	if err := b.RenewLease(ctxT(t), lb); err != nil {
		t.Fatalf("the new holder lost its lease to an old holder's release: %v", err)
	}
}

func TestExpiredHolderCannotWrite(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	a, b := newStore(t, srv, redisstore.Options{}), newStore(t, srv, redisstore.Options{})
	g1 := pair("c", 1)
	mustStore(t, a, g1, tokensource.Version{})
	if _, err := a.TakeLease(ctxT(t), "a", time.Minute); err != nil {
		t.Fatal(err)
	}
	expireLease(t, srv)
	err := a.CompareAndStore(ctxT(t), pair("c", 2), version(g1))
	if !errors.Is(err, tokensource.ErrLeaseLost) {
		t.Fatalf("write by a holder whose lease expired: %v, want ErrLeaseLost", err)
	}
	if got := mustLoad(t, b); got.Generation != 1 {
		t.Fatalf("stored generation %d after a fenced write, want 1", got.Generation)
	}
	// Another instance takes the lease: the old holder still cannot write,
	// the new one can.
	if _, err := b.TakeLease(ctxT(t), "b", time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := a.CompareAndStore(ctxT(t), pair("c", 2), version(g1)); !errors.Is(err, tokensource.ErrLeaseLost) {
		t.Fatalf("write by the old holder under the new lease: %v, want ErrLeaseLost", err)
	}
	mustStore(t, b, pair("c", 2), version(g1))
	if got := mustLoad(t, a); got.Generation != 2 || got.RefreshToken != "rt-c-2" {
		t.Fatalf("stored %+v, want the new holder's generation 2", got)
	}
}

func TestCompareAndStoreChecksVersion(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	a, b := newStore(t, srv, redisstore.Options{}), newStore(t, srv, redisstore.Options{})
	if rec := mustLoad(t, a); rec != nil {
		t.Fatalf("Load of an empty Redis: %+v, want nil", rec)
	}
	g1 := pair("c", 1)
	mustStore(t, a, g1, tokensource.Version{})
	if err := b.CompareAndStore(ctxT(t), pair("d", 1), tokensource.Version{}); !errors.Is(err, tokensource.ErrConflict) {
		t.Fatalf("second first write: %v, want ErrConflict", err)
	}
	g2 := pair("c", 2)
	mustStore(t, b, g2, version(g1))
	// a read generation 1 (it wrote it); storing on it now conflicts.
	if err := a.CompareAndStore(ctxT(t), pair("c", 2), version(g1)); !errors.Is(err, tokensource.ErrConflict) {
		t.Fatalf("write on a stale generation: %v, want ErrConflict", err)
	}
	if err := a.CompareAndStore(ctxT(t), pair("c", 3), tokensource.Version{Generation: 2, Chain: "other"}); !errors.Is(err, tokensource.ErrConflict) {
		t.Fatalf("write on another chain's version: %v, want ErrConflict", err)
	}
	// A record of the same version with new history (recordDead) is a write.
	dead := *g2
	dead.DeadTokens = []string{tokensource.Fingerprint("rt-c-1")}
	mustStore(t, a, &dead, version(g2))
	got := mustLoad(t, b)
	if got.Generation != 2 || len(got.DeadTokens) != 1 {
		t.Fatalf("stored %+v, want generation 2 with one dead token", got)
	}

	// 8 instances race to store generation 3 on 2: exactly one wins.
	var wg sync.WaitGroup
	var mu sync.Mutex
	wins := 0
	for i := range 8 {
		s := newStore(t, srv, redisstore.Options{})
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := s.CompareAndStore(context.Background(), pair(fmt.Sprint("c", i), 3), version(g2))
			switch {
			case err == nil:
				mu.Lock()
				wins++
				mu.Unlock()
			case !errors.Is(err, tokensource.ErrConflict):
				t.Errorf("racing write: %v", err)
			}
		}()
	}
	wg.Wait()
	if wins != 1 {
		t.Fatalf("%d racing writes on one version succeeded, want 1", wins)
	}
}

func TestCorruptRecordIsNeverOverwritten(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	s := newStore(t, srv, redisstore.Options{})
	for _, setup := range [][]string{
		{"SET", recordKey(), "not a hash"},
		{"HSET", recordKey(), "gen", "1", "chain", "c"},                      // no data
		{"HSET", recordKey(), "gen", "x", "chain", "c", "data", "{}"},        // gen not a number
		{"HSET", recordKey(), "gen", "1", "chain", "c", "data", "not json"},  // data not a record
		{"HSET", recordKey(), "gen", "7", "chain", "c", "data", pairJSON(t)}, // fields disagree with data
	} {
		srv.MustDo("DEL", recordKey())
		srv.MustDo(setup...)
		_, err := s.Load(ctxT(t))
		if !errors.Is(err, tokensource.ErrCorruptRecord) {
			t.Fatalf("%v: Load: %v, want ErrCorruptRecord", setup, err)
		}
		if !strings.Contains(err.Error(), recordKey()) {
			t.Errorf("%v: the error does not name the key: %v", setup, err)
		}
		if setup[0] == "SET" || setup[3] == "x" || len(setup) == 6 {
			if err := s.CompareAndStore(ctxT(t), pair("c", 1), tokensource.Version{}); !errors.Is(err, tokensource.ErrCorruptRecord) {
				t.Fatalf("%v: CompareAndStore: %v, want ErrCorruptRecord", setup, err)
			}
		}
	}
}

// pairJSON is the stored form of generation 1 of chain c.
func pairJSON(t testing.TB) string {
	b, err := tokensource.EncodeRecord(pair("c", 1), recordKey(), account, nil)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestMarkSurvivesReleaseExpiryAndTakeover(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	a, b, c := newStore(t, srv, redisstore.Options{}), newStore(t, srv, redisstore.Options{}), newStore(t, srv, redisstore.Options{})
	la, err := a.TakeLease(ctxT(t), "a", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	la.Mark, la.MarkedBy = "fp-1", "a"
	if err := a.RenewLease(ctxT(t), la); err != nil {
		t.Fatal(err)
	}
	// Released: the mark stays.
	if err := a.ReleaseLease(ctxT(t), la); err != nil {
		t.Fatal(err)
	}
	lb, err := b.TakeLease(ctxT(t), "b", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if lb.Mark != "fp-1" || lb.MarkedBy != "a" {
		t.Fatalf("after a release the lease carries mark %q by %q, want fp-1 by a", lb.Mark, lb.MarkedBy)
	}
	// Expired without a release: the mark stays.
	expireLease(t, srv)
	lc, err := c.TakeLease(ctxT(t), "c", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if lc.Mark != "fp-1" || lc.MarkedBy != "a" {
		t.Fatalf("after an expiry the lease carries mark %q by %q, want fp-1 by a", lc.Mark, lc.MarkedBy)
	}
	// The lapsed holder's release changes nothing.
	lb.Mark = ""
	if err := b.ReleaseLease(ctxT(t), lb); err != nil {
		t.Fatal(err)
	}
	// The holder clears it (it knows the outcome); the next holder sees none.
	lc.Mark, lc.MarkedBy = "", ""
	if err := c.ReleaseLease(ctxT(t), lc); err != nil {
		t.Fatal(err)
	}
	ld, err := a.TakeLease(ctxT(t), "a", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if ld.Mark != "" || ld.MarkedBy != "" {
		t.Fatalf("a cleared mark came back: %q by %q", ld.Mark, ld.MarkedBy)
	}
}

func TestMinReplicasWaitsForReplicas(t *testing.T) {
	if testing.Short() {
		t.Skip("wall-clock: WAITs that time out, and a real replica to start and sync")
	}
	primary := redistest.Start(t, redistest.Options{})
	s := newStore(t, primary, redisstore.Options{MinReplicas: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	g1 := pair("c", 1)
	start := time.Now()
	err := s.CompareAndStore(ctx, g1, tokensource.Version{})
	if err == nil || errors.Is(err, tokensource.ErrConflict) || !strings.Contains(err.Error(), "0 of the 1 Redis replicas") {
		t.Fatalf("write with min_replicas 1 and no replica: %v, want the replicas error", err)
	}
	if took := time.Since(start); took > time.Second {
		t.Fatalf("the failed WAIT took %s, beyond its context", took)
	}
	// The mark write waits for replicas too.
	l, err := s.TakeLease(ctxT(t), "a", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	l.Mark, l.MarkedBy = "fp", "a"
	ctx2, cancel2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel2()
	if err := s.RenewLease(ctx2, l); err == nil || errors.Is(err, tokensource.ErrLeaseLost) {
		t.Fatalf("mark write with min_replicas 1 and no replica: %v, want the replicas error", err)
	}

	replica := redistest.Start(t, redistest.Options{ReplicaOf: primary.Addr()})
	replica.WaitReplicaUp(primary)
	// The retry of the same write finds it on the primary and now gets its
	// acknowledgement.
	if err := s.CompareAndStore(ctxT(t), g1, tokensource.Version{}); err != nil {
		t.Fatalf("retried write with a replica: %v", err)
	}
	g2 := pair("c", 2)
	if err := s.CompareAndStore(ctxT(t), g2, version(g1)); err != nil {
		t.Fatalf("write with a replica: %v", err)
	}
	if err := s.RenewLease(ctxT(t), l); err != nil {
		t.Fatalf("mark write with a replica: %v", err)
	}
	// The replica holds what the write returned for.
	if got := replica.MustDo("HGET", recordKey(), "gen"); got != "2" {
		t.Fatalf("replica has generation %v, want 2", got)
	}
	if got := replica.MustDo("HGET", redisstore.DefaultKeyPrefix+"{"+account+"}/mark", "mark"); got != "fp" {
		t.Fatalf("replica has mark %v, want fp", got)
	}
}

func TestLostRecordIsWrittenBack(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	a := newStore(t, srv, redisstore.Options{})
	g1, g2 := pair("c", 1), pair("c", 2)
	mustStore(t, a, g1, tokensource.Version{})
	old := srv.MustDo("HGET", recordKey(), "data").(string)
	mustStore(t, a, g2, version(g1))

	// Flushed: the next Load writes back the newest pair a knows.
	srv.MustDo("FLUSHALL")
	if got := mustLoad(t, a); got == nil || got.Generation != 2 {
		t.Fatalf("Load after FLUSHALL: %+v, want generation 2 written back", got)
	}
	b := newStore(t, srv, redisstore.Options{})
	if got := mustLoad(t, b); got == nil || got.RefreshToken != "rt-c-2" {
		t.Fatalf("another instance reads %+v, want the written-back generation 2", got)
	}

	// An older generation of the same chain (a failover to a lagging
	// replica) is replaced by the newer one too.
	srv.MustDo("HSET", recordKey(), "gen", "1", "chain", "c", "data", old)
	if got := mustLoad(t, a); got.Generation != 2 {
		t.Fatalf("Load over an older generation: %d, want 2", got.Generation)
	}

	// A history-only record (a dead seed sent into the emptied Redis: no
	// chain, generation 0) is replaced by the live chain, or every
	// instance would end up needing re-authorization.
	hist := tokensource.Record{Version: 1, DeadTokens: []string{tokensource.Fingerprint("rt-seed")}}
	srv.MustDo("DEL", recordKey())
	mustStore(t, b, &hist, tokensource.Version{})
	if got := mustLoad(t, a); got == nil || got.Generation != 2 || got.Chain != "c" {
		t.Fatalf("Load over a history-only record: %+v, want c/2 written back", got)
	}

	// Another chain is never replaced, whatever its generation.
	x1 := pair("x", 1)
	srv.MustDo("DEL", recordKey())
	mustStore(t, b, x1, tokensource.Version{})
	if got := mustLoad(t, a); got.Chain != "x" {
		t.Fatalf("Load over another chain wrote back %q", got.Chain)
	}

	// A write on a version that vanished (the refresher read generation 2,
	// Redis lost it while the token call ran) is stored, not dropped.
	c := newStore(t, srv, redisstore.Options{})
	x2 := pair("x", 2)
	mustLoad(t, c)
	srv.MustDo("FLUSHALL")
	mustStore(t, c, x2, version(x1))
	if got := mustLoad(t, b); got.Generation != 2 || got.Chain != "x" {
		t.Fatalf("after a write on a vanished record: %+v, want x/2", got)
	}
	// But never on a newer generation of the chain.
	if err := a.CompareAndStore(ctxT(t), pair("x", 2), version(x1)); !errors.Is(err, tokensource.ErrConflict) {
		t.Fatalf("write on an older base: %v, want ErrConflict", err)
	}
}

func TestRedisDownIsTransient(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	s := newStore(t, srv, redisstore.Options{})
	mustStore(t, s, pair("c", 1), tokensource.Version{})
	srv.Kill()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, lerr := s.Load(ctx)
	cerr := s.CompareAndStore(ctx, pair("c", 2), version(pair("c", 1)))
	_, terr := s.TakeLease(ctx, "a", time.Minute)
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("calls against a dead Redis took %s; each must end with its context", took)
	}
	for name, err := range map[string]error{"Load": lerr, "CompareAndStore": cerr, "TakeLease": terr} {
		if err == nil {
			t.Fatalf("%s against a dead Redis succeeded", name)
		}
		for _, named := range []error{tokensource.ErrConflict, tokensource.ErrLeaseHeld, tokensource.ErrLeaseLost,
			tokensource.ErrCorruptRecord, tokensource.ErrUnreadableRecord} {
			if errors.Is(err, named) {
				t.Fatalf("%s against a dead Redis: %v is %v, want a transient error", name, err, named)
			}
		}
	}
}

func TestEncryptedRecordIsBoundToItsKey(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	kr, err := tokensource.NewKeyring(make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	s := newStore(t, srv, redisstore.Options{Keyring: kr})
	mustStore(t, s, pair("c", 1), tokensource.Version{})
	data := srv.MustDo("HGET", recordKey(), "data").(string)
	if strings.Contains(data, "rt-c-1") {
		t.Fatal("the refresh token is stored in the clear with a keyring")
	}
	if got := mustLoad(t, newStore(t, srv, redisstore.Options{Keyring: kr})); got.RefreshToken != "rt-c-1" {
		t.Fatalf("decrypted %+v", got)
	}
	// Copied under another prefix, the envelope does not open.
	other := "other/{" + account + "}/record"
	srv.MustDo("HSET", other, "gen", "1", "chain", "c", "data", data)
	_, err = newStore(t, srv, redisstore.Options{Keyring: kr, KeyPrefix: "other/"}).Load(ctxT(t))
	if !errors.Is(err, tokensource.ErrUnreadableRecord) {
		t.Fatalf("record copied to another key: %v, want ErrUnreadableRecord", err)
	}
}

func TestNewRejectsBadOptions(t *testing.T) {
	c := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	defer c.Close()
	for _, o := range []redisstore.Options{{KeyPrefix: "has space/"}, {KeyPrefix: "{tag}/"}, {MinReplicas: -1}} {
		if _, err := redisstore.New(c, account, o); err == nil {
			t.Errorf("New(%+v) accepted", o)
		}
	}
	if _, err := redisstore.New(c, "a{b}", redisstore.Options{}); err == nil {
		t.Error("an account with braces was accepted")
	}
}

// A store that writes back a record from memory may hold an older one than
// another instance (it read the record just before a rotation it has not
// seen): nobody may take the lease, and so refresh from it, until the
// settle time has passed, while a newer write-back replaces it.
func TestWriteBackSettlesBeforeRefresh(t *testing.T) {
	if testing.Short() {
		t.Skip("wall-clock: waits out the 400 ms settle lease on Redis's clock")
	}
	srv := redistest.Start(t, redistest.Options{})
	const settle = 400 * time.Millisecond
	a := newStore(t, srv, redisstore.Options{RestoreSettle: settle})
	b := newStore(t, srv, redisstore.Options{RestoreSettle: settle})
	g1, g2 := pair("c", 1), pair("c", 2)
	mustStore(t, a, g1, tokensource.Version{})
	mustLoad(t, b) // b knows generation 1
	mustStore(t, a, g2, version(g1))

	srv.MustDo("FLUSHALL")
	if got := mustLoad(t, b); got.Generation != 1 {
		t.Fatalf("b wrote back generation %d, want its stale 1", got.Generation)
	}
	restored := time.Now()
	if _, err := b.TakeLease(ctxT(t), "b", time.Minute); !errors.Is(err, tokensource.ErrLeaseHeld) {
		t.Fatalf("TakeLease right after a write-back: %v, want ErrLeaseHeld", err)
	}
	if got := mustLoad(t, a); got.Generation != 2 {
		t.Fatalf("a's write-back: generation %d, want 2 over b's 1", got.Generation)
	}
	if got := mustLoad(t, b); got.Generation != 2 {
		t.Fatalf("b reads generation %d, want 2", got.Generation)
	}
	for {
		_, err := b.TakeLease(ctxT(t), "b", time.Minute)
		if err == nil {
			break
		}
		if !errors.Is(err, tokensource.ErrLeaseHeld) {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond) // Redis's expiry of the settle lease
	}
	if took := time.Since(restored); took < settle-50*time.Millisecond {
		t.Fatalf("the lease was free %s after the write-back, before the settle time %s", took, settle)
	}
}

// A holder whose lease and record Redis both lost holds the newest pair
// there is: its write is not fenced off.
func TestHolderWritesBackAfterDataLoss(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	a := newStore(t, srv, redisstore.Options{})
	g1 := pair("c", 1)
	mustStore(t, a, g1, tokensource.Version{})
	if _, err := a.TakeLease(ctxT(t), "a", time.Minute); err != nil {
		t.Fatal(err)
	}
	srv.MustDo("FLUSHALL")
	mustStore(t, a, pair("c", 2), version(g1))
	if got := mustLoad(t, newStore(t, srv, redisstore.Options{})); got.Generation != 2 {
		t.Fatalf("stored %+v, want generation 2", got)
	}
}
