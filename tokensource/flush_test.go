package tokensource

import (
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
)

// A pair held only in memory whose write keeps failing is retried at once
// for a newly rejected token, then no more than once a second however often
// requests wake the refresher: TestChaosRedis/no_persistence logged a failed
// write about every millisecond, one per woken round, while an upstream
// rejected the token.
func TestFailedFlushBacksOffWhileRequestsWake(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	var broken atomic.Bool
	var writes atomic.Int64
	env.st.setOnStore(func(key string, _ []byte) error {
		if key == RecordKey(testAccount) && broken.Load() {
			writes.Add(1)
			return errors.New("disk full")
		}
		return nil
	})
	s := env.seededSource(t, "o")
	s.Start()
	mustToken(t, s)
	at := clockStart.Add(55 * time.Minute)
	env.clk.waitForWaiter(t, at)

	broken.Store(true)
	env.clk.AdvanceTo(at) // proactive refresh: generation 2, its write fails
	eventually(t, "generation 2 served from memory", func() bool { return s.Current().Generation == 2 })

	rejected := s.Current()
	before := writes.Load()
	for range 200 { // requests see upstream 401s and wake the refresher
		s.Rejected(rejected)
		time.Sleep(200 * time.Microsecond)
	}
	time.Sleep(50 * time.Millisecond)
	if n := writes.Load() - before; n > 1 {
		t.Fatalf("%d write retries within one second of the fake clock after 200 wake-ups, want at most 1 (at once for the rejection)", n)
	}
	env.clk.Advance(time.Second)
	s.Rejected(rejected)
	eventually(t, "a retry a second later", func() bool { return writes.Load()-before >= 2 })
}
