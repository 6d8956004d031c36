package redisstore_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/redistest"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource/redisstore"
)

// The protocol over Redis, end to end: token sources (instances) that share
// an account through Redis only, against the strict fake Restream, which
// answers invalid_grant to any refresh token sent twice.

func newFake(t *testing.T) *fakerestream.Server {
	t.Helper()
	fake := fakerestream.New(fakerestream.Options{AccessTTL: 2 * time.Second, Logf: func(string, ...any) {}})
	t.Cleanup(fake.Close)
	return fake
}

func startSource(t *testing.T, fake *fakerestream.Server, store tokensource.Store, seed, owner string) *tokensource.Source {
	t.Helper()
	src, err := tokensource.New(tokensource.Config{
		Account: account, ClientID: "test-client", ClientSecret: "test-secret", TokenURL: fake.TokenURL(),
		Seed: seed, Timeout: 5 * time.Second, Store: store, Owner: owner,
	})
	if err != nil {
		t.Fatal(err)
	}
	src.Start()
	t.Cleanup(src.Close)
	return src
}

// watched are the store options of an instance in these tests: the
// background watch and the settle time scaled to 2-second tokens.
var watched = redisstore.Options{WatchInterval: 100 * time.Millisecond, RestoreSettle: 400 * time.Millisecond}

// storedGeneration is the generation Redis holds, 0 if none.
func storedGeneration(srv *redistest.Server) uint64 {
	v, err := srv.Do("HGET", recordKey(), "gen")
	if s, ok := v.(string); ok && err == nil {
		n, _ := strconv.ParseUint(s, 10, 64)
		return n
	}
	return 0
}

// serveUntil asks every source for a token, as requests would, until Redis
// holds generation gen; every ask must succeed.
func serveUntil(t *testing.T, srv *redistest.Server, gen uint64, srcs ...*tokensource.Source) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for storedGeneration(srv) < gen {
		if time.Now().After(deadline) {
			t.Fatalf("Redis never reached generation %d (at %d)", gen, storedGeneration(srv))
		}
		for _, s := range srcs {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if _, err := s.Token(ctx); err != nil {
				t.Errorf("%s: Token: %v", s.Status().Account, err)
			}
			cancel()
		}
		time.Sleep(50 * time.Millisecond) // request pacing, not synchronization
	}
}

func checkFake(t *testing.T, fake *fakerestream.Server) {
	t.Helper()
	st := fake.Stats()
	if st.InvalidGrant != 0 || st.MaxConcurrentRefresh > 1 || st.LostRotations != 0 {
		t.Fatalf("fake: %d invalid_grant, %d concurrent refreshes at most, %d lost rotations; want 0, 1, 0",
			st.InvalidGrant, st.MaxConcurrentRefresh, st.LostRotations)
	}
	t.Logf("fake: %d rotations, 0 invalid_grant", st.RefreshOK)
}

func TestSourcesShareChainThroughRedis(t *testing.T) {
	if testing.Short() {
		t.Skip("wall-clock: four rotations of 2-second tokens through a real Redis")
	}
	srv := redistest.Start(t, redistest.Options{})
	fake := newFake(t)
	seed := fake.Seed()
	a := startSource(t, fake, newStore(t, srv, watched), seed, "a")
	b := startSource(t, fake, newStore(t, srv, watched), seed, "b")
	serveUntil(t, srv, 4, a, b)
	checkFake(t, fake)
}

func TestLostRedisDataLosesNoChain(t *testing.T) {
	if testing.Short() {
		t.Skip("wall-clock: rotations of 2-second tokens through a real Redis, before and after it loses its data")
	}
	for _, tc := range []struct {
		name string
		lose func(*redistest.Server)
	}{
		{"flushall", func(srv *redistest.Server) { srv.MustDo("FLUSHALL") }},
		{"restart_without_persistence", func(srv *redistest.Server) { srv.Kill(); srv.Restart() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := redistest.Start(t, redistest.Options{})
			fake := newFake(t)
			seed := fake.Seed() // consumed once; its fingerprint lives only in the record
			a := startSource(t, fake, newStore(t, srv, watched), seed, "a")
			b := startSource(t, fake, newStore(t, srv, watched), seed, "b")
			serveUntil(t, srv, 2, a, b)
			tc.lose(srv)
			lost := time.Now()
			// Written back well before the next refresh is due, which is
			// when a source reads the record again at the latest.
			serveUntil(t, srv, 1, a, b)
			t.Logf("written back after %s", time.Since(lost).Round(time.Millisecond))
			serveUntil(t, srv, 5, a, b)
			checkFake(t, fake)
			for _, s := range []*tokensource.Source{a, b} {
				if st := s.Status(); st.State != tokensource.StateOK && st.State != tokensource.StateRefreshing {
					t.Errorf("source state %s (%s), want ok", st.State, st.LastError)
				}
			}
		})
	}
}
