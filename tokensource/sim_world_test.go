package tokensource

// The deterministic simulation's world: a scheduler that runs every
// simulated goroutine one at a time, simulated time with a skewed clock per
// instance, a storage with per-operation faults and latency and real lock
// semantics (the model of Restream's token endpoint is in
// sim_restream_test.go). Given a seed, a run is the same every time:
// goroutines only switch at storage, endpoint and clock operations, and
// every choice is drawn from one seeded source in event order.

import (
	"bytes"
	"container/heap"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"runtime"
	"strings"
	"time"
)

// simEvent is something that happens at a point of true time.
type simEvent struct {
	at   time.Time
	seq  uint64
	fn   func()
	dead *bool // set to cancel
}

type simQueue []*simEvent

func (q simQueue) Len() int { return len(q) }
func (q simQueue) Less(i, j int) bool {
	if !q[i].at.Equal(q[j].at) {
		return q[i].at.Before(q[j].at)
	}
	return q[i].seq < q[j].seq
}
func (q simQueue) Swap(i, j int) { q[i], q[j] = q[j], q[i] }
func (q *simQueue) Push(x any)   { *q = append(*q, x.(*simEvent)) }
func (q *simQueue) Pop() any {
	old := *q
	e := old[len(old)-1]
	*q = old[:len(old)-1]
	return e
}

// simWorld runs one schedule.
type simWorld struct {
	rng    *rand.Rand
	now    time.Time
	seq    uint64
	queue  simQueue
	baton  chan struct{} // a simulated goroutine gives control back
	kv     *simKV
	redis  *simRedis // the store's backend when not nil (sim_redis_test.go)
	model  *simRestream
	faults simFaults
	trace  func(format string, args ...any)
	// injected counts the faults that struck.
	injected int
	// violations found by the checks that run during the schedule.
	violations []string
}

func newSimWorld(seed uint64) *simWorld {
	w := &simWorld{
		rng:   rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		now:   clockStart,
		baton: make(chan struct{}),
		trace: func(string, ...any) {},
	}
	w.kv = &simKV{w: w, data: map[string][]byte{}, locks: map[string]*simProc{}, waiters: map[string][]*simLockWaiter{}}
	w.model = &simRestream{w: w, tokens: map[string]*simToken{}}
	return w
}

func (w *simWorld) violate(format string, args ...any) {
	msg := fmt.Sprintf("t=%s ", w.now.Sub(clockStart)) + fmt.Sprintf(format, args...)
	w.violations = append(w.violations, msg)
	w.trace("VIOLATION %s", msg)
}

// at schedules fn at true time t; the returned flag cancels it.
func (w *simWorld) at(t time.Time, fn func()) *bool {
	if t.Before(w.now) {
		t = w.now
	}
	w.seq++
	dead := new(bool)
	heap.Push(&w.queue, &simEvent{at: t, seq: w.seq, fn: fn, dead: dead})
	return dead
}

// run executes events until none is left or until end.
func (w *simWorld) run(end time.Time) {
	for w.queue.Len() > 0 {
		e := w.queue[0]
		if e.at.After(end) {
			w.now = end
			return
		}
		heap.Pop(&w.queue)
		if *e.dead {
			continue
		}
		w.now = e.at
		e.fn()
	}
	w.now = end
}

func (w *simWorld) dur(lo, hi time.Duration) time.Duration {
	if hi <= lo {
		return lo
	}
	return lo + time.Duration(w.rng.Int64N(int64(hi-lo)))
}

func (w *simWorld) chance(p float64) bool { return p > 0 && w.rng.Float64() < p }

// fault draws a fault of probability p and counts it when it strikes.
func (w *simWorld) fault(p float64) bool {
	if w.chance(p) {
		w.injected++
		return true
	}
	return false
}

// simProc is a simulated goroutine. It runs only while the scheduler waits
// for it, and gives control back whenever it blocks on a simulated
// operation or ends.
type simProc struct {
	w       *simWorld
	inst    *simInstance
	resume  chan any
	name    string
	exited  bool
	exiting bool        // unwinding after its instance was killed
	cancel  func() bool // cancels the pending operation's completion
}

// errSimKilled resumes an operation of a killed instance.
var errSimKilled = errors.New("instance killed")

