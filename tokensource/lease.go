package tokensource

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"time"

	"go.uber.org/zap"
)

// Cross-instance coordination.
//
// The storage lock is held only for short read-modify-writes, never across a
// network call: a holder killed while holding some storage locks (Caddy's
// file_system lock among them) can block everyone for a long time. The token
// call runs under a lease instead, a record with an owner and an expiry that
// a dead holder cannot keep alive. The new pair is written with a
// compare-and-set on the generation, so even a holder whose lease ran out
// cannot overwrite a newer pair.

// lockWait bounds one wait for the storage lock.
const lockWait = 20 * time.Second

// leasePoll is how often a process waiting for another's lease re-reads storage.
const leasePoll = 150 * time.Millisecond

type storageKeys struct {
	record, lease, lock string
}

// KeyPrefix is the storage prefix of an account's keys.
func KeyPrefix(account string) string { return "restream_auth/" + account }

func keysFor(account string) storageKeys {
	p := KeyPrefix(account)
	return storageKeys{record: p + "/token.json", lease: p + "/lease.json", lock: p + "/lease"}
}

// RecordKey is the storage key of an account's token record.
func RecordKey(account string) string { return keysFor(account).record }

type leaseRecord struct {
	Owner   string    `json:"owner"`
	Expires time.Time `json:"expires_at"`
	// Nonce tells this process's successive leases apart, so releasing one
	// (in the background) never releases the next.
	Nonce string `json:"nonce,omitempty"`
}

// leaseTTL outlives one token call plus the write that follows it.
func (s *Source) leaseTTL() time.Duration { return s.cfg.Timeout + 10*time.Second }

// ErrCorruptRecord marks a stored record that exists but cannot be used; any
// other LoadRecord error is a storage failure.
var ErrCorruptRecord = errors.New("corrupt stored record")

// LoadRecord reads an account's plain (unencrypted) stored record; it
// returns nil, nil if none exists.
func LoadRecord(ctx context.Context, st Storage, account string) (*Record, error) {
	return LoadRecordKeyring(ctx, st, account, nil)
}

// LoadRecordKeyring reads an account's stored record, decrypting it with kr
// if it is encrypted; it returns nil, nil if none exists.
func LoadRecordKeyring(ctx context.Context, st Storage, account string, kr *Keyring) (*Record, error) {
	key := RecordKey(account)
	b, err := st.Load(ctx, key)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("loading %s: %w", key, err)
	}
	if b, err = decodeRecordBytes(b, key, account, kr); err != nil {
		return nil, err
	}
	var rec Record
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Errorf("%w %s (%d bytes): not valid JSON", ErrCorruptRecord, key, len(b))
	}
	switch {
	case rec.Version != recordVersion:
		return nil, fmt.Errorf("%w %s: unsupported version %d", ErrCorruptRecord, key, rec.Version)
	case rec.RefreshToken == "" || rec.AccessToken == "" || rec.Expiry.IsZero():
		return nil, fmt.Errorf("%w %s: incomplete (missing tokens or expiry)", ErrCorruptRecord, key)
	}
	return &rec, nil
}

func (s *Source) loadRecord(ctx context.Context) (*Record, error) {
	return LoadRecordKeyring(ctx, s.cfg.Storage, s.cfg.Account, s.cfg.Keyring)
}

// withLock runs fn under the account's storage lock, waiting at most lockWait.
func (s *Source) withLock(ctx context.Context, fn func() error) error {
	lctx, cancel := context.WithTimeout(ctx, lockWait)
	defer cancel()
	if err := s.cfg.Storage.Lock(lctx, s.keys.lock); err != nil {
		return &Error{Kind: Transient, Msg: fmt.Sprintf("obtaining storage lock %s: %v", s.keys.lock, err)}
	}
	defer func() {
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if err := s.cfg.Storage.Unlock(uctx, s.keys.lock); err != nil {
			s.log.Warn("releasing storage lock", zap.String("lock", s.keys.lock), zap.Error(err))
		}
	}()
	return fn()
}

