package tokensource

// The refresh protocol, on one screen.
//
// Restream rotates on every refresh: the answer kills the pair that was sent.
// One goroutine per account and process, the refresher, runs the protocol in
// rounds; requests only read the published token (one atomic load) or wake
// the refresher and wait for its next round. Every instance that shares the
// account's Store runs the same rounds; the Store's lease and its
// compare-and-set writes make them act as one.
//
// A round (tick):
//
//	renew   a held lease that is near its end
//	flush   a pair that lives only in memory goes to storage first (I2)
//	load    the stored record; a failed read ends the round (I4)
//	adopt   serve the stored pair if it is newer, even if due (it is valid)
//	plan    what to send: a pending seed, else the stored refresh token;
//	        nothing if no refresh is due, or the 401 rate limit declines;
//	        an error if the token is dead (I6) or there is no chain
//	lease   take the lease, or wait (poll) while another instance holds it
//	reread  under the lease; if the record changed, adopt it and replan
//	mark    write the fingerprint of the token about to be sent into the
//	        lease, with enough lease left for the call and the write (I3);
//	        a token marked by another instance is in doubt and never sent
//	send    one token call, detached from every request
//	store   compare-and-set on the version that was read (I5), then publish,
//	        clear the mark and release; if the write fails, serve the pair
//	        from memory and keep renewing the lease until it is stored (I2)
//	user    a generation inherits its chain's Restream user; while the user
//	        is unknown, read it with the stored pair's access token and
//	        write it into the same version (compare-and-set; a conflict
//	        skips it, a failure waits for the next rotation)
//
// Outcomes of the call: a new pair (store it); invalid_grant (the token is
// dead: store its fingerprint, reauth_required); invalid_client (a
// configuration error: keep the chain, retry slowly); an error answer (not
// spent: clear the mark, back off); no answer or an unusable 200 (unknown:
// keep the lease and the mark, back off, and resend under them).
//
// Invariants, each enforced where named:
//
//	I1 A refresh token that may have been spent is sent by one instance only:
//	   the one that marked it in the lease (mark, and Store.TakeLease keeps
//	   marks), and again only after an outcome that left it unspent or
//	   unknown. Spent and dead tokens are never sent (plan).
//	I2 No pair is served before it is stored, except the memory-only
//	   fallback after a failed write; then the lease is kept and renewed (and
//	   should it lapse, the holder's mark still guards the stale token), so
//	   nobody refreshes from the stale stored pair, and Status says degraded.
//	I3 Leases need neither synchronized clocks nor equal configs: a lease
//	   carries its TTL; its holder counts from before its write on its own
//	   clock, and sends only with Timeout + StorageTimeout + slack left; others
//	   see it lapse only after seeing it unchanged for the TTL on their own.
//	I4 A failed read is a transient failure, never "no record" or "no lease".
//	I5 A record is only overwritten after it was read and its version
//	   compared (Store.CompareAndStore).
//	I6 Fingerprints of spent seeds and dead refresh tokens are stored with
//	   the record (bounded), so no restart, reload or instance resends one.
//	I7 Close returns within Timeout + 1s; no goroutine or timer outlives it.
//	I8 No storage content and no endpoint answer causes a panic (a recovered
//	   one is logged as a bug and retried).
//
// What no client can survive: an instance that dies after it marked a token
// and before the answer reached storage takes the only live refresh token
// with it (the others see the mark and stop: reauth_required, in doubt).

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"
)

// actorState is the refresher's own memory; no other goroutine touches it.
type actorState struct {
	lease   *Lease
	pending *pendingPair
	// resend is the fingerprint of a token this instance sent without
	// learning the outcome: it may send it again, under its mark.
	resend string
	// localDead holds fingerprints this instance knows to be spent but could
	// not record in storage; its own mark keeps the others away from them.
	localDead map[string]bool
	// sighted is the stored version last seen, and when: the 401 rate limit
	// measures a generation's age on this instance's own clock.
	sighted    Version
	sightedAt  time.Time
	flushAt    time.Time // the next retry of a failed write
	lastFlush  time.Time
	renewRetry time.Time // no renewal before this, after a failed one
	// flushedFor is the rejected token the last write retry was made for:
	// a rejection brings one retry at once, not one per woken round.
	flushedFor *Token
}

