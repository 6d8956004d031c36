package tokensource

// One schedule of the simulation being run (sim_test.go): its instances
// (start, kill, reload), the chaos the schedule plans, the requests that
// check what is served, and the final checks.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"go.uber.org/zap"
)

// simInstance is one Caddy process of the simulation (one incarnation).
type simInstance struct {
	w        *simWorld
	name     string
	owner    string
	slot     int
	src      *Source
	clock    *simClock
	keyring  *Keyring
	timeout  time.Duration
	killed   bool
	closeBy  *time.Time // true time
	closedAt time.Time
	running  *simProc
	procs    []*simProc
	timers   []*bool
	actor    *simProc
	sleeping *bool // the actor's pending wake-up; nil while it works
	kicked   bool
}

// simRun is one schedule being run.
type simRun struct {
	w         *simWorld
	sc        simSchedule
	seed      string // the configured refresh_token
	slots     []*simInstance
	n         int
	key       *Keyring
	log       func() *zap.Logger
	window    []string // kills inside the window no client survives
	installed bool     // an install succeeded
	obs       *simObserver
	kills     int
	rd        *simRedis // the Redis model, on a Redis schedule
}

// simObserver counts a run's events (one goroutine runs at a time).
type simObserver struct{ events map[string]int }

func (o *simObserver) Refreshed(_ string, result RefreshResult, _ time.Duration) {
	o.events[string(result)]++
}
func (o *simObserver) LockWaited(string, time.Duration)   {}
func (o *simObserver) Published(string, *Token)           {}
func (o *simObserver) PersistFailed(string)               { o.events["persist_failed"]++ }
func (o *simObserver) StateChanged(_ string, state State) { o.events["state_"+string(state)]++ }

// start boots a new incarnation of slot i, configured with the original
// seed (stale after the first rotation).
func (r *simRun) start(i int) {
	w, sc := r.w, r.sc
	r.n++
	inst := &simInstance{w: w, slot: i, name: fmt.Sprintf("i%d#%d", i, r.n), owner: fmt.Sprintf("owner-%d", r.n), timeout: sc.timeouts[i], keyring: r.key}
	inst.clock = &simClock{w: w, inst: inst, skew: sc.skews[i]}
	logger := zap.NewNop()
	if r.log != nil {
		logger = r.log().With(zap.String("instance", inst.name))
	}
	cfg := Config{
		Account: simAccount, ClientID: "client", ClientSecret: "secret", TokenURL: "http://restream.invalid/oauth/token",
		Seed: r.seed, RefreshAhead: sc.ahead[i], Timeout: sc.timeouts[i],
		Storage: &simStorage{kv: w.kv, inst: inst}, HTTPClient: &http.Client{Transport: &simTransport{m: w.model, inst: inst}},
		Logger: logger, Clock: inst.clock, Owner: inst.owner, Keyring: r.key, Observer: r.obs,
	}
	if r.rd != nil {
		cfg.Storage, cfg.Store = nil, r.rd.store(inst, logger)
	}
	src, err := New(cfg)
	if err != nil {
		panic(err)
	}
	src.jitter = w.rng.Float64
	src.onPanic = func(v any) { w.violate("I8: %s: recovered panic: %v", inst.name, v) }
	inst.src = src
	r.slots[i] = inst
	w.trace("start %s (skew %s, timeout %s)", inst.name, inst.clock.skew, inst.timeout)
	inst.actor = w.spawn(inst, inst.name+"/refresher", func(p *simProc) { inst.actorLoop(r, p) })
	if r.rd != nil {
		r.rd.watch(inst, cfg.Store)
	}
}

