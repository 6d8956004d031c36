package redisstore_test

import (
	"context"
	"testing"
	"time"

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
