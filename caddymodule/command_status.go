package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/caddyserver/certmagic"
	"github.com/spf13/cobra"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource/redisstore"
)

// cliStatusCobra is `caddy restream-auth status`.
func cliStatusCobra() *cobra.Command {
	c := &cobra.Command{
		Use:   "status --config <file> [--adapter <name>] [--json]",
		Short: "Shows each account's stored token chain",
		Long: `
For every restream_auth account in the config, shows what the storage (or
Redis) holds: the chain's generation and id, the Restream user it acts as
("unknown" until an instance has read it), its scope, when the access and
refresh tokens expire, how many seeds were consumed, and who holds the
refresh lease if it is live. Control characters in stored values are shown escaped.

The state is seen from storage only:
  ok               a stored pair whose access token is still valid
  access_expired   a stored pair whose access token expired (no instance
                   is refreshing it, or refreshes fail); its refresh token
                   may still work
  refresh_expired  the stored refresh token expired: seed a new chain
  reauth_required  the token endpoint rejected the stored refresh token
                   (invalid_grant): seed a new chain
  in_doubt         an instance marked the stored refresh token in the lease
                   (it was sending it) and stopped before storing the answer:
                   the token may be spent, so no instance sends it again;
                   seed a new chain
  no_chain         no pair stored (perhaps only the fingerprints of spent or
                   rejected tokens): seed a chain
  unreadable       the record cannot be read (the error names the key); it
                   is never overwritten: fix or delete it. With
                   encryption_key, a record that is not encrypted, or sealed
                   by an earlier version, is unreadable too: seal it with
                   caddy restream-auth encrypt

The lease line shows its holder and the expiry the holder wrote (instances
do not trust it: they take a lease over only once they have seen it
unchanged for its TTL), and whether a refresh token is marked in it. On
Redis it shows what Redis leaves of the lease, which alone ends it, and the
mark kept in its own key.

A running instance's own view (including reauth_required after an
invalid_grant) is at its admin endpoint, GET /restream_auth/.

Exit status: 0 when every account has a chain (ok or access_expired),
1 otherwise.
`,
		Args: cobra.NoArgs,
		RunE: caddycmd.WrapCommandFuncForCobra(cliCommand(cliStatusCommand)),
	}
	cliConfigFlags(c)
	c.Flags().Bool("json", false, "Print JSON")
	return c
}

// cliStatus is the status command's JSON output.
type cliStatus struct {
	CheckedAt time.Time `json:"checked_at"`
	// Storage names where the accounts live: Caddy storage, or Redis
	// (address, database, key prefix; never a password).
	Storage  string             `json:"storage"`
	Accounts []cliAccountStatus `json:"accounts"`
}

// cliAccountStatus describes one account's stored chain. It holds no secret.
type cliAccountStatus struct {
	Account string `json:"account"`
	// State is judged from storage alone (tokensource.RecordState).
	State tokensource.RecordState `json:"state"`
	// Error says why the record is unreadable; it names the key.
	Error string `json:"error,omitempty"`
	// Key is the record's storage key, or its Redis key.
	Key              string    `json:"key"`
	Generation       uint64    `json:"generation,omitempty"`
	Chain            string    `json:"chain,omitempty"`
	IssuedAt         time.Time `json:"issued_at,omitzero"`
	AccessExpiresAt  time.Time `json:"access_expires_at,omitzero"`
	AccessExpiresIn  *int64    `json:"access_expires_in_seconds,omitempty"`
	RefreshExpiresAt time.Time `json:"refresh_expires_at,omitzero"`
	RefreshExpiresIn *int64    `json:"refresh_expires_in_seconds,omitempty"`
	ConsumedSeeds    int       `json:"consumed_seeds"`
	// DeadTokens counts the refresh tokens the endpoint rejected.
	DeadTokens int `json:"dead_tokens,omitempty"`
	// User is the Restream account the chain acts as; null while unknown.
	User *cliUser `json:"user"`
	// Scope is the chain's granted scope, as the token endpoint gave it.
	Scope []string `json:"scope,omitempty"`
	// Lease is set while the lease record names a holder (an instance or
	// the seed command) or marks a refresh token.
	Lease *cliLease `json:"lease,omitempty"`
	// LeaseError is set when the lease record cannot be read.
	LeaseError string `json:"lease_error,omitempty"`
}

// cliUser is the Restream account a chain acts as.
type cliUser struct {
	ID       string `json:"id"`
	Username string `json:"username,omitempty"`
}

