package tokensource

// The simulation's Redis: one server in simulated true time that runs the
// real redisstore code (tokensource/redisstore) over a go-redis client whose
// commands never reach a network. A client hook hands each command to this
// model: EVALSHA/EVAL of the store's scripts, each one a Go transcription of
// its Lua, applied atomically at the instant the command completes, and WAIT.
// Keys expire by PX on the world's true time, never on an instance's skewed
// clock. Commands meet the schedule's storage faults (latency, hangs,
// failures, and, Redis's own ambiguity, a script that ran but whose reply was
// lost), and the schedule's Redis events: a restart that keeps the data
// (appendonly), one that loses it, and a failover to a replica that lags
// (with min_replicas 1 the replica has every write a WAIT confirmed).
//
// The scripts are known by their SHA-1: a script redisstore changes or adds
// fails the run until its transcription here follows it.
//
// Checks, besides I1, I2, I3 (the lease holder is the owner of the
// unexpired lease key at true time) and chain survival, which the shared
// code makes:
//
//	fence       a record written by CompareAndStore from an instance that
//	            holds a lease (as the commands it sent tell) lands only while
//	            that lease is the live one at true time, except a write-back
//	            where lease and record are both gone
//	write-back  a record written back (load, or CompareAndStore "restored")
//	            replaces only a missing record or an older generation of the
//	            same chain
//
// A data loss that takes a mark (a token in doubt) or the only copy of the
// newest record known to no running instance is one no client survives: it
// goes on the run's window list, as a kill inside the rotation window does,
// and the I1/I3 checks spare the token whose mark was lost.