// spawn starts fn as a simulated goroutine and runs it until it first blocks.
func (w *simWorld) spawn(inst *simInstance, name string, fn func(p *simProc)) *simProc {
	p := &simProc{w: w, inst: inst, resume: make(chan any), name: name}
	if inst != nil {
		inst.running = p
		inst.procs = append(inst.procs, p)
	}
	go func() {
		defer func() {
			if v := recover(); v != nil {
				w.violate("I8: %s panicked: %v", name, v)
			}
			p.exited = true
			w.baton <- struct{}{}
		}()
		<-p.resume
		fn(p)
	}()
	p.resume <- nil
	<-w.baton
	return p
}

// block gives control back until the event that calls wake; the value
// passed to wake is returned. A killed instance's goroutine exits here.
func (p *simProc) block() any {
	if p.inst != nil && p.inst.killed {
		p.exiting = true
		runtime.Goexit()
	}
	p.w.baton <- struct{}{}
	v := <-p.resume
	if v == errSimKilled || (p.inst != nil && p.inst.killed) {
		p.exiting = true
		runtime.Goexit()
	}
	return v
}

// wake resumes p with v and waits until it blocks again or ends. It runs on
// the scheduler.
func (p *simProc) wake(v any) {
	if p.exited {
		return
	}
	if p.inst != nil {
		p.inst.running = p
	}
	p.resume <- v
	<-p.w.baton
}

// callAt runs f at true time t and resumes p with its result.
func (p *simProc) callAt(t time.Time, f func() any) any {
	if p.inst != nil && p.inst.killed {
		if p.exiting {
			return errSimKilled // deferred calls of a dying goroutine
		}
		p.exiting = true
		runtime.Goexit()
	}
	ev := p.w.at(t, func() {
		p.cancel = nil
		if p.inst != nil && p.inst.killed {
			p.wake(errSimKilled)
			return
		}
		p.wake(f())
	})
	p.cancel = func() bool {
		if *ev {
			return false
		}
		*ev = true
		return true
	}
	return p.block()
}

// interrupt ends p's pending operation with err, as a cancelled context
// would; it reports whether p was waiting on one.
func (p *simProc) interrupt(err error) bool {
	c := p.cancel
	if c == nil || p.exited || !c() {
		return false
	}
	p.cancel = nil
	p.wake(err)
	return true
}

// simClock is one instance's clock: true time plus a fixed skew. It also
// decides timeouts and sleeps in simulated time.
type simClock struct {
	w    *simWorld
	inst *simInstance
	skew time.Duration
}

type simDeadlineKey struct{}

func (c *simClock) Now() time.Time { return c.w.now.Add(c.skew) }

func (c *simClock) At(t time.Time) <-chan time.Time {
	panic("the simulation drives the refresher itself; At is not used")
}

func (c *simClock) AfterFunc(t time.Time, f func()) func() bool {
	var dead *bool
	dead = c.w.at(t.Add(-c.skew), func() {
		*dead = true // fired: no longer armed
		if !c.inst.killed {
			f()
		}
	})
	c.inst.timers = append(c.inst.timers, dead)
	return func() bool {
		was := *dead
		*dead = true
		return !was
	}
}

// WithTimeout records the deadline (in true time) for the simulated
// operations to honour; no wall-clock timer is involved.
func (c *simClock) WithTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	deadline := c.w.now.Add(d)
	if c.inst.closeBy != nil && c.inst.closeBy.Before(deadline) {
		deadline = *c.inst.closeBy
	}
	if prev, ok := ctx.Value(simDeadlineKey{}).(time.Time); ok && prev.Before(deadline) {
		deadline = prev
	}
	return context.WithCancel(context.WithValue(ctx, simDeadlineKey{}, deadline))
}

func (c *simClock) Sleep(ctx context.Context, d time.Duration) error {
	until := c.w.now.Add(d)
	if dl, ok := simDeadline(ctx); ok && dl.Before(until) {
		c.proc().callAt(dl, func() any { return nil })
		return context.DeadlineExceeded
	}
	c.proc().callAt(until, func() any { return nil })
	return nil
}

// proc is the simulated goroutine running now on this instance.
func (c *simClock) proc() *simProc { return c.inst.running }

func simDeadline(ctx context.Context) (time.Time, bool) {
	t, ok := ctx.Value(simDeadlineKey{}).(time.Time)
	return t, ok
}

// opDeadline is when an operation of inst gives up: its own deadline, or the
// end of Close's grace, when the Source's context is cancelled.
func opDeadline(ctx context.Context, inst *simInstance) (time.Time, bool) {
	t, ok := simDeadline(ctx)
	if ok && inst.closeBy != nil && inst.closeBy.Before(t) {
		t = *inst.closeBy
	}
	return t, ok
}

