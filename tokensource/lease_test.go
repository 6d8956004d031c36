package tokensource

// The refresh lease (store.go's lease on Caddy storage, as protocol.go uses
// it): one refresh at a time across instances, a dead owner's lease, and a
// waiter that adopts the holder's pair.

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
)

// TestSourcesSharingStorage: two processes (different owners) on one storage,
// both needing a new token at the same moment, round after round. The strict
// fake counts any reuse of a rotated refresh token and any overlap.
func TestSourcesSharingStorage(t *testing.T) {
	if testing.Short() {
		t.Skip("wall-clock: four rounds of a 1.1 s token call racing file_system's 1 s lock poll")
	}
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
		toks := make([][]*Token, len(sources))
		for i := range sources {
			toks[i] = make([]*Token, callers)
		}
		errs := make(chan error, len(sources)*callers)
		concurrently(len(sources)*callers, func(k int) {
			i, j := k/callers, k%callers
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			tok, err := sources[i].Token(ctx)
			if err != nil {
				errs <- err
			}
			toks[i][j] = tok
		})
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

// TestDeadOwnersLeaseDelaysRefresh: a lease left by a crashed process holds
// refreshes back until this process has seen it unchanged for its TTL; a
// request does not wait with it: it gets an error after Timeout,
// and the refresh goes on in the background.
func TestDeadOwnersLeaseDelaysRefresh(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	s := env.seededSource(t, "alive")
	mustToken(t, s)
	env.waitLeaseReleased(t, "the seed exchange's lease to be released")
	lease, _ := json.Marshal(leaseRecord{Owner: "crashed", Nonce: "n", TTLMillis: 30_000})
	if err := env.st.Store(context.Background(), LeaseKey(testAccount), lease); err != nil {
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
		l := env.lease()
		return l != nil && l.Owner == "" && l.Mark == ""
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
	env.waitLeaseReleased(t, "a to release its lease")

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

// A lease's timestamps mean nothing to other instances (I3): one that says
// it expires in a day lapses after its TTL of observation, and one that says
// it expired long ago is still honoured for its TTL.
func TestLeaseExpiryIgnoresTimestamps(t *testing.T) {
	t.Parallel()
	for _, expires := range []time.Duration{24 * time.Hour, -24 * time.Hour} {
		env := newTestEnv(t, fakerestream.Options{})
		s := env.seededSource(t, "o")
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
