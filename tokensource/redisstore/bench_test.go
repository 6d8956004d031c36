package redisstore_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/redistest"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource/redisstore"
)

// BenchmarkRefreshRound is the store's share of one refresh: take the
// lease, mark, reread, store the new pair, release.
func BenchmarkRefreshRound(b *testing.B) {
	for _, replicas := range []int{0, 1} {
		b.Run(map[int]string{0: "no_replica", 1: "min_replicas_1"}[replicas], func(b *testing.B) {
			primary := redistest.Start(b, redistest.Options{})
			if replicas > 0 {
				replica := redistest.Start(b, redistest.Options{ReplicaOf: primary.Addr()})
				replica.WaitReplicaUp(primary)
			}
			s := newStore(b, primary, redisstore.Options{MinReplicas: replicas})
			ctx := context.Background()
			prev := pair("c", 1)
			if err := s.CompareAndStore(ctx, prev, tokensource.Version{}); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for i := range b.N {
				l, err := s.TakeLease(ctx, "a", time.Minute)
				if err != nil {
					b.Fatal(err)
				}
				l.Mark, l.MarkedBy = "fp", "a"
				if err := s.RenewLease(ctx, l); err != nil {
					b.Fatal(err)
				}
				if _, err := s.Load(ctx); err != nil {
					b.Fatal(err)
				}
				next := pair("c", uint64(i)+2)
				if err := s.CompareAndStore(ctx, next, version(prev)); err != nil {
					b.Fatal(err)
				}
				l.Mark, l.MarkedBy = "", ""
				if err := s.ReleaseLease(ctx, l); err != nil {
					b.Fatal(err)
				}
				prev = next
			}
		})
	}
}

// BenchmarkSourceRefresh is the latency of one whole refresh (lease, mark,
// reread, token call, store, release, publish) by a token source against the
// fake Restream (no added latency), on Caddy file_system storage and on
// Redis side by side; the store is the only difference. Each iteration is
// one operator refresh; p50-µs and p99-µs are over all of them. Run the
// test binary itself: certmagic's file lock keeper logs to stderr when
// locks churn this fast, which go test would mix into the results.
//
//	go test -c -o redisstore.test ./tokensource/redisstore/
//	./redisstore.test -test.run '^$' -test.bench SourceRefresh -test.benchtime 1000x -test.count 6 2>/dev/null | tee refresh.txt
//	go run golang.org/x/perf/cmd/benchstat@latest -col /store refresh.txt
func BenchmarkSourceRefresh(b *testing.B) {
	for _, tc := range []struct {
		name  string
		store func(b *testing.B) tokensource.Config
	}{
		{"file_system", func(b *testing.B) tokensource.Config {
			return tokensource.Config{Storage: &certmagic.FileStorage{Path: b.TempDir()}}
		}},
		{"redis", func(b *testing.B) tokensource.Config {
			srv := redistest.Start(b, redistest.Options{})
			return tokensource.Config{Store: newStore(b, srv, redisstore.Options{WatchInterval: redisstore.DefaultWatchInterval})}
		}},
		{"redis_min_replicas_1", func(b *testing.B) tokensource.Config {
			primary := redistest.Start(b, redistest.Options{})
			redistest.Start(b, redistest.Options{ReplicaOf: primary.Addr()}).WaitReplicaUp(primary)
			return tokensource.Config{Store: newStore(b, primary, redisstore.Options{MinReplicas: 1, WatchInterval: redisstore.DefaultWatchInterval})}
		}},
	} {
		b.Run("store="+tc.name, func(b *testing.B) {
			fake := fakerestream.New(fakerestream.Options{Logf: func(string, ...any) {}})
			b.Cleanup(fake.Close)
			cfg := tc.store(b)
			cfg.Account, cfg.ClientID, cfg.ClientSecret = account, "test-client", "test-secret"
			cfg.TokenURL, cfg.Seed, cfg.Timeout = fake.TokenURL(), fake.Seed(), 5*time.Second
			src, err := tokensource.New(cfg)
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(src.Close)
			ctx := context.Background()
			if _, err := src.Token(ctx); err != nil {
				b.Fatal(err)
			}
			var took []time.Duration
			for b.Loop() {
				start := time.Now()
				if err := src.Refresh(ctx); err != nil {
					b.Fatal(err)
				}
				took = append(took, time.Since(start))
			}
			if st := fake.Stats(); st.InvalidGrant != 0 || st.MaxConcurrentRefresh > 1 {
				b.Fatalf("fake: %d invalid_grant, %d concurrent refreshes", st.InvalidGrant, st.MaxConcurrentRefresh)
			}
			slices.Sort(took)
			q := func(p float64) float64 { return float64(took[int(p*float64(len(took)-1))]) / float64(time.Microsecond) }
			b.ReportMetric(q(0.5), "p50-µs")
			b.ReportMetric(q(0.99), "p99-µs")
		})
	}
}