// pendingPair is a pair that lives only in memory (I2).
type pendingPair struct {
	rec  *Record
	base Version
	// overDeleted: the record changed while the pair was being issued, so
	// the pair may only be written over a missing record, under a renewed
	// lease (writeOverDeleted).
	overDeleted bool
}

// leaseTTL is the life of a lease after each write: the token call and the
// store that follows it, plus one renewal's worth of slack.
func (s *Source) leaseTTL() time.Duration { return s.cfg.Timeout + 2*StorageTimeout + leaseSlack }

// sendBudget is the lease time a holder needs before it sends (I3).
func (s *Source) sendBudget() time.Duration { return s.cfg.Timeout + StorageTimeout + leaseSlack }

func (s *Source) op(ctx context.Context) (context.Context, context.CancelFunc) {
	return withTimeout(ctx, s.clock, StorageTimeout)
}

// tick runs one round and returns when the next one is due.
func (s *Source) tick(ctx context.Context) time.Time {
	now := s.clock.Now()
	a := &s.act
	s.renewIfDue(ctx, now)
	if a.pending != nil {
		// Retry the write when due, or sooner when a request woke the
		// refresher: at once for a newly rejected token, else once a second
		// (requests wake it at their rate: never a retry per wake-up).
		rj := s.rejectedToken()
		if now.Before(a.flushAt) && now.Sub(a.lastFlush) < recheckInterval && (rj == nil || rj == a.flushedFor) {
			return s.holdLease(a.flushAt)
		}
		a.lastFlush, a.flushedFor = now, rj
		if err := s.flush(ctx); err != nil {
			// Waiters get the verdict; status still says degraded.
			a.flushAt = s.failed(now, ResultTransient, &Error{Kind: Transient,
				Msg: "the newest token pair is not in storage yet, so no refresh can start: " + err.Error()})
			return s.holdLease(a.flushAt)
		}
	}

	s.mu.Lock()
	inBackoff := s.lastErr != nil && now.Before(s.nextAttempt)
	nextAttempt := s.nextAttempt
	recent := now.Sub(s.lastLoad) < recheckInterval
	s.mu.Unlock()
	if inBackoff && (recent || s.closing()) {
		return s.holdLease(nextAttempt)
	}

	rec, err := s.load(ctx)
	if err != nil && !errors.Is(err, ErrCorruptRecord) && !errors.Is(err, ErrUnreadableRecord) {
		if inBackoff {
			return s.holdLease(nextAttempt)
		}
		return s.holdLease(s.failed(now, ResultTransient, &Error{Kind: Transient, Msg: err.Error()}))
	}
	if err != nil {
		s.log.Error("stored token record is unusable", zap.Error(err))
	}
	if err == nil {
		s.dropStaleResend(rec)
	}
	adopted := err == nil && s.adopt(rec, now)
	p := s.plan(rec, err, now)
	if adopted && p.result == "" {
		p.result = ResultAdopted
	}
	switch {
	case p.err != nil:
		s.releaseLease(ctx)
		s.staleIfRejected()
		if inBackoff && p.err.Kind == Transient {
			return nextAttempt
		}
		return s.failed(now, p.result, p.err)
	case p.send == "":
		s.releaseLease(ctx)
		s.setRefreshing(false)
		s.succeeded(p.result)
		return s.holdLease(p.wake)
	case inBackoff:
		return s.holdLease(nextAttempt)
	case s.closing():
		s.releaseLease(ctx)
		return now.Add(time.Hour)
	}
	return s.refresh(ctx, rec, p, now)
}

// plan is what a round will send, if anything.
type plan struct {
	send    string // the refresh token to send; "" for none
	newSeed bool
	cause   string
	wake    time.Time // when nothing is sent: the next round
	result  RefreshResult
	err     *Error
}

