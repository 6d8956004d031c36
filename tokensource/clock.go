package tokensource

import (
	"context"
	"time"
)

// Clock is the time source of a Source; tests substitute a fake one. Every
// duration the protocol measures (lease age, backoff, token validity) is a
// difference of two readings of this one clock, so only its rate matters:
// Restream's clock and other instances' clocks are never compared with it.
type Clock interface {
	Now() time.Time
	// At fires at the given time (at once if it has passed). Taking an
	// absolute time, not a duration, keeps a wake-up from drifting when the
	// clock moves between reading it and arming the timer.
	At(t time.Time) <-chan time.Time
	// AfterFunc calls f at the given time (at once, or soon, if it has
	// passed). stop cancels the call; it reports whether it did.
	AfterFunc(t time.Time, f func()) (stop func() bool)
}

// timeoutClock is a Clock that also decides when operations time out; the
// deterministic simulation implements it so that deadlines follow simulated
// time instead of the wall clock.
type timeoutClock interface {
	WithTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc)
}

// sleeperClock is a Clock that also sleeps; the simulation implements it so
// that a sleeping goroutine yields to the scheduler.
type sleeperClock interface {
	Sleep(ctx context.Context, d time.Duration) error
}

type realClock struct{}

func (realClock) Now() time.Time                  { return time.Now() }
func (realClock) At(t time.Time) <-chan time.Time { return time.After(time.Until(t)) }
func (realClock) AfterFunc(t time.Time, f func()) func() bool {
	return time.AfterFunc(time.Until(t), f).Stop
}

// withTimeout bounds ctx by d, on c's notion of time.
func withTimeout(ctx context.Context, c Clock, d time.Duration) (context.Context, context.CancelFunc) {
	if tc, ok := c.(timeoutClock); ok {
		return tc.WithTimeout(ctx, d)
	}
	return context.WithTimeout(ctx, d)
}

// sleep waits d on c, or until ctx is done.
func sleep(ctx context.Context, c Clock, d time.Duration) error {
	if sc, ok := c.(sleeperClock); ok {
		return sc.Sleep(ctx, d)
	}
	select {
	case <-c.At(c.Now().Add(d)):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
