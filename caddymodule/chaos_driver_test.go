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
	_, down := overlapping(in.down, from, to, margin, margin)
	return down
}

// downtime is from just before a kill to the restarted process answering;
// until is zero while the restart is in progress.
type downtime struct{ from, until time.Time }

// overlapping returns the first of downs that [from, to] overlaps, each
// downtime widened by before and after; one still in progress lasts until
// now.
func overlapping(downs []downtime, from, to time.Time, before, after time.Duration) (downtime, bool) {
	for _, d := range downs {
		until := d.until
		if until.IsZero() {
			until = time.Now()
		}
		if !from.After(until.Add(after)) && !to.Before(d.from.Add(-before)) {
			return d, true
		}
	}
	return downtime{}, false
}

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

// chaosSafeWait bounds the driver's wait for a moment when a kill cannot
// lose a rotated pair; past it the kill goes ahead and is counted as forced.
const chaosSafeWait = 10 * time.Second

// chaosRun is one run of the chaos driver: three Caddy processes, and
// where they keep the account's chain.
type chaosRun struct {
	name       string
	duration   time.Duration
	storageDir string // the instances' Caddy storage (file_system)
	global     string // more global options (the Redis backend)
	extra      string // more restream_auth subdirectives
	storage    chaosStorage
	// redis, if set, is killed and restarted too during the run.
	redis *redisOutages
	// hard: RESTREAM_AUTH_CHAOS=hard (file_system), where requests may time
	// out or get 503 and only outages longer than chaosSettle fail.
	hard bool
	// minRotations: a run with fewer means too little traffic to judge.
	minRotations int64
}

// runChaos starts the run's three instances in front of the fake (2-second
// tokens, 100-300 ms token latency, refresh_ahead 1s, timeout 2s), loads
// them from 12 workers for the run's duration while the driver kills and
// restarts a random instance every 3-5 s (and Redis, if the run says so),
// then checks that the chain survived: see TestChaosKillRestart.
func runChaos(t *testing.T, run chaosRun) {
	var journal chaosJournal
	fake := newFake(t, fakerestream.Options{
		AccessTTL: 2 * time.Second, Latency: chaosLatency, LatencyJitter: 200 * time.Millisecond,
		DropDisconnected: true, Logf: journal.add,
	})
	instances := startChaosInstances(t, run, fake)
	diagnose := func() {
		// RESTREAM_AUTH_CHAOS_DUMP names a file for the whole timeline.
		if path := os.Getenv("RESTREAM_AUTH_CHAOS_DUMP"); path != "" {
			_ = os.WriteFile(path, []byte(mergedTimeline(instances, 1<<20)+"\n\n"+journal.tail(1<<20)), 0o600)
		}
		t.Logf("merged restream_auth timeline of all processes (tail):\n%s", mergedTimeline(instances, 150))
		t.Logf("driver and fake events (tail):\n%s", journal.tail(150))
	}

	load := startChaosLoad(instances)
	defer load.halt()
	driver := &chaosDriver{t: t, run: run, fake: fake, journal: &journal, instances: instances}
	err := driver.drive()
	load.halt()
	if err != nil {
		diagnose()
		t.Fatal(err)
	}
	outcome := classifyChaos(load.events, instances, run.redis)
	settled, dead := settleChaos(load.client, instances)
	reportChaos(t, run, driver, load, outcome, settled, fake.Stats())
	checkChaos(t, run, driver, load, outcome, dead, fake.Stats())
	if t.Failed() || run.hard {
		diagnose()
	}
}

func startChaosInstances(t *testing.T, run chaosRun, fake *fakerestream.Server) []*chaosInstance {
	seed := fake.Seed()
	instances := make([]*chaosInstance, chaosInstances)
	for i := range instances {
		cfg := siteConfig{Port: testproc.Port(t), StorageDir: run.storageDir, Fake: fake, Seed: seed,
			Extra: "refresh_ahead 1s\ntimeout 2s\n" + run.extra, Global: run.global}
		in := &chaosInstance{idx: i, cfg: cfg, url: cfg.profileURL()}
		in.proc = startProcess(t, cfg.Caddyfile())
		in.all = append(in.all, in.proc)
		instances[i] = in
	}
	for _, in := range instances {
		waitReady(t, in.url, in.proc)
	}
	return instances
}