// actorLoop is Source.run, driven by the simulation.
func (inst *simInstance) actorLoop(r *simRun, p *simProc) {
	s, w := inst.src, inst.w
	var last time.Time
	spins := 0
	for {
		if w.now.Sub(last) < time.Millisecond {
			if spins++; spins == 1000 {
				w.violate("%s's refresher spins: 1000 rounds within 1ms of simulated time (state %s: %s)", inst.name, s.Status().State, s.Status().LastError)
			}
			if spins > 1000 {
				w.at(w.now.Add(time.Second), func() { p.wake(nil) })
				p.block()
			}
		} else {
			last, spins = w.now, 0
		}
		wake := s.round()
		if s.closing() {
			if s.act.pending != nil || s.act.resend != "" {
				r.window = append(r.window, fmt.Sprintf("%s closed with a pair in memory or an unknown outcome", inst.name))
			}
			if l := r.lease(); l != nil && l.MarkedBy == inst.owner && l.Mark != "" {
				r.window = append(r.window, fmt.Sprintf("%s closed with its mark on the lease", inst.name))
			}
			s.shutdown()
			s.finishClose()
			inst.closedAt = w.now
			if limit := inst.closeStarted().Add(inst.timeout + time.Second); w.now.After(limit) {
				w.violate("I7: %s closed %s after Close began, limit %s", inst.name, w.now.Sub(inst.closeStarted()), inst.timeout+time.Second)
			}
			for _, t := range inst.timers {
				if !*t {
					// A timer still armed after Close (the token's stale
					// timer or the close deadline's) outlives it.
					w.violate("I7: %s left a timer armed after Close", inst.name)
					break
				}
			}
			return
		}
		if inst.kicked {
			inst.kicked = false
			continue
		}
		ev := w.at(wake.Add(-inst.clock.skew), func() {
			inst.sleeping = nil
			p.wake(nil)
		})
		inst.sleeping = ev
		p.block()
	}
}

func (inst *simInstance) closeStarted() time.Time {
	return inst.closeBy.Add(-(inst.timeout + 900*time.Millisecond))
}

// kick is a request waking the refresher.
func (inst *simInstance) kick() {
	if inst.killed || inst.closeBy != nil {
		return
	}
	if ev := inst.sleeping; ev != nil {
		*ev = true
		inst.sleeping = nil
		inst.w.at(inst.w.now, func() { inst.actor.wake(nil) })
		return
	}
	inst.kicked = true
}

// kill stops an instance at once: memory gone, storage kept.
func (r *simRun) kill(inst *simInstance, why string) {
	w := r.w
	if inst.killed {
		return
	}
	if why == "kill" {
		if l := r.lease(); l != nil && l.MarkedBy == inst.owner && l.Mark != "" {
			r.window = append(r.window, fmt.Sprintf("%s killed with its mark on the lease", inst.name))
		}
		if inst.src.act.pending != nil || inst.src.act.resend != "" {
			r.window = append(r.window, fmt.Sprintf("%s killed with a pair in memory or an unknown outcome", inst.name))
		}
	}
	w.trace("%s %s", why, inst.name)
	if why == "kill" {
		w.injected++
		r.kills++
	}
	inst.killed = true
	if r.rd != nil {
		r.rd.gone(inst)
	}
	for _, t := range inst.timers {
		*t = true
	}
	if inst.sleeping != nil {
		*inst.sleeping = true
	}
	w.kv.killLocks(inst)
	for _, p := range inst.procs {
		p.wake(errSimKilled)
	}
}

func (r *simRun) killAll() {
	for _, inst := range r.slots {
		if inst != nil {
			r.kill(inst, "end")
		}
	}
}

// markedBy reports whether the lease carries inst's mark on the refresh
// token anyone would send next: the stored one, or the seed if none is.
func (r *simRun) markedBy(inst *simInstance) bool {
	l := r.lease()
	if l == nil || l.MarkedBy != inst.owner || l.Mark == "" {
		return false
	}
	next := r.seed
	if b, key, ok := r.record(); ok {
		if rec, err := decodeRecord(b, key, simAccount, r.key); err == nil && rec.HasPair() {
			next = rec.RefreshToken
		}
	}
	return l.Mark == Fingerprint(next)
}

// record is the stored record and the key it is sealed to.
func (r *simRun) record() (data []byte, key string, ok bool) {
	if r.rd != nil {
		return r.rd.record()
	}
	data, ok = r.w.kv.data[RecordKey(simAccount)]
	return data, RecordKey(simAccount), ok
}

func (r *simRun) lease() *leaseRecord {
	if r.rd != nil {
		return r.rd.lease()
	}
	var l leaseRecord
	if b, ok := r.w.kv.data[LeaseKey(simAccount)]; ok && json.Unmarshal(b, &l) == nil {
		return &l
	}
	return nil
}

// scheduleChaos plans kills, reloads, installs and operator refreshes, in
// that order (each draws from the seeded source).
func (r *simRun) scheduleChaos(end time.Time) {
	r.scheduleKills(end)
	r.scheduleReloads(end)
	r.scheduleInstalls(end)
	r.scheduleOperatorRefreshes(end)
}

// running is the instance in slot, nil if there is none or it is killed or
// closing.
func (r *simRun) running(slot int) *simInstance {
	if inst := r.slots[slot]; inst != nil && !inst.killed && inst.closeBy == nil {
		return inst
	}
	return nil
}

