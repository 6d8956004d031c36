package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/caddyserver/certmagic"
	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"golang.org/x/term"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource/redisstore"
)

// The restream-auth CLI works on the token chains where a config keeps them
// (the restream_auth app's Redis, or Caddy storage), without a running Caddy: `status` reports what is stored, `seed`
// installs a new chain from a refresh token read on stdin, `encrypt` seals a
// stored record with the configured encryption_key. Running instances that
// share the storage adopt a seeded or sealed chain by themselves. What they
// print from storage or Redis goes through cliClean first.

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "restream-auth",
		Usage: "status|seed|encrypt --config <file> [--adapter <name>]",
		Short: "Shows, seeds or encrypts the restream_auth token chains in the configured storage or Redis",
		Long: `
Works on the Restream token chains that the restream_auth handlers of a
config keep in Redis (the global restream_auth option's redis URL) or else
in Caddy's storage. The config (--config, adapted with --adapter or by file
name, like caddy run) names the place (the redis URL, or the global
"storage" option; Caddy's default data directory when both are absent) and
the accounts (every restream_auth handler, subroutes included). No running
Caddy is needed, and no token or password is ever printed.

  caddy restream-auth status --config Caddyfile [--json]
  caddy restream-auth seed --config Caddyfile [--account <name>] < refresh_token.txt
  caddy restream-auth encrypt --config Caddyfile [--account <name>]
`,
		CobraFunc: func(cmd *cobra.Command) {
			status := &cobra.Command{
				Use:   "status --config <file> [--adapter <name>] [--json]",
				Short: "Shows each account's stored token chain",
				Long: `
For every restream_auth account in the config, shows what the storage (or
Redis) holds:
the chain's generation and id, the Restream user it acts as ("unknown"
until an instance has read it), its scope, when the access and refresh
tokens expire, how many seeds were consumed, and who holds the refresh
lease if it is live. Control characters in stored values are shown escaped.

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
			status.Flags().StringP("config", "c", "", "Configuration file (Caddyfile or JSON)")
			status.Flags().StringP("adapter", "a", "", "Name of config adapter")
			status.Flags().Bool("json", false, "Print JSON")
			cmd.AddCommand(status)

			seed := &cobra.Command{
				Use:   "seed --config <file> [--adapter <name>] [--account <name>]",
				Short: "Starts a new token chain from a refresh token read on stdin",
				Long: `
Reads one refresh token from stdin (without echo on a terminal), exchanges it
at the account's token endpoint with the client credentials of its
restream_auth handler, and stores the new pair as a new chain, the next
generation, under the account's refresh lease. The exchange spends the
refresh token. Instances sharing the storage (or Redis) pick the new chain
up by themselves; no restart or reload is needed. The handler's own refresh_token
seed, if any, is marked as used so that a restart does not replace the new
chain with it.

{env.*} and {file.*} placeholders in the handler are resolved in this
command's environment: run it with the environment Caddy runs with, and as
the user Caddy runs as (file_system storage writes files only their owner
can read; the default storage lives in the caller's data directory).
`,
				Args: cobra.NoArgs,
				RunE: caddycmd.WrapCommandFuncForCobra(cliCommand(cliSeedCommand)),
			}
			seed.Flags().StringP("config", "c", "", "Configuration file (Caddyfile or JSON)")
			seed.Flags().StringP("adapter", "a", "", "Name of config adapter")
			seed.Flags().String("account", DefaultAccount, "Account to seed")
			cmd.AddCommand(seed)
			cmd.AddCommand(cliEncryptCobra())
		},
	})
}

// cliConfig is what the commands need from a config.
type cliConfig struct {
	storage certmagic.Storage
	// app says where accounts live: its Redis, or storage.
	app      *App
	accounts map[string][]*Handler // restream_auth handlers by account, in config order
	cancel   context.CancelFunc    // releases the storage module
}

// names returns the accounts, sorted.
func (c *cliConfig) names() []string {
	out := make([]string, 0, len(c.accounts))
	for a := range c.accounts {
		out = append(out, a)
	}
	slices.Sort(out)
	return out
}

// loadCLIConfig loads and adapts a config, loads its storage module (or the
// default storage) and finds its restream_auth handlers.
func loadCLIConfig(configFile, adapter string) (*cliConfig, error) {
	cfgJSON, file, _, err := caddycmd.LoadConfig(configFile, adapter)
	if err != nil {
		return nil, err
	}
	if len(cfgJSON) == 0 {
		return nil, errors.New("no config: use --config <file>")
	}
	var cfg caddy.Config
	if err := json.Unmarshal(cfgJSON, &cfg); err != nil {
		return nil, fmt.Errorf("decoding config %s: %v", file, err)
	}
	app, err := appFromConfig(&cfg)
	if err != nil {
		return nil, fmt.Errorf("config %s: %v", file, err)
	}
	var raws []json.RawMessage
	cliFindHandlers(cfgJSON, &raws)
	if len(raws) == 0 {
		return nil, fmt.Errorf("config %s has no restream_auth handler", file)
	}
	out := &cliConfig{app: app, accounts: make(map[string][]*Handler)}
	for _, raw := range raws {
		h := new(Handler)
		if err := json.Unmarshal(raw, h); err != nil {
			return nil, fmt.Errorf("config %s: decoding a restream_auth handler: %v", file, err)
		}
		if h.Account == "" {
			h.Account = DefaultAccount
		}
		if !accountPattern.MatchString(h.Account) {
			return nil, fmt.Errorf("config %s: account %q: use 1-64 letters, digits, '.', '_' or '-'", file, h.Account)
		}
		out.accounts[h.Account] = append(out.accounts[h.Account], h)
	}

	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	if cfg.StorageRaw != nil {
		val, err := ctx.LoadModule(&cfg, "StorageRaw")
		if err != nil {
			cancel()
			return nil, fmt.Errorf("loading the config's storage module: %v", err)
		}
		if out.storage, err = val.(caddy.StorageConverter).CertMagicStorage(); err != nil {
			cancel()
			return nil, fmt.Errorf("creating the config's storage: %v", err)
		}
	} else {
		out.storage = caddy.DefaultStorage
	}
	out.cancel = cancel
	return out, nil
}

// backend is where account lives in this config, as a running instance
// finds it: the restream_auth app's Redis, or storage behind the lock guard.
func (c *cliConfig) backend(account string, kr *tokensource.Keyring, logger *zap.Logger) sourceBackend {
	return c.app.backendFor(account, kr, guardStorage(c.storage, logger), logger)
}

// place names where the config keeps its accounts, never with credentials.
func (c *cliConfig) place() string {
	r := c.app.redis
	if r == nil {
		return storageIdentity(c.storage)
	}
	s := fmt.Sprintf("redis %s db %d, key prefix %s", r.opts.Addr, r.opts.DB, r.keyPrefix)
	if r.minReplicas > 0 {
		s += fmt.Sprintf(", min_replicas %d", r.minReplicas)
	}
	return s
}

// cliFindHandlers collects every JSON object with "handler": "restream_auth",
// wherever it sits (routes, subroutes, error routes, other apps' routes).
func cliFindHandlers(raw json.RawMessage, out *[]json.RawMessage) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 {
		return
	}
	switch raw[0] {
	case '{':
		var obj map[string]json.RawMessage
		if json.Unmarshal(raw, &obj) != nil {
			return
		}
		var name string
		if h, ok := obj["handler"]; ok && json.Unmarshal(h, &name) == nil && name == "restream_auth" {
			*out = append(*out, raw)
		}
		keys := make([]string, 0, len(obj))
		for k := range obj {
			keys = append(keys, k)
		}
		slices.Sort(keys) // a stable order for "first handler" below
		for _, k := range keys {
			cliFindHandlers(obj[k], out)
		}
	case '[':
		var arr []json.RawMessage
		if json.Unmarshal(raw, &arr) != nil {
			return
		}
		for _, v := range arr {
			cliFindHandlers(v, out)
		}
	}
}

// Account states as the status command sees them from storage.
const (
	cliStateOK             = "ok"
	cliStateAccessExpired  = "access_expired"
	cliStateRefreshExpired = "refresh_expired"
	cliStateReauthRequired = "reauth_required"
	cliStateInDoubt        = "in_doubt"
	cliStateNoChain        = "no_chain"
	cliStateUnreadable     = "unreadable"
)

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
	State   string `json:"state"`
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

func (a cliAccountStatus) hasChain() bool {
	return a.State == cliStateOK || a.State == cliStateAccessExpired
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
		if !a.hasChain() {
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
		a := cliAccountStatus{Account: account, Key: got.key}
		rec := got.rec
		storedFP := ""
		switch {
		case got.err != nil:
			a.State, a.Error = cliStateUnreadable, got.err.Error()
		case rec == nil:
			a.State = cliStateNoChain
		case !rec.HasPair():
			// Only history: fingerprints of spent seeds and rejected tokens.
			a.State = cliStateNoChain
			a.ConsumedSeeds, a.DeadTokens = len(rec.ConsumedSeeds), len(rec.DeadTokens)
		default:
			storedFP = tokensource.Fingerprint(rec.RefreshToken)
			a.Generation, a.Chain = rec.Generation, rec.Chain
			a.ConsumedSeeds, a.DeadTokens = len(rec.ConsumedSeeds), len(rec.DeadTokens)
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
			switch {
			case slices.Contains(rec.DeadTokens, storedFP):
				a.State = cliStateReauthRequired
			case !rec.RefreshExpiry.IsZero() && !now.Before(rec.RefreshExpiry):
				a.State = cliStateRefreshExpired
			case !now.Before(rec.Expiry):
				a.State = cliStateAccessExpired
			default:
				a.State = cliStateOK
			}
		}
		a.Lease, a.LeaseError = got.lease, got.leaseErr
		if l := a.Lease; l != nil {
			l.MarksStoredToken = l.mark != "" && l.mark == storedFP
			if l.Owner == "" && l.MarksStoredToken && a.hasChain() {
				// Released with the stored token still marked: its sender
				// stopped before the answer reached storage.
				a.State = cliStateInDoubt
			}
		}
		st.Accounts = append(st.Accounts, a)
	}
	cliCleanStatus(&st)
	return st
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
func cliReadLease(ctx context.Context, storage certmagic.Storage, account string, now time.Time) (*cliLease, string) {
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

func cliWriteStatus(w io.Writer, st cliStatus) error {
	now := st.CheckedAt
	fmt.Fprintf(w, "storage: %s\n", st.Storage)
	for _, a := range st.Accounts {
		state := a.State
		if a.Error != "" {
			state += ": " + a.Error
		}
		fmt.Fprintf(w, "\naccount %q: %s\n", a.Account, state)
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		if a.State == cliStateNoChain && a.ConsumedSeeds+a.DeadTokens == 0 {
			fmt.Fprintf(tw, "  record\tnothing stored at %s\n", a.Key)
		}
		if a.Generation != 0 || a.Chain != "" {
			fmt.Fprintf(tw, "  generation\t%d\n", a.Generation)
			fmt.Fprintf(tw, "  chain\t%s\n", a.Chain)
			fmt.Fprintf(tw, "  user\t%s\n", a.User)
			if len(a.Scope) > 0 {
				fmt.Fprintf(tw, "  scope\t%s\n", strings.Join(a.Scope, " "))
			}
			fmt.Fprintf(tw, "  issued\t%s\n", cliTime(a.IssuedAt, now))
			fmt.Fprintf(tw, "  access expires\t%s\n", cliTime(a.AccessExpiresAt, now))
			fmt.Fprintf(tw, "  refresh expires\t%s\n", cliTime(a.RefreshExpiresAt, now))
			fmt.Fprintf(tw, "  consumed seeds\t%d\n", a.ConsumedSeeds)
		} else if a.ConsumedSeeds+a.DeadTokens > 0 {
			fmt.Fprintf(tw, "  record\tno pair; %d consumed seeds, %d rejected tokens\n", a.ConsumedSeeds, a.DeadTokens)
		}
		if a.DeadTokens > 0 && (a.Generation != 0 || a.Chain != "") {
			fmt.Fprintf(tw, "  rejected tokens\t%d\n", a.DeadTokens)
		}
		switch l := a.Lease; {
		case a.LeaseError != "":
			fmt.Fprintf(tw, "  lease\tunreadable: %s\n", a.LeaseError)
		case l == nil || l.Owner == "":
			fmt.Fprintf(tw, "  lease\tfree\n")
		case l.inRedis && l.TTLLeftMillis < 0:
			fmt.Fprintf(tw, "  lease\theld by %s, without expiry in Redis (the next instance to try for it gives it one TTL%s)\n", l.Owner, cliTTL(l.TTLMillis))
		case l.inRedis:
			ttl := ""
			if l.TTLMillis > 0 {
				ttl = ", TTL " + (time.Duration(l.TTLMillis) * time.Millisecond).String()
			}
			fmt.Fprintf(tw, "  lease\theld by %s, Redis ends it in %s (at %s%s)\n", l.Owner,
				(time.Duration(l.TTLLeftMillis) * time.Millisecond).Round(time.Millisecond), l.ExpiresAt.Format(time.RFC3339), ttl)
		case l.ExpiresAt.IsZero():
			fmt.Fprintf(tw, "  lease\theld by %s\n", l.Owner)
		case l.Expired:
			fmt.Fprintf(tw, "  lease\theld by %s, expired %s by its holder's clock (instances take it over once they have seen it unchanged for its TTL%s)\n",
				l.Owner, cliTime(l.ExpiresAt, now), cliTTL(l.TTLMillis))
		default:
			fmt.Fprintf(tw, "  lease\theld by %s until %s\n", l.Owner, cliTime(l.ExpiresAt, now))
		}
		if l := a.Lease; l != nil && l.Marked {
			which := "an earlier refresh token"
			if l.MarksStoredToken {
				which = "the stored refresh token"
			}
			fmt.Fprintf(tw, "  marked\t%s, by %s\n", which, l.MarkedBy)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	return nil
}

func cliTime(t, now time.Time) string {
	if t.IsZero() {
		return "unknown"
	}
	return t.UTC().Format(time.RFC3339) + " (" + cliRelative(t, now) + ")"
}

// cliRelative says "in 59m58s" or "3m2s ago".
func cliRelative(t, now time.Time) string {
	d := t.Sub(now).Round(time.Second)
	if d >= 0 {
		return "in " + cliDuration(d)
	}
	return cliDuration(-d) + " ago"
}

func cliDuration(d time.Duration) string {
	const day = 24 * time.Hour
	if d >= 2*day {
		return fmt.Sprintf("%dd%dh", d/day, (d%day)/time.Hour)
	}
	return d.String()
}

func cliPtr[T any](v T) *T { return &v }

func cliTTL(ms int64) string {
	if ms <= 0 {
		return ""
	}
	return ", " + (time.Duration(ms) * time.Millisecond).String()
}

// cliMaxSeedInput bounds what the seed command reads from stdin.
const cliMaxSeedInput = 64 << 10

func cliSeedCommand(fl caddycmd.Flags) (int, error) {
	account := fl.String("account")
	if account == "" {
		account = DefaultAccount
	}
	if fl.String("config") == "-" {
		return 1, errors.New("--config -: stdin carries the refresh token; give the config as a file")
	}
	cfg, err := loadCLIConfig(fl.String("config"), fl.String("adapter"))
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	defer cfg.cancel()
	h, err := cfg.handlerFor(account)
	if err != nil {
		return 1, err
	}
	logger := caddy.Log().Named("restream_auth.seed")
	srcCfg, err := cliSourceConfig(h, logger)
	if err != nil {
		return 1, fmt.Errorf("account %q: %w", account, err)
	}
	backend := cfg.backend(account, srcCfg.Keyring, logger)
	src, err := newPooledSource(srcCfg, backend)
	if err != nil {
		return 1, fmt.Errorf("account %q: %w", account, err)
	}
	defer src.Destruct()
	// A record that exists but cannot be read is never replaced (it may hold
	// the only live refresh token): say so before the token is read, let
	// alone spent. Any other failure to read it fails the install too, so
	// it is reported now, while the token is still good. On Redis, this
	// read imports the account from Caddy storage if Redis has none yet.
	lctx, lcancel := context.WithTimeout(context.Background(), tokensource.StorageTimeout)
	_, lerr := src.loadRecord(lctx)
	lcancel()
	switch {
	case errors.Is(lerr, tokensource.ErrCorruptRecord) || errors.Is(lerr, tokensource.ErrUnreadableRecord):
		return 1, fmt.Errorf("account %q: %v; it is never overwritten, as it may hold the only live refresh token: "+
			"fix it (e.g. configure the encryption key it was written with) or delete it, then seed again; the refresh token was not read", account, lerr)
	case lerr != nil:
		return 1, fmt.Errorf("account %q: reading the stored record in %s: %v; nothing was changed and the refresh token was not read",
			account, backend.identity, lerr)
	}
	rt, err := cliReadRefreshToken(os.Stdin, os.Stderr)
	if err != nil {
		return 1, err
	}
	tok, err := src.InstallSeed(context.Background(), rt)
	if err != nil {
		return 1, cliSeedError(account, err)
	}
	now := time.Now()
	fmt.Fprintf(os.Stdout, "account %q: installed a new token chain in %s\n", account, cliClean(backend.identity.String()))
	fmt.Fprintf(os.Stdout, "  generation      %d\n", tok.Generation)
	fmt.Fprintf(os.Stdout, "  chain           %s\n", cliClean(tok.Chain))
	fmt.Fprintf(os.Stdout, "  access expires  %s\n", cliTime(tok.Expiry, now))
	if !tok.RefreshExpiry.IsZero() {
		fmt.Fprintf(os.Stdout, "  refresh expires %s\n", cliTime(tok.RefreshExpiry, now))
	}
	fmt.Fprintln(os.Stdout, "Running instances that share it adopt it by themselves.")
	return 0, nil
}

// handlerFor returns the account's handler settings. Handlers of one account
// must agree on everything the token exchange uses.
func (c *cliConfig) handlerFor(account string) (*Handler, error) {
	hs := c.accounts[account]
	if len(hs) == 0 {
		return nil, fmt.Errorf("account %q is not configured: the config's restream_auth accounts are %s",
			account, strings.Join(cliQuoteAll(c.names()), ", "))
	}
	first := hs[0]
	for _, h := range hs[1:] {
		if h.ClientID != first.ClientID || h.ClientSecret != first.ClientSecret || h.RefreshToken != first.RefreshToken ||
			h.TokenURL != first.TokenURL || h.ClientAuth != first.ClientAuth || h.Timeout != first.Timeout {
			return nil, fmt.Errorf("account %q has %d restream_auth handlers whose client_id, client_secret, refresh_token, token_url, client_auth or timeout differ; make them agree", account, len(hs))
		}
	}
	return first, nil
}

func cliQuoteAll(ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = fmt.Sprintf("%q", s)
	}
	return out
}

// cliSourceConfig builds a token source configuration from a handler's
// settings as Provision does: placeholders resolved, defaults applied, the
// token URL checked. Its backend (cliConfig.backend) sets where it stores.
func cliSourceConfig(h *Handler, logger *zap.Logger) (tokensource.Config, error) {
	// The handler's own seed (cfg.Seed) is marked as used by the new chain,
	// so that a restart does not start yet another chain from it.
	cfg, err := h.tokenConfig()
	if err != nil {
		return tokensource.Config{}, cliPlaceholderError(err)
	}
	host, _ := os.Hostname()
	cfg.HTTPClient = &http.Client{Transport: tokenTransport()}
	cfg.Logger = logger
	cfg.Owner = fmt.Sprintf("caddy restream-auth seed (%s, pid %d)", host, os.Getpid())
	return cfg, nil
}

func cliPlaceholderError(err error) error {
	return fmt.Errorf("%v (placeholders are resolved in this command's environment: run it with the environment Caddy runs with)", err)
}

// cliSeedError explains a failed InstallSeed. A token source's errors name
// the account already; others get it here, once.
func cliSeedError(account string, err error) error {
	var te *tokensource.Error
	if !errors.As(err, &te) {
		return fmt.Errorf("account %q: %w", account, err)
	}
	prefix := fmt.Sprintf("account %q: ", account)
	msg := strings.TrimPrefix(te.Msg, prefix)
	switch {
	case te.Code == "invalid_grant":
		return fmt.Errorf("%sthe token endpoint refused the refresh token (%s): it is spent, expired or revoked, or was issued to another client; nothing was stored. Re-authorize to get a new one", prefix, msg)
	case te.Kind == tokensource.Terminal, te.Kind == tokensource.Misconfigured:
		return fmt.Errorf("%sthe token endpoint refused the request (%s); check client_id, client_secret and client_auth; nothing was stored", prefix, msg)
	case te.Unknown:
		return fmt.Errorf("%s%s; the exchange may have reached the endpoint, in which case the refresh token is spent; nothing was stored", prefix, msg)
	}
	return fmt.Errorf("%s%s; nothing was stored", prefix, msg)
}

// cliReadRefreshToken reads one refresh token: a line typed without echo on a
// terminal, or the whole input otherwise.
func cliReadRefreshToken(stdin *os.File, stderr io.Writer) (string, error) {
	var in []byte
	if fd := int(stdin.Fd()); term.IsTerminal(fd) {
		fmt.Fprint(stderr, "reading refresh token from stdin…\n")
		b, err := term.ReadPassword(fd)
		fmt.Fprintln(stderr)
		if err != nil {
			return "", fmt.Errorf("reading the refresh token from the terminal: %v", err)
		}
		in = b
	} else {
		b, err := io.ReadAll(io.LimitReader(stdin, cliMaxSeedInput+1))
		if err != nil {
			return "", fmt.Errorf("reading the refresh token from stdin: %v", err)
		}
		if len(b) > cliMaxSeedInput {
			return "", fmt.Errorf("stdin holds more than %d bytes: expected one refresh token", cliMaxSeedInput)
		}
		in = b
	}
	return cliParseRefreshToken(string(in))
}

// cliParseRefreshToken trims the input and requires a single token.
func cliParseRefreshToken(in string) (string, error) {
	rt := strings.TrimSpace(in)
	switch {
	case rt == "":
		return "", errors.New("no refresh token on stdin")
	case strings.ContainsAny(rt, "\r\n"):
		return "", errors.New("stdin holds more than one line: expected one refresh token")
	case strings.ContainsFunc(rt, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }):
		return "", errors.New("the refresh token on stdin contains spaces or control characters")
	}
	return rt, nil
}