// plan decides what to send for the stored record rec (nil if none; bad is
// set if the record exists but cannot be used).
func (s *Source) plan(rec *Record, bad error, now time.Time) plan {
	a := &s.act
	if bad != nil {
		return plan{result: ResultNoChain, err: &Error{Kind: NoChain, Code: "no_chain", Msg: fmt.Sprintf(
			"%v; fix or delete it (it is never overwritten: it may hold the only live refresh token)", bad)}}
	}
	if s.seedPending(rec) {
		return plan{send: s.cfg.Seed, newSeed: true, cause: CauseSeed}
	}
	if !rec.HasPair() {
		if s.seedFingerprint != "" {
			return plan{result: ResultInvalidGrant, err: &Error{Kind: Terminal, Code: "invalid_grant",
				Msg: "the configured refresh_token is spent or was rejected, and no chain is stored: " + reauthHint}}
		}
		return plan{result: ResultNoChain, err: &Error{Kind: NoChain, Code: "no_chain", Msg: "no token chain yet: " + onboardHint}}
	}
	if rec.dead() || a.localDead[Fingerprint(rec.RefreshToken)] {
		return plan{result: ResultInvalidGrant, err: &Error{Kind: Terminal, Code: "invalid_grant",
			Msg: "the refresh token chain is dead (invalid_grant): " + reauthHint}}
	}
	t := rec.token()
	cause := ""
	if s.operator.Load() {
		cause = CauseOperator
	} else if mark := s.rejected.Load(); mark != nil && !t.Supersedes(mark.tok) {
		// The clock is read after the mark: a 401 is judged by a time no
		// earlier than its own, even when this round began before it. A
		// 401 after the read leaves a new mark, for the next round.
		if rec.Cause == CauseRejected && s.clock.Now().Sub(s.sightedAt(rec, now)) < ForcedRefreshInterval {
			s.mu.Lock()
			s.limited = mark.tok
			s.mu.Unlock()
			s.rejected.CompareAndSwap(mark, nil)
			return plan{wake: s.refreshAt(t), result: ResultRateLimited}
		}
		cause = CauseRejected
	}
	if cause == "" && !now.Before(s.refreshAt(t)) {
		cause = CauseRefresh
	}
	if cause == "" {
		return plan{wake: s.refreshAt(t)}
	}
	return plan{send: rec.RefreshToken, cause: cause}
}

// dropStaleResend forgets a token awaiting a resend once storage says it is
// no longer the one to send (a newer pair or another chain is stored, or it
// is recorded as spent), so the lease kept for the resend is released. Its
// mark stays on the lease: the token may still be spent.
func (s *Source) dropStaleResend(rec *Record) {
	a := &s.act
	if a.resend == "" {
		return
	}
	next := ""
	switch {
	case s.seedPending(rec):
		next = s.seedFingerprint
	case rec.HasPair():
		next = Fingerprint(rec.RefreshToken)
	}
	if next != a.resend || rec.spent(a.resend) {
		a.resend = ""
	}
}

// seedPending reports whether the configured seed is still to be
// exchanged: neither spent nor dead, in storage or in this instance's memory.
func (s *Source) seedPending(rec *Record) bool {
	return s.seedFingerprint != "" && !rec.spent(s.seedFingerprint) && !s.act.localDead[s.seedFingerprint]
}

const (
	onboardHint = "authorize the account in the browser (restream_auth_login), " +
		"install a refresh token with `caddy restream-auth seed`, or configure refresh_token"
	reauthHint = "re-authorize the account (restream_auth_login or `caddy restream-auth seed`)"
)

