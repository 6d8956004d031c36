package tokensource

// The simulated Redis's events (restarts that keep or lose the data,
// failovers to a lagging replica) and what a data loss takes: a mark or the
// only copy of the newest record puts the run on the window list.

import (
	"fmt"
	"time"
)

// schedule plans the Redis events.
func (rd *simRedis) schedule() {
	w := rd.w
	for _, e := range rd.sc.events {
		var before simRedisData
		w.at(e.at, func() {
			w.trace("redis: %s", e)
			w.injected++
			before = rd.data.clone()
			rd.down = true
			rd.epoch++
		})
		w.at(e.upAt, func() {
			rd.down = false
			rd.loaded = map[string]bool{}
			rd.writtenBack, rd.readWrittenBack = map[string]bool{}, map[*simInstance]bool{}
			switch e.kind {
			case simRedisRestartKept:
				rd.kept++
			case simRedisRestartLost:
				rd.lost++
				rd.data = simRedisData{}
			case simRedisFailover:
				rd.failovers++
				rd.data = rd.replica.clone()
			}
			rd.replica, rd.replicaSeq = rd.data.clone(), rd.seq
			rd.lossChecks(before, e)
		})
	}
}

// lossChecks classifies what an event took: the chain survives a loss only
// if no mark went with it and a running instance knows the newest record.
func (rd *simRedis) lossChecks(before simRedisData, e simRedisEvent) {
	r := rd.r
	now := rd.data
	rd.data = before
	recBefore, leaseBefore, markBefore := rd.version(), rd.leaseOwner(), rd.lease()
	rd.data = now
	recAfter, leaseAfter, markAfter := rd.version(), rd.leaseOwner(), rd.lease()
	rd.w.trace("redis: back after %s: record %v -> %v, lease %q -> %q, mark %+v -> %+v", e.kind, recBefore, recAfter, leaseBefore, leaseAfter, markBefore, markAfter)
	if leaseBefore != "" && leaseBefore != leaseAfter {
		rd.lostLeases[leaseBefore] = true
	}
	if markAfter != nil && markAfter.Mark != "" && (markBefore == nil || markBefore.Mark != markAfter.Mark) {
		rd.marksBack++
		rd.finding("Redis %s brought back %s's cleared mark", e.kind, markAfter.MarkedBy)
	}
	if markBefore != nil && markBefore.Mark != "" && (markAfter == nil || markAfter.Mark != markBefore.Mark || markAfter.MarkedBy != markBefore.MarkedBy) {
		rd.lostMarks[markBefore.Mark] = true
		r.window = append(r.window, fmt.Sprintf("Redis %s took %s's mark", e.kind, markBefore.MarkedBy))
	}
	if recBefore == nil || (recAfter != nil && (recAfter.chain != recBefore.chain || recAfter.gen >= recBefore.gen)) {
		return
	}
	rd.gap = recBefore
	for tok, st := range rd.w.model.tokens {
		if !st.access && !st.live {
			rd.gapSpent[tok] = true
		}
	}
	for _, inst := range r.slots {
		if inst != nil && !inst.killed && inst.closeBy == nil && rd.knows[inst] == *recBefore {
			rd.unrestored = recBefore
			return
		}
	}
	r.window = append(r.window, fmt.Sprintf("Redis %s took generation %d, which no running instance knows", e.kind, recBefore.gen))
	rd.forget()
}

// simGapRound is how long after a write-back a round that read before it
// may still send: the longest timeout, the storage operations, and slack.
const simGapRound = 20*time.Second + 3*StorageTimeout + leaseSlack

// simRedisStrict is RESTREAM_SIM_REDIS_STRICT: the tolerated findings fail.
var simRedisStrict bool

// finding records a redisstore weakness the model found: on the window list
// (no survival check), or a violation with RESTREAM_SIM_REDIS_STRICT=1.
func (rd *simRedis) finding(format string, args ...any) {
	msg := "redisstore finding: " + fmt.Sprintf(format, args...)
	if simRedisStrict {
		rd.w.violate("%s", msg)
		return
	}
	rd.w.trace("%s", msg)
	rd.r.window = append(rd.r.window, msg)
}

// forget notes the tokens spent so far as forgotten.
func (rd *simRedis) forget() {
	for tok, st := range rd.w.model.tokens {
		if !st.access && !st.live {
			rd.forgotten[tok] = true
		}
	}
}

// gone notes an instance killed or closed: if it knew a record Redis lost
// and no other running one does, the record is gone for good.
func (rd *simRedis) gone(inst *simInstance) {
	u := rd.unrestored
	if u == nil || rd.knows[inst] != *u {
		return
	}
	for _, o := range rd.r.slots {
		if o != nil && o != inst && !o.killed && o.closeBy == nil && rd.knows[o] == *u {
			return
		}
	}
	rd.unrestored = nil
	rd.r.window = append(rd.r.window, fmt.Sprintf("%s went before it wrote back generation %d, which Redis lost", inst.name, u.gen))
	rd.forget()
}

// spared reports a token whose mark a data loss took: I1 and I3 cannot
// hold for it, and the run is on the window list already.
func (rd *simRedis) spared(rt string, inst *simInstance) (i1, i3 bool) {
	if rd == nil {
		return false, false
	}
	fp := Fingerprint(rt)
	if rd.heldByItsSpender(rt, inst) {
		return false, rd.lostLeases[inst.owner]
	}
	if (rd.gap != nil || rd.w.now.Before(rd.gapClosed.Add(simGapRound))) && rd.gapSpent[rt] {
		rd.w.trace("redis: %s sent a token spent before Redis lost a record, around its write-back", inst.name)
		rd.gapResends++
		delete(rd.gapSpent, rt)
		rd.w.model.allowedInvalid++
		return true, rd.lostLeases[inst.owner]
	}
	return rd.lostMarks[fp] || rd.forgotten[rt], rd.lostMarks[fp] || rd.lostLeases[inst.owner]
}

// heldByItsSpender reports a token sent from a record some store wrote
// back, spent by another instance that received the new pair and still
// runs: a lost record or mark does not excuse that resend, for the spender
// holds the newer pair (in memory, and its store knows it), and the
// write-back's settle lease exists so that it writes that pair back before
// anyone refreshes from an older one. TestChaosRedis/no_persistence sent
// such a token once: a lease request sent before a crash landed on the
// emptied Redis, and its holder wrote back the older generation under its
// own lease, which left no settle lease. Sends before any write-back (an
// older generation a failover left looks current to one that knew no
// newer) stay excused: see gap.
func (rd *simRedis) heldByItsSpender(rt string, inst *simInstance) bool {
	if !rd.readWrittenBack[inst] {
		return false
	}
	st := rd.w.model.tokens[rt]
	// The configured seed is excepted: an instance that never read the
	// record sends it into a Redis that lost the record (it cannot know).
	if st == nil || st.spentBy == nil || st.spentBy == inst || !st.delivered || rd.forgotten[rt] || rt == rd.r.seed {
		return false
	}
	sp := st.spentBy
	return !sp.killed && sp.closeBy == nil
}