// scheduleKills kills a random instance every killEvery or so, and
// restarts its slot a little later.
func (r *simRun) scheduleKills(end time.Time) {
	w, sc := r.w, r.sc
	if sc.killEvery > 0 {
		for t := clockStart.Add(w.dur(0, 2*sc.killEvery)); t.Before(end); t = t.Add(w.dur(sc.killEvery/2, 3*sc.killEvery/2)) {
			slot := w.rng.IntN(sc.instances)
			restart := w.dur(0, 30*time.Second)
			w.at(t, func() {
				if inst := r.running(slot); inst != nil {
					r.kill(inst, "kill")
					w.at(w.now.Add(restart), func() {
						if w.now.Before(end) && r.slots[slot] == inst {
							r.start(slot)
							r.requests(slot, end.Add(3*sc.lifetime))
						}
					})
				}
			})
		}
	}
}

// scheduleReloads closes an instance as a Caddy reload does, starting the
// new configuration's source at once, and checks that the old one closes in
// time (I7).
func (r *simRun) scheduleReloads(end time.Time) {
	w, sc := r.w, r.sc
	if sc.closes {
		for range 1 + w.rng.IntN(3) {
			t, slot := clockStart.Add(w.dur(0, end.Sub(clockStart))), w.rng.IntN(sc.instances)
			w.at(t, func() {
				inst := r.running(slot)
				if inst == nil {
					return
				}
				w.trace("close %s", inst.name)
				inst.src.beginClose()
				by := inst.clock.closeDeadline()
				inst.closeBy = &by
				if r.rd != nil {
					r.rd.gone(inst)
				}
				inst.kickClosing()
				// At the deadline the Source's context is cancelled: what is
				// still waiting on storage or the endpoint ends.
				w.at(by, func() {
					for _, p := range inst.procs {
						p.interrupt(context.Canceled)
					}
				})
				// A reload starts the new configuration's source right away.
				r.slots[slot] = nil
				r.start(slot)
				r.requests(slot, end.Add(3*sc.lifetime))
				w.at(w.now.Add(inst.timeout+2*time.Second), func() {
					if inst.closedAt == (time.Time{}) && !inst.killed {
						w.violate("I7: %s did not finish closing within timeout + 1s", inst.name)
					}
				})
			})
		}
	}
}

// scheduleInstalls installs new chains (a login), racing the first
// refreshes on a spent seed.
func (r *simRun) scheduleInstalls(end time.Time) {
	w, sc := r.w, r.sc
	if sc.installs || sc.deadSeed {
		for i := range 1 + w.rng.IntN(2) {
			t, slot := clockStart.Add(w.dur(0, end.Sub(clockStart))), w.rng.IntN(sc.instances)
			if sc.deadSeed && i == 0 {
				t = clockStart.Add(w.dur(0, 10*time.Second)) // racing the first refreshes
			}
			w.at(t, func() {
				inst := r.running(slot)
				if inst == nil {
					return
				}
				at, rt := w.model.authorize()
				// As the login's code exchange would parse Restream's answer.
				body := fmt.Sprintf(`{"access_token":%q,"refresh_token":%q,"token_type":"Bearer","expires_in":%d,"expires":%d}`,
					at, rt, int64(w.model.lifetime/time.Second), w.model.tokens[at].expires.Unix())
				rec, err := parseTokenResponse([]byte(body), "application/json", inst.clock.Now())
				if err != nil {
					panic(err)
				}
				w.spawn(inst, inst.name+"/install", func(p *simProc) {
					_, err := inst.src.InstallPair(context.Background(), rec)
					w.trace("%s installed chain %s: %v", inst.name, rt, err)
					if err == nil {
						r.installed = true
					}
				})
			})
		}
	}
}

// scheduleOperatorRefreshes has an operator ask instances for a refresh.
func (r *simRun) scheduleOperatorRefreshes(end time.Time) {
	w, sc := r.w, r.sc
	if sc.operator {
		for range 1 + w.rng.IntN(3) {
			t, slot := clockStart.Add(w.dur(0, end.Sub(clockStart))), w.rng.IntN(sc.instances)
			w.at(t, func() {
				if inst := r.slots[slot]; inst != nil && !inst.killed {
					inst.src.operator.Store(true)
					inst.kick()
				}
			})
		}
	}
}

func (c *simClock) closeDeadline() time.Time {
	return c.w.now.Add(c.inst.timeout + 900*time.Millisecond)
}

// kickClosing wakes the refresher so it sees Close.
func (inst *simInstance) kickClosing() {
	if ev := inst.sleeping; ev != nil {
		*ev = true
		inst.sleeping = nil
		inst.w.at(inst.w.now, func() { inst.actor.wake(nil) })
	}
}