// simFaults are a schedule's fault rates; zero is no fault.
type simFaults struct {
	loadFail, storeFail, lockFail float64 // per storage operation
	slowStorage                   float64 // an operation takes seconds
	hangStorage                   float64 // an operation hangs until its deadline
	lockStuckMax                  time.Duration
	endpoint5xx, endpoint429      float64
	endpointLost                  float64 // rotated, answer lost (timeout)
	endpointGarbage               float64 // rotated, unusable 200
	endpointSlow                  float64 // the call takes close to the timeout
	omitRefreshExpiry             bool
}

// simKV is a storage with Caddy's semantics: Load/Store of keys and named
// locks with mutual exclusion. It checks I4 and I5 directly: a write of a
// record or lease must follow a successful read of it in the same lock hold.
type simKV struct {
	w     *simWorld
	data  map[string][]byte
	locks map[string]*simProc
	// readOK tracks, per lock holder, the keys read successfully since it
	// took the lock.
	readOK map[*simProc]map[string]bool
	// waiters are the procs blocked in Lock, by lock name.
	waiters map[string][]*simLockWaiter
	// holds identifies each taking of a lock, so breaking an abandoned
	// hold never frees a later one of the same holder.
	holds  map[string]uint64
	holdID uint64
}

type simLockWaiter struct {
	p       *simProc
	expired *bool
}

func (kv *simKV) latency() time.Duration {
	w := kv.w
	switch {
	case w.fault(w.faults.slowStorage):
		return w.dur(time.Second, 8*time.Second)
	default:
		return w.dur(0, 20*time.Millisecond)
	}
}

// op runs one storage operation for the current proc of inst: after a
// latency, unless its deadline comes first; f applies it at completion.
func (kv *simKV) op(ctx context.Context, inst *simInstance, fail float64, f func() error) error {
	w := kv.w
	p := inst.running
	done := w.now.Add(kv.latency())
	hang := w.fault(w.faults.hangStorage)
	dl, hasDL := opDeadline(ctx, inst)
	if !hasDL {
		w.violate("storage operation without a deadline by %s", p.name)
		dl = w.now.Add(time.Hour)
	}
	if hang || done.After(dl) {
		if err, ok := p.callAt(dl, func() any { return nil }).(error); ok {
			return err
		}
		return context.DeadlineExceeded
	}
	res := p.callAt(done, func() any {
		if w.fault(fail) {
			return errors.New("simulated storage failure")
		}
		return f()
	})
	if err, ok := res.(error); ok {
		return err
	}
	return nil
}

// simStorage is one instance's view of the simKV (a Storage).
type simStorage struct {
	kv   *simKV
	inst *simInstance
}

func (s *simStorage) Load(ctx context.Context, key string) ([]byte, error) {
	var out []byte
	p := s.inst.running
	err := s.kv.op(ctx, s.inst, s.kv.w.faults.loadFail, func() error {
		v, ok := s.kv.data[key]
		s.kv.noteRead(p, key)
		if !ok {
			return fs.ErrNotExist
		}
		out = bytes.Clone(v)
		return nil
	})
	return out, err
}

func (s *simStorage) Store(ctx context.Context, key string, value []byte) error {
	p := s.inst.running
	return s.kv.op(ctx, s.inst, s.kv.w.faults.storeFail, func() error {
		if strings.HasSuffix(key, "/token.json") || strings.HasSuffix(key, "/lease.json") {
			if s.kv.locks[keysFor(simAccount).lock] != p {
				s.kv.w.violate("I5: %s wrote %s without holding the storage lock", p.name, key)
			}
			if !s.kv.readOK[p][key] {
				s.kv.w.violate("I4/I5: %s wrote %s without reading it first under the lock", p.name, key)
			}
		}
		s.kv.data[key] = bytes.Clone(value)
		if strings.HasSuffix(key, "/token.json") {
			s.kv.w.model.stored(key, value, s.inst)
		}
		return nil
	})
}

func (kv *simKV) noteRead(p *simProc, key string) {
	for _, holder := range kv.locks {
		if holder == p {
			if kv.readOK == nil {
				kv.readOK = map[*simProc]map[string]bool{}
			}
			if kv.readOK[p] == nil {
				kv.readOK[p] = map[string]bool{}
			}
			kv.readOK[p][key] = true
		}
	}
}

