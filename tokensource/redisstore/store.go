// Package redisstore implements tokensource.Store natively on Redis, for
// replicas that share an account's token chain through Redis rather than
// Caddy storage.
//
// An account has three keys under a prefix (default "restream_auth/"), the
// account in braces so they share one Redis Cluster slot:
//
//	<prefix>{<account>}/record  hash: gen, chain, and data, the record as
//	                            tokensource.EncodeRecord writes it
//	<prefix>{<account>}/lease   the holder's token ({"owner","nonce","ttl_ms"}),
//	                            with a PX expiry: Redis's clock alone ends it
//	<prefix>{<account>}/mark    hash: mark, marked_by; no expiry
//
// The semantics are the storage store's (see tokensource.Store), made
// atomic by Lua scripts instead of a storage lock:
//
//   - TakeLease is SET NX PX; the mark, kept in its own key, survives every
//     lease's expiry, takeover and release. Renew and release are
//     owner-only, and write the lease's mark.
//   - CompareAndStore checks the stored generation and chain against base,
//     and, when the caller holds a lease, that the lease is still its own: a
//     holder whose lease expired cannot write.
//   - With MinReplicas, every record and mark write is followed by WAIT on
//     the same connection; too few acknowledgements make the write an error
//     (transient), so a pair is used only once replicas hold it.
//
// Two departures, both for a Redis that lost data (restarted without
// persistence, flushed, failed over to a lagging replica): a store writes
// back the newest record it has read or written when Redis has none, or an
// older generation of the same chain, in Load and in CompareAndStore; it
// never overwrites another chain or a newer generation. So the instance
// that holds the newest pair restores it, and nobody starts a refresh from
// a spent token or a seed the lost record had consumed. An instance's
// knowledge may lag a rotation by a moment, so a write-back from memory
// takes the lease for RestoreSettle, and every store reloads the record in
// the background every WatchInterval: an instance holding a newer record
// writes it back before anyone can refresh from an older one.
//
// What is where: store.go holds Store, Options and New, and the Store
// methods; scripts.go the Lua scripts they run; client.go the client
// (ParseURL, NewClient, RedactURL); import.go the one-time import of an
// account from Caddy storage (Options.ImportFrom); inspect.go the read-only
// Snapshot for the CLI.
package redisstore

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// DefaultKeyPrefix starts every key of the store.
const DefaultKeyPrefix = "restream_auth/"

// maxReplicaWait bounds one WAIT for replicas, within the call's context,
// which it leaves waitSlack of for the answer.
const (
	maxReplicaWait = 5 * time.Second
	waitSlack      = 250 * time.Millisecond
)

// Options configure a Store. The zero value is valid.
type Options struct {
	// KeyPrefix starts every key; default DefaultKeyPrefix.
	KeyPrefix string
	// MinReplicas is how many replicas must acknowledge each record and
	// mark write before it counts as done; default 0 (the primary's word).
	MinReplicas int
	// Keyring, if set, encrypts the record at rest.
	Keyring *tokensource.Keyring
	// Clock is the protocol's clock; a lease's holder counts its time on it.
	Clock  tokensource.Clock
	Logger *zap.Logger
	// ImportFrom, if set, is the Caddy storage an account's record is
	// imported from, once, when Redis has none (see Load).
	ImportFrom tokensource.Storage
	// WatchInterval is how often the store checks, in the background, that
	// Redis still holds the record, and writes back the one it knows if not;
	// default 1s, negative for never. It keeps what an idle instance knows
	// fresh, too.
	WatchInterval time.Duration
	// RestoreSettle is how long the lease stays taken after a record is
	// written back from memory, so that an instance that knows a newer one
	// writes it back before anyone refreshes; default 2.5s. It must exceed
	// every instance's WatchInterval.
	RestoreSettle time.Duration
}

// Defaults of Options.
const (
	DefaultWatchInterval = time.Second
	DefaultRestoreSettle = 2500 * time.Millisecond
)

// Store is the tokensource.Store of one account on Redis. It is safe for
// concurrent use.
type Store struct {
	c        *redis.Client
	account  string
	keys     keys
	opts     Options
	log      *zap.Logger
	password string // never shown: errors are scrubbed of it
	ident    string

	mu sync.Mutex
	// known is the newest record this store read or wrote, as stored; it is
	// written back if Redis loses the record.
	known *stored
	// unconfirmed is a record whose write failed, or was written to the
	// primary but its WAIT failed: a retry of the same write sends the same
	// bytes, which the script recognizes as already written, and waits for
	// replicas again.
	unconfirmed *unconfirmedWrite
	// held maps each lease this store took, and neither released nor found
	// lost, to its token: the fence of CompareAndStore.
	held map[*tokensource.Lease]string
	// watching is set once the watch runs; closed once Close was called.
	watching, closed bool
	done             chan struct{}
	wg               sync.WaitGroup

	importer
}