// refresh takes the lease, re-reads, marks, sends and stores.
func (s *Source) refresh(ctx context.Context, rec *Record, p plan, now time.Time) time.Time {
	a := &s.act
	if a.lease == nil {
		var wake time.Time
		var ok bool
		if rec, p, wake, ok = s.leaseAndReplan(ctx, now); !ok {
			return wake
		}
	}
	fp, wake, ok := s.markForSend(ctx, p, now)
	if !ok {
		return wake
	}

	s.setRefreshing(true)
	started := s.clock.Now()
	next, err := s.x.exchange(ctx, p.send)
	s.setRefreshing(false)
	if err != nil {
		return s.exchangeFailed(ctx, rec, p, fp, err, started)
	}
	a.resend = ""
	if p.cause == CauseOperator {
		s.operator.Store(false)
	}
	return s.storeNew(ctx, rec, p, fp, next, started)
}

// leaseAndReplan takes the lease, re-reads the record under it and plans
// again: another instance may have stored a pair, or a dead token, since the
// round's first read. Without ok the round ends and its next one is due at
// wake: the lease is another's, the read failed, or there is nothing to send.
func (s *Source) leaseAndReplan(ctx context.Context, now time.Time) (rec *Record, p plan, wake time.Time, ok bool) {
	octx, cancel := s.op(ctx)
	l, err := s.store.TakeLease(octx, s.cfg.Owner, s.leaseTTL())
	cancel()
	switch {
	case errors.Is(err, ErrLeaseHeld):
		s.obs.LockWaited(s.cfg.Account, leasePoll)
		s.setRefreshing(true) // another instance's refresh, awaited
		return nil, plan{}, now.Add(leasePoll), false
	case err != nil:
		return nil, plan{}, s.failed(now, ResultTransient, &Error{Kind: Transient, Msg: "taking the refresh lease: " + err.Error()}), false
	}
	s.act.lease = l
	rec, err = s.load(ctx)
	if err != nil && !errors.Is(err, ErrCorruptRecord) && !errors.Is(err, ErrUnreadableRecord) {
		s.releaseLease(ctx)
		return nil, plan{}, s.failed(now, ResultTransient, &Error{Kind: Transient, Msg: err.Error()}), false
	}
	if err == nil {
		s.adopt(rec, now)
	}
	p = s.plan(rec, err, now)
	switch {
	case p.err != nil:
		s.releaseLease(ctx)
		s.staleIfRejected()
		return rec, p, s.failed(now, p.result, p.err), false
	case p.send == "":
		s.releaseLease(ctx)
		s.setRefreshing(false)
		s.succeeded(p.result)
		return rec, p, s.holdLease(p.wake), false
	}
	return rec, p, time.Time{}, true
}

// markForSend writes the fingerprint of the token about to be sent into the
// held lease, with enough lease left for the call and the write (I1, I3). It
// returns the fingerprint; without ok the token is not sent and the round's
// next one is due at wake.
func (s *Source) markForSend(ctx context.Context, p plan, now time.Time) (fp string, wake time.Time, ok bool) {
	a := &s.act
	l := a.lease
	fp = Fingerprint(p.send)
	if l.Mark == fp && l.MarkedBy != s.cfg.Owner {
		// I1: another instance marked this token and never cleared the mark.
		s.releaseLease(ctx)
		if p.newSeed {
			a.localDeadAdd(fp) // the seed is in doubt; the stored chain may still serve
			return fp, now, false
		}
		s.staleIfRejected()
		return fp, s.failed(now, ResultInDoubt, &Error{Kind: Terminal, Code: "in_doubt", Msg: "the refresh token may have been " +
			"spent by another instance that stopped before storing the answer, so it is not sent again: " + reauthHint}), false
	}
	if l.Mark != fp || l.MarkedBy != s.cfg.Owner || l.Remaining(s.clock.Now()) < s.sendBudget() {
		prevMark, prevBy := l.Mark, l.MarkedBy
		l.Mark, l.MarkedBy = fp, s.cfg.Owner
		octx, cancel := s.op(ctx)
		err := s.store.RenewLease(octx, l)
		cancel()
		if err != nil {
			// The mark is not known to be stored: the next try writes it again.
			l.Mark, l.MarkedBy = prevMark, prevBy
			if errors.Is(err, ErrLeaseLost) {
				a.lease = nil
			}
			return fp, s.failed(now, ResultTransient, &Error{Kind: Transient, Msg: "marking the refresh lease: " + err.Error()}), false
		}
	}
	if s.closing() {
		s.clearMark(fp)
		s.releaseLease(ctx)
		return fp, now.Add(time.Hour), false
	}
	if l.Remaining(s.clock.Now()) < s.cfg.Timeout+StorageTimeout {
		s.clearMark(fp)
		s.releaseLease(ctx)
		return fp, s.failed(now, ResultTransient, &Error{Kind: Transient, Msg: "storage is too slow to keep the refresh lease"}), false
	}
	return fp, time.Time{}, true
}

