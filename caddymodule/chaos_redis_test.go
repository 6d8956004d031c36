package caddymodule_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/redistest"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource/redisstore"
)

// chaosRedisRun is one sub-run of TestChaosRedis.
type chaosRedisRun struct {
	name       string
	appendOnly bool
	duration   time.Duration
	redisKills int
	// recovery is how long after Redis answers again a 503 still counts as
	// caused by its downtime: the refresher's next round (recheckInterval,
	// 1 s) plus a token call (at most 300 ms), and, when Redis came back
	// empty, the settle lease of the record written back from memory
	// (redisstore.DefaultRestoreSettle), during which nobody refreshes.
	recovery time.Duration
}

// Redis downtime: long enough for the served 2-second tokens to expire.
const (
	chaosRedisDownMin = time.Second
	chaosRedisDownMax = 2 * time.Second
)

// TestChaosRedis is TestChaosKillRestart on Redis, with Redis itself killed
// too: three Caddy processes (the built binary) share the account through
// one redis-server, in front of the fake (2-second tokens, 100-300 ms token
// latency, refresh_ahead 1s, timeout 2s), under load from 12 workers, while
// a random instance is SIGKILLed every 3-5 s and restarted, and Redis is
// SIGKILLed and restarted on the same port and directory, down 1-2 s each
// time.
//
//   - "appendonly" (60 s, Redis killed twice): appendfsync always, so Redis
//     comes back with every write it acknowledged, leases and marks included.
//   - "no persistence" (30 s, Redis killed twice): Redis comes back empty;
//     the instances write back the newest record they know (redisstore's
//     write-back) and the chain goes on.
//
// Caddy kills follow TestChaosKillRestart's rule (a kill inside the rotation
// window loses the chain by design, see TestKillDuringRefreshLosesChain):
// no token call in flight or ended in the last chaosQuiet, the lease free,
// and Redis's generation caught up with every rotation the fake made. Redis
// kills wait for nothing; the first of each sub-run even aims at a token
// call just sent (waiting up to 3 s for one), so that Restream rotates while
// Redis is down. Without persistence that was a window that lost the chain
// (invalid_grant): see TestRedisRestartDuringRefreshStoresNewPair.
//
// Asserted: 0 invalid_grant; every completed response is 200, except 503
// temporarily_unavailable while Redis is down or recovering (see
// chaosRedisRun.recovery); no transport error except to an instance being
// killed or restarted; each instance answers 200 at the end.
func TestChaosRedis(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos: three Caddy processes and a redis-server for 90 s")
	}
	for _, run := range []chaosRedisRun{
		{name: "appendonly", appendOnly: true, duration: 60 * time.Second, redisKills: 2, recovery: 2 * time.Second},
		{name: "no persistence", duration: 30 * time.Second, redisKills: 2, recovery: 2*time.Second + redisstore.DefaultRestoreSettle},
	} {
		t.Run(run.name, func(t *testing.T) { runChaosRedis(t, run) })
	}
}