// requests sends a request to slot every second or so while inst lives.
func (r *simRun) requests(slot int, until time.Time) {
	w := r.w
	inst := r.slots[slot]
	var next func()
	next = func() {
		if inst.killed || inst.closeBy != nil || w.now.After(until) {
			return
		}
		r.request(inst)
		w.at(w.now.Add(w.dur(time.Second, 4*time.Second)), next)
	}
	w.at(w.now.Add(w.dur(0, time.Second)), next)
}

// request is one request through the handler's hot path. It checks I2 and
// that no expired token is served; a token the model has rotated gets a 401
// upstream, which the handler reports to the source.
func (r *simRun) request(inst *simInstance) {
	w, m := r.w, r.w.model
	t := inst.src.cur.Load()
	if t == nil || t.stale.Load() {
		inst.kick()
		return
	}
	st := m.tokens[t.AccessToken]
	switch {
	case st == nil:
		w.violate("%s served an access token Restream never issued", inst.name)
		return
	case !w.now.Before(st.expires) && r.sc.skewed():
		// Another host's clock wrote the expiry: an upstream 401 tells.
		inst.src.markRejected(t)
		inst.kick()
		return
	case !w.now.Before(st.expires):
		w.violate("%s served an expired access token (expired %s ago)", inst.name, w.now.Sub(st.expires))
	}
	if !m.storedAT[t.AccessToken] {
		// The memory-only fallback: the pair is pending, the status says so,
		// and the stale stored refresh token is held by the lease or by this
		// instance's mark, so nobody refreshes from it.
		p := inst.src.act.pending
		if p == nil || p.rec.AccessToken != t.AccessToken || inst.src.Status().State != StateDegraded ||
			(inst.src.act.lease == nil && !r.markedBy(inst)) {
			w.violate("I2: %s served a pair that is not in storage (pending %v, state %s)", inst.name, p != nil, inst.src.Status().State)
		}
	}
	if !st.live {
		inst.src.markRejected(t)
		inst.kick()
	}
}

// settle runs until no refresh is in flight, so the final checks see a
// quiet world.
func (r *simRun) settle() {
	w := r.w
	for range 200 {
		l := r.lease()
		busy := l != nil && l.Owner != ""
		for _, inst := range r.slots {
			if inst != nil && !inst.killed && inst.sleeping == nil {
				busy = true
			}
		}
		if !busy {
			return
		}
		w.run(w.now.Add(time.Second))
	}
}

// finalChecks: unless the run lost the chain in a way no client survives,
// the stored chain is alive, nobody was answered invalid_grant, and every
// instance can serve a live token.
func (r *simRun) finalChecks() {
	w, m := r.w, r.w.model
	if len(m.exempt) > 0 || len(r.window) > 0 {
		w.trace("survival not checked: %v %v", m.exempt, r.window)
		return
	}
	if m.invalidGrants > m.allowedInvalid {
		w.violate("the chain was lost: %d invalid_grant answers without a kill in the window or a lost answer", m.invalidGrants)
		return
	}
	if r.sc.deadSeed && !r.installed {
		return // no chain was ever alive
	}
	b, key, ok := r.record()
	if !ok {
		w.violate("no record stored at the end")
		return
	}
	rec, err := decodeRecord(b, key, simAccount, r.key)
	if err != nil || !rec.HasPair() {
		w.violate("the stored record is unusable at the end: %v", err)
		return
	}
	if st := m.tokens[rec.RefreshToken]; st == nil || !st.live {
		w.violate("the stored refresh token is not live at the end: the chain is lost")
		return
	}
	// Every instance serves a live token after a request or two (a request
	// that meets a rotated token gets a 401 and a newer token).
	var stuck []string
	for range 3 {
		for _, inst := range r.slots {
			if inst != nil && !inst.killed {
				r.request(inst)
			}
		}
		w.run(w.now.Add(5 * time.Second))
		r.settle()
		stuck = stuck[:0]
		for _, inst := range r.slots {
			if inst == nil || inst.killed {
				continue
			}
			if t := inst.src.cur.Load(); t == nil || t.stale.Load() || !m.tokens[t.AccessToken].live {
				stuck = append(stuck, fmt.Sprintf("%s cannot serve a live token at the end (state %s: %s)",
					inst.name, inst.src.Status().State, inst.src.Status().LastError))
			}
		}
		if len(stuck) == 0 {
			return
		}
	}
	for _, msg := range stuck {
		w.violate("%s", msg)
	}
}