type keys struct{ record, lease, mark string }

type stored struct {
	gen   uint64
	chain string
	data  string
}

type unconfirmedWrite struct {
	rec  *tokensource.Record
	data string
}

var prefixPattern = regexp.MustCompile(`^[^\s{}\x00-\x1f\x7f]{1,200}$`)

// CheckKeyPrefix reports a key prefix the store cannot use.
func CheckKeyPrefix(p string) error {
	if !prefixPattern.MatchString(p) || !utf8.ValidString(p) {
		return fmt.Errorf("key_prefix %q: use 1-200 characters without spaces, control characters or braces "+
			"(the store puts the account in braces, a Redis Cluster hash tag)", p)
	}
	return nil
}

// New returns the Store of account on c. It does not contact Redis.
func New(c *redis.Client, account string, opts Options) (*Store, error) {
	if opts.KeyPrefix == "" {
		opts.KeyPrefix = DefaultKeyPrefix
	}
	switch {
	case c == nil:
		return nil, errors.New("redis store: no client")
	case account == "" || strings.ContainsAny(account, "{}"):
		return nil, fmt.Errorf("redis store: account %q: empty or with braces", account)
	case CheckKeyPrefix(opts.KeyPrefix) != nil:
		return nil, CheckKeyPrefix(opts.KeyPrefix)
	case opts.MinReplicas < 0:
		return nil, fmt.Errorf("redis min_replicas %d: must not be negative", opts.MinReplicas)
	}
	if opts.Clock == nil {
		opts.Clock = realClock{}
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.WatchInterval == 0 {
		opts.WatchInterval = DefaultWatchInterval
	}
	if opts.RestoreSettle <= 0 {
		opts.RestoreSettle = DefaultRestoreSettle
	}
	base := opts.KeyPrefix + "{" + account + "}/"
	o := c.Options()
	s := &Store{
		c:        c,
		account:  account,
		keys:     keys{record: base + "record", lease: base + "lease", mark: base + "mark"},
		opts:     opts,
		log:      opts.Logger.With(zap.String("account", account)),
		password: o.Password,
		ident:    fmt.Sprintf("redis %s db %d, keys %s{%s}/", o.Addr, o.DB, opts.KeyPrefix, account),
		held:     make(map[*tokensource.Lease]string),
		done:     make(chan struct{}),
	}
	if opts.MinReplicas > 0 {
		s.ident += fmt.Sprintf(", min_replicas %d", opts.MinReplicas)
	}
	s.importer.owner = "redis import " + randomID()
	return s, nil
}

// String names the store for people: address, database and keys, never
// credentials.
func (s *Store) String() string { return s.ident }

// RecordKey is the Redis key of the account's record.
func (s *Store) RecordKey() string { return s.keys.record }

// Load returns the stored record. The first Load imports the record from
// Caddy storage (Options.ImportFrom) if Redis has none; until the import is
// settled it fails (transiently), so no caller acts on a missing record
// that is only not imported yet. If the record is gone, or holds an older
// generation of the chain this store last saw, the one it last saw is
// written back and returned.
func (s *Store) Load(ctx context.Context) (*tokensource.Record, error) {
	if err := s.importOnce(ctx, s); err != nil {
		return nil, err
	}
	return s.load(ctx)
}

func (s *Store) load(ctx context.Context) (*tokensource.Record, error) {
	s.mu.Lock()
	known := s.known
	s.mu.Unlock()
	args := []any{settleToken(s.opts.RestoreSettle), s.opts.RestoreSettle.Milliseconds()}
	if known != nil {
		args = append(args, strconv.FormatUint(known.gen, 10), known.chain, known.data)
	}
	reply, waitErr, err := s.run(ctx, loadScript, 5, []string{s.keys.record, s.keys.lease, s.keys.mark}, args,
		func(r []string) bool { return r[0] == "restored" })
	if err != nil {
		return nil, s.errorf("reading %s: %w", s.keys.record, err)
	}
	status, gen, chain, data, detail := reply[0], reply[1], reply[2], reply[3], reply[4]
	switch status {
	case "none":
		return nil, nil
	case "corrupt":
		return nil, fmt.Errorf("%w %s: %s", tokensource.ErrCorruptRecord, s.keys.record, detail)
	}
	rec, err := s.decode(gen, chain, data)
	if err != nil {
		return nil, err
	}
	s.rememberUnlessOlder(rec, data)
	if status == "restored" {
		s.log.Warn("the record in Redis was gone or older than the one this instance holds; wrote it back",
			zap.String("key", s.keys.record), zap.String("stored_generation", detail), zap.Uint64("generation", rec.Generation))
		if waitErr != nil {
			return nil, waitErr
		}
	}
	return rec, nil
}

// decode parses a stored record and checks that the fields the scripts
// compare agree with it.
func (s *Store) decode(gen, chain, data string) (*tokensource.Record, error) {
	rec, err := tokensource.DecodeRecord([]byte(data), s.keys.record, s.account, s.opts.Keyring)
	if err != nil {
		return nil, err
	}
	if strconv.FormatUint(rec.Generation, 10) != gen || rec.Chain != chain {
		return nil, fmt.Errorf("%w %s: its gen and chain fields (%s, %q) disagree with the record (%d, %q)",
			tokensource.ErrCorruptRecord, s.keys.record, gen, chain, rec.Generation, rec.Chain)
	}
	return rec, nil
}

// remember makes data the newest record this store knows, and starts the
// watch that writes it back should Redis lose it.
func (s *Store) remember(rec *tokensource.Record, data string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rememberLocked(rec, data)
}

func (s *Store) rememberLocked(rec *tokensource.Record, data string) {
	s.known = &stored{gen: rec.Generation, chain: rec.Chain, data: data}
	if !s.watching && !s.closed && s.opts.WatchInterval > 0 {
		s.watching = true
		s.wg.Add(1)
		go s.watch()
	}
}

// rememberUnlessOlder remembers what a read returned, unless it is an older
// generation of the chain this store knows: a read that ran before this
// store's own write of a newer generation can return after it (the watch
// reads concurrently with the refresher), and remembering it would make the
// watch write the older, spent pair back after a data loss. Redis itself
// never goes back in a chain without the read writing the known record
// back, so the older read is always that stale answer.
func (s *Store) rememberUnlessOlder(rec *tokensource.Record, data string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if k := s.known; k != nil && k.chain == rec.Chain && k.gen > rec.Generation {
		return
	}
	s.rememberLocked(rec, data)
}

// rememberIfNewer remembers rec if it is a newer generation of the chain
// this store knows, or the store knows none.
func (s *Store) rememberIfNewer(rec *tokensource.Record, data string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if k := s.known; k == nil || k.chain == rec.Chain && k.gen < rec.Generation {
		s.rememberLocked(rec, data)
	}
}

// watch loads the record every WatchInterval: that writes the known record
// back if Redis lost it, and keeps the known record fresh.
func (s *Store) watch() {
	defer s.wg.Done()
	t := time.NewTicker(s.opts.WatchInterval)
	defer t.Stop()
	for {
		select {
		case <-s.done:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), max(s.opts.WatchInterval, time.Second))
		if _, err := s.load(ctx); err != nil {
			s.log.Debug("watching the record in Redis", zap.Error(err))
		}
		cancel()
	}
}