// chaosLoad is the workers' traffic: what succeeded, what did not, and the
// longest time without any 200.
type chaosLoad struct {
	client *http.Client
	ok     atomic.Int64
	stop   chan struct{}
	halt   func()

	mu       sync.Mutex
	events   []chaosEvent
	lastOK   time.Time
	outage   time.Duration
	outageAt time.Time
}

// startChaosLoad starts chaosWorkers workers, each going round the
// instances; halt stops them and waits.
func startChaosLoad(instances []*chaosInstance) *chaosLoad {
	l := &chaosLoad{
		client: &http.Client{Timeout: chaosClientTimeout, Transport: &http.Transport{MaxIdleConnsPerHost: chaosWorkers}},
		stop:   make(chan struct{}),
		lastOK: time.Now(),
	}
	var wg sync.WaitGroup
	for w := range chaosWorkers {
		wg.Go(func() {
			for n := 0; ; n++ {
				select {
				case <-l.stop:
					return
				default:
				}
				if !l.send(instances[(w+n)%chaosInstances]) {
					time.Sleep(20 * time.Millisecond) // don't spin on a refused port
				}
			}
		})
	}
	l.halt = sync.OnceFunc(func() {
		close(l.stop)
		wg.Wait()
		l.client.CloseIdleConnections()
	})
	return l
}

// send sends one request and records its outcome; it reports false on a
// transport error.
func (l *chaosLoad) send(in *chaosInstance) bool {
	start := time.Now()
	status, body, err := get(l.client, in.url)
	l.mu.Lock()
	defer l.mu.Unlock()
	if err == nil && status == http.StatusOK {
		l.ok.Add(1)
		if now := time.Now(); now.Sub(l.lastOK) > l.outage {
			l.outage, l.outageAt = now.Sub(l.lastOK), l.lastOK
		}
		l.lastOK = time.Now()
		return true
	}
	ev := chaosEvent{instance: in.idx, start: start, end: time.Now(), status: status}
	if err != nil {
		ev.detail = err.Error()
	} else {
		ev.detail = strings.TrimSpace(string(body))
	}
	l.events = append(l.events, ev)
	return err == nil
}

// chaosDriver kills and restarts the instances, and Redis if the run has
// it, until the run's duration is over.
type chaosDriver struct {
	t         *testing.T
	run       chaosRun
	fake      *fakerestream.Server
	journal   *chaosJournal
	instances []*chaosInstance

	kills, forced, lockKills, redisRestarts int
	safeWaits                               []time.Duration
}

func (d *chaosDriver) drive() error {
	started := time.Now()
	loadDone := started.Add(d.run.duration)
	var redisAt []time.Time
	if d.run.redis != nil {
		redisAt = d.run.redis.schedule(started, d.run.duration)
	}
	nextCaddy := time.Now().Add(chaosKillMin + rand.N(chaosKillMax-chaosKillMin))
	for {
		if len(redisAt) > 0 && redisAt[0].Before(nextCaddy) {
			sleepUntil(redisAt[0])
			redisAt = redisAt[1:]
			d.run.redis.killAndRestart(d.fake, d.journal, d.redisRestarts == 0)
			d.redisRestarts++
			nextCaddy = later(nextCaddy, time.Now())
			continue
		}
		if nextCaddy.After(loadDone) {
			sleepUntil(loadDone)
			return nil
		}
		sleepUntil(nextCaddy)
		nextCaddy = nextCaddy.Add(chaosKillMin + rand.N(chaosKillMax-chaosKillMin))
		if err := d.killInstance(d.instances[rand.IntN(chaosInstances)]); err != nil {
			return err
		}
	}
}