func (u *cliUser) String() string {
	switch {
	case u == nil:
		return "unknown"
	case u.Username == "":
		return "id " + u.ID
	}
	return fmt.Sprintf("%s (id %s)", u.Username, u.ID)
}

// cliLease is the lease record as the status command shows it. In Caddy
// storage ExpiresAt is the holder's own reading, and instances judge expiry
// by observation; in Redis it is now plus what Redis leaves of the lease
// (TTLLeftMillis), and Redis alone ends it.
type cliLease struct {
	// Owner holds the lease; empty once it was released.
	Owner     string    `json:"owner,omitempty"`
	ExpiresAt time.Time `json:"expires_at,omitzero"`
	TTLMillis int64     `json:"ttl_ms,omitempty"`
	// TTLLeftMillis is, in Redis, what is left of the lease (PTTL); -1 for
	// a lease key without expiry.
	TTLLeftMillis int64 `json:"ttl_left_ms,omitempty"`
	// Expired says the holder's expiry has passed by this host's clock.
	// Other instances take the lease over only once they have seen it
	// unchanged for its TTL.
	Expired bool `json:"expired,omitempty"`
	// Marked says a refresh token is marked: MarkedBy was sending it, or
	// sent it without the answer reaching storage.
	Marked   bool   `json:"marked"`
	MarkedBy string `json:"marked_by,omitempty"`
	// MarksStoredToken says the marked token is the stored refresh token.
	MarksStoredToken bool `json:"marks_stored_token,omitempty"`

	mark    string // the marked token's fingerprint; never shown
	inRedis bool
}

func cliStatusCommand(fl caddycmd.Flags) (int, error) {
	cfg, err := loadCLIConfig(fl.String("config"), fl.String("adapter"))
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	defer cfg.cancel()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st := cliReadStatus(ctx, cfg, time.Now())
	if fl.Bool("json") {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(st); err != nil {
			return 1, err
		}
	} else if err := cliWriteStatus(os.Stdout, st); err != nil {
		return 1, err
	}
	var missing []string
	for _, a := range st.Accounts {
		if !a.State.HasChain() {
			missing = append(missing, fmt.Sprintf("%s: %s", a.Account, a.State))
		}
	}
	if len(missing) > 0 {
		// WrapCommandFuncForCobra turns only an error into a failing exit status.
		return 1, fmt.Errorf("%d of %d accounts have no usable chain (%s)", len(missing), len(st.Accounts), strings.Join(missing, ", "))
	}
	return 0, nil
}

// cliReadStatus reads every account's record and lease from its backend.
func cliReadStatus(ctx context.Context, cfg *cliConfig, now time.Time) cliStatus {
	st := cliStatus{CheckedAt: now.UTC(), Storage: cfg.place()}
	logger := caddy.Log().Named("restream_auth.status")
	for _, account := range cfg.names() {
		// Decrypt with the account's keys when it encrypts at rest; a key
		// that does not resolve here shows up as an unreadable record.
		var keyring *tokensource.Keyring
		if hs := cfg.accounts[account]; len(hs) > 0 {
			keyring, _ = resolveKeyring(caddy.NewReplacer(), hs[0].EncryptionKey, hs[0].EncryptionKeyPrevious)
		}
		backend := cfg.backend(account, keyring, logger)
		var got cliStored
		if backend.redis == nil {
			got = cliReadStorage(ctx, backend.storage, account, keyring, now)
		} else {
			got = cliReadRedis(ctx, backend, now)
		}
		st.Accounts = append(st.Accounts, cliAccountFrom(account, got, now))
	}
	cliCleanStatus(&st)
	return st
}

