package tokensource

// TestSimulation runs the refresh protocol of 1–5 instances through seeded
// schedules of simulated time (sim_world_test.go): storage that fails,
// stalls and hangs per operation, locks whose dead holders keep them for a
// while, clocks skewed by minutes, different timeouts per instance, kills
// at any step with restarts on stale seeds, reloads (Close), login installs
// racing refreshes, operator refreshes, upstream 401s, and a token endpoint
// that rotates exactly as Restream does, including rotations whose answer is
// lost. The checks assert I1–I8 during every run, and at its end that the
// chain is alive unless the run lost it in a way no client can survive.
//
// A failing run prints its seed and the command that replays it:
//
//	RESTREAM_SIM_SEED=<seed> RESTREAM_SIM_TRACE=1 go test ./tokensource -run TestSimulation -v
//
// RESTREAM_SIM_SCHEDULES sets how many schedules run (default 20000; 500
// under the race detector, 200 with -short), RESTREAM_SIM_BASE the first
// seed (default 1).

import (
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
)

const simAccount = "sim"

// With -short (the inner loop) the simulation runs a sample of its
// schedules; .ci/run runs the full counts (sim_norace_test.go).
const (
	simShortSchedules     = 200
	simShortItemSchedules = 30
)

// simSchedule is what a seed chooses.
type simSchedule struct {
	seed      uint64
	instances int
	lifetime  time.Duration
	timeouts  []time.Duration
	skews     []time.Duration
	ahead     []time.Duration
	encrypted bool
	killEvery time.Duration // mean; 0 for no kills
	closes    bool
	installs  bool
	operator  bool
	// deadSeed configures a refresh token that was spent elsewhere: every
	// instance starts on empty storage with it, and installs race them.
	deadSeed bool
	faults   simFaults
	// redis, if set, runs the schedule on the Redis model instead of Caddy
	// storage (sim_redis_test.go).
	redis *simRedisSchedule
}

func newSimSchedule(seed uint64, w *simWorld) simSchedule {
	r := w.rng
	sc := simSchedule{seed: seed, instances: 1 + r.IntN(5)}
	sc.lifetime = []time.Duration{60 * time.Second, 2 * time.Minute, 5 * time.Minute}[r.IntN(3)]
	for range sc.instances {
		sc.timeouts = append(sc.timeouts, []time.Duration{time.Second, 2 * time.Second, 5 * time.Second, 10 * time.Second, 20 * time.Second}[r.IntN(5)])
		skew := time.Duration(0)
		if r.IntN(2) == 0 {
			skew = time.Duration(r.Int64N(int64(10*time.Minute))) - 5*time.Minute
		}
		sc.skews = append(sc.skews, skew)
		sc.ahead = append(sc.ahead, sc.lifetime/time.Duration(2+r.IntN(4)))
	}
	sc.encrypted = r.IntN(4) == 0
	if r.IntN(3) > 0 {
		sc.killEvery = sc.lifetime / time.Duration(1+r.IntN(4))
	}
	sc.closes = r.IntN(4) == 0
	sc.installs = r.IntN(4) == 0
	sc.deadSeed = r.IntN(8) == 0
	sc.operator = r.IntN(4) == 0
	f := &sc.faults
	switch r.IntN(6) {
	case 0: // no faults
	case 1: // flaky storage
		f.loadFail, f.storeFail, f.lockFail = 0.1*r.Float64(), 0.2*r.Float64(), 0.05*r.Float64()
	case 2: // slow and hanging storage
		f.slowStorage, f.hangStorage, f.lockStuckMax = 0.1*r.Float64(), 0.03*r.Float64(), 20*time.Second
	case 3: // endpoint faults without lost rotations
		f.endpoint5xx, f.endpoint429, f.endpointSlow = 0.2*r.Float64(), 0.1*r.Float64(), 0.1*r.Float64()
	case 4: // rotations whose answer is lost
		f.endpointLost, f.endpointGarbage = 0.1*r.Float64(), 0.05*r.Float64()
	case 5: // everything
		f.loadFail, f.storeFail, f.lockFail = 0.05*r.Float64(), 0.1*r.Float64(), 0.02*r.Float64()
		f.slowStorage, f.hangStorage, f.lockStuckMax = 0.05*r.Float64(), 0.01*r.Float64(), 10*time.Second
		f.endpoint5xx, f.endpointSlow, f.endpointLost = 0.1*r.Float64(), 0.05*r.Float64(), 0.02*r.Float64()
	}
	f.omitRefreshExpiry = r.IntN(2) == 0
	return sc
}

// skewed reports whether the instances' clocks disagree.
func (sc simSchedule) skewed() bool {
	for _, d := range sc.skews {
		if d != sc.skews[0] {
			return true
		}
	}
	return false
}

