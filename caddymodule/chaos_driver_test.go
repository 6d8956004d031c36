package caddymodule_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/redistest"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
)

// Chaos parameters.
const (
	chaosInstances = 3
	chaosWorkers   = 12
	chaosDuration  = 60 * time.Second
	chaosKillMin   = 3 * time.Second
	chaosKillMax   = 5 * time.Second
	// chaosClientTimeout is short on purpose: a stuck instance shows up as
	// timeouts rather than as a slow test.
	chaosClientTimeout = 5 * time.Second
	// chaosQuiet is how long ago the last token call must have ended before
	// a kill.
	chaosQuiet = 100 * time.Millisecond
	// chaosLatency is the fake's smallest token call latency.
	chaosLatency = 100 * time.Millisecond
	// chaosSettle bounds the wait for every instance to answer 200 at the
	// end: above the storage lock guard's bound (about 35 s).
	chaosSettle = 45 * time.Second
)

// chaosInstance is one sidecar slot: a port and a Caddyfile, run by a
// sequence of processes as it is killed and restarted.
type chaosInstance struct {
	idx  int
	cfg  siteConfig
	url  string
	mu   sync.Mutex
	proc *testproc.Process
	all  []*testproc.Process
	down []downtime
}

func (in *chaosInstance) current() *testproc.Process {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.proc
}

// wasDown reports whether the instance was down at some time in [from, to],
// give or take margin.
func (in *chaosInstance) wasDown(from, to time.Time, margin time.Duration) bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	for _, d := range in.down {
		until := d.until
		if until.IsZero() {
			until = time.Now()
		}
		if !from.After(until.Add(margin)) && !to.Before(d.from.Add(-margin)) {
			return true
		}
	}
	return false
}

// downtime is from just before a kill to the restarted process answering;
// until is zero while the restart is in progress.
type downtime struct{ from, until time.Time }

// chaosEvent is a request that did not end in 200.
type chaosEvent struct {
	instance   int
	start, end time.Time
	status     int
	detail     string
}

// chaosJournal keeps timestamped driver and fake events for diagnosis.
type chaosJournal struct {
	mu    sync.Mutex
	lines []string
}

func (j *chaosJournal) add(format string, args ...any) {
	line := time.Now().Format("15:04:05.000 ") + fmt.Sprintf(format, args...)
	j.mu.Lock()
	defer j.mu.Unlock()
	j.lines = append(j.lines, line)
}

func (j *chaosJournal) tail(n int) string {
	j.mu.Lock()
	defer j.mu.Unlock()
	return strings.Join(j.lines[max(0, len(j.lines)-n):], "\n")
}

// mergedTimeline merges the restream_auth and storage log lines of every
// process ever run, by time, labelled iN.pM (instance N, its M-th process).
// The repetitive "answering 503" lines are counted, not listed.
func mergedTimeline(instances []*chaosInstance, n int) string {
	type line struct {
		at   float64
		text string
	}
	var lines []line
	for _, in := range instances {
		in.mu.Lock()
		procs := append([]*testproc.Process(nil), in.all...)
		in.mu.Unlock()
		for m, p := range procs {
			label := fmt.Sprintf("i%d.p%d(pid %d)", in.idx, m+1, p.PID())
			answered503 := 0
			for _, raw := range strings.Split(p.Output(), "\n") {
				var e struct {
					TS     float64 `json:"ts"`
					Logger string  `json:"logger"`
					Msg    string  `json:"msg"`
				}
				if json.Unmarshal([]byte(raw), &e) != nil {
					continue
				}
				switch {
				case e.Msg == "no valid token; answering 503":
					answered503++
				case strings.Contains(e.Logger, "restream_auth") || strings.Contains(e.Msg, "lock") || e.Msg == "serving initial configuration":
					sec, frac := math.Modf(e.TS)
					at := time.Unix(int64(sec), int64(frac*1e9)).Format("15:04:05.000")
					lines = append(lines, line{e.TS, at + " " + label + " " + raw})
				}
			}
			if answered503 > 0 {
				lines = append(lines, line{math.MaxFloat64, fmt.Sprintf("%s answered 503 %d times", label, answered503)})
			}
		}
	}
	sort.SliceStable(lines, func(i, j int) bool { return lines[i].at < lines[j].at })
	out := make([]string, 0, n)
	for _, l := range lines[max(0, len(lines)-n):] {
		out = append(out, l.text)
	}
	return strings.Join(out, "\n")
}

// waitAnswer waits up to 30 s until url answers anything, like waitReady,
// but returns an error instead of failing the test (the caller has
// goroutines to stop).
func waitAnswer(url string, p *testproc.Process) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return testproc.WaitHTTP(ctx, url, p)
}

// exitedBeforeKill reports whether p has exited by itself.
func exitedBeforeKill(p *testproc.Process) bool {
	select {
	case <-p.Exited():
		return true
	default:
		return false
	}
}

func tailString(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

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
		cfg := siteConfig{Port: testproc.Port(t), StorageDir: storageDir, Fake: fake, Seed: seed,
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
			in.idx, p.PID(), isSafe, n, oldest.Round(time.Millisecond), sinceEnd.Round(time.Millisecond))
		in.mu.Lock()
		in.down = append(in.down, downtime{from: time.Now()})
		in.mu.Unlock()
		if exitedBeforeKill(p) {
			// Exited by itself: show why (a crash, or the host out of memory).
			unclaim()
			driverErr = fmt.Errorf("instance %d (pid %d) exited before the kill; its output ends:\n%s", in.idx, p.PID(), tailString(p.Output(), 30))
			break
		}
		p.Kill()
		unclaim()
		kills++
		np := startProcess(t, in.cfg.Caddyfile())
		journal.add("driver: restarted instance %d as pid %d", in.idx, np.PID())
		if err := waitAnswer(in.url, np); err != nil {
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
		procs := append([]*testproc.Process(nil), in.all...)
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
