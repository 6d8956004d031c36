package tokensource

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"sync"
	"time"

	"go.uber.org/zap"
)

// Store is the storage side of the refresh protocol for one account: its
// record, read and written by compare-and-set, and its lease, the right to
// send the account's refresh token. Every method is one bounded operation;
// an error other than the named ones is transient (I4: a failed read is never
// taken as "no record" or "no lease").
//
// NewStorageStore implements it over any Caddy storage; a backend with
// atomic operations (Redis) can implement it natively.
type Store interface {
	// Load returns the stored record, or nil if there is none. A record that
	// exists but cannot be used is reported with ErrCorruptRecord or
	// ErrUnreadableRecord.
	Load(ctx context.Context) (*Record, error)
	// CompareAndStore writes rec if the stored record's version is still
	// base (the zero Version for "no record"); otherwise it returns
	// ErrConflict and writes nothing (I5).
	CompareAndStore(ctx context.Context, rec *Record, base Version) error
	// TakeLease takes the lease for owner, for ttl. It returns ErrLeaseHeld
	// while another owner's lease is live. A taken-over lease keeps its Mark.
	TakeLease(ctx context.Context, owner string, ttl time.Duration) (*Lease, error)
	// RenewLease rewrites a held lease, with its current Mark, for another
	// TTL; ErrLeaseLost if it is no longer held.
	RenewLease(ctx context.Context, l *Lease) error
	// ReleaseLease gives a held lease up, keeping its Mark.
	ReleaseLease(ctx context.Context, l *Lease) error
}

// Store errors.
var (
	// ErrConflict: the stored record changed since it was read.
	ErrConflict = errors.New("the stored record changed since it was read")
	// ErrLeaseHeld: another instance holds the account's lease.
	ErrLeaseHeld = errors.New("another instance holds the refresh lease")
	// ErrLeaseLost: the lease is no longer held by its owner.
	ErrLeaseLost = errors.New("the refresh lease was lost")
	// ErrCorruptRecord marks a stored record that exists but cannot be used.
	ErrCorruptRecord = errors.New("corrupt stored record")
	// ErrUnreadableRecord marks a stored record this configuration cannot
	// decrypt. Like a corrupt one it is never overwritten: it may hold the
	// only live refresh token, readable with the right key.
	ErrUnreadableRecord = errors.New("unreadable stored record")
)

// Version identifies a stored record for compare-and-set.
type Version struct {
	Generation uint64
	Chain      string
}

// Lease is the right to send an account's refresh token.
type Lease struct {
	Owner string
	Nonce string
	// TTL is how long the lease lives after each write. It travels with the
	// lease, so instances with different timeouts agree on it.
	TTL time.Duration
	// Mark is the fingerprint of a refresh token that the instance MarkedBy
	// was about to send, or sent without its outcome reaching storage. It
	// survives takeovers and releases: only MarkedBy may send that token
	// again (I1), and it is cleared by the holder that knows the outcome.
	Mark     string
	MarkedBy string

	// validUntil is when the lease lapses by its holder's own clock: the
	// reading taken before the write that took or renewed it, plus TTL.
	validUntil time.Time
	seq        uint64
}

// Remaining is how long the holder may still act under the lease.
func (l *Lease) Remaining(now time.Time) time.Duration { return l.validUntil.Sub(now) }

// Held is for Store implementations outside this package: the write that
// took or renewed l was sent at start (a clock reading taken before it), so
// its holder may act under it until start + TTL (I3).
func (l *Lease) Held(start time.Time) { l.validUntil = start.Add(l.TTL) }

// maxLeaseTTL caps a TTL read from storage, so a bad record cannot block an
// account for longer.
const maxLeaseTTL = time.Hour

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

// LeaseKey is the storage key of an account's lease.
func LeaseKey(account string) string { return keysFor(account).lease }

// Storage is the part of certmagic.Storage the storage store needs. Load
// must return an error wrapping fs.ErrNotExist for a missing key.
type Storage interface {
	Lock(ctx context.Context, name string) error
	Unlock(ctx context.Context, name string) error
	Store(ctx context.Context, key string, value []byte) error
	Load(ctx context.Context, key string) ([]byte, error)
}