// cliAccountFrom describes what an account's backend holds, and judges its
// state from the record (tokensource.Record.StateAt), the read error and
// the lease.
func cliAccountFrom(account string, got cliStored, now time.Time) cliAccountStatus {
	a := cliAccountStatus{Account: account, Key: got.key, Lease: got.lease, LeaseError: got.leaseErr}
	if got.err != nil {
		a.State, a.Error = tokensource.RecordUnreadable, got.err.Error()
		return a
	}
	rec := got.rec
	a.State = rec.StateAt(now)
	if rec != nil {
		// A record without a pair holds only history: fingerprints of
		// spent seeds and rejected tokens.
		a.ConsumedSeeds, a.DeadTokens = len(rec.ConsumedSeeds), len(rec.DeadTokens)
	}
	if !rec.HasPair() {
		return a
	}
	a.Generation, a.Chain = rec.Generation, rec.Chain
	if rec.User != nil {
		a.User = &cliUser{ID: rec.User.ID, Username: rec.User.Username}
	}
	a.Scope = rec.Scope
	a.IssuedAt = rec.IssuedAt.UTC()
	a.AccessExpiresAt = rec.Expiry.UTC()
	a.AccessExpiresIn = cliPtr(int64(rec.Expiry.Sub(now) / time.Second))
	if !rec.RefreshExpiry.IsZero() {
		a.RefreshExpiresAt = rec.RefreshExpiry.UTC()
		a.RefreshExpiresIn = cliPtr(int64(rec.RefreshExpiry.Sub(now) / time.Second))
	}
	if l := a.Lease; l != nil {
		l.MarksStoredToken = l.mark != "" && l.mark == tokensource.Fingerprint(rec.RefreshToken)
		if l.Owner == "" && l.MarksStoredToken && a.State.HasChain() {
			// Released with the stored token still marked: its sender
			// stopped before the answer reached storage.
			a.State = tokensource.RecordInDoubt
		}
	}
	return a
}

// cliStored is what an account's backend holds, as status reads it.
type cliStored struct {
	key      string // the record's key
	rec      *tokensource.Record
	err      error // why the record cannot be read
	lease    *cliLease
	leaseErr string
}

// cliReadStorage reads an account's record and lease from Caddy storage.
func cliReadStorage(ctx context.Context, storage certmagic.Storage, account string, kr *tokensource.Keyring, now time.Time) cliStored {
	got := cliStored{key: tokensource.RecordKey(account)}
	got.rec, got.err = tokensource.LoadRecordKeyring(ctx, storage, account, kr)
	got.lease, got.leaseErr = cliReadLease(ctx, storage, account, now)
	return got
}

// cliReadRedis reads an account's record, lease and mark from Redis at
// once, without importing from Caddy storage or writing anything.
func cliReadRedis(ctx context.Context, backend sourceBackend, now time.Time) cliStored {
	cfg := tokensource.Config{Account: backend.account, Keyring: backend.keyring}
	release, err := backend.open(&cfg)
	if err != nil {
		return cliStored{err: err}
	}
	defer release()
	store := cfg.Store.(*redisstore.Store)
	got := cliStored{key: store.RecordKey()}
	snap, err := store.Inspect(ctx)
	if err != nil {
		got.err, got.leaseErr = err, "not read (see the record's error)"
		return got
	}
	got.rec, got.err = snap.Record, snap.RecordErr
	if snap.Lease == nil && snap.Mark == "" {
		return got
	}
	l := &cliLease{Marked: snap.Mark != "", MarkedBy: snap.MarkedBy, mark: snap.Mark, inRedis: true}
	if lv := snap.Lease; lv != nil {
		l.Owner, l.TTLMillis = lv.Owner, lv.TTL.Milliseconds()
		if lv.Left >= 0 {
			l.TTLLeftMillis = max(lv.Left.Milliseconds(), 1)
			l.ExpiresAt = now.Add(lv.Left).UTC()
		} else {
			l.TTLLeftMillis = -1
		}
	}
	got.lease = l
	return got
}

// cliReadLease reads the account's lease record: nil if there is none, or
// if it names no holder and marks no token.
func cliReadLease(ctx context.Context, storage certmagic.Storage, account string, now time.Time) (lease *cliLease, readErr string) {
	key := tokensource.LeaseKey(account)
	b, err := storage.Load(ctx, key)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, ""
	}
	if err != nil {
		return nil, fmt.Sprintf("loading %s: %v", key, err)
	}
	var rec struct {
		Owner     string    `json:"owner"`
		TTLMillis int64     `json:"ttl_ms"`
		Mark      string    `json:"mark"`
		MarkedBy  string    `json:"marked_by"`
		ExpiresAt time.Time `json:"expires_at"`
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Sprintf("%s (%d bytes): not valid JSON", key, len(b))
	}
	if rec.Owner == "" && rec.Mark == "" {
		return nil, ""
	}
	l := &cliLease{Owner: rec.Owner, TTLMillis: max(rec.TTLMillis, 0), Marked: rec.Mark != "", MarkedBy: rec.MarkedBy, mark: rec.Mark}
	if rec.Owner != "" && !rec.ExpiresAt.IsZero() {
		l.ExpiresAt = rec.ExpiresAt.UTC()
		l.Expired = !now.Before(rec.ExpiresAt)
	}
	return l, ""
}

func cliPtr[T any](v T) *T { return &v }