func (sc simSchedule) String() string {
	backend := "Caddy storage"
	if sc.redis != nil {
		backend = "Redis (" + sc.redis.String() + ")"
	}
	return fmt.Sprintf("seed %d: %d instances, tokens %s, timeouts %v, skews %v, encrypted %v, kills every %s, closes %v, installs %v, operator %v, spent seed %v, faults %+v, on %s",
		sc.seed, sc.instances, sc.lifetime, sc.timeouts, sc.skews, sc.encrypted, sc.killEvery, sc.closes, sc.installs, sc.operator, sc.deadSeed, sc.faults, backend)
}

// runSimulation runs one seed and returns the violations found. A quarter
// of the seeds run on the Redis model (simOnRedis).
func runSimulation(seed uint64, logger func() *zap.Logger, trace func(string, ...any)) (simSchedule, simResult) {
	return runScenario(seed, simRedisShape(seed), logger, trace)
}

// simResult is what one schedule did.
type simResult struct {
	violations []string
	injected   int // faults that struck, kills included
	kills      int
	events     map[string]int // observer results and PersistFailed, summed over instances
	installed  bool
	// On the Redis model: restarts that kept and lost the data, failovers,
	// write-backs, and whether a data loss put the run on the window list.
	redisKept, redisLost, redisFailovers, redisWriteBacks, redisGapResends int
	redisHistoryOverGap, redisMarksBack                                    int
	redisWindow                                                            bool
}

// runScenario runs one seed; shape, if not nil, adjusts the schedule the
// seed chose (the named item tests below use it to aim at one defect).
func runScenario(seed uint64, shape func(*simSchedule), logger func() *zap.Logger, trace func(string, ...any)) (sc simSchedule, res simResult) {
	w := newSimWorld(seed)
	if trace != nil {
		w.trace = trace
	}
	sc = newSimSchedule(seed, w)
	if shape != nil {
		shape(&sc)
	}
	r := &simRun{w: w, sc: sc, log: logger, obs: &simObserver{events: map[string]int{}}}
	w.model.lifetime = sc.lifetime
	w.model.chains = nil
	_, r.seed = w.model.authorize()
	if sc.deadSeed {
		w.model.issue(0) // spent by someone else before any instance starts
		w.model.allowedInvalid = 1
	}
	if sc.encrypted {
		key := make([]byte, 32)
		for i := range key {
			key[i] = byte(w.rng.IntN(256))
		}
		r.key, _ = NewKeyring(key)
	}
	for len(sc.timeouts) < sc.instances { // a shape may add instances
		sc.timeouts = append(sc.timeouts, 5*time.Second)
		sc.skews = append(sc.skews, 0)
		sc.ahead = append(sc.ahead, sc.lifetime/3)
	}
	r.sc = sc
	if sc.redis != nil {
		r.rd = newSimRedis(w, r, sc.redis)
		w.redis = r.rd
	}
	r.slots = make([]*simInstance, sc.instances)
	for i := range sc.instances {
		r.start(i)
	}
	defer r.killAll()

	end := clockStart.Add(5 * sc.lifetime)
	w.faults = sc.faults
	r.scheduleChaos(end)
	if r.rd != nil {
		r.rd.schedule()
	}
	for i := range r.slots {
		r.requests(i, end.Add(3*sc.lifetime))
	}
	w.run(end)

	// Heal: no more faults; restart what is down; let the chain settle.
	w.faults = simFaults{omitRefreshExpiry: sc.faults.omitRefreshExpiry}
	for i, inst := range r.slots {
		if inst == nil || inst.killed || inst.closedAt != (time.Time{}) {
			r.start(i)
			r.requests(i, end.Add(3*sc.lifetime))
		}
	}
	w.run(end.Add(2 * sc.lifetime))
	r.settle()
	if l := r.lease(); l != nil && l.Owner != "" {
		// Nothing is pending once faults healed: a live instance still
		// holding the lease never gives it back (a dead one's lapses).
		for _, inst := range r.slots {
			if inst != nil && !inst.killed && strings.HasPrefix(l.Owner, inst.owner) && inst.src.act.lease != nil {
				w.violate("%s still holds the lease after the run settled", inst.name)
			}
		}
	}
	r.finalChecks()
	res = simResult{violations: w.violations, events: r.obs.events, installed: r.installed, injected: w.injected, kills: r.kills}
	if rd := r.rd; rd != nil {
		res.redisKept, res.redisLost, res.redisFailovers, res.redisWriteBacks = rd.kept, rd.lost, rd.failovers, rd.writeBacks
		res.redisGapResends, res.redisHistoryOverGap, res.redisMarksBack = rd.gapResends, rd.historyOverGap, rd.marksBack
		res.redisWindow = len(rd.lostMarks) > 0 || len(rd.forgotten) > 0 || slices.ContainsFunc(r.window, func(s string) bool { return strings.HasPrefix(s, "Redis ") })
	}
	return sc, res
}

