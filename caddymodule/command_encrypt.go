package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource/redisstore"
)

// `caddy restream-auth encrypt` seals an account's stored record with the
// configured encryption_key, in Caddy storage or in the restream_auth app's
// Redis. With a key set, instances refuse records that are not encrypted,
// or that an earlier version sealed without binding them to their storage
// key: anyone who can write to the storage could have planted them. Sealing one in place is the operator's decision, made here.

func cliEncryptCobra() *cobra.Command {
	c := &cobra.Command{
		Use:   "encrypt --config <file> [--adapter <name>] [--account <name>]",
		Short: "Seals an account's stored record with its encryption_key",
		Long: `
Rewrites the account's stored token record in place (in Redis when the
config has the restream_auth redis option, else in Caddy storage), sealed
with the
encryption_key of its restream_auth handler: a record that is not encrypted
(written before encryption_key was set), one sealed with
encryption_key_previous, or one sealed by an earlier version that bound it
to the account only. With encryption_key set, instances never use such a
record (they answer 503 and name this command), as anyone who can write to
the storage could have planted it: run this only for a record you know is
yours. A record sealed for another account or storage key, or with a key
the config does not have, is refused and left as it is.

The record is read and written under the account's refresh lease, as the
same generation (no token is sent to Restream); running instances adopt it
by themselves. A record already sealed with the current key is left alone.
Run it with Caddy's environment and as Caddy's user, like seed.

Exit status: 0 when the record is sealed with the current key (or none is
stored), 1 otherwise.
`,
		Args: cobra.NoArgs,
		RunE: caddycmd.WrapCommandFuncForCobra(cliCommand(cliEncryptCommand)),
	}
	cliConfigFlags(c)
	c.Flags().String("account", DefaultAccount, "Account whose record to seal")
	return c
}

// Bounds of the encrypt command.
const (
	// cliEncryptWait bounds the wait for another holder's lease; a dead
	// holder's lease (35s with the default timeout) lapses well before.
	cliEncryptWait = 2 * time.Minute
	// cliLeasePoll is how often a held lease is tried again.
	cliLeasePoll = 250 * time.Millisecond
	// cliEncryptLeaseTTL covers the lease's work: three storage operations.
	cliEncryptLeaseTTL = 3*tokensource.StorageTimeout + 5*time.Second
)

func cliEncryptCommand(fl caddycmd.Flags) (int, error) {
	account := cliAccountFlag(fl)
	cfg, err := loadCLIConfig(fl.String("config"), fl.String("adapter"))
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	defer cfg.cancel()
	kr, err := cfg.keyringFor(account)
	if err != nil {
		return 1, err
	}
	logger := caddy.Log().Named("restream_auth.encrypt")
	host, _ := os.Hostname()
	owner := fmt.Sprintf("caddy restream-auth encrypt (%s, pid %d)", host, os.Getpid())
	ctx, cancel := context.WithTimeout(context.Background(), cliEncryptWait+cliEncryptLeaseTTL)
	defer cancel()
	// The migration keyring reads plain records and legacy envelopes too,
	// never one sealed for another account or key; it writes with kr's
	// current key.
	target, err := cliSealTargetFor(cfg.backend(account, kr.ForMigration(), logger), logger)
	if err != nil {
		return 1, fmt.Errorf("account %q: %w", account, err)
	}
	defer target.release()
	msg, err := cliEncrypt(ctx, target, account, kr, owner, os.Stderr, logger)
	if err != nil {
		return 1, fmt.Errorf("account %q: %w", account, err)
	}
	fmt.Fprintf(os.Stdout, "account %q: %s\n", account, msg)
	return 0, nil
}

// keyringFor returns the account's keyring; an error if the account has
// none, or if its handlers disagree on the keys.
func (c *cliConfig) keyringFor(account string) (*tokensource.Keyring, error) {
	h, err := c.handlerFor(account)
	if err != nil {
		return nil, err
	}
	for _, o := range c.accounts[account][1:] {
		if o.EncryptionKey != h.EncryptionKey || o.EncryptionKeyPrevious != h.EncryptionKeyPrevious {
			return nil, fmt.Errorf("account %q has %d restream_auth handlers whose encryption_key or encryption_key_previous differ; make them agree", account, len(c.accounts[account]))
		}
	}
	kr, err := resolveKeyring(caddy.NewReplacer(), h.EncryptionKey, h.EncryptionKeyPrevious)
	if err != nil {
		return nil, fmt.Errorf("account %q: %w", account, cliPlaceholderError(err))
	}
	if kr == nil {
		return nil, fmt.Errorf("account %q has no encryption_key in this config: set encryption_key in its restream_auth handler "+
			"(on every instance), then run encrypt again; nothing was changed", account)
	}
	return kr, nil
}

// cliSealTarget is an account's record as encrypt reaches it: its Store,
// which reads with the migration keyring, the key the record is sealed
// for, and its stored bytes.
type cliSealTarget struct {
	store tokensource.Store
	key   string
	// raw returns the record as stored; an error wrapping fs.ErrNotExist
	// if there is none.
	raw func(ctx context.Context) ([]byte, error)
	// release gives back what cliSealTargetFor opened.
	release func()
}