func (s *simStorage) Lock(ctx context.Context, name string) error {
	kv, w := s.kv, s.kv.w
	p := s.inst.running
	dl, ok := opDeadline(ctx, s.inst)
	if !ok {
		w.violate("lock without a deadline by %s", p.name)
		dl = w.now.Add(time.Hour)
	}
	lat := kv.latency()
	if w.fault(w.faults.lockFail) {
		p.callAt(w.now.Add(lat), func() any { return nil })
		return errors.New("simulated lock failure")
	}
	if w.now.Add(lat).After(dl) {
		p.callAt(dl, func() any { return nil })
		return context.DeadlineExceeded
	}
	if kv.locks[name] == nil {
		res := p.callAt(w.now.Add(lat), func() any {
			if kv.locks[name] != nil {
				return errSimBusy
			}
			kv.take(name, p)
			return nil
		})
		if res == nil {
			return nil
		}
		if err, ok := res.(error); ok && err != errSimBusy {
			return err
		}
	}
	// Wait for the holder to release, or for the deadline.
	waiter := &simLockWaiter{p: p, expired: new(bool)}
	if kv.waiters == nil {
		kv.waiters = map[string][]*simLockWaiter{}
	}
	kv.waiters[name] = append(kv.waiters[name], waiter)
	w.at(dl, func() {
		if *waiter.expired {
			return
		}
		*waiter.expired = true
		p.cancel = nil
		p.wake(context.DeadlineExceeded)
	})
	p.cancel = func() bool {
		if *waiter.expired {
			return false
		}
		*waiter.expired = true
		return true
	}
	res := p.block()
	p.cancel = nil
	if err, ok := res.(error); ok {
		return err
	}
	return nil
}

var errSimBusy = errors.New("busy")

func (kv *simKV) take(name string, p *simProc) {
	kv.locks[name] = p
	kv.holdID++
	if kv.holds == nil {
		kv.holds = map[string]uint64{}
	}
	kv.holds[name] = kv.holdID
	if kv.readOK != nil {
		delete(kv.readOK, p)
	}
}

// release frees a lock and hands it to the first live waiter.
func (kv *simKV) release(name string) {
	delete(kv.locks, name)
	ws := kv.waiters[name]
	for len(ws) > 0 {
		wt := ws[0]
		ws = ws[1:]
		if *wt.expired || (wt.p.inst != nil && wt.p.inst.killed) {
			continue
		}
		kv.waiters[name] = ws
		kv.take(name, wt.p)
		*wt.expired = true
		wt.p.cancel = nil
		kv.w.at(kv.w.now, func() { wt.p.wake(nil) })
		return
	}
	kv.waiters[name] = nil
}

func (s *simStorage) Unlock(ctx context.Context, name string) error {
	p := s.inst.running
	err := s.kv.op(ctx, s.inst, 0, func() error {
		if s.kv.locks[name] != p {
			return errors.New("unlocking a lock not held")
		}
		s.kv.release(name)
		return nil
	})
	if err != nil && s.kv.locks[name] == p {
		// The lock stays behind, as a lock file would, until it is broken.
		s.kv.breakLater(name, p)
	}
	return err
}

// breakLater frees a lock left behind by holder after a while, as a stale
// lock file or the stuck-lock guard would.
func (kv *simKV) breakLater(name string, holder *simProc) {
	hold := kv.holds[name]
	kv.w.at(kv.w.now.Add(kv.w.dur(2*time.Second, 2*time.Second+kv.w.faults.lockStuckMax)), func() {
		if kv.locks[name] == holder && kv.holds[name] == hold {
			kv.release(name)
		}
	})
}

// killLocks models a holder that died holding storage locks: the lock is
// broken after a while (a stale lock file, the stuck-lock guard).
func (kv *simKV) killLocks(inst *simInstance) {
	for name, holder := range kv.locks {
		if holder.inst == inst {
			kv.breakLater(name, holder)
		}
	}
}

// leaseOwner is the lease's owner as stored ("" if none or released).
func (w *simWorld) leaseOwner() string {
	if w.redis != nil {
		return w.redis.leaseOwner()
	}
	return w.kv.leaseOwner()
}

func (kv *simKV) leaseOwner() string {
	var l leaseRecord
	if b, ok := kv.data[LeaseKey(simAccount)]; ok && json.Unmarshal(b, &l) == nil {
		return l.Owner
	}
	return ""
}