import (
	"context"
	"crypto/sha1"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// SimNewRedisStore builds a redisstore.Store for the simulation. It is set
// by sim_redis_ext_test.go, in package tokensource_test: redisstore imports
// this package, so only the external test package can import it.
var SimNewRedisStore func(opt *redis.Options, hook redis.Hook, account string, minReplicas int, kr *Keyring, clock Clock, log *zap.Logger) (Store, error)

// simRedisPrefix is where the store keeps the simulated account's keys.
const simRedisPrefix = "restream_auth/{" + simAccount + "}/"

const (
	simRedisRecord = simRedisPrefix + "record"
	simRedisLease  = simRedisPrefix + "lease"
	simRedisMark   = simRedisPrefix + "mark"
)

// simRedisScripts are redisstore's scripts (scripts.go) by SHA-1, each
// transcribed below; a change to a script changes its SHA-1, and the run
// fails until its transcription follows.
var simRedisScripts = map[string]simRedisScript{
	"532068f7b016a43b331dd9df5fc110cfe21ec77e": {name: "takeLease", run: (*simRedis).takeLease, fail: func(f simFaults) float64 { return f.lockFail }},
	"a9db129266d65f0990dfe3d77c7a794b35b9a499": {name: "renewLease", run: (*simRedis).renewLease, fail: func(f simFaults) float64 { return f.storeFail }},
	"2a324b626ef67be37285edda4d8dbfd7f7eafad7": {name: "releaseLease", run: (*simRedis).releaseLease, fail: func(f simFaults) float64 { return f.storeFail }},
	"604f12f6fe5fa98ef24531bc3659e66a4e1d6bae": {name: "compareAndStore", run: (*simRedis).compareAndStore, fail: func(f simFaults) float64 { return f.storeFail }},
	"d98e2bc772f67263956a7cea6710fd48efd8ff25": {name: "load", run: (*simRedis).load, fail: func(f simFaults) float64 { return f.loadFail }},
}

type simRedisScript struct {
	name string
	run  func(rd *simRedis, inst *simInstance, keys, argv []string) (any, error)
	fail func(simFaults) float64
}

// simRedisSchedule is what a Redis schedule adds to the seed's choices.
type simRedisSchedule struct {
	minReplicas int
	waitFail    float64 // a replica too slow to acknowledge a WAIT
	lag         time.Duration
	events      []simRedisEvent
}

type simRedisEventKind int

const (
	simRedisRestartKept simRedisEventKind = iota // appendonly: the data survives
	simRedisRestartLost                          // no persistence: every key gone
	simRedisFailover                             // a replica promoted: the newest writes may be gone
)

func (k simRedisEventKind) String() string {
	return [...]string{"restart keeping data", "restart losing data", "failover"}[k]
}

type simRedisEvent struct {
	kind     simRedisEventKind
	at, upAt time.Time // true time
}

func (e simRedisEvent) String() string {
	return fmt.Sprintf("%s at %s (down %s)", e.kind, e.at.Sub(clockStart), e.upAt.Sub(e.at))
}

func (rs *simRedisSchedule) String() string {
	return fmt.Sprintf("min_replicas %d, wait fails %.2f, replica lag %s, events %v", rs.minReplicas, rs.waitFail, rs.lag, rs.events)
}

// simOnRedis picks a quarter of the seeds for the Redis model, by a hash of
// the seed, so a seed replays on the backend it failed on.
func simOnRedis(seed uint64) bool {
	if simRedisMode != "" {
		return simRedisMode == "all"
	}
	z := seed + 0x9e3779b97f4a7c15
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return (z^(z>>31))%4 == 0
}

// simRedisMode is RESTREAM_SIM_REDIS: "all", "none", or "" for a quarter.
var simRedisMode string

// simRedisShape returns the shape that puts seed's schedule on Redis, or
// nil. Its choices come from a source of their own, so the seed's other
// choices are those it makes on Caddy storage.
func simRedisShape(seed uint64) func(*simSchedule) {
	if !simOnRedis(seed) {
		return nil
	}
	return func(sc *simSchedule) {
		r := rand.New(rand.NewPCG(seed, 0x5eed7ed15))
		dur := func(lo, hi time.Duration) time.Duration { return lo + time.Duration(r.Int64N(int64(hi-lo))) }
		rs := &simRedisSchedule{lag: dur(0, 3*time.Second)}
		if r.IntN(2) == 0 {
			rs.minReplicas = 1
			if r.IntN(2) == 0 {
				rs.waitFail = 0.2 * r.Float64()
			}
		}
		end := 5 * sc.lifetime
		var ats []time.Duration
		for range r.IntN(4) {
			ats = append(ats, dur(0, end))
		}
		slices.Sort(ats)
		for _, at := range ats {
			e := simRedisEvent{kind: simRedisEventKind(r.IntN(3)), at: clockStart.Add(at)}
			e.upAt = e.at.Add(dur(100*time.Millisecond, 10*time.Second))
			if n := len(rs.events); n > 0 && e.at.Before(rs.events[n-1].upAt.Add(time.Second)) {
				continue // one event at a time
			}
			rs.events = append(rs.events, e)
		}
		sc.redis = rs
	}
}

type simRedisKey struct {
	str    string
	hash   map[string]string // nil for a string
	expire time.Time         // true time; zero for none
}

type simRedisData map[string]*simRedisKey

func (d simRedisData) clone() simRedisData {
	c := make(simRedisData, len(d))
	for k, v := range d {
		nv := *v
		if v.hash != nil {
			nv.hash = make(map[string]string, len(v.hash))
			for f, x := range v.hash {
				nv.hash[f] = x
			}
		}
		c[k] = &nv
	}
	return c
}

type simVersion struct {
	gen   uint64
	chain string
}

// simRedis is the Redis server of one schedule.
type simRedis struct {
	w    *simWorld
	r    *simRun
	sc   *simRedisSchedule
	data simRedisData
	// loaded is the server's script cache; a restart empties it.
	loaded map[string]bool
	down   bool
	// replica is what a promoted replica would hold: the primary's state
	// after a lag, or at once after a confirmed WAIT.
	replica    simRedisData
	replicaSeq uint64
	seq, epoch uint64
	replicate  bool
	// held is, per instance, the lease tokens the commands it sent say it
	// holds: taken (reply delivered), neither released nor found lost.
	held map[*simInstance]map[string]bool
	// knows is the newest record each instance's store read or wrote.
	knows map[*simInstance]simVersion
	// lostMarks are fingerprints whose mark a data loss took; lostLeases the
	// owners whose lease it took.
	lostMarks, lostLeases map[string]bool
	// forgotten are the refresh tokens spent before a data loss that took
	// the newest record for good: with it went their fingerprints (I6), so
	// I1 cannot hold for them.
	forgotten map[string]bool
	// gap is the record a data loss took, until Redis holds it (or newer, or
	// another chain) again; gapSpent the refresh tokens spent before the
	// loss. Until the write-back, an instance that knows nothing newer acts
	// on what Redis has: a fresh one sends its consumed seed, one that reads
	// the older generation a failover left sends its spent token. Each is
	// answered invalid_grant and the chain survives; they are counted
	// (gapResends) and spared from I1 and the invalid_grant count, not
	// hidden: see the summary line.
	gap        *simVersion
	gapClosed  time.Time // and a round after: an instance may have read before the write-back
	gapSpent   map[string]bool
	gapResends int
	// Findings the model tolerates, counted (see simRedisStrict):
	// historyOverGap counts history-only records (a dead seed's, no chain)
	// written into a Redis that lost a chain's record; the write-back
	// replaces them (the chain survives if a running instance holds it);
	// marksBack counts cleared marks a failover brought back (min_replicas
	// 0): all instances stay in doubt while the token is live.
	historyOverGap, marksBack int
	// unrestored is a record a data loss took that a running instance
	// knows, until Redis holds it (or newer) again.
	unrestored *simVersion

	kept, lost, failovers, writeBacks, waitFails int
	// writtenBack holds the records (data) written back since the last
	// Redis event, and readWrittenBack the instances whose last read
	// returned one of them: they act on a record some store wrote back.
	writtenBack     map[string]bool
	readWrittenBack map[*simInstance]bool
}

func newSimRedis(w *simWorld, r *simRun, sc *simRedisSchedule) *simRedis {
	rd := &simRedis{w: w, r: r, sc: sc, data: simRedisData{}, loaded: map[string]bool{}, replica: simRedisData{},
		held: map[*simInstance]map[string]bool{}, knows: map[*simInstance]simVersion{},
		lostMarks: map[string]bool{}, lostLeases: map[string]bool{}, forgotten: map[string]bool{}, gapSpent: map[string]bool{},
		writtenBack: map[string]bool{}, readWrittenBack: map[*simInstance]bool{}}
	for _, e := range sc.events {
		if e.kind == simRedisFailover {
			rd.replicate = true
		}
	}
	return rd
}

// store builds inst's redisstore.Store, and its watch.
func (rd *simRedis) store(inst *simInstance, log *zap.Logger) Store {
	if SimNewRedisStore == nil {
		panic("SimNewRedisStore is not set: sim_redis_ext_test.go is not built")
	}
	opt := &redis.Options{Addr: "redis.sim.invalid:6379", MaxRetries: -1}
	st, err := SimNewRedisStore(opt, simRedisHook{rd: rd, inst: inst}, simAccount, rd.sc.minReplicas, inst.keyring, inst.clock, log)
	if err != nil {
		panic(err)
	}
	return st
}

// watch is redisstore's background watch (Options.WatchInterval, 1s) in
// simulated time: a Load every second. It runs from 3s before each Redis
// event until 12s after Redis is back, where it matters (what an instance
// knows when Redis loses data, and the write-back after it); elsewhere it
// only refreshes what Load refreshes anyway, and would cost the simulation
// an operation per second and instance.
func (rd *simRedis) watch(inst *simInstance, st Store) {
	rd.w.spawn(inst, inst.name+"/redis-watch", func(p *simProc) {
		w := rd.w
		for {
			next := w.now.Add(time.Second)
			var in bool
			var from time.Time
			for _, e := range rd.sc.events {
				lo, hi := e.at.Add(-3*time.Second), e.upAt.Add(12*time.Second)
				if !next.Before(lo) && !next.After(hi) {
					in = true
					break
				}
				if lo.After(next) && (from.IsZero() || lo.Before(from)) {
					from = lo
				}
			}
			if !in {
				if from.IsZero() {
					return
				}
				next = from
			}
			p.callAt(next, func() any { return nil })
			if inst.killed || inst.closeBy != nil {
				return
			}
			ctx, cancel := inst.clock.WithTimeout(context.Background(), time.Second)
			_, _ = st.Load(ctx)
			cancel()
		}
	})
}

// simRedisHook answers the client's commands from the model.
type simRedisHook struct {
	rd   *simRedis
	inst *simInstance
}

func (h simRedisHook) DialHook(redis.DialHook) redis.DialHook {
	return func(context.Context, string, string) (net.Conn, error) {
		h.rd.w.violate("the simulated Redis client dialled the network")
		return nil, errors.New("the simulation's Redis is not on the network")
	}
}

func (h simRedisHook) ProcessPipelineHook(redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(context.Context, []redis.Cmder) error {
		h.rd.w.violate("redisstore sent a pipeline the simulation does not model")
		return errors.New("pipelines are not modelled")
	}
}

func (h simRedisHook) ProcessHook(redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := h.rd.do(ctx, h.inst, cmd)
		if err != nil {
			cmd.SetErr(err)
		}
		return err
	}
}