func (s *Source) loadLease(ctx context.Context) *leaseRecord {
	b, err := s.cfg.Storage.Load(ctx, s.keys.lease)
	if err != nil {
		return nil
	}
	var l leaseRecord
	if json.Unmarshal(b, &l) != nil {
		s.log.Warn("ignoring unreadable lease record", zap.String("key", s.keys.lease))
		return nil
	}
	return &l
}

func (s *Source) storeLease(ctx context.Context, l leaseRecord) error {
	b, _ := json.Marshal(l)
	return s.cfg.Storage.Store(ctx, s.keys.lease, b)
}

// acquireLease takes the account's lease. While another live process holds
// it, it polls the stored record and, if adopt is not nil, returns (nil, rec,
// nil) as soon as that process has stored a pair adopt accepts. On success it
// returns the lease and the record as read under the storage lock.
func (s *Source) acquireLease(ctx context.Context, adopt func(*Record) bool) (*leaseRecord, *Record, error) {
	start := time.Now()
	defer func() { s.obs.LockWaited(s.cfg.Account, time.Since(start)) }()
	for waited := false; ; waited = true {
		// Peek without the storage lock: while another instance holds the
		// lease, waiters only read, so the holder's own lock sections (its
		// write of the new pair) do not queue behind them.
		if l := s.loadLease(ctx); s.leaseHeldByOther(l) {
			if rec, err := s.pollLease(ctx, waited, adopt); err != nil || rec != nil {
				return nil, rec, err
			}
			continue
		}
		var got *leaseRecord
		var rec, adopted *Record
		var recErr error
		err := s.withLock(ctx, func() error {
			now := s.clock.Now()
			if s.leaseHeldByOther(s.loadLease(ctx)) {
				return nil
			}
			// Re-read before taking the lease: if another instance has just
			// stored a usable pair, adopt it and leave the lease alone (no
			// lease to release, no second lock section).
			if r, err := s.loadRecord(ctx); err == nil && adopt != nil && adopt(r) {
				adopted = r
				return nil
			}
			mine := leaseRecord{Owner: s.cfg.Owner, Expires: now.Add(s.leaseTTL()), Nonce: newChainID()}
			if err := s.storeLease(ctx, mine); err != nil {
				return &Error{Kind: Transient, Msg: fmt.Sprintf("writing lease %s: %v", s.keys.lease, err)}
			}
			got = &mine
			rec, recErr = s.loadRecord(ctx)
			return nil
		})
		if err != nil {
			return nil, nil, err
		}
		if adopted != nil {
			return nil, adopted, nil
		}
		if got != nil {
			if recErr != nil && !errors.Is(recErr, ErrCorruptRecord) {
				s.releaseLease(got)
				return nil, nil, &Error{Kind: Transient, Msg: recErr.Error()}
			}
			if recErr != nil {
				s.log.Error("stored token record is unusable", zap.Error(recErr))
			}
			return got, rec, nil
		}
		if rec, err := s.pollLease(ctx, waited, adopt); err != nil || rec != nil {
			return nil, rec, err
		}
	}
}

// pollLease waits one poll interval for another instance's lease. It
// returns the stored record instead if that instance has stored a pair
// adopt accepts.
func (s *Source) pollLease(ctx context.Context, waited bool, adopt func(*Record) bool) (*Record, error) {
	if !waited {
		s.log.Debug("another instance holds the refresh lease; waiting")
	}
	if adopt != nil {
		if rec, err := s.loadRecord(ctx); err == nil && adopt(rec) {
			return rec, nil
		}
	}
	select {
	case <-time.After(leasePoll):
		return nil, nil
	case <-ctx.Done():
		return nil, &Error{Kind: Transient, Msg: "timed out waiting for another instance's refresh lease"}
	}
}