// storageStore implements Store over a Caddy storage. Writes happen under
// the storage's lock, held only for a read and a write, never across a
// network call. Lease expiry is judged by observation (I3): a lease lapses
// when this process has seen it unchanged for its TTL on its own clock, so
// neither clock skew nor a different configuration on another host can make
// two instances hold it at once. Its exclusivity is that of the storage's
// lock; see the README on which storages provide one.
type storageStore struct {
	st      Storage
	account string
	keys    storageKeys
	kr      *Keyring
	clock   Clock
	log     *zap.Logger

	mu       sync.Mutex
	sighting leaseSighting // the other owner's lease as last seen
}

type leaseSighting struct {
	id    string
	since time.Time
}

// NewStorageStore returns the Store of account over st.
func NewStorageStore(st Storage, account string, kr *Keyring, clock Clock, log *zap.Logger) Store {
	if clock == nil {
		clock = realClock{}
	}
	if log == nil {
		log = zap.NewNop()
	}
	return &storageStore{st: st, account: account, keys: keysFor(account), kr: kr, clock: clock, log: log}
}

// leaseRecord is a lease as stored. ExpiresAt is for people and the CLI
// only: no decision reads it.
type leaseRecord struct {
	Owner     string    `json:"owner"`
	Nonce     string    `json:"nonce,omitempty"`
	Seq       uint64    `json:"seq,omitempty"`
	TTLMillis int64     `json:"ttl_ms,omitempty"`
	Mark      string    `json:"mark,omitempty"`
	MarkedBy  string    `json:"marked_by,omitempty"`
	ExpiresAt time.Time `json:"expires_at,omitzero"`
}

func (l *leaseRecord) id() string { return fmt.Sprintf("%s/%s/%d", l.Owner, l.Nonce, l.Seq) }

// ttl is the lease's TTL; a record without one (written by an earlier
// version) gets the default configuration's.
func (l *leaseRecord) ttl() time.Duration {
	d := time.Duration(l.TTLMillis) * time.Millisecond
	if d <= 0 {
		return DefaultTimeout + 2*StorageTimeout + leaseSlack
	}
	return min(d, maxLeaseTTL)
}

func (s *storageStore) Load(ctx context.Context) (*Record, error) {
	return LoadRecordKeyring(ctx, s.st, s.account, s.kr)
}

func (s *storageStore) CompareAndStore(ctx context.Context, rec *Record, base Version) error {
	b, err := EncodeRecord(rec, s.keys.record, s.account, s.kr)
	if err != nil {
		return err
	}
	return s.withLock(ctx, func() error {
		stored, err := s.Load(ctx)
		if err != nil {
			return err // I5: never overwrite what could not be read
		}
		if got := stored.version(); got != base {
			return fmt.Errorf("%w (stored generation %d, expected %d)", ErrConflict, got.Generation, base.Generation)
		}
		if err := s.st.Store(ctx, s.keys.record, b); err != nil {
			return fmt.Errorf("storing %s: %w", s.keys.record, err)
		}
		return nil
	})
}

func (s *storageStore) TakeLease(ctx context.Context, owner string, ttl time.Duration) (*Lease, error) {
	// Look first without the storage lock: waiters only read, so the
	// holder's own lock sections do not queue behind them.
	cur, err := s.loadLease(ctx)
	if err != nil {
		return nil, err
	}
	if s.heldByOther(cur, owner) {
		return nil, ErrLeaseHeld
	}
	var got *Lease
	err = s.withLock(ctx, func() error {
		cur, err := s.loadLease(ctx)
		if err != nil {
			return err
		}
		if s.heldByOther(cur, owner) {
			return ErrLeaseHeld
		}
		l := &Lease{Owner: owner, Nonce: randomID(), TTL: ttl}
		if cur != nil {
			l.Mark, l.MarkedBy = cur.Mark, cur.MarkedBy
		}
		if err := s.writeLease(ctx, l); err != nil {
			return err
		}
		got = l
		return nil
	})
	return got, err
}

func (s *storageStore) RenewLease(ctx context.Context, l *Lease) error {
	return s.withLock(ctx, func() error {
		cur, err := s.loadLease(ctx)
		if err != nil {
			return err
		}
		if cur == nil || cur.Owner != l.Owner || cur.Nonce != l.Nonce {
			return ErrLeaseLost
		}
		l.seq = max(l.seq, cur.Seq) + 1
		return s.writeLease(ctx, l)
	})
}