// simRedisRedial is how long a command keeps redialing a Redis that is
// down (go-redis: 5 dials 100 ms apart per attempt, 4 attempts, measured
// against a real redis-server at about 1.5 s), and simRedisRedialEvery the
// pause between dials.
const (
	simRedisRedial      = 1500 * time.Millisecond
	simRedisRedialEvery = 100 * time.Millisecond
)

var errSimRedisDown = errors.New("dial tcp redis.sim.invalid:6379: connect: connection refused")

// simRedisReply is a script's outcome as the server produced it.
type simRedisReply struct {
	v   any
	err error
}

func (rd *simRedis) do(ctx context.Context, inst *simInstance, cmd redis.Cmder) error {
	args := make([]string, len(cmd.Args()))
	for i, a := range cmd.Args() {
		args[i] = fmt.Sprint(a)
	}
	switch name := strings.ToLower(args[0]); name {
	case "eval", "evalsha":
		n, _ := strconv.Atoi(args[2])
		keys, argv := args[3:3+n], args[3+n:]
		sha := args[1]
		if name == "eval" {
			h := sha1.Sum([]byte(args[1]))
			sha = hex.EncodeToString(h[:])
		}
		sc, ok := simRedisScripts[sha]
		switch {
		case !ok && name == "evalsha":
			return redis.ErrNoScript // never loaded: the client sends the source
		case !ok:
			first, _, _ := strings.Cut(strings.TrimSpace(args[1]), "\n")
			rd.w.violate("redisstore ran a script the simulation does not model (SHA-1 %s, %q…): transcribe it in sim_redis_test.go", sha, first)
			return errors.New("unmodelled script")
		}
		if sc.name == "releaseLease" {
			delete(rd.held[inst], argv[0]) // the store forgets the lease whatever the outcome
		}
		v, err := rd.op(ctx, inst, sc.fail, func() simRedisReply {
			if !rd.loaded[sha] {
				if name == "evalsha" {
					return simRedisReply{err: redis.ErrNoScript}
				}
				rd.loaded[sha] = true
			}
			v, err := sc.run(rd, inst, keys, argv)
			if inst.killed && sc.name == "renewLease" && argv[2] != "" && v == int64(1) {
				// A mark sent before the kill lands after it: the instance
				// died about to send, inside the rotation window.
				rd.r.window = append(rd.r.window, fmt.Sprintf("%s's mark landed after it was killed", inst.name))
			}
			if sc.name != "load" || err == nil && v.([]any)[0] == "restored" {
				rd.mutated()
			}
			return simRedisReply{v, err}
		})
		if err != nil {
			if sc.name == "compareAndStore" {
				// The store remembers a write that may not have happened.
				gen, _ := strconv.ParseUint(argv[2], 10, 64)
				rd.know(inst, simVersion{gen, argv[3]})
			}
			return err
		}
		rd.delivered(inst, sc.name, argv, v)
		cmd.(*redis.Cmd).SetVal(v)
		return nil
	case "wait":
		n, _ := strconv.Atoi(args[1])
		ms, _ := strconv.ParseInt(args[2], 10, 64)
		acked, err := rd.wait(ctx, inst, n, time.Duration(ms)*time.Millisecond)
		if err != nil {
			return err
		}
		cmd.(*redis.IntCmd).SetVal(acked)
		return nil
	default:
		rd.w.violate("redisstore sent %s, which the simulation does not model", args[0])
		return fmt.Errorf("unmodelled command %s", args[0])
	}
}