// Close stops the store's background watch. The client stays open: it is
// the caller's, and may be shared.
func (s *Store) Close() {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		close(s.done)
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// settleToken holds the lease after a write-back from memory; no client
// owns it, so every TakeLease waits until it expires.
func settleToken(d time.Duration) string {
	return fmt.Sprintf(`{"owner":%q,"nonce":"","ttl_ms":%d}`, settleOwner, d.Milliseconds())
}

// settleOwner owns the settle lease: no client.
const settleOwner = "written back from memory, settling"

// CompareAndStore writes rec if the stored version is base, fenced by the
// leases this store holds (see the package comment).
func (s *Store) CompareAndStore(ctx context.Context, rec *tokensource.Record, base tokensource.Version) error {
	b, err := tokensource.EncodeRecord(rec, s.keys.record, s.account, s.opts.Keyring)
	if err != nil {
		return fmt.Errorf("encoding the record: %w", err)
	}
	data := string(b)
	s.mu.Lock()
	if u := s.unconfirmed; u != nil && u.rec == rec {
		data = u.data
	}
	args := []any{strconv.FormatUint(base.Generation, 10), base.Chain, strconv.FormatUint(rec.Generation, 10), rec.Chain, data}
	for _, tok := range s.held {
		args = append(args, tok)
	}
	s.mu.Unlock()

	reply, waitErr, err := s.run(ctx, compareAndStoreScript, 4, []string{s.keys.record, s.keys.lease}, args,
		func(r []string) bool { return r[0] == "ok" || r[0] == "restored" || r[0] == "same" })
	if err != nil {
		// The write may not have happened, and rec may be the only copy of
		// a pair Restream has rotated: known, the watch writes it back once
		// Redis answers again, before the settle lease of an older record
		// written back by another instance ends; a retry sends the same
		// bytes, which the script then finds already written (same).
		s.remember(rec, data)
		s.mu.Lock()
		s.unconfirmed = &unconfirmedWrite{rec: rec, data: data}
		s.mu.Unlock()
		return s.errorf("writing %s: %w", s.keys.record, err)
	}
	status, gen, chain, detail := reply[0], reply[1], reply[2], reply[3]
	switch status {
	case "conflict":
		return fmt.Errorf("%w (stored generation %s, expected %d)", tokensource.ErrConflict, gen, base.Generation)
	case "lease_lost":
		// rec may be a pair Restream has rotated, held only in the caller's
		// memory: if it is newer than what this store knows, the next Load
		// (the watch's, every WatchInterval) writes it back over an older
		// generation of its chain, whoever holds the lease.
		s.rememberIfNewer(rec, data)
		return fmt.Errorf("%w: %s was not written", tokensource.ErrLeaseLost, s.keys.record)
	case "corrupt":
		return fmt.Errorf("%w %s: %s", tokensource.ErrCorruptRecord, s.keys.record, detail)
	case "restored":
		if gen == "" {
			gen = "gone"
		}
		s.log.Warn("the record in Redis was gone or older than the one it was read as; wrote the newer one",
			zap.String("key", s.keys.record), zap.String("stored_generation", gen), zap.Bool("same_chain", chain == base.Chain),
			zap.Uint64("generation", rec.Generation))
	}
	s.remember(rec, data)
	s.mu.Lock()
	defer s.mu.Unlock()
	if waitErr != nil {
		s.unconfirmed = &unconfirmedWrite{rec: rec, data: data}
		return waitErr
	}
	s.unconfirmed = nil
	return nil
}

// leaseToken is the lease key's value for l: the holder's token.
func leaseToken(l *tokensource.Lease) string {
	b, _ := json.Marshal(struct {
		Owner     string `json:"owner"`
		Nonce     string `json:"nonce"`
		TTLMillis int64  `json:"ttl_ms"`
	}{l.Owner, l.Nonce, l.TTL.Milliseconds()})
	return string(b)
}

// TakeLease takes the lease for owner with SET NX PX; ErrLeaseHeld while
// another owner's lease lives. The lease comes with the account's mark.
func (s *Store) TakeLease(ctx context.Context, owner string, ttl time.Duration) (*tokensource.Lease, error) {
	if ttl < time.Millisecond {
		return nil, fmt.Errorf("lease TTL %s: must be at least 1ms", ttl)
	}
	// The one-time import runs before any lease of this store is taken: it
	// takes the Redis lease itself, so a caller that took the lease first
	// and then loaded (an install) would find it held by its own store.
	if owner != s.importer.owner {
		if err := s.importOnce(ctx, s); err != nil {
			return nil, err
		}
	}
	l := &tokensource.Lease{Owner: owner, Nonce: randomID(), TTL: ttl}
	tok := leaseToken(l)
	start := s.opts.Clock.Now()
	r, err := takeLeaseScript.Run(ctx, s.c, []string{s.keys.lease, s.keys.mark}, tok, ttl.Milliseconds(), owner).Slice()
	if err != nil {
		return nil, s.errorf("taking the lease %s: %w", s.keys.lease, err)
	}
	if len(r) == 0 || r[0] != int64(1) {
		return nil, tokensource.ErrLeaseHeld
	}
	if len(r) == 3 {
		l.Mark, _ = r[1].(string)
		l.MarkedBy, _ = r[2].(string)
	}
	l.Held(start)
	s.mu.Lock()
	for old := range s.held {
		if old.Owner == owner { // taken over: its token is gone
			delete(s.held, old)
		}
	}
	s.held[l] = tok
	s.mu.Unlock()
	return l, nil
}

// RenewLease rewrites a held lease, and its mark, for another TTL;
// ErrLeaseLost if the lease is no longer l's.
func (s *Store) RenewLease(ctx context.Context, l *tokensource.Lease) error {
	start := s.opts.Clock.Now()
	reply, waitErr, err := s.run(ctx, renewLeaseScript, 1, []string{s.keys.lease, s.keys.mark},
		[]any{leaseToken(l), l.TTL.Milliseconds(), l.Mark, l.MarkedBy}, renewed)
	switch {
	case err != nil:
		return s.errorf("renewing the lease %s: %w", s.keys.lease, err)
	case !renewed(reply):
		s.forget(l)
		return tokensource.ErrLeaseLost
	case waitErr != nil:
		return waitErr // the mark may not be on the replicas: not known to be stored
	}
	l.Held(start)
	return nil
}

// ReleaseLease gives a held lease up, writing its mark; a lease that is no
// longer l's is left alone (its mark stays as last written).
func (s *Store) ReleaseLease(ctx context.Context, l *tokensource.Lease) error {
	defer s.forget(l)
	_, waitErr, err := s.run(ctx, releaseLeaseScript, 1, []string{s.keys.lease, s.keys.mark},
		[]any{leaseToken(l), l.Mark, l.MarkedBy}, renewed)
	if err != nil {
		return s.errorf("releasing the lease %s: %w", s.keys.lease, err)
	}
	return waitErr
}

// renewed reports a renewal or release script's success.
func renewed(reply []string) bool { return reply[0] == "1" }

func (s *Store) forget(l *tokensource.Lease) {
	s.mu.Lock()
	delete(s.held, l)
	s.mu.Unlock()
}

// run runs a script and checks its reply has at least n fields; if wrote says the reply means a write happened and
// MinReplicas is set, it then waits for the replicas on the same
// connection (WAIT counts the connection's own writes). waitErr is set if
// they did not all acknowledge. Replies are flattened to strings.
func (s *Store) run(ctx context.Context, script *redis.Script, n int, keys []string, args []any,
	wrote func([]string) bool) (reply []string, waitErr, err error) {
	var sc redis.Scripter = s.c
	var conn *redis.Conn
	if s.opts.MinReplicas > 0 {
		conn = s.c.Conn()
		defer conn.Close()
		sc = conn
	}
	v, err := script.Run(ctx, sc, keys, args...).Result()
	if err != nil {
		return nil, nil, err
	}
	reply = flatten(v)
	if len(reply) < n {
		return nil, nil, fmt.Errorf("unexpected script reply (%d fields, want %d)", len(reply), n)
	}
	if conn == nil || !wrote(reply) {
		return reply, nil, nil
	}
	// Redis answers a WAIT that timed out at its next event-loop wake-up,
	// up to 1/hz (100ms by default) late: leave room for that in ctx.
	timeout := maxReplicaWait
	if d, ok := ctx.Deadline(); ok {
		timeout = min(timeout, time.Until(d)-waitSlack)
	}
	timeout = max(timeout, 10*time.Millisecond) // WAIT 0 would block for ever
	acked, err := conn.Wait(ctx, s.opts.MinReplicas, timeout).Result()
	switch {
	case err != nil:
		waitErr = s.errorf("waiting for %d Redis replicas to acknowledge a write to %s: %w", s.opts.MinReplicas, keys[0], err)
	case acked < int64(s.opts.MinReplicas):
		waitErr = fmt.Errorf("only %d of the %d Redis replicas required (min_replicas) acknowledged a write to %s within %s; "+
			"it is not used until they do", acked, s.opts.MinReplicas, keys[0], timeout.Round(time.Millisecond))
	}
	return reply, waitErr, nil
}

// flatten turns a script reply into strings: integers in decimal, nil as "".
func flatten(v any) []string {
	switch x := v.(type) {
	case []any:
		out := make([]string, len(x))
		for i, e := range x {
			switch e := e.(type) {
			case string:
				out[i] = e
			case int64:
				out[i] = strconv.FormatInt(e, 10)
			}
		}
		return out
	case int64:
		return []string{strconv.FormatInt(x, 10)}
	case string:
		return []string{x}
	}
	return nil
}

// errorf wraps a Redis error; the result never contains the password.
func (s *Store) errorf(format string, args ...any) error {
	err := fmt.Errorf(format, args...)
	if s.password != "" && strings.Contains(err.Error(), s.password) {
		return errors.New(strings.ReplaceAll(err.Error(), s.password, "xxxxx"))
	}
	return err
}

func randomID() string {
	var b [8]byte
	_, _ = crand.Read(b[:])
	return hex.EncodeToString(b[:])
}

type realClock struct{}

func (realClock) Now() time.Time                  { return time.Now() }
func (realClock) At(t time.Time) <-chan time.Time { return time.After(time.Until(t)) }
func (realClock) AfterFunc(t time.Time, f func()) func() bool {
	return time.AfterFunc(time.Until(t), f).Stop
}

// Interface guards
var _ tokensource.Store = (*Store)(nil)
