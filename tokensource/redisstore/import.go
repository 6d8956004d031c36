package redisstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// ImportedBy is who the Caddy storage copy of an imported record is marked
// by. The mark lives in the storage lease, where the storage store keeps it
// through every takeover: an instance still on Caddy storage never sends
// the imported refresh token (it reports it in doubt instead of breaking
// the chain now carried on in Redis), and the stale copy is never imported
// again should Redis lose the record.
const ImportedBy = "imported into Redis"

// importLeaseTTL bounds how long an import holds the two leases.
const importLeaseTTL = 30 * time.Second

// importer imports an account's record from Caddy storage once per store.
type importer struct {
	owner string
	mu    sync.Mutex // one import at a time
	done  atomic.Bool
	// markFP is the refresh token imported whose storage copy is still to
	// be marked (the mark's write failed after the import).
	markFP string
}

// importOnce imports the record from Options.ImportFrom if Redis has none.
// Until it succeeds, or finds nothing to import, it returns an error.
func (im *importer) importOnce(ctx context.Context, s *Store) error {
	if s.opts.ImportFrom == nil || im.done.Load() {
		return nil
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.done.Load() {
		return nil
	}
	if err := im.run(ctx, s); err != nil {
		return fmt.Errorf("importing the record from Caddy storage into Redis: %w", err)
	}
	im.done.Store(true)
	return nil
}

func (im *importer) run(ctx context.Context, s *Store) error {
	from := tokensource.NewStorageStore(s.opts.ImportFrom, s.account, s.opts.Keyring, s.opts.Clock, s.log)
	if im.markFP == "" {
		rec, err := im.candidate(ctx, s, from)
		if rec == nil || err != nil {
			return err
		}
	}
	sl, err := from.TakeLease(ctx, im.owner, importLeaseTTL)
	if err != nil {
		return fmt.Errorf("taking the lease in Caddy storage: %w", err)
	}
	defer func() {
		// The release keeps the mark, whatever happened.
		rctx, cancel := releaseContext(ctx)
		defer cancel()
		if err := from.ReleaseLease(rctx, sl); err != nil {
			s.log.Warn("releasing the Caddy storage lease after the import failed (it lapses on its own)", zap.Error(err))
		}
	}()
	if im.markFP == "" {
		if err := im.copy(ctx, s, from, sl); err != nil || im.markFP == "" {
			return err
		}
	}
	sl.Mark, sl.MarkedBy = im.markFP, ImportedBy
	if err := from.RenewLease(ctx, sl); err != nil {
		return fmt.Errorf("the record is in Redis; marking the Caddy storage copy as imported failed: %w", err)
	}
	im.markFP = ""
	return nil
}

// candidate is the record to import, read without leases: nil if Redis has
// a record, Caddy storage has none, or the one it has was imported before.
func (im *importer) candidate(ctx context.Context, s *Store, from tokensource.Store) (*tokensource.Record, error) {
	n, err := s.c.Exists(ctx, s.keys.record).Result()
	if err != nil {
		return nil, s.errorf("checking %s: %w", s.keys.record, err)
	}
	if n > 0 {
		return nil, nil
	}
	rec, err := from.Load(ctx)
	if rec == nil || err != nil {
		return nil, err
	}
	before, err := importedBefore(ctx, s.opts.ImportFrom, s.account, rec)
	if err != nil {
		return nil, err
	}
	if before {
		s.log.Warn("Redis has no record, and the one in Caddy storage was imported into Redis before and is stale since: "+
			"it is not imported again", zap.String("storage_key", tokensource.RecordKey(s.account)), zap.String("key", s.keys.record))
		return nil, nil
	}
	return rec, nil
}

// copy writes the storage record into Redis under both leases, carrying a
// mark of the storage lease over, and sets markFP to the refresh token
// that storage must now mark.
func (im *importer) copy(ctx context.Context, s *Store, from tokensource.Store, sl *tokensource.Lease) error {
	rl, err := s.TakeLease(ctx, im.owner, importLeaseTTL)
	if err != nil {
		return fmt.Errorf("taking the lease in Redis: %w", err)
	}
	defer func() {
		rctx, cancel := releaseContext(ctx)
		defer cancel()
		if err := s.ReleaseLease(rctx, rl); err != nil {
			s.log.Warn("releasing the Redis lease after the import failed (it lapses on its own)", zap.Error(err))
		}
	}()
	// Under both leases, read both sides again.
	rec, err := im.candidate(ctx, s, from)
	if rec == nil || err != nil {
		return err
	}
	if sl.Mark != "" {
		// A token in doubt under Caddy storage stays in doubt under Redis.
		rl.Mark, rl.MarkedBy = sl.Mark, sl.MarkedBy
		if err := s.RenewLease(ctx, rl); err != nil {
			return fmt.Errorf("carrying the lease's mark over: %w", err)
		}
	}
	if err := s.CompareAndStore(ctx, rec, tokensource.Version{}); err != nil {
		return err
	}
	s.log.Info("imported the token record from Caddy storage into Redis", zap.Uint64("generation", rec.Generation),
		zap.String("storage_key", tokensource.RecordKey(s.account)), zap.String("key", s.keys.record))
	if rec.HasPair() {
		im.markFP = tokensource.Fingerprint(rec.RefreshToken)
	}
	return nil
}

// releaseContext bounds a release that must run even if ctx has ended.
func releaseContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
}

// importedBefore reports whether the storage lease marks rec's refresh
// token as imported into Redis.
func importedBefore(ctx context.Context, st tokensource.Storage, account string, rec *tokensource.Record) (bool, error) {
	if !rec.HasPair() {
		return false, nil
	}
	b, err := st.Load(ctx, tokensource.LeaseKey(account))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("loading %s: %w", tokensource.LeaseKey(account), err)
	}
	var l struct {
		Mark     string `json:"mark"`
		MarkedBy string `json:"marked_by"`
	}
	if json.Unmarshal(b, &l) != nil {
		return false, nil
	}
	return l.MarkedBy == ImportedBy && l.Mark == tokensource.Fingerprint(rec.RefreshToken), nil
}