// cliSealTargetFor opens the backend's record: in Caddy storage (behind
// the lock guard), or in Redis, where the record's key is its Redis key.
func cliSealTargetFor(backend sourceBackend, logger *zap.Logger) (cliSealTarget, error) {
	if backend.redis == nil {
		key := tokensource.RecordKey(backend.account)
		st := backend.storage
		return cliSealTarget{
			store:   tokensource.NewStorageStore(st, backend.account, backend.keyring, nil, logger),
			key:     key,
			raw:     func(ctx context.Context) ([]byte, error) { return st.Load(ctx, key) },
			release: func() {},
		}, nil
	}
	cfg := tokensource.Config{Account: backend.account, Keyring: backend.keyring}
	release, err := backend.open(&cfg)
	if err != nil {
		return cliSealTarget{}, err
	}
	store := cfg.Store.(*redisstore.Store)
	return cliSealTarget{
		store:   store,
		key:     store.RecordKey(),
		release: release,
		raw: func(ctx context.Context) ([]byte, error) {
			snap, err := store.Inspect(ctx)
			switch {
			case err != nil:
				return nil, err
			case snap.Data != nil:
				return snap.Data, nil
			case snap.RecordErr != nil:
				return nil, snap.RecordErr
			}
			return nil, fs.ErrNotExist
		},
	}, nil
}

// cliEncrypt seals account's stored record with kr's current key, under the
// account's lease, and says what it did. It reads the record through
// target's store, with the migration keyring (plain records and legacy
// envelopes too, but never one sealed for another account or key), and
// writes the same record back with the version it read as base, so a
// record that changed meanwhile is never overwritten.
func cliEncrypt(ctx context.Context, target cliSealTarget, account string, kr *tokensource.Keyring, owner string, stderr io.Writer, logger *zap.Logger) (string, error) {
	key, store := target.key, target.store
	lease, err := cliTakeLease(ctx, store, owner, stderr)
	if err != nil {
		return "", err
	}
	defer func() {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), tokensource.StorageTimeout)
		defer cancel()
		if err := store.ReleaseLease(rctx, lease); err != nil {
			logger.Warn("releasing the refresh lease (it lapses by itself)", zap.Error(err))
		}
	}()

	// What the stored bytes claim, to tell what changes; only the reads
	// below, which decrypt, prove it.
	octx, cancel := context.WithTimeout(ctx, tokensource.StorageTimeout)
	b, err := target.raw(octx)
	cancel()
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Sprintf("nothing stored at %s; records will be written encrypted with key %s", key, kr.KeyID()), nil
	case err != nil:
		return "", fmt.Errorf("loading %s: %w; nothing was changed", key, err)
	}
	was, err := tokensource.InspectRecord(b, key)
	if err != nil {
		return "", fmt.Errorf("%w; nothing was changed", err)
	}
	if was.Current(kr) {
		// Decrypt with the keyring instances use, which proves it.
		if _, err := tokensource.DecodeRecord(b, key, account, kr); err != nil {
			return "", fmt.Errorf("%w; nothing was changed", err)
		}
		return fmt.Sprintf("the record at %s is already encrypted with the current key %s; nothing to do", key, kr.KeyID()), nil
	}

	octx, cancel = context.WithTimeout(ctx, tokensource.StorageTimeout)
	rec, err := store.Load(octx)
	cancel()
	switch {
	case err != nil:
		return "", fmt.Errorf("%w; nothing was changed", err)
	case rec == nil:
		return "", fmt.Errorf("%s vanished while the refresh lease was held; nothing was changed", key)
	}
	// Leave the write a whole storage timeout, as a refresh would (I3).
	if left := lease.Remaining(time.Now()); left < tokensource.StorageTimeout {
		return "", fmt.Errorf("storage is slow: only %s of the refresh lease is left for the write; nothing was changed, try again", left.Round(time.Millisecond))
	}
	octx, cancel = context.WithTimeout(ctx, tokensource.StorageTimeout)
	err = store.CompareAndStore(octx, rec, tokensource.Version{Generation: rec.Generation, Chain: rec.Chain})
	cancel()
	if err != nil {
		return "", fmt.Errorf("writing %s: %w; the record may not be sealed, run encrypt again", key, err)
	}
	user := "unknown"
	if rec.User != nil {
		user = (&cliUser{ID: rec.User.ID, Username: rec.User.Username}).String()
	}
	return cliClean(fmt.Sprintf("sealed the record at %s with key %s (it was %s): generation %d, chain %s, user %s",
		key, kr.KeyID(), was, rec.Generation, rec.Chain, user)), nil
}

// cliTakeLease takes the account's refresh lease for the encrypt command,
// waiting while another instance holds it.
func cliTakeLease(ctx context.Context, store tokensource.Store, owner string, stderr io.Writer) (*tokensource.Lease, error) {
	waiting := false
	for {
		octx, cancel := context.WithTimeout(ctx, tokensource.StorageTimeout)
		l, err := store.TakeLease(octx, owner, cliEncryptLeaseTTL)
		cancel()
		switch {
		case err == nil:
			return l, nil
		case !errors.Is(err, tokensource.ErrLeaseHeld):
			return nil, fmt.Errorf("taking the refresh lease: %w; nothing was changed", err)
		case !waiting:
			waiting = true
			fmt.Fprintln(stderr, "waiting for the refresh lease, which another instance holds…")
		}
		select {
		case <-ctx.Done():
			return nil, errors.New("another instance kept the refresh lease too long; nothing was changed, try again")
		case <-time.After(cliLeasePoll):
		}
	}
}