// storeNew writes a pair just issued and only then publishes it.
func (s *Source) storeNew(ctx context.Context, rec *Record, p plan, fp string, next *Record, started time.Time) time.Time {
	a := &s.act
	next.Generation, next.Cause = rec.version().Generation+1, p.cause
	if rec != nil {
		// A chain never changes account: its user goes on with it.
		next.Chain, next.ConsumedSeeds, next.DeadTokens, next.User = rec.Chain, rec.ConsumedSeeds, rec.DeadTokens, rec.User
	}
	if p.newSeed {
		next.Chain = randomID()
		next.User = nil // a new chain's user is read with its own token
		next.ConsumedSeeds = appendBounded(next.ConsumedSeeds, s.seedFingerprint)
	}
	octx, cancel := s.op(ctx)
	err := s.store.CompareAndStore(octx, next, rec.version())
	cancel()
	overDeleted := errors.Is(err, ErrConflict)
	if overDeleted {
		err = s.writeOverDeleted(ctx, next, err)
	}
	took := s.clock.Now().Sub(started)
	switch {
	case err == nil && !next.token().ValidAt(s.clock.Now()):
		// Stored, so the chain is safe, but the access token is already
		// expired by this host's clock: back off instead of looping.
		s.clearMark(fp)
		s.releaseLease(ctx)
		return s.failed(s.clock.Now(), ResultTransient, &Error{Kind: Transient, Msg: "the token endpoint's answer expires in the past " +
			"by this host's clock (clock skew?); the pair is stored and retried"})
	case err == nil:
		// Stored: publish first, so waiters need not wait for the release.
		s.publish(next, ResultOK)
		s.succeeded(ResultOK)
		s.obs.Refreshed(s.cfg.Account, ResultOK, took)
		s.log.Info("refreshed token pair", zap.Uint64("generation", next.Generation), zap.String("cause", p.cause),
			zap.Time("access_expires_at", next.Expiry), optionalTime("refresh_expires_at", next.RefreshExpiry),
			zap.Duration("took", took))
		s.clearMark(fp)
		// Stored first, so its token may be used; still under the lease, so
		// no same-generation write (a dead token recorded by another
		// instance) can land between its read and its compare-and-set.
		s.recordUser(ctx, next, a.lease)
		s.releaseLease(ctx)
		return s.refreshAt(next.token())
	case errors.Is(err, ErrConflict):
		// Only an install (a new chain) replaces the record under a live
		// lease; the token sent is spent either way.
		a.localDeadAdd(fp)
		s.releaseLease(ctx)
		s.log.Warn("the stored record changed while refreshing; the refreshed pair is dropped", zap.Error(err))
		return s.clock.Now()
	default:
		// I2: the old pair is dead already; serve the new one from memory,
		// keep the lease and retry the write before anything else.
		a.pending = &pendingPair{rec: next, base: rec.version(), overDeleted: overDeleted}
		a.flushAt = s.clock.Now().Add(backoff(1, s.jitter()))
		s.setMemoryOnly(true)
		s.obs.PersistFailed(s.cfg.Account)
		s.obs.Refreshed(s.cfg.Account, ResultOK, took)
		s.publish(next, ResultOK)
		s.succeeded(ResultOK)
		s.log.Error("storing the new token pair failed; serving it from memory, keeping the lease and retrying",
			zap.Uint64("generation", next.Generation), zap.Error(err))
		return s.holdLease(a.flushAt)
	}
}

