package redisstore

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// Snapshot is an account's three keys as Redis held them at one instant,
// for people (the restream-auth status and encrypt commands): no decision
// of the protocol reads it.
type Snapshot struct {
	// Record is the stored record, decoded with the store's keyring; nil if
	// there is none, or if RecordErr says why it cannot be used.
	Record    *tokensource.Record
	RecordErr error
	// Data is the record as stored, sealed or not; nil if there is none.
	// It may hold tokens in the clear: never print it.
	Data []byte
	// Lease is the lease key's holder; nil while nobody holds it.
	Lease *LeaseView
	// Mark is the fingerprint of the refresh token MarkedBy was sending, or
	// sent without storing the answer; "" if none is marked.
	Mark, MarkedBy string
}

// LeaseView is a held lease as Redis has it.
type LeaseView struct {
	// Owner is the holder's name, as it wrote it.
	Owner string
	// TTL is the holder's lease TTL, zero if its token does not say.
	TTL time.Duration
	// Left is what Redis leaves of the lease (PTTL), which alone ends it;
	// negative if the key has no expiry (the next TakeLease gives it one).
	Left time.Duration
}

// inspectScript: KEYS record, lease, mark. Returns {status, gen, chain,
// data, detail, lease_type, lease, lease_pttl, mark, marked_by}, status as
// loadScript's (ok, none, corrupt). It writes nothing.
var inspectScript = redis.NewScript(readRecord + `
local r = {'none', '', '', '', ''}
local cur, bad = readRecord(KEYS[1])
if bad then
	r = {'corrupt', '', '', '', bad}
elseif cur then
	r = {'ok', cur.gen, cur.chain, cur.data, ''}
end
local lt = redis.call('TYPE', KEYS[2]).ok
local lease = ''
if lt == 'string' then
	lease = redis.call('GET', KEYS[2])
end
r[6], r[7], r[8] = lt, lease, redis.call('PTTL', KEYS[2])
r[9], r[10] = '', ''
if redis.call('TYPE', KEYS[3]).ok == 'hash' then
	local m = redis.call('HMGET', KEYS[3], 'mark', 'marked_by')
	r[9], r[10] = m[1] or '', m[2] or ''
end
return r
`)

// Inspect reads the account's record, lease and mark at once, for people.
// Unlike Load it neither imports from Caddy storage nor writes anything
// back. Its error is Redis's (unreachable, refused); a record that cannot
// be used is reported in Snapshot.RecordErr.
func (s *Store) Inspect(ctx context.Context) (*Snapshot, error) {
	v, err := inspectScript.Run(ctx, s.c, []string{s.keys.record, s.keys.lease, s.keys.mark}).Result()
	if err != nil {
		return nil, s.errorf("reading %s: %w", s.keys.record, err)
	}
	r := flatten(v)
	if len(r) < 10 {
		return nil, fmt.Errorf("reading %s: unexpected script reply (%d fields, want 10)", s.keys.record, len(r))
	}
	snap := &Snapshot{Mark: r[8], MarkedBy: r[9]}
	switch r[0] {
	case "corrupt":
		snap.RecordErr = fmt.Errorf("%w %s: %s", tokensource.ErrCorruptRecord, s.keys.record, r[4])
	case "ok":
		snap.Data = []byte(r[3])
		snap.Record, snap.RecordErr = s.decode(r[1], r[2], r[3])
	}
	switch leaseType, token := r[5], r[6]; leaseType {
	case "none":
	case "string":
		snap.Lease = readLeaseToken(token)
	default:
		snap.Lease = &LeaseView{Owner: "unknown (the lease key is a Redis " + leaseType + ")"}
	}
	if snap.Lease != nil {
		pttl, _ := strconv.ParseInt(r[7], 10, 64)
		snap.Lease.Left = time.Duration(pttl) * time.Millisecond
	}
	return snap, nil
}

// readLeaseToken parses a lease key's value as TakeLease writes it.
func readLeaseToken(token string) *LeaseView {
	var l struct {
		Owner     string `json:"owner"`
		TTLMillis int64  `json:"ttl_ms"`
	}
	if json.Unmarshal([]byte(token), &l) != nil || l.Owner == "" {
		return &LeaseView{Owner: "unknown (the lease key does not hold a lease token)"}
	}
	return &LeaseView{Owner: l.Owner, TTL: time.Duration(max(l.TTLMillis, 0)) * time.Millisecond}
}