func (s *storageStore) ReleaseLease(ctx context.Context, l *Lease) error {
	return s.withLock(ctx, func() error {
		cur, err := s.loadLease(ctx)
		if err != nil {
			return err
		}
		if cur == nil || cur.Owner != l.Owner || cur.Nonce != l.Nonce {
			return nil // lapsed and taken over: the Mark went with it
		}
		b, _ := json.Marshal(leaseRecord{Mark: l.Mark, MarkedBy: l.MarkedBy})
		return s.st.Store(ctx, s.keys.lease, b)
	})
}

// writeLease stores l; on success its validUntil counts from the clock
// reading taken before the write, so no other instance can see the lease
// lapse earlier than its holder does.
func (s *storageStore) writeLease(ctx context.Context, l *Lease) error {
	start := s.clock.Now()
	b, _ := json.Marshal(leaseRecord{Owner: l.Owner, Nonce: l.Nonce, Seq: l.seq, TTLMillis: l.TTL.Milliseconds(),
		Mark: l.Mark, MarkedBy: l.MarkedBy, ExpiresAt: start.Add(l.TTL).UTC()})
	if err := s.st.Store(ctx, s.keys.lease, b); err != nil {
		return fmt.Errorf("writing %s: %w", s.keys.lease, err)
	}
	l.validUntil = start.Add(l.TTL)
	return nil
}

// heldByOther reports a live lease of another owner: one this process has
// not yet seen unchanged for its TTL.
func (s *storageStore) heldByOther(l *leaseRecord, owner string) bool {
	if l == nil || l.Owner == "" || l.Owner == owner {
		return false
	}
	now := s.clock.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sighting.id != l.id() {
		s.sighting = leaseSighting{id: l.id(), since: now}
		return true
	}
	if now.Sub(s.sighting.since) < l.ttl() {
		return true
	}
	s.log.Warn("taking over a refresh lease its holder stopped renewing", zap.Duration("unchanged_for", now.Sub(s.sighting.since)))
	return false
}

// loadLease reads the lease; nil if there is none. An unreadable lease
// record counts as a live lease of an unknown owner that nobody renews.
func (s *storageStore) loadLease(ctx context.Context) (*leaseRecord, error) {
	b, err := s.st.Load(ctx, s.keys.lease)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("loading %s: %w", s.keys.lease, err)
	}
	var l leaseRecord
	if json.Unmarshal(b, &l) != nil {
		return &leaseRecord{Owner: "unreadable lease record", Nonce: Fingerprint(string(b))}, nil
	}
	return &l, nil
}

// withLock runs fn under the account's storage lock. ctx bounds the wait.
func (s *storageStore) withLock(ctx context.Context, fn func() error) error {
	if err := s.st.Lock(ctx, s.keys.lock); err != nil {
		return fmt.Errorf("obtaining storage lock %s: %w", s.keys.lock, err)
	}
	defer func() {
		uctx, cancel := withTimeout(context.WithoutCancel(ctx), s.clock, unlockTimeout)
		defer cancel()
		if err := s.st.Unlock(uctx, s.keys.lock); err != nil {
			s.log.Warn("releasing storage lock", zap.String("lock", s.keys.lock), zap.Error(err))
		}
	}()
	return fn()
}

// unlockTimeout bounds the release of a storage lock.
const unlockTimeout = 5 * time.Second

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
	return decodeRecord(b, key, account, kr)
}

// decodeRecord parses a stored record. It never panics, whatever b holds (I8).
// With a keyring it returns only records that keyring could have written:
// sealed, in a current envelope, for this account and key.
func decodeRecord(b []byte, key, account string, kr *Keyring) (*Record, error) {
	b, sealing, err := unsealRecord(b, key, account, kr)
	if err != nil {
		return nil, err
	}
	var rec Record
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Errorf("%w %s (%d bytes): not valid JSON", ErrCorruptRecord, key, len(b))
	}
	switch {
	case rec.Version != recordVersion:
		return nil, fmt.Errorf("%w %s: unsupported version %d", ErrCorruptRecord, key, rec.Version)
	case !rec.HasPair() && (rec.RefreshToken != "" || rec.AccessToken != "" || rec.Generation > 0):
		return nil, fmt.Errorf("%w %s: incomplete (missing tokens or expiry)", ErrCorruptRecord, key)
	}
	if err := refuseSealing(sealing, key, account, kr); err != nil {
		return nil, err
	}
	return &rec, nil
}

func randomID() string {
	var b [8]byte
	_, _ = crand.Read(b[:])
	return hex.EncodeToString(b[:])
}