// writeOverDeleted stores next if the conflict was a deleted record: the
// token just sent is spent, so next is the chain's only live pair, and
// dropping it would end the chain. Anything else stored meanwhile (an
// install's new chain, an unreadable record) keeps conflict, and so does a
// lease that is no longer this instance's: its holder may be exchanging a
// new seed, whose chain must not be overwritten. A failed read or renewal
// is returned as it is, so the pair stays pending and this is retried.
//
// The read and the write come after the one write the send budget allowed
// for, so the lease is renewed first.
func (s *Source) writeOverDeleted(ctx context.Context, next *Record, conflict error) error {
	octx, cancel := s.op(ctx)
	stored, err := s.store.Load(octx)
	cancel()
	switch {
	case errors.Is(err, ErrCorruptRecord) || errors.Is(err, ErrUnreadableRecord):
		return fmt.Errorf("%w; the stored record cannot be read (%v), so it is not written over", conflict, err)
	case err != nil:
		return fmt.Errorf("reading the record again after it changed: %w", err)
	case stored != nil:
		return conflict
	case s.act.lease == nil:
		return fmt.Errorf("%w; the record was deleted and the refresh lease is lost, so the pair is not written back", conflict)
	}
	octx, cancel = s.op(ctx)
	err = s.store.RenewLease(octx, s.act.lease)
	cancel()
	switch {
	case errors.Is(err, ErrLeaseLost):
		s.act.lease = nil
		return fmt.Errorf("%w; the record was deleted and the refresh lease is another instance's, so the pair is not written back", conflict)
	case err != nil:
		return fmt.Errorf("renewing the refresh lease before writing over the deleted record: %w", err)
	}
	octx, cancel = s.op(ctx)
	err = s.store.CompareAndStore(octx, next, Version{})
	cancel()
	if err == nil {
		s.log.Warn("the stored record was deleted while refreshing; the new pair is written back (it is the chain's only live pair)",
			zap.Uint64("generation", next.Generation))
	}
	return err
}

// exchangeFailed handles a token call that brought no pair.
func (s *Source) exchangeFailed(ctx context.Context, rec *Record, p plan, fp string, err error, started time.Time) time.Time {
	a := &s.act
	var e *Error
	if !errors.As(err, &e) {
		e = &Error{Kind: Transient, Msg: err.Error()}
	}
	if p.cause == CauseOperator && !e.Unknown {
		s.operator.Store(false)
	}
	now := s.clock.Now()
	result := RefreshResult(e.Code)
	if a.resend == fp && e.Kind != Terminal {
		// An earlier call with this token had no answer: it may be spent
		// whatever this one says, so the lease and the mark stay (I1).
		e.Unknown = true
	}
	switch {
	case e.Kind == Terminal:
		a.resend = ""
		a.localDeadAdd(fp)
		s.recordDead(ctx, rec, fp)
		s.releaseLease(ctx)
		if p.newSeed && rec.HasPair() && !rec.dead() {
			s.log.Error("the configured refresh_token was rejected; the stored chain stays in use", zap.String("code", e.Code))
			return now
		}
		s.staleIfRejected()
		e.Msg += "; the refresh token chain is dead: " + reauthHint
	case e.Unknown:
		a.resend = fp // keep the lease and the mark; resend under them
		result = ResultTransient
	case e.Kind == Misconfigured:
		// The endpoint refused the client before the grant: the token is
		// not spent, and the mark must not outlive this answer (another
		// instance, perhaps with the right secret, may send it).
		a.resend = ""
		s.clearMark(fp)
		s.releaseLease(ctx)
	default:
		a.resend = ""
		s.clearMark(fp)
		s.releaseLease(ctx)
		result = ResultTransient
	}
	s.obs.Refreshed(s.cfg.Account, result, now.Sub(started))
	return s.holdLease(s.failed(now, result, e))
}