// op runs one command of inst: after a latency, unless its deadline comes
// first; apply runs at completion, atomically. A command that hangs may run
// on the server after its client gave up; one that fails may have run, its
// reply lost.
func (rd *simRedis) op(ctx context.Context, inst *simInstance, rate func(simFaults) float64, apply func() simRedisReply) (any, error) {
	w := rd.w
	p := inst.running
	done := w.now.Add(w.kv.latency())
	hang := w.fault(w.faults.hangStorage)
	dl, ok := opDeadline(ctx, inst)
	if !ok {
		w.violate("Redis command without a deadline by %s", p.name)
		dl = w.now.Add(time.Hour)
	}
	if hang || done.After(dl) {
		if w.chance(0.5) {
			epoch := rd.epoch
			w.at(w.now.Add(w.dur(0, dl.Sub(w.now)+time.Second)), func() {
				if !rd.down && rd.epoch == epoch {
					apply()
				}
			})
		}
		if err, ok := p.callAt(dl, func() any { return nil }).(error); ok {
			return nil, err
		}
		return nil, context.DeadlineExceeded
	}
	fail := 0.0
	if rate != nil {
		fail = rate(w.faults)
	}
	// go-redis redials a refused connection (DialerRetries, 100 ms apart)
	// and retries the command (MaxRetries): one sent into a downtime lands
	// on the restarted server if it answers within about 1.5 s, with what
	// its sender knew before the crash.
	redialUntil := w.now.Add(simRedisRedial)
	if dl.Before(redialUntil) {
		redialUntil = dl
	}
	var res any
	for {
		res = p.callAt(done, func() any {
			switch {
			case rd.down:
				return errSimRedisDown
			case w.fault(fail):
				if w.chance(0.5) {
					apply()
				}
				return errors.New("read tcp: connection reset by peer (simulated)")
			}
			return apply()
		})
		if res != errSimRedisDown || !done.Add(simRedisRedialEvery).Before(redialUntil) {
			break
		}
		done = done.Add(simRedisRedialEvery)
	}
	switch x := res.(type) {
	case error:
		return nil, x
	case simRedisReply:
		return x.v, x.err
	}
	return nil, fmt.Errorf("unexpected completion %v", res)
}