// killInstance SIGKILLs the instance's process at a safe moment (or after
// chaosSafeWait), restarts it on the same port with the same Caddyfile and
// waits until it answers.
func (d *chaosDriver) killInstance(in *chaosInstance) error {
	waitStart := time.Now()
	moment := d.run.storage.waitForKill(d.fake)
	d.safeWaits = append(d.safeWaits, time.Since(waitStart))
	if !moment.safe {
		d.forced++
	}
	if moment.lockFile {
		d.lockKills++
	}
	p := in.current()
	n, oldest, sinceEnd := d.fake.TokenActivity()
	d.journal.add("driver: SIGKILL instance %d pid %d (safe=%v, lock file=%v, token calls in flight=%d oldest=%s, last ended %s ago)",
		in.idx, p.PID(), moment.safe, moment.lockFile, n, oldest.Round(time.Millisecond), sinceEnd.Round(time.Millisecond))
	in.mu.Lock()
	in.down = append(in.down, downtime{from: time.Now()})
	in.mu.Unlock()
	if exitedBeforeKill(p) {
		// Exited by itself: show why (a crash, or the host out of memory).
		moment.release()
		return fmt.Errorf("instance %d (pid %d) exited before the kill; its output ends:\n%s", in.idx, p.PID(), tailString(p.Output(), 30))
	}
	p.Kill()
	moment.release()
	d.kills++
	restarted := startProcess(d.t, in.cfg.Caddyfile())
	d.journal.add("driver: restarted instance %d as pid %d", in.idx, restarted.PID())
	err := waitAnswer(in.url, restarted)
	d.journal.add("driver: instance %d answers", in.idx)
	in.mu.Lock()
	in.proc = restarted
	in.all = append(in.all, restarted)
	in.down[len(in.down)-1].until = time.Now()
	in.mu.Unlock()
	if err != nil {
		return fmt.Errorf("restarting instance %d: %v\n%s", in.idx, err, restarted.Output())
	}
	return nil
}

// chaosOutcome sorts the requests that did not end in 200.
type chaosOutcome struct {
	failed   []chaosEvent // a completed answer other than 200
	redis503 []chaosEvent // 503 temporarily_unavailable while Redis was down or recovering
	connErrs []chaosEvent // transport errors of instances being killed or restarted
	liveErrs []chaosEvent // transport errors of live instances
	// lastRedis503 is the latest end of a Redis 503 after Redis answered again.
	lastRedis503 time.Duration
}

func classifyChaos(events []chaosEvent, instances []*chaosInstance, redis *redisOutages) chaosOutcome {
	var o chaosOutcome
	for _, ev := range events {
		switch {
		case ev.status == http.StatusServiceUnavailable && strings.Contains(ev.detail, `"temporarily_unavailable"`):
			d, during := redis.around(ev.start, ev.end)
			if !during {
				o.failed = append(o.failed, ev)
				break
			}
			o.redis503 = append(o.redis503, ev)
			o.lastRedis503 = max(o.lastRedis503, ev.end.Sub(d.until))
		case ev.status != 0:
			o.failed = append(o.failed, ev)
		case instances[ev.instance].wasDown(ev.start, ev.end, 50*time.Millisecond):
			o.connErrs = append(o.connErrs, ev)
		default:
			o.liveErrs = append(o.liveErrs, ev)
		}
	}
	return o
}