func TestSimulation(t *testing.T) {
	simRedisStrict = os.Getenv("RESTREAM_SIM_REDIS_STRICT") != ""
	switch simRedisMode = os.Getenv("RESTREAM_SIM_REDIS"); simRedisMode {
	case "", "all", "none":
	default:
		t.Fatalf("RESTREAM_SIM_REDIS=%q: want all, none, or unset (a quarter of the seeds)", simRedisMode)
	}
	if s := os.Getenv("RESTREAM_SIM_SEED"); s != "" {
		seed, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		var logger func() *zap.Logger
		var trace func(string, ...any)
		if os.Getenv("RESTREAM_SIM_TRACE") != "" {
			logger = func() *zap.Logger { return zaptest.NewLogger(t) }
			trace = func(f string, a ...any) { t.Logf(f, a...) }
		}
		sc, res := runSimulation(seed, logger, trace)
		t.Logf("%s", sc)
		for _, msg := range res.violations {
			t.Error(msg)
		}
		return
	}
	n := simDefaultSchedules
	if testing.Short() {
		n = min(n, simShortSchedules)
	}
	if s := os.Getenv("RESTREAM_SIM_SCHEDULES"); s != "" {
		var err error
		if n, err = strconv.Atoi(s); err != nil {
			t.Fatal(err)
		}
	}
	base := uint64(1)
	if s := os.Getenv("RESTREAM_SIM_BASE"); s != "" {
		base, _ = strconv.ParseUint(s, 10, 64)
	}
	var next atomic.Uint64
	var mu sync.Mutex
	var failed []string
	var stats simStats
	start := time.Now()
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= uint64(n) {
					return
				}
				mu.Lock()
				stop := len(failed) >= 5
				mu.Unlock()
				if stop {
					return
				}
				seed := base + i
				sc, res := runSimulation(seed, nil, nil)
				mu.Lock()
				stats.add(sc, res)
				if v := res.violations; len(v) > 0 {
					failed = append(failed, fmt.Sprintf("%s\n  %s\n  replay: RESTREAM_SIM_SEED=%d RESTREAM_SIM_TRACE=1 go test ./tokensource -run 'TestSimulation$' -v",
						sc, strings.Join(v, "\n  "), seed))
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	t.Logf("%d schedules in %s: %s", stats.runs, time.Since(start).Round(time.Millisecond), stats)
	for _, f := range failed {
		t.Error(f)
	}
}

type simStats struct {
	runs, instances, killed, faulted, lost, closes, installs, deadSeeds int
	injected, kills, violations                                         int
	redis, redisKept, redisLost, redisFailovers, redisWriteBacks        int
	redisWindows, redisGapResends                                       int
	gapSeeds                                                            []uint64
	historyOverGap, marksBack                                           []uint64 // seeds
}

func (s *simStats) add(sc simSchedule, res simResult) {
	s.runs++
	s.injected += res.injected
	s.kills += res.kills
	s.violations += len(res.violations)
	if sc.redis != nil {
		s.redis++
		s.redisKept += res.redisKept
		s.redisLost += res.redisLost
		s.redisFailovers += res.redisFailovers
		s.redisWriteBacks += res.redisWriteBacks
		if res.redisHistoryOverGap > 0 {
			s.historyOverGap = append(s.historyOverGap, sc.seed)
		}
		if res.redisMarksBack > 0 {
			s.marksBack = append(s.marksBack, sc.seed)
		}
		if res.redisGapResends > 0 {
			s.redisGapResends += res.redisGapResends
			s.gapSeeds = append(s.gapSeeds, sc.seed)
		}
		if res.redisWindow {
			s.redisWindows++
		}
	}
	if sc.deadSeed {
		s.deadSeeds++
	}
	s.instances += sc.instances
	if sc.killEvery > 0 {
		s.killed++
	}
	if sc.faults != (simFaults{omitRefreshExpiry: sc.faults.omitRefreshExpiry}) {
		s.faulted++
	}
	if sc.faults.endpointLost > 0 || sc.faults.endpointGarbage > 0 {
		s.lost++
	}
	if sc.closes {
		s.closes++
	}
	if sc.installs {
		s.installs++
	}
}

func (s simStats) String() string {
	return fmt.Sprintf("%d instances in all; %d faults injected (%d kills); %d invariant violations; %d schedules with kills, %d with storage or endpoint faults (%d with lost rotations), %d with reloads, %d with installs, %d starting from a spent seed; "+
		"%d on the Redis model: %d Redis restarts keeping the data, %d losing it, %d failovers, %d write-backs, %d runs where a data loss took a mark or the only copy of a record, "+
		"%d spent tokens resent between a data loss and its write-back (answered invalid_grant, chain kept; seeds %v); "+
		"%d runs where a history-only record was written over a lost chain before its write-back (seeds %v); findings (RESTREAM_SIM_REDIS_STRICT=1 fails them): %d runs where a failover brought back a cleared mark (seeds %v)",
		s.instances, s.injected, s.kills, s.violations, s.killed, s.faulted, s.lost, s.closes, s.installs, s.deadSeeds,
		s.redis, s.redisKept, s.redisLost, s.redisFailovers, s.redisWriteBacks, s.redisWindows, s.redisGapResends, s.gapSeeds[:min(len(s.gapSeeds), 5)],
		len(s.historyOverGap), s.historyOverGap[:min(len(s.historyOverGap), 5)], len(s.marksBack), s.marksBack[:min(len(s.marksBack), 5)])
}