// leaseHeldByOther reports a live lease of another instance. A lease that
// expires implausibly late (a skewed clock, a bad record) is ignored: no
// lease is ever granted for longer than leaseTTL.
func (s *Source) leaseHeldByOther(l *leaseRecord) bool {
	now := s.clock.Now()
	if l == nil || l.Owner == s.cfg.Owner || !now.Before(l.Expires) {
		return false
	}
	if l.Expires.Sub(now) > 2*s.leaseTTL() {
		s.log.Warn("ignoring a refresh lease that expires implausibly late", zap.Time("expires_at", l.Expires))
		return false
	}
	return true
}

// releaseLease gives the lease up if it is still ours.
func (s *Source) releaseLease(l *leaseRecord) {
	ctx, cancel := context.WithTimeout(context.Background(), lockWait+5*time.Second)
	defer cancel()
	err := s.withLock(ctx, func() error {
		if cur := s.loadLease(ctx); cur == nil || cur.Owner != l.Owner || cur.Nonce != l.Nonce {
			return nil
		}
		return s.storeLease(ctx, leaseRecord{Owner: "", Expires: time.Time{}})
	})
	if err != nil {
		s.log.Warn("releasing refresh lease (it expires on its own)", zap.Error(err))
	}
}

// errNewerStored means the stored chain moved on without us.
var errNewerStored = errors.New("a newer pair is already stored")

// persist writes rec if the stored generation is still base. lease, if not
// nil, is checked only to warn: a holder whose lease ran out but whose
// compare-and-set still succeeds holds the one live pair and must write it.
func (s *Source) persist(ctx context.Context, rec *Record, base uint64, lease *leaseRecord) error {
	b, err := encodeRecord(rec, s.cfg.Account, s.cfg.Keyring)
	if err != nil {
		return err
	}
	return s.withLock(ctx, func() error {
		stored, err := s.loadRecord(ctx)
		if err == nil && stored != nil && stored.Generation != base {
			return fmt.Errorf("%w (generation %d, expected %d)", errNewerStored, stored.Generation, base)
		}
		if lease != nil {
			if cur := s.loadLease(ctx); cur == nil || cur.Owner != lease.Owner || cur.Nonce != lease.Nonce {
				s.log.Warn("refresh lease expired before the new pair was written; writing it by generation check")
			}
		}
		if err := s.cfg.Storage.Store(ctx, s.keys.record, b); err != nil {
			return fmt.Errorf("storing %s: %w", s.keys.record, err)
		}
		return nil
	})
}

// persistPending writes the pair held only in memory, if there is one. A nil
// result means storage holds that pair or a newer one.
func (s *Source) persistPending(ctx context.Context) error {
	s.mu.Lock()
	p := s.pending
	s.mu.Unlock()
	if p == nil {
		return nil
	}
	if err := s.persist(ctx, p.rec, p.base, nil); err != nil && !errors.Is(err, errNewerStored) {
		return err
	}
	s.mu.Lock()
	if s.pending == p {
		s.pending = nil
	}
	s.mu.Unlock()
	return nil
}

// flushPending retries writing a pair that exists only in memory. It reports
// whether it did any work.
func (s *Source) flushPending() bool {
	s.mu.Lock()
	p := s.pending
	s.mu.Unlock()
	if p == nil {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), lockWait+s.cfg.Timeout)
	defer cancel()
	err := s.persist(ctx, p.rec, p.base, nil)
	s.mu.Lock()
	defer s.mu.Unlock()
	// Clear only the pair written here: an attempt may have set a newer one.
	switch {
	case err == nil:
		if s.pending == p {
			s.pending = nil
		}
		s.failures = 0
		s.nextAttempt = time.Time{}
		s.log.Info("persisted the token pair held in memory", zap.Uint64("generation", p.rec.Generation))
	case errors.Is(err, errNewerStored):
		if s.pending == p {
			s.pending = nil
		}
		s.log.Warn("dropping unpersisted pair: storage holds a newer one", zap.Error(err))
	default:
		s.failures++
		s.nextAttempt = s.clock.Now().Add(backoff(s.failures))
		s.log.Error("persisting the token pair still fails", zap.Error(err))
	}
	return true
}
