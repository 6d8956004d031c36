package caddymodule

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

// Bounds of the file_system lock guard.
const (
	// lockProbeInterval is how often a waiting Lock looks at the lock file
	// to see whether it is stuck.
	lockProbeInterval = 5 * time.Second
	// lockPollInterval is how often a waiting Lock tries again: the holder
	// (restream_auth) keeps it for milliseconds. certmagic's own Lock polls
	// once a second, which would keep a token source's single refresher
	// from adopting a pair another instance stored meanwhile.
	lockPollInterval = 25 * time.Millisecond
	// maxLockHold is far longer than any section restream_auth holds a storage
	// lock for (a read and a write of small records). A lock file seen for
	// this long is stuck, whatever its freshness timestamp says.
	maxLockHold = 10 * time.Second
)

// fileLockGuard works around a flaw of certmagic's file_system lock: each
// Lock starts a goroutine that keeps the lock file fresh until it finds the
// file gone, tied to the file name rather than the holder. Under lock churn
// across processes, an old goroutine can keep a dead holder's lock fresh
// forever. restream_auth holds its locks for milliseconds, so a lock file
// that this process has seen unchanged (same "created" stamp) for maxHold is
// stuck, and is broken instead of waited on. The guard judges by its own
// observation, not by the stamp's age, so clock skew between hosts sharing
// the storage cannot make it break a live lock.
type fileLockGuard struct {
	*certmagic.FileStorage
	logger  *zap.Logger
	probe   time.Duration
	maxHold time.Duration

	mu   *sync.Mutex
	seen map[string]lockSighting // lock name -> first sighting of its current file
}

type lockSighting struct {
	created time.Time // the lock file's own stamp, used only as an identity
	since   time.Time // when this process first saw that file
}

// guardStorage wraps file_system storage with the guard; other storages are
// returned as they are.
func guardStorage(s certmagic.Storage, logger *zap.Logger) certmagic.Storage {
	if fs, ok := s.(*certmagic.FileStorage); ok {
		return &fileLockGuard{FileStorage: fs, logger: logger, probe: lockProbeInterval, maxHold: maxLockHold,
			mu: new(sync.Mutex), seen: make(map[string]lockSighting)}
	}
	return s
}

// Lock obtains the lock, trying every lockPollInterval (with jitter) and
// breaking the lock if it is stuck.
func (g *fileLockGuard) Lock(ctx context.Context, name string) error {
	probeAt := time.Now().Add(g.probe)
	for {
		ok, err := g.tryLock(ctx, name)
		switch {
		case ok:
			return nil
		case ctx.Err() != nil:
			return ctx.Err()
		case err != nil:
			return err
		}
		if now := time.Now(); !now.Before(probeAt) {
			g.breakIfStuck(name)
			probeAt = now.Add(g.probe)
		}
		wait := time.NewTimer(time.Duration(float64(lockPollInterval) * (0.5 + mrand.Float64())))
		select {
		case <-wait.C:
		case <-ctx.Done():
			wait.Stop()
			return ctx.Err()
		}
	}
}

// tryLock makes one attempt at the lock. certmagic's Lock waits a second
// between attempts unless its context ends; a context that ends at once
// leaves one attempt (and certmagic's own handling of stale and empty lock
// files).
func (g *fileLockGuard) tryLock(ctx context.Context, name string) (bool, error) {
	actx, cancel := context.WithCancel(ctx)
	cancel()
	err := g.FileStorage.Lock(actx, name)
	if err == nil {
		return true, nil
	}
	if errors.Is(err, context.Canceled) {
		return false, nil // held by someone else
	}
	return false, err
}

// stuckFor reports how long this process has seen the same lock file.
func (g *fileLockGuard) stuckFor(name string, created time.Time) time.Duration {
	g.mu.Lock()
	defer g.mu.Unlock()
	now := time.Now()
	s, ok := g.seen[name]
	if !ok || !s.created.Equal(created) {
		g.seen[name] = lockSighting{created: created, since: now}
		return 0
	}
	return now.Sub(s.since)
}

func (g *fileLockGuard) breakIfStuck(name string) {
	path := filepath.Join(g.Path, "locks", certmagic.StorageKeys.Safe(name)+".lock")
	created, err := lockCreated(path)
	if err != nil {
		return
	}
	held := g.stuckFor(name, created)
	if held < g.maxHold {
		return
	}
	// Rename first: of several processes breaking at once, only one moves the
	// file, and a lock created after the rename is put back.
	var b [6]byte
	_, _ = rand.Read(b[:])
	stuck := path + ".stuck-" + hex.EncodeToString(b[:])
	if err := os.Rename(path, stuck); err != nil {
		return
	}
	if c, err := lockCreated(stuck); err == nil && !c.Equal(created) {
		// Someone re-created the lock between our read and rename: put it back.
		if os.Link(stuck, path) == nil {
			_ = os.Remove(stuck)
			return // nothing was broken
		}
		g.logger.Warn("lock file changed while breaking it", zap.String("lock", name))
	}
	_ = os.Remove(stuck)
	g.logger.Warn("broke a stuck storage lock", zap.String("lock", name), zap.Time("created", created), zap.Duration("seen_for", held))
}

func lockCreated(path string) (time.Time, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return time.Time{}, err
	}
	var meta struct {
		Created time.Time `json:"created"`
	}
	if err := json.Unmarshal(b, &meta); err != nil {
		return time.Time{}, fmt.Errorf("lock file %s: %w", path, err)
	}
	return meta.Created, nil
}

// storageIdentity names a storage for the source pool key.
func storageIdentity(s any) string {
	switch v := s.(type) {
	case *fileLockGuard:
		return v.FileStorage.String()
	case fmt.Stringer:
		return v.String()
	}
	return fmt.Sprintf("%T", s)
}