// settleChaos waits up to chaosSettle for every instance to answer 200 and
// returns how long that took and the instances that never did.
func settleChaos(client *http.Client, instances []*chaosInstance) (settled time.Duration, dead []string) {
	settleStart := time.Now()
	for _, in := range instances {
		deadline := settleStart.Add(chaosSettle)
		for {
			status, body, err := get(client, in.url)
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
	return time.Since(settleStart), dead
}

func reportChaos(t *testing.T, run chaosRun, d *chaosDriver, load *chaosLoad, o chaosOutcome, settled time.Duration, st fakerestream.Stats) {
	var maxWait time.Duration
	for _, w := range d.safeWaits {
		maxWait = max(maxWait, w)
	}
	mode := run.name
	if run.hard {
		mode += ", hard"
	}
	t.Logf("chaos (%s): requests ok=%d failed=%d connection_errors=%d (to killed/restarting instances) other_transport_errors=%d; "+
		"caddy kills=%d (%d while a storage lock file existed, %d without a safe moment, longest wait %s); longest_outage=%s (from %s) settle=%s; "+
		"fake: rotations=%d refresh_calls=%d invalid_grant=%d dropped_calls=%d lost_rotations=%d max_concurrent_refreshes=%d api401=%d",
		mode, load.ok.Load(), len(o.failed), len(o.connErrs), len(o.liveErrs),
		d.kills, d.lockKills, d.forced, maxWait.Round(time.Millisecond), load.outage.Round(time.Millisecond), load.outageAt.Format("15:04:05.000"), settled.Round(time.Millisecond),
		st.RefreshOK, st.RefreshCalls, st.InvalidGrant, st.DroppedCalls, st.LostRotations, st.MaxConcurrentRefresh, st.API401)
	if run.redis != nil {
		writeBacks := 0
		for _, in := range d.instances {
			in.mu.Lock()
			procs := append([]*testproc.Process(nil), in.all...)
			in.mu.Unlock()
			for _, p := range procs {
				out := p.Output()
				writeBacks += strings.Count(out, "wrote it back") + strings.Count(out, "wrote the newer one")
			}
		}
		t.Logf("chaos (%s): 503_while_redis_down=%d (last %s after Redis answered); redis restarts=%d (%s); write-backs logged=%d",
			mode, len(o.redis503), o.lastRedis503.Round(time.Millisecond), d.redisRestarts, strings.Join(run.redis.notes, "; "), writeBacks)
	}
	report := func(what string, evs []chaosEvent) {
		for i, ev := range evs {
			if i == 10 {
				t.Logf("... %d more %s", len(evs)-10, what)
				break
			}
			t.Logf("%s: instance %d at %s (took %s): %d %.300s", what, ev.instance, ev.start.Format("15:04:05.000"), ev.end.Sub(ev.start).Round(time.Millisecond), ev.status, ev.detail)
		}
	}
	report("failed response", o.failed)
	report("transport error on a live instance", o.liveErrs)
	if testing.Verbose() {
		report("connection error (kill)", o.connErrs)
		report("503 while Redis was down", o.redis503)
	}
}

func checkChaos(t *testing.T, run chaosRun, d *chaosDriver, load *chaosLoad, o chaosOutcome, dead []string, st fakerestream.Stats) {
	if len(dead) > 0 {
		t.Errorf("the chain is not alive %s after the load:\n%s", chaosSettle, strings.Join(dead, "\n"))
	}
	if st.InvalidGrant != 0 {
		t.Errorf("invalid_grant = %d (lost rotations %d)", st.InvalidGrant, st.LostRotations)
	}
	if run.hard {
		if load.outage > chaosSettle {
			t.Errorf("no instance answered 200 for %s (from %s)", load.outage, load.outageAt.Format("15:04:05.000"))
		}
	} else {
		switch {
		case len(o.failed) != 0 && run.redis != nil:
			t.Errorf("%d completed responses were neither 200 nor a 503 while Redis was down", len(o.failed))
		case len(o.failed) != 0:
			t.Errorf("%d completed responses were not 200", len(o.failed))
		}
		if len(o.liveErrs) != 0 {
			t.Errorf("%d requests to live instances got no answer (client timeout %s)", len(o.liveErrs), chaosClientTimeout)
		}
		redisKills := 0
		if run.redis != nil {
			redisKills = run.redis.kills
		}
		if want := int(run.duration/chaosKillMax) - 1 - redisKills; d.kills < want {
			t.Errorf("only %d Caddy kills in %s, want %d or more", d.kills, run.duration, want)
		}
	}
	if run.redis != nil && d.redisRestarts != run.redis.kills {
		t.Errorf("Redis restarted %d times, want %d", d.redisRestarts, run.redis.kills)
	}
	if load.ok.Load() == 0 || st.RefreshOK < run.minRotations {
		t.Errorf("too little traffic to mean anything: %d ok requests, %d rotations", load.ok.Load(), st.RefreshOK)
	}
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