func runChaosRedis(t *testing.T, run chaosRedisRun) {
	srv := redistest.Start(t, redistest.Options{AppendOnly: run.appendOnly})
	var journal chaosJournal
	fake := newFake(t, fakerestream.Options{
		AccessTTL: 2 * time.Second, Latency: chaosLatency, LatencyJitter: 200 * time.Millisecond,
		DropDisconnected: true, Logf: journal.add,
	})
	storageDir := t.TempDir()
	seed := fake.Seed()
	instances := make([]*chaosInstance, chaosInstances)
	for i := range instances {
		cfg := siteConfig{Port: freePort(t), StorageDir: storageDir, Fake: fake, Seed: seed,
			Extra: "refresh_ahead 1s\ntimeout 2s", Global: redisGlobal(srv.URL())}
		in := &chaosInstance{idx: i, cfg: cfg, url: "http://127.0.0.1:" + itoa(cfg.Port) + "/v2/user/profile"}
		in.proc = startProcess(t, cfg.Caddyfile())
		in.all = append(in.all, in.proc)
		instances[i] = in
	}
	for _, in := range instances {
		waitReady(t, in.url, in.proc)
	}
	diagnose := func() {
		// RESTREAM_AUTH_CHAOS_DUMP names a file for the whole timeline.
		if path := os.Getenv("RESTREAM_AUTH_CHAOS_DUMP"); path != "" {
			_ = os.WriteFile(path, []byte(mergedTimeline(instances, 1<<20)+"\n\n"+journal.tail(1<<20)), 0o600)
		}
		t.Logf("merged restream_auth timeline of all processes (tail):\n%s", mergedTimeline(instances, 150))
		t.Logf("driver and fake events (tail):\n%s", journal.tail(150))
	}

	// redisDown holds Redis's downtimes, from just before each kill to the
	// restarted server answering.
	var redisMu sync.Mutex
	var redisDown []downtime
	redisDownAround := func(from, to time.Time) (downtime, bool) {
		redisMu.Lock()
		defer redisMu.Unlock()
		for _, d := range redisDown {
			until := d.until
			if until.IsZero() {
				until = time.Now()
			}
			if !from.After(until.Add(run.recovery)) && !to.Before(d.from) {
				return d, true
			}
		}
		return downtime{}, false
	}

	cl := &http.Client{Timeout: chaosClientTimeout, Transport: &http.Transport{MaxIdleConnsPerHost: chaosWorkers}}
	defer cl.CloseIdleConnections()
	var (
		ok       atomic.Int64
		evMu     sync.Mutex
		events   []chaosEvent
		stop     = make(chan struct{})
		wg       sync.WaitGroup
		started  = time.Now()
		loadDone = started.Add(run.duration)
	)
	for w := range chaosWorkers {
		wg.Go(func() {
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				in := instances[(w+n)%chaosInstances]
				start := time.Now()
				status, body, err := get(cl, in.url)
				if err == nil && status == http.StatusOK {
					ok.Add(1)
					continue
				}
				ev := chaosEvent{instance: in.idx, start: start, end: time.Now(), status: status}
				if err != nil {
					ev.detail = err.Error()
				} else {
					ev.detail = strings.TrimSpace(string(body))
				}
				evMu.Lock()
				events = append(events, ev)
				evMu.Unlock()
				if err != nil {
					time.Sleep(20 * time.Millisecond) // don't spin on a refused port
				}
			}
		})
	}
	stopLoad := sync.OnceFunc(func() { close(stop); wg.Wait() })
	defer stopLoad()

	// The quiet-moment rule of TestChaosKillRestart, read from Redis.
	recordKey := redisRecordKey("default")
	leaseKey := strings.TrimSuffix(recordKey, "record") + "lease"
	persisted := func() bool {
		gen, err := srv.Do("HGET", recordKey, "gen")
		s, _ := gen.(string)
		return err == nil && s == fmt.Sprint(fake.Stats().RefreshOK)
	}
	// The driver holds the refresh lease itself while it checks and kills,
	// as an instance would: no instance can then be between marking a
	// refresh token and storing its answer, so no refresh can start between
	// the check and the kill (a free lease alone let one start in that gap
	// under load, and the kill landed in the window no client survives).
	// Instances meet it as a lease of an unknown owner and wait.
	const driverLease = `{"owner":"chaos driver","nonce":"driver"}`
	claim := func() bool {
		v, err := srv.Do("SET", leaseKey, driverLease, "NX", "PX", "5000")
		return err == nil && v == "OK"
	}
	unclaim := func() {
		_, _ = srv.Do("EVAL", "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
			"1", leaseKey, driverLease)
	}
	safe := func() bool {
		if !claim() {
			return false // held by an instance, or the settle lease of a write-back
		}
		if fake.TokenIdleFor() >= chaosQuiet && persisted() {
			return true
		}
		unclaim()
		return false
	}

	// Redis is killed at evenly spread times, give or take a second.
	var redisAt []time.Time
	for i := 1; i <= run.redisKills; i++ {
		at := started.Add(run.duration * time.Duration(i) / time.Duration(run.redisKills+1))
		redisAt = append(redisAt, at.Add(rand.N(2*time.Second)-time.Second))
	}

	var kills, forced, redisRestarts int
	var redisKillNotes []string
	var safeWaits []time.Duration
	var driverErr error
	nextCaddy := time.Now().Add(chaosKillMin + rand.N(chaosKillMax-chaosKillMin))
	for driverErr == nil {
		if len(redisAt) > 0 && redisAt[0].Before(nextCaddy) {
			// Kill Redis, wherever the protocol is.
			sleepUntil(redisAt[0])
			redisAt = redisAt[1:]
			if redisRestarts == 0 {
				// The first kill aims at a rotation: a token call just sent,
				// whose answer comes after Redis is gone.
				aim := time.Now()
				for time.Since(aim) < 3*time.Second {
					if n, oldest, _ := fake.TokenActivity(); n > 0 && oldest < chaosLatency/2 {
						break
					}
					time.Sleep(time.Millisecond)
				}
			}
			down := chaosRedisDownMin + rand.N(chaosRedisDownMax-chaosRedisDownMin)
			n, oldest, sinceEnd := fake.TokenActivity()
			journal.add("driver: SIGKILL redis-server for %s (token calls in flight=%d oldest=%s, last ended %s ago; rotations=%d)",
				down.Round(time.Millisecond), n, oldest.Round(time.Millisecond), sinceEnd.Round(time.Millisecond), fake.Stats().RefreshOK)
			rotationsAtKill := fake.Stats().RefreshOK
			redisMu.Lock()
			redisDown = append(redisDown, downtime{from: time.Now()})
			redisMu.Unlock()
			srv.Kill()
			time.Sleep(down) // the downtime itself: nothing to wait for
			srv.Restart()
			redisMu.Lock()
			redisDown[len(redisDown)-1].until = time.Now()
			redisMu.Unlock()
			redisRestarts++
			redisKillNotes = append(redisKillNotes, fmt.Sprintf("down %s, token calls in flight at the kill %d, rotations while down %d",
				redisDown[len(redisDown)-1].until.Sub(redisDown[len(redisDown)-1].from).Round(time.Millisecond), n, fake.Stats().RefreshOK-rotationsAtKill))
			journal.add("driver: redis-server answers again (generation %s, rotations %d)",
				redisField(srv, "default", "gen"), fake.Stats().RefreshOK)
			nextCaddy = later(nextCaddy, time.Now())
			continue
		}
		if nextCaddy.After(loadDone) {
			sleepUntil(loadDone)
			break
		}
		sleepUntil(nextCaddy)
		nextCaddy = nextCaddy.Add(chaosKillMin + rand.N(chaosKillMax-chaosKillMin))
		in := instances[rand.IntN(chaosInstances)]
		waitStart := time.Now()
		isSafe := safe()
		for ; !isSafe && time.Since(waitStart) < 10*time.Second; isSafe = safe() {
			time.Sleep(time.Millisecond)
		}
		if !isSafe {
			forced++
		}
		safeWaits = append(safeWaits, time.Since(waitStart))
		p := in.current()
		n, oldest, sinceEnd := fake.TokenActivity()
		journal.add("driver: SIGKILL instance %d pid %d (safe=%v, token calls in flight=%d oldest=%s, last ended %s ago)",
			in.idx, p.cmd.Process.Pid, isSafe, n, oldest.Round(time.Millisecond), sinceEnd.Round(time.Millisecond))
		in.mu.Lock()
		in.down = append(in.down, downtime{from: time.Now()})
		in.mu.Unlock()
		if err := p.cmd.Process.Kill(); err != nil {
			unclaim()
			driverErr = fmt.Errorf("kill instance %d (pid %d): %v; its output ends:\n%s", in.idx, p.cmd.Process.Pid, err, tailString(p.Output(), 30))
			break
		}
		<-p.exited
		unclaim()
		kills++
		np := startProcess(t, in.cfg.Caddyfile())
		journal.add("driver: restarted instance %d as pid %d", in.idx, np.cmd.Process.Pid)
		if err := waitAnswer(in.url, np, 30*time.Second); err != nil {
			driverErr = fmt.Errorf("restarting instance %d: %v\n%s", in.idx, err, np.Output())
		}
		journal.add("driver: instance %d answers", in.idx)
		in.mu.Lock()
		in.proc = np
		in.all = append(in.all, np)
		in.down[len(in.down)-1].until = time.Now()
		in.mu.Unlock()
	}
	stopLoad()
	if driverErr != nil {
		diagnose()
		t.Fatal(driverErr)
	}

	// Classify what did not end in 200.
	var failed, redis503, connErrs, liveErrs []chaosEvent
	var lastRedis503 time.Duration // latest end of a Redis 503 after Redis answered again
	for _, ev := range events {
		switch {
		case ev.status == http.StatusServiceUnavailable && strings.Contains(ev.detail, `"temporarily_unavailable"`):
			d, during := redisDownAround(ev.start, ev.end)
			if !during {
				failed = append(failed, ev)
				break
			}
			redis503 = append(redis503, ev)
			lastRedis503 = max(lastRedis503, ev.end.Sub(d.until))
		case ev.status != 0:
			failed = append(failed, ev)
		case instances[ev.instance].wasDown(ev.start, ev.end, 50*time.Millisecond):
			connErrs = append(connErrs, ev)
		default:
			liveErrs = append(liveErrs, ev)
		}
	}

	// The chain must be alive: every instance answers 200 once settled.
	settleStart := time.Now()
	var dead []string
	for _, in := range instances {
		deadline := settleStart.Add(chaosSettle)
		for {
			status, body, err := get(cl, in.url)
			if err == nil && status == http.StatusOK {
				break
			}
			if time.Now().After(deadline) {
				dead = append(dead, fmt.Sprintf("instance %d: %d %s %v", in.idx, status, bytes.TrimSpace(body), err))
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	settled := time.Since(settleStart)

	// Write-backs from memory, as the instances logged them.
	writeBacks := 0
	for _, in := range instances {
		in.mu.Lock()
		procs := append([]*caddyProc(nil), in.all...)
		in.mu.Unlock()
		for _, p := range procs {
			out := p.Output()
			writeBacks += strings.Count(out, "wrote it back") + strings.Count(out, "wrote the newer one")
		}
	}
	st := fake.Stats()
	var maxWait time.Duration
	for _, w := range safeWaits {
		maxWait = max(maxWait, w)
	}
	t.Logf("chaos on redis (%s): requests ok=%d 503_while_redis_down=%d (last %s after Redis answered) failed=%d connection_errors=%d (to killed/restarting instances) other_transport_errors=%d; "+
		"caddy kills=%d (%d without a safe moment, longest wait %s); redis restarts=%d (%s); write-backs logged=%d; "+
		"fake: rotations=%d refresh_calls=%d invalid_grant=%d dropped_calls=%d lost_rotations=%d max_concurrent_refreshes=%d api401=%d; settle=%s",
		run.name, ok.Load(), len(redis503), lastRedis503.Round(time.Millisecond), len(failed), len(connErrs), len(liveErrs),
		kills, forced, maxWait.Round(time.Millisecond), redisRestarts, strings.Join(redisKillNotes, "; "), writeBacks,
		st.RefreshOK, st.RefreshCalls, st.InvalidGrant, st.DroppedCalls, st.LostRotations, st.MaxConcurrentRefresh, st.API401, settled.Round(time.Millisecond))
	report := func(what string, evs []chaosEvent) {
		for i, ev := range evs {
			if i == 10 {
				t.Logf("... %d more %s", len(evs)-10, what)
				break
			}
			t.Logf("%s: instance %d at %s (took %s): %d %.300s", what, ev.instance, ev.start.Format("15:04:05.000"), ev.end.Sub(ev.start).Round(time.Millisecond), ev.status, ev.detail)
		}
	}
	report("failed response", failed)
	report("transport error on a live instance", liveErrs)
	if testing.Verbose() {
		report("503 while Redis was down", redis503)
	}

	if len(dead) > 0 {
		t.Errorf("the chain is not alive %s after the load:\n%s", chaosSettle, strings.Join(dead, "\n"))
	}
	if st.InvalidGrant != 0 {
		t.Errorf("invalid_grant = %d (lost rotations %d)", st.InvalidGrant, st.LostRotations)
	}
	if len(failed) != 0 {
		t.Errorf("%d completed responses were neither 200 nor a 503 while Redis was down", len(failed))
	}
	if len(liveErrs) != 0 {
		t.Errorf("%d requests to live instances got no answer (client timeout %s)", len(liveErrs), chaosClientTimeout)
	}
	if redisRestarts != run.redisKills {
		t.Errorf("Redis restarted %d times, want %d", redisRestarts, run.redisKills)
	}
	if want := int(run.duration/chaosKillMax) - 1 - run.redisKills; kills < want {
		t.Errorf("only %d Caddy kills in %s, want %d or more", kills, run.duration, want)
	}
	if ok.Load() == 0 || st.RefreshOK < int64(run.duration/(2*time.Second)) {
		t.Errorf("too little traffic to mean anything: %d ok requests, %d rotations", ok.Load(), st.RefreshOK)
	}
	if t.Failed() {
		diagnose()
	}
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// newRedisStores returns two stores of account "default" on srv, each with
// its own client, as two instances have; their watch is off, so the test
// says when each one loads.
func newRedisStores(t *testing.T, srv *redistest.Server) (a, b *redisstore.Store) {
	t.Helper()
	opt, err := redisstore.ParseURL(srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	stores := make([]*redisstore.Store, 2)
	for i := range stores {
		c := redisstore.NewClient(opt)
		t.Cleanup(func() { _ = c.Close() })
		if stores[i], err = redisstore.New(c, "default", redisstore.Options{WatchInterval: -1}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(stores[i].Close)
	}
	return stores[0], stores[1]
}

// genOf names a loaded record by its generation, never its tokens.
func genOf(rec *tokensource.Record) string {
	if rec == nil {
		return "none"
	}
	return fmt.Sprint(rec.Generation)
}

func chaosRecord(gen uint64) *tokensource.Record {
	now := time.Now()
	return &tokensource.Record{Version: 1, Generation: gen, Chain: "chain-1", AccessToken: fmt.Sprintf("at-%d", gen),
		RefreshToken: fmt.Sprintf("rt-%d", gen), TokenType: "Bearer", Expiry: now.Add(time.Hour), IssuedAt: now}
}

// The window TestChaosRedis found (no persistence), step by step: instance
// A holds the lease and has sent generation 1's refresh token when Redis
// restarts empty; instance B, which knows generation 1, writes it back and
// takes the settle lease. A's new pair (generation 2) must still be
// stored: the settle lease ends 2.5 s later, and whoever refreshes then,
// with no mark left in Redis, sends generation 1's spent token
// (invalid_grant). Before the fix, A's write was refused as lease_lost
// until A's own lease would have needed renewing, 12 s later.
func TestRedisRestartDuringRefreshStoresNewPair(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	a, b := newRedisStores(t, srv)
	ctx := t.Context()
	if err := a.CompareAndStore(ctx, chaosRecord(1), tokensource.Version{}); err != nil {
		t.Fatal(err)
	}
	if rec, err := b.Load(ctx); err != nil || rec.Generation != 1 {
		t.Fatalf("B loads generation %s, %v", genOf(rec), err)
	}
	if _, err := a.Load(ctx); err != nil {
		t.Fatal(err)
	}
	l, err := a.TakeLease(ctx, "A", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	l.Mark, l.MarkedBy = tokensource.Fingerprint("rt-1"), "A"
	if err := a.RenewLease(ctx, l); err != nil {
		t.Fatal(err)
	}

	srv.Kill()
	srv.Restart() // empty: record, lease and mark are gone
	if rec, err := b.Load(ctx); err != nil || rec.Generation != 1 {
		t.Fatalf("B's write-back: generation %s, %v", genOf(rec), err)
	}
	if _, err := b.TakeLease(ctx, "B", 30*time.Second); err == nil {
		t.Fatal("B took the lease during the settle")
	}
	if err := a.CompareAndStore(ctx, chaosRecord(2), tokensource.Version{Generation: 1, Chain: "chain-1"}); err != nil {
		t.Fatalf("A stores the new pair under the settle lease: %v", err)
	}
	if rec, err := b.Load(ctx); err != nil || rec.Generation != 2 {
		t.Fatalf("B then loads generation %s, %v; want generation 2", genOf(rec), err)
	}
}

// The same window when A's write fails while Redis is down and B writes
// generation 1 back before A retries: A's store knows the pair it failed to
// write, so its next Load (the watch, every second, within the settle)
// writes generation 2 back, and A's retry finds it stored. Before the fix,
// A's Load returned generation 1 and its retry was refused as lease_lost.
func TestRedisFailedWriteIsWrittenBack(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	a, b := newRedisStores(t, srv)
	ctx := t.Context()
	if err := a.CompareAndStore(ctx, chaosRecord(1), tokensource.Version{}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Load(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := a.TakeLease(ctx, "A", 30*time.Second); err != nil {
		t.Fatal(err)
	}

	srv.Kill()
	rec2, base := chaosRecord(2), tokensource.Version{Generation: 1, Chain: "chain-1"}
	down, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	err := a.CompareAndStore(down, rec2, base)
	cancel()
	if err == nil {
		t.Fatal("a write to a dead Redis succeeded")
	}
	srv.Restart()
	if rec, err := b.Load(ctx); err != nil || rec.Generation != 1 {
		t.Fatalf("B's write-back: generation %s, %v", genOf(rec), err)
	}
	if rec, err := a.Load(ctx); err != nil || rec.Generation != 2 {
		t.Fatalf("A's Load returns generation %s, %v; want its unwritten generation 2 written back", genOf(rec), err)
	}
	if err := a.CompareAndStore(ctx, rec2, base); err != nil {
		t.Fatalf("A's retry: %v", err)
	}
	if rec, err := b.Load(ctx); err != nil || rec.Generation != 2 {
		t.Fatalf("B then loads generation %s, %v; want generation 2", genOf(rec), err)
	}
}