// wait is WAIT n timeout: the replica acknowledges everything written so
// far, or, lagging, nothing before the timeout.
func (rd *simRedis) wait(ctx context.Context, inst *simInstance, n int, timeout time.Duration) (int64, error) {
	w := rd.w
	p := inst.running
	dl, ok := opDeadline(ctx, inst)
	if !ok {
		w.violate("WAIT without a deadline by %s", p.name)
		dl = w.now.Add(time.Hour)
	}
	if n != 1 {
		w.violate("WAIT %d: the simulation has one replica", n)
	}
	if w.fault(rd.sc.waitFail) {
		rd.waitFails++
		until := w.now.Add(timeout)
		if until.After(dl) {
			if err, ok := p.callAt(dl, func() any { return nil }).(error); ok {
				return 0, err
			}
			return 0, context.DeadlineExceeded
		}
		if err, ok := p.callAt(until, func() any {
			if rd.down {
				return errSimRedisDown
			}
			return nil
		}).(error); ok {
			return 0, err
		}
		return 0, nil
	}
	v, err := rd.op(ctx, inst, nil, func() simRedisReply {
		rd.replica, rd.replicaSeq = rd.data.clone(), rd.seq
		return simRedisReply{v: int64(1)}
	})
	if err != nil {
		return 0, err
	}
	return v.(int64), nil
}

