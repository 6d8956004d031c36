package tokensource

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
)

// BenchmarkRefreshStorm: 10,000 goroutines ask for a token while the stored
// one has expired. Exactly one token-endpoint call must serve them all; the
// wait distribution is reported (the fake answers after 50 ms).
//
//	go test -run '^$' -bench RefreshStorm -benchtime 5x ./tokensource/
func BenchmarkRefreshStorm(b *testing.B) {
	const waiters = 10_000
	fake := fakerestream.New(fakerestream.Options{ClientID: testClientID, ClientSecret: testClientSecret,
		Latency: 50 * time.Millisecond, Logf: func(string, ...any) {}})
	b.Cleanup(fake.Close)
	var all []time.Duration
	for b.Loop() {
		b.StopTimer()
		src, err := New(Config{Account: testAccount, ClientID: testClientID, ClientSecret: testClientSecret,
			TokenURL: fake.TokenURL(), Seed: fake.Seed(), Storage: &certmagic.FileStorage{Path: b.TempDir()}})
		if err != nil {
			b.Fatal(err)
		}
		before := fake.Stats().RefreshCalls
		waits := make([]time.Duration, waiters)
		start := make(chan struct{})
		var ready, done sync.WaitGroup
		for i := range waiters {
			ready.Add(1)
			done.Add(1)
			go func() {
				defer done.Done()
				ready.Done()
				<-start
				t0 := time.Now()
				if _, err := src.Token(context.Background()); err != nil {
					b.Error(err)
				}
				waits[i] = time.Since(t0)
			}()
		}
		ready.Wait()
		b.StartTimer()
		close(start)
		done.Wait()
		b.StopTimer()
		if calls := fake.Stats().RefreshCalls - before; calls != 1 {
			b.Fatalf("%d waiters caused %d token-endpoint calls, want 1", waiters, calls)
		}
		src.Close()
		all = append(all, waits...)
		b.StartTimer()
	}
	slices.Sort(all)
	q := func(p float64) float64 { return float64(all[int(p*float64(len(all)-1))]) / 1e6 }
	b.ReportMetric(1, "endpoint-calls/storm")
	b.ReportMetric(q(0.5), "p50-ms")
	b.ReportMetric(q(0.99), "p99-ms")
	b.ReportMetric(q(1), "max-ms")
}