// recordDead stores fp as dead with the record, or as a history-only record
// if there is none (I6). If the write fails, the lease mark (kept) and
// localDead keep the token from being sent again.
func (s *Source) recordDead(ctx context.Context, rec *Record, fp string) {
	next := Record{Version: recordVersion}
	if rec != nil {
		next = *rec
	}
	next.DeadTokens = appendBounded(next.DeadTokens, fp)
	octx, cancel := s.op(ctx)
	err := s.store.CompareAndStore(octx, &next, rec.version())
	cancel()
	if err != nil {
		s.log.Warn("recording the dead refresh token failed; the lease mark keeps it from being resent", zap.Error(err))
		return
	}
	s.clearMark(fp)
}

// flush writes the pair that lives only in memory.
func (s *Source) flush(ctx context.Context) error {
	a := &s.act
	p := a.pending
	var err error
	if p.overDeleted {
		err = s.writeOverDeleted(ctx, p.rec, fmt.Errorf("%w (a record is stored)", ErrConflict))
	} else {
		octx, cancel := s.op(ctx)
		err = s.store.CompareAndStore(octx, p.rec, p.base)
		cancel()
		if errors.Is(err, ErrConflict) {
			// Changed since the pair was issued: deleted, or replaced.
			p.overDeleted = true
			err = s.writeOverDeleted(ctx, p.rec, err)
		}
	}
	if errors.Is(err, ErrLeaseLost) && s.writtenBack(ctx, p.rec) {
		err = nil
	}
	switch {
	case err == nil:
		s.log.Info("stored the token pair held in memory", zap.Uint64("generation", p.rec.Generation))
	case errors.Is(err, ErrConflict):
		s.log.Warn("dropping the pair held in memory: the stored record changed meanwhile", zap.Error(err))
	default:
		s.log.Error("storing the token pair held in memory still fails", zap.Error(err))
		s.obs.PersistFailed(s.cfg.Account)
		return err
	}
	a.pending = nil
	if a.lease != nil && a.lease.Mark != "" && a.lease.MarkedBy == s.cfg.Owner {
		a.lease.Mark = "" // the stored refresh token is no longer the marked one
	}
	s.setMemoryOnly(false)
	s.succeeded("") // the write's backoff is over
	s.releaseLease(ctx)
	return nil
}

// writtenBack reports whether rec is stored after a Load. A write fenced off
// because storage lost the lease (Redis lost its data, and another instance
// took the lease on what it knew before) goes through the store's
// write-back instead: a Redis store's Load writes back the newest pair it
// was given over an older generation of its chain, whoever holds the lease,
// and takes the lease until every instance had the time to do the same.
func (s *Source) writtenBack(ctx context.Context, rec *Record) bool {
	stored, err := s.load(ctx)
	return err == nil && stored != nil && stored.version() == rec.version()
}

// load reads the stored record.
func (s *Source) load(ctx context.Context) (*Record, error) {
	s.mu.Lock()
	s.lastLoad = s.clock.Now()
	s.mu.Unlock()
	octx, cancel := s.op(ctx)
	defer cancel()
	return s.store.Load(octx)
}

// adopt serves the stored pair if it is valid and newer than the served
// one, even when it is due for renewal (it is still valid). A configured
// seed not yet exchanged says which chain to serve, so the stored one is not
// adopted until the seed is spent. It reports whether it published anything.
func (s *Source) adopt(rec *Record, now time.Time) bool {
	if !rec.HasPair() || s.seedPending(rec) {
		return false
	}
	s.sightedAt(rec, now)
	if rec.token().ValidAt(now) && s.publish(rec, ResultAdopted) {
		s.obs.Refreshed(s.cfg.Account, ResultAdopted, 0)
		return true
	}
	s.noteUser(rec) // another instance may have recorded the served chain's user
	return false
}

// sightedAt is when this instance first saw rec's version.
func (s *Source) sightedAt(rec *Record, now time.Time) time.Time {
	a := &s.act
	if a.sighted != rec.version() {
		a.sighted, a.sightedAt = rec.version(), now
	}
	return a.sightedAt
}