// mutated feeds a write to the replica, which receives it after the lag.
func (rd *simRedis) mutated() {
	if !rd.replicate {
		return
	}
	rd.seq++
	seq, epoch, snap := rd.seq, rd.epoch, rd.data.clone()
	rd.w.at(rd.w.now.Add(rd.sc.lag), func() {
		if rd.epoch == epoch && seq > rd.replicaSeq {
			rd.replica, rd.replicaSeq = snap, seq
		}
	})
}

// delivered notes what a reply that reached inst told its store.
func (rd *simRedis) delivered(inst *simInstance, script string, argv []string, v any) {
	switch script {
	case "takeLease":
		if r := v.([]any); r[0] == int64(1) {
			rd.held[inst] = map[string]bool{argv[0]: true}
		}
	case "renewLease":
		if v == int64(0) {
			delete(rd.held[inst], argv[0])
		}
	case "load":
		if r := v.([]any); r[0] == "ok" || r[0] == "restored" {
			gen, _ := strconv.ParseUint(r[1].(string), 10, 64)
			rd.know(inst, simVersion{gen, r[2].(string)})
			rd.readWrittenBack[inst] = rd.writtenBack[r[3].(string)]
		}
	case "compareAndStore":
		if r := v.([]any); r[0] == "ok" || r[0] == "restored" || r[0] == "same" {
			gen, _ := strconv.ParseUint(argv[2], 10, 64)
			rd.know(inst, simVersion{gen, argv[3]})
		}
	}
}

func (rd *simRedis) know(inst *simInstance, v simVersion) { rd.knows[inst] = v }

// get reads a key, expired by PX on true time.
func (rd *simRedis) get(key string) *simRedisKey {
	k := rd.data[key]
	if k != nil && !k.expire.IsZero() && !rd.w.now.Before(k.expire) {
		delete(rd.data, key)
		return nil
	}
	return k
}

var errSimWrongType = errors.New("WRONGTYPE Operation against a key holding the wrong kind of value")

// getString is GET: "" and false if missing.
func (rd *simRedis) getString(key string) (value string, found bool, err error) {
	k := rd.get(key)
	switch {
	case k == nil:
		return "", false, nil
	case k.hash != nil:
		return "", false, errSimWrongType
	}
	return k.str, true, nil
}

func (rd *simRedis) setPX(key, v string, ms string) {
	d, _ := strconv.ParseInt(ms, 10, 64)
	rd.data[key] = &simRedisKey{str: v, expire: rd.w.now.Add(time.Duration(d) * time.Millisecond)}
}

// writeMark is the scripts' writeMark.
func (rd *simRedis) writeMark(key, mark, by string) {
	delete(rd.data, key)
	if mark != "" {
		rd.data[key] = &simRedisKey{hash: map[string]string{"mark": mark, "marked_by": by}}
	}
}

type simRedisRecordFields struct{ gen, chain, data string }

// simSettleOwner is redisstore's settleOwner.
const simSettleOwner = "written back from memory, settling"
