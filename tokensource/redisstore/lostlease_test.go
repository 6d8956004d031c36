package redisstore_test

// The interleaving of TestChaosRedis/no_persistence's invalid_grant, step by
// step on a real redis-server. A holds the lease and rotates generation 1
// into 2 while Redis is down, so its write of 2 fails; B's lease request,
// sent before Redis died (go-redis retries a dial for about 2 s), lands on
// the restarted, empty Redis and takes the lease; B's re-read under it
// writes back the 1 it knew, and, before the fix, took no settle lease
// because the lease was B's: B went on to refresh from 1 (spent by A) while
// A's retries were fenced off as lease_lost.

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/redistest"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource/redisstore"
)

func TestWriteBackUnderALeaseTakenAfterDataLossSettles(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	a, b := newStore(t, srv, redisstore.Options{}), newStore(t, srv, redisstore.Options{})
	ctx := ctxT(t)
	g1, g2 := pair("c", 1), pair("c", 2)
	mustStore(t, a, g1, tokensource.Version{})
	mustLoad(t, b) // B knows generation 1
	la, err := a.TakeLease(ctx, "a", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	la.Mark, la.MarkedBy = tokensource.Fingerprint(g1.RefreshToken), "a"
	if err := a.RenewLease(ctx, la); err != nil {
		t.Fatal(err)
	}

	srv.Kill() // A's token call is in flight: Restream rotates 1 into 2
	down, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	err = a.CompareAndStore(down, g2, version(g1))
	cancel()
	if err == nil {
		t.Fatal("a write to a dead Redis succeeded")
	}
	srv.Restart() // empty: record, lease and mark are gone

	// B's lease request from before the crash lands first.
	lb, err := b.TakeLease(ctx, "b", time.Minute)
	if err != nil {
		t.Fatalf("B's TakeLease on the empty Redis: %v", err)
	}
	if got := mustLoad(t, b); got.Generation != 1 {
		t.Fatalf("B's re-read wrote back generation %d, want its stale 1", got.Generation)
	}
	// B marks the token it is about to send: the lease must no longer be
	// B's, or B sends generation 1's spent refresh token.
	lb.Mark, lb.MarkedBy = tokensource.Fingerprint(g1.RefreshToken), "b"
	if err := b.RenewLease(ctx, lb); !errors.Is(err, tokensource.ErrLeaseLost) {
		t.Fatalf("B marks generation 1 under its lease after writing it back: %v, want ErrLeaseLost (the settle lease)", err)
	}
	// A's retry of its pending pair is not fenced off.
	if err := a.CompareAndStore(ctx, g2, version(g1)); err != nil {
		t.Fatalf("A's retry: %v", err)
	}
	if got := mustLoad(t, b); got.Generation != 2 {
		t.Fatalf("B reads generation %d, want A's 2", got.Generation)
	}
}

// A write that lost its lease to one taken after a data loss still reaches
// Redis through the write-back: the store's Load writes back the pair whose
// write failed, over the older generation, whoever holds the lease.
func TestFailedWriteIsWrittenBackOverALeaseTakenAfterDataLoss(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	a, b := newStore(t, srv, redisstore.Options{}), newStore(t, srv, redisstore.Options{})
	ctx := ctxT(t)
	g1, g2 := pair("c", 1), pair("c", 2)
	mustStore(t, a, g1, tokensource.Version{})
	mustLoad(t, b)
	if _, err := a.TakeLease(ctx, "a", time.Minute); err != nil {
		t.Fatal(err)
	}
	srv.Kill()
	down, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	_ = a.CompareAndStore(down, g2, version(g1))
	cancel()
	srv.Restart()
	lb, err := b.TakeLease(ctx, "b", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.CompareAndStore(ctx, g2, version(g1)); !errors.Is(err, tokensource.ErrLeaseLost) {
		t.Fatalf("A's retry with B's lease on an empty Redis: %v, want ErrLeaseLost", err)
	}
	if got := mustLoad(t, a); got.Generation != 2 {
		t.Fatalf("A's Load wrote back generation %d, want its pending 2", got.Generation)
	}
	if err := b.RenewLease(ctx, lb); !errors.Is(err, tokensource.ErrLeaseLost) {
		t.Fatalf("B's lease after A's write-back: %v, want ErrLeaseLost (the settle lease took it)", err)
	}
	if _, err := b.TakeLease(ctx, "b", time.Minute); !errors.Is(err, tokensource.ErrLeaseHeld) {
		t.Fatalf("TakeLease right after A's write-back: %v, want ErrLeaseHeld (settle)", err)
	}
}

// The same when the pair's first write reached the emptied Redis but was
// fenced off by the lease taken there (no network error made the store
// remember it): the fenced pair, newer than what the store knew, is what
// its Load writes back.
func TestFencedWriteIsWrittenBackAfterDataLoss(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	a, b := newStore(t, srv, redisstore.Options{}), newStore(t, srv, redisstore.Options{})
	ctx := ctxT(t)
	g1, g2 := pair("c", 1), pair("c", 2)
	mustStore(t, a, g1, tokensource.Version{})
	mustLoad(t, b)
	if _, err := a.TakeLease(ctx, "a", time.Minute); err != nil {
		t.Fatal(err)
	}
	srv.MustDo("FLUSHALL") // Redis lost its data while A's token call was in flight
	if _, err := b.TakeLease(ctx, "b", time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := a.CompareAndStore(ctx, g2, version(g1)); !errors.Is(err, tokensource.ErrLeaseLost) {
		t.Fatalf("A's write under B's lease on an empty Redis: %v, want ErrLeaseLost", err)
	}
	if got := mustLoad(t, a); got.Generation != 2 {
		t.Fatalf("A's Load wrote back generation %d, want its fenced 2", got.Generation)
	}
	if got := mustLoad(t, b); got.Generation != 2 {
		t.Fatalf("B reads generation %d, want 2", got.Generation)
	}
}

// End to end with a token source: A rotates while Redis is down, B's lease
// request lands first on the restarted, empty Redis and B writes back the
// generation it knew. B may not refresh from it, and A's pair, whose retried
// write meets B's lease or the settle lease, is stored and the chain goes on.
func TestSourceRotatingWhileRedisRestartsEmptyKeepsTheChain(t *testing.T) {
	if testing.Short() {
		t.Skip("wall-clock: rotations of 2-second tokens through a real Redis killed during one")
	}
	srv := redistest.Start(t, redistest.Options{})
	fake := fakerestream.New(fakerestream.Options{AccessTTL: 2 * time.Second, Latency: 300 * time.Millisecond, Logf: func(string, ...any) {}})
	t.Cleanup(fake.Close)
	a := startSource(t, fake, newStore(t, srv, redisstore.Options{RestoreSettle: 400 * time.Millisecond}), fake.Seed(), "a")
	b := newStore(t, srv, redisstore.Options{RestoreSettle: 400 * time.Millisecond})
	serveUntil(t, srv, 2, a)
	known := mustLoad(t, b)

	deadline := time.Now().Add(5 * time.Second)
	for n, _, _ := fake.TokenActivity(); n == 0; n, _, _ = fake.TokenActivity() {
		if time.Now().After(deadline) {
			t.Fatal("A never refreshed")
		}
		time.Sleep(time.Millisecond) // polling an external fake's counters
	}
	rotations := fake.Stats().RefreshOK
	srv.Kill()
	for fake.Stats().RefreshOK == rotations {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond) // A's write fails against the dead Redis
	srv.Restart()

	// A retries its write 0.8-1.2 s after it failed; a restart slower than
	// that (a loaded machine) lets A's write come first, and the
	// interleaving is not reached: the chain must survive all the same.
	lb, err := b.TakeLease(ctxT(t), "b", time.Minute)
	if err != nil {
		t.Fatalf("B's TakeLease on the empty Redis: %v", err)
	}
	if got := mustLoad(t, b); got.Generation != known.Generation {
		t.Logf("A's retried write came before B's lease (generation %d stored): the interleaving was not reached", got.Generation)
		if err := b.ReleaseLease(ctxT(t), lb); err != nil {
			t.Fatal(err)
		}
		serveUntil(t, srv, known.Generation+3, a)
		checkFake(t, fake)
		return
	}
	lb.Mark, lb.MarkedBy = tokensource.Fingerprint(known.RefreshToken), "b"
	if err := b.RenewLease(ctxT(t), lb); !errors.Is(err, tokensource.ErrLeaseLost) {
		t.Fatalf("B marks the stale refresh token under its lease: %v, want ErrLeaseLost", err)
	}
	serveUntil(t, srv, known.Generation+3, a)
	checkFake(t, fake)
}
