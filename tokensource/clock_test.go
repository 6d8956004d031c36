package tokensource

import (
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeClock is a Clock that moves only when a test says so. It also serves as
// the fake Restream server's clock (Options.Now), so token lifetimes, expiry
// margins, backoffs, leases and refresh schedules all follow it.
type fakeClock struct {
	mu      sync.Mutex
	now     time.Time
	waiters []*clockWaiter
	funcs   []clockFunc // AfterFunc callbacks, kept apart from sleepers
	// added is closed and replaced whenever a waiter registers, so tests can
	// wait for the refresher to go to sleep without polling.
	added chan struct{}
}

type clockWaiter struct {
	at time.Time
	ch chan time.Time
}

type clockFunc struct {
	at      time.Time
	f       func()
	stopped *bool
}

// AfterFunc runs f when the clock reaches at: synchronously inside the
// Advance that gets there, so its effect is visible when Advance returns.
func (c *fakeClock) AfterFunc(at time.Time, f func()) func() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !at.After(c.now) {
		f()
		return func() bool { return false }
	}
	stopped := new(bool)
	c.funcs = append(c.funcs, clockFunc{at, f, stopped})
	return func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		was := *stopped
		*stopped = true
		return !was
	}
}

// pendingFuncs counts AfterFunc callbacks neither run nor stopped.
func (c *fakeClock) pendingFuncs() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, cf := range c.funcs {
		if !*cf.stopped {
			n++
		}
	}
	return n
}

// clockStart is a whole second, so the token endpoint's epoch-seconds expiry
// and its expires_in agree exactly.
var clockStart = time.Date(2030, time.March, 4, 5, 6, 7, 0, time.UTC)

func newFakeClock() *fakeClock {
	return &fakeClock{now: clockStart, added: make(chan struct{})}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) After(d time.Duration) <-chan time.Time { return c.At(c.Now().Add(d)) }

func (c *fakeClock) At(at time.Time) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	if !at.After(c.now) {
		ch <- c.now
		return ch
	}
	c.waiters = append(c.waiters, &clockWaiter{at: at, ch: ch})
	close(c.added)
	c.added = make(chan struct{})
	return ch
}

// Advance moves the clock forward and fires every waiter that is due.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	kept := c.waiters[:0]
	for _, w := range c.waiters {
		if !w.at.After(c.now) {
			w.ch <- c.now // buffered, never blocks
			continue
		}
		kept = append(kept, w)
	}
	c.waiters = kept
	keptFuncs := c.funcs[:0]
	for _, cf := range c.funcs {
		if *cf.stopped {
			continue
		}
		if !cf.at.After(c.now) {
			*cf.stopped = true
			cf.f()
			continue
		}
		keptFuncs = append(keptFuncs, cf)
	}
	c.funcs = keptFuncs
}

// runRealtime makes the clock follow the wall clock (in 25 ms steps) until
// the test ends, for tests where instances wait on each other's leases while
// a real-latency token call is in flight.
func (c *fakeClock) runRealtime(t testing.TB) {
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(25 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				c.Advance(25 * time.Millisecond)
			}
		}
	}()
	t.Cleanup(func() { close(stop); <-done })
}

// AdvanceTo moves the clock to t (which must not be in the past).
func (c *fakeClock) AdvanceTo(t time.Time) {
	c.Advance(t.Sub(c.Now()))
}

// hasWaiter reports whether something sleeps until exactly at.
func (c *fakeClock) hasWaiter(at time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, w := range c.waiters {
		if w.at.Equal(at) {
			return true
		}
	}
	return false
}

// waitForWaiter blocks until something (normally the Source's refresher)
// sleeps until exactly at, or fails the test after a real-time bound.
func (c *fakeClock) waitForWaiter(t testing.TB, at time.Time) {
	t.Helper()
	deadline := time.NewTimer(5 * time.Second)
	defer deadline.Stop()
	for {
		c.mu.Lock()
		for _, w := range c.waiters {
			if w.at.Equal(at) {
				c.mu.Unlock()
				return
			}
		}
		added := c.added
		c.mu.Unlock()
		select {
		case <-added:
		case <-deadline.C:
			t.Fatalf("nothing sleeps until %s (now %s); sleepers: %s", at.Format(time.RFC3339Nano),
				c.Now().Format(time.RFC3339Nano), c.describeWaiters())
		}
	}
}

func (c *fakeClock) describeWaiters() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var ss []string
	for _, w := range c.waiters {
		ss = append(ss, w.at.Format(time.RFC3339Nano))
	}
	sort.Strings(ss)
	if len(ss) == 0 {
		return "none"
	}
	return strings.Join(ss, ", ")
}

// TestFakeClock checks the helper itself, so a broken clock cannot make the
// Source tests pass vacuously.
func TestFakeClock(t *testing.T) {
	t.Parallel()
	c := newFakeClock()
	if got := c.Now(); !got.Equal(clockStart) {
		t.Fatalf("Now = %v, want %v", got, clockStart)
	}
	immediate := c.After(0)
	select {
	case <-immediate:
	default:
		t.Fatal("After(0) did not fire at once")
	}
	ch := c.After(time.Minute)
	c.waitForWaiter(t, clockStart.Add(time.Minute))
	c.Advance(59 * time.Second)
	select {
	case <-ch:
		t.Fatal("fired 1s early")
	default:
	}
	if !c.hasWaiter(clockStart.Add(time.Minute)) {
		t.Fatal("waiter lost")
	}
	c.Advance(time.Second)
	select {
	case got := <-ch:
		if !got.Equal(clockStart.Add(time.Minute)) {
			t.Fatalf("fired with %v", got)
		}
	default:
		t.Fatal("did not fire when due")
	}
	if c.hasWaiter(clockStart.Add(time.Minute)) {
		t.Fatal("fired waiter still registered")
	}
}