// renewIfDue renews a held lease that is near its end.
func (s *Source) renewIfDue(ctx context.Context, now time.Time) {
	a := &s.act
	if a.lease == nil || now.Before(a.renewAt()) {
		return
	}
	octx, cancel := s.op(ctx)
	err := s.store.RenewLease(octx, a.lease)
	cancel()
	switch {
	case errors.Is(err, ErrLeaseLost):
		a.lease = nil
		if a.pending != nil {
			s.log.Error("lost the refresh lease while the newest pair is only in memory")
		}
	case err != nil:
		// Try again soon, but never in a loop against failing storage.
		a.renewRetry = s.clock.Now().Add(minBackoff)
		s.log.Warn("renewing the refresh lease failed", zap.Error(err))
	}
}

// renewAt is when a held lease is renewed: with a storage operation and
// some slack left, or after a failed renewal's pause.
func (a *actorState) renewAt() time.Time {
	return later(a.lease.validUntil.Add(-(StorageTimeout + leaseSlack)), a.renewRetry)
}

// holdLease returns wake, or earlier if a held lease needs renewing first.
func (s *Source) holdLease(wake time.Time) time.Time {
	if s.act.lease != nil {
		if renew := s.act.renewAt(); renew.Before(wake) {
			return renew
		}
	}
	return wake
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// clearMark drops this instance's mark of fp from the held lease: the token
// is known unspent, or storage no longer holds it.
func (s *Source) clearMark(fp string) {
	if l := s.act.lease; l != nil && l.Mark == fp && l.MarkedBy == s.cfg.Owner {
		l.Mark, l.MarkedBy = "", ""
	}
}

// releaseLease gives the lease up unless something still needs it: a pair
// only in memory (I2) or a token to resend after an unknown outcome (I1).
// The release keeps the lease's mark.
func (s *Source) releaseLease(ctx context.Context) {
	a := &s.act
	if a.lease == nil || a.pending != nil || a.resend != "" {
		return
	}
	octx, cancel := s.op(ctx)
	err := s.store.ReleaseLease(octx, a.lease)
	cancel()
	if err != nil {
		s.log.Warn("releasing the refresh lease failed (it lapses on its own)", zap.Error(err))
	}
	a.lease = nil
}

// staleIfRejected stops serving the current token once an upstream has
// rejected it and no newer one can be had: requests get the documented 503
// at once instead of the upstream's 401.
func (s *Source) staleIfRejected() {
	if rj, cur := s.rejectedToken(), s.cur.Load(); rj != nil && cur != nil && !cur.Supersedes(rj) {
		cur.stale.Store(true)
	}
}

// shutdown runs once when Close stops the refresher: a last try to store a
// pair held only in memory, then the lease goes back.
func (s *Source) shutdown() {
	a := &s.act
	if a.pending != nil {
		if err := s.flush(s.closeCtx); err != nil {
			s.log.Error("closing with the newest token pair not stored: the chain may be lost", zap.Error(err))
			a.pending = nil
		}
	}
	a.resend = ""
	s.releaseLease(s.closeCtx)
}

func (a *actorState) localDeadAdd(fp string) {
	if a.localDead == nil {
		a.localDead = make(map[string]bool)
	}
	for old := range a.localDead {
		if len(a.localDead) < maxConsumedSeeds {
			break
		}
		delete(a.localDead, old)
	}
	a.localDead[fp] = true
}

func (s *Source) setRefreshing(v bool) {
	s.mu.Lock()
	s.refreshing = v
	s.mu.Unlock()
}

func (s *Source) setMemoryOnly(v bool) {
	s.mu.Lock()
	s.memoryOnly = v
	state := s.stateLocked()
	s.mu.Unlock()
	s.obs.StateChanged(s.cfg.Account, state)
}

// optionalTime logs t, or nothing when it is unknown (zero).
func optionalTime(key string, t time.Time) zap.Field {
	if t.IsZero() {
		return zap.Skip()
	}
	return zap.Time(key, t)
}
