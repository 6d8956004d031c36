package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// lockFileMeta is certmagic's lock file content.
type lockFileMeta struct {
	Created time.Time `json:"created,omitempty"`
	Updated time.Time `json:"updated,omitempty"`
}

func newTestGuard(t *testing.T, probe, maxHold time.Duration) (*fileLockGuard, *observer.ObservedLogs) {
	t.Helper()
	core, logs := observer.New(zapcore.DebugLevel)
	fsStorage := &certmagic.FileStorage{Path: t.TempDir()}
	g, ok := guardStorage(fsStorage, zap.New(core)).(*fileLockGuard)
	if !ok {
		t.Fatalf("guardStorage did not wrap file_system storage")
	}
	if g.probe != lockProbeInterval || g.maxHold != maxLockHold || g.FileStorage != fsStorage {
		t.Fatalf("guardStorage built %+v", g)
	}
	g.probe, g.maxHold = probe, maxHold
	return g, logs
}

func lockPath(g *fileLockGuard, name string) string {
	return filepath.Join(g.Path, "locks", certmagic.StorageKeys.Safe(name)+".lock")
}

func writeLockFile(t *testing.T, path string, meta lockFileMeta) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(meta)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// keepFresh imitates certmagic's keepLockfileFresh goroutine of a dead
// holder: it rewrites "updated" in whatever file sits at path, keeping its
// "created", and stops only when the file is gone or the test ends. It
// refreshes far more often than certmagic's 5 s so that the lock never
// looks stale to certmagic's own 10 s check.
func keepFresh(t *testing.T, path string) {
	t.Helper()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			f, err := os.OpenFile(path, os.O_RDWR, 0o644)
			if errors.Is(err, fs.ErrNotExist) {
				return // as certmagic: the lock was released
			}
			if err != nil {
				t.Errorf("refresher: %v", err)
				return
			}
			var meta lockFileMeta
			if json.NewDecoder(f).Decode(&meta) == nil {
				meta.Updated = time.Now()
				b, _ := json.Marshal(meta)
				_ = f.Truncate(0)
				_, _ = f.WriteAt(b, 0)
			}
			_ = f.Close()
		}
	}()
	t.Cleanup(func() { close(stop); wg.Wait() })
}

// readCreated reads a lock file's creation time, retrying while a refresher
// has it truncated mid-rewrite.
func readCreated(t *testing.T, path string) (time.Time, error) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		c, err := lockCreated(path)
		var syntax *json.SyntaxError
		if err == nil || !errors.As(err, &syntax) || time.Now().After(deadline) {
			return c, err
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// The guard judges a lock stuck by how long it has itself seen the same lock
// file, so a "created" stamp from a host whose clock runs an hour ahead
// (which would never look old) is broken all the same.
func TestGuardBreaksStuckLock(t *testing.T) {
	if testing.Short() {
		t.Skip("wall-clock: waits past the lock guard's bound (about 1 s)")
	}
	const name = "restream_auth/main/lock"
	g, logs := newTestGuard(t, 200*time.Millisecond, 600*time.Millisecond)
	path := lockPath(g, name)
	created := time.Now().Add(time.Hour).Truncate(time.Second)
	writeLockFile(t, path, lockFileMeta{Created: created, Updated: time.Now()})
	keepFresh(t, path)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	if err := g.Lock(ctx, name); err != nil {
		t.Fatalf("Lock on a stuck lock file: %v", err)
	}
	took := time.Since(start)
	t.Logf("stuck lock broken and taken in %s", took)
	if took < g.maxHold || took > 3*time.Second {
		t.Errorf("breaking the stuck lock took %s, want maxHold (%s) plus about one probe (%s)", took, g.maxHold, g.probe)
	}
	c, err := readCreated(t, path)
	if err != nil {
		t.Fatalf("no lock file after Lock: %v", err)
	}
	if c.Equal(created) || time.Since(c) > time.Minute {
		t.Errorf("lock file created %s: still the stuck one", c)
	}
	if n := logs.FilterMessage("broke a stuck storage lock").Len(); n != 1 {
		t.Errorf("logged %d breaks, want 1", n)
	}
	if err := g.Unlock(context.Background(), name); err != nil {
		t.Fatalf("Unlock: %v", err)
	}
	if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("lock file left after Unlock: %v", err)
	}
	leftovers, _ := filepath.Glob(path + ".stuck-*")
	if len(leftovers) != 0 {
		t.Errorf("renamed stuck lock files left behind: %v", leftovers)
	}
}

func TestGuardKeepsFreshLock(t *testing.T) {
	if testing.Short() {
		t.Skip("wall-clock: waits past the lock guard's probe interval (about 1 s)")
	}
	const name = "restream_auth/main/lock"
	g, logs := newTestGuard(t, 200*time.Millisecond, 5*time.Second)
	path := lockPath(g, name)
	created := time.Now().Add(-time.Second).Truncate(time.Second)
	writeLockFile(t, path, lockFileMeta{Created: created, Updated: time.Now()})
	keepFresh(t, path)

	ctx, cancel := context.WithTimeout(context.Background(), 1200*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := g.Lock(ctx, name)
	if err == nil {
		_ = g.Unlock(context.Background(), name)
		t.Fatal("Lock took a lock held (recently created, fresh) by someone else")
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Lock error %v, want context.DeadlineExceeded", err)
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("Lock returned %s after its context expired", took)
	}
	c, err := readCreated(t, path)
	if err != nil || !c.Equal(created) {
		t.Fatalf("holder's lock file changed: created %s, %v", c, err)
	}
	if n := logs.FilterMessage("broke a stuck storage lock").Len(); n != 0 {
		t.Errorf("logged %d breaks of a fresh lock", n)
	}
}

// A lock held by a live holder through certmagic itself is never broken
// while it is younger than maxHold, and is handed over on Unlock.
func TestGuardLockExcludesLiveHolder(t *testing.T) {
	const name = "restream_auth/acct/lock"
	g, _ := newTestGuard(t, 100*time.Millisecond, 5*time.Second)
	holder := &certmagic.FileStorage{Path: g.Path}
	if err := holder.Lock(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	err := g.Lock(ctx, name)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Lock while another holds it: %v, want context.DeadlineExceeded", err)
	}
	if err := holder.Unlock(context.Background(), name); err != nil {
		t.Fatal(err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := g.Lock(ctx, name); err != nil {
		t.Fatalf("Lock after the holder released it: %v", err)
	}
	if err := g.Unlock(context.Background(), name); err != nil {
		t.Fatal(err)
	}
}

// A cancelled caller gets its error back at once, not after the probe.
func TestGuardLockHonoursCancel(t *testing.T) {
	const name = "restream_auth/main/lock"
	g, _ := newTestGuard(t, time.Hour, time.Hour)
	writeLockFile(t, lockPath(g, name), lockFileMeta{Created: time.Now(), Updated: time.Now()})
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	start := time.Now()
	if err := g.Lock(ctx, name); !errors.Is(err, context.Canceled) {
		t.Fatalf("Lock: %v, want context.Canceled", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("Lock returned %s after cancel", took)
	}
}

// otherStorage is any storage that is not file_system.
type otherStorage struct{ certmagic.Storage }

func (otherStorage) String() string { return "other-storage:xyz" }

func TestGuardStorageLeavesOtherStoragesAlone(t *testing.T) {
	other := &otherStorage{}
	if got := guardStorage(other, zap.NewNop()); got != certmagic.Storage(other) {
		t.Fatalf("guardStorage wrapped a non-file storage: %T", got)
	}
	if got := storageIdentity(other); got != "other-storage:xyz" {
		t.Errorf("storageIdentity(other) = %q", got)
	}

	fsStorage := &certmagic.FileStorage{Path: t.TempDir()}
	wrapped := guardStorage(fsStorage, zap.NewNop())
	if _, ok := wrapped.(*fileLockGuard); !ok {
		t.Fatalf("guardStorage(file_system) = %T, want *fileLockGuard", wrapped)
	}
	// The pool key must not change because of the wrapper.
	if a, b := storageIdentity(wrapped), storageIdentity(fsStorage); a != b {
		t.Errorf("storageIdentity: wrapped %q, bare %q", a, b)
	}
	// The wrapper still is a complete storage.
	ctx := context.Background()
	if err := wrapped.Store(ctx, "k/v", []byte("x")); err != nil {
		t.Fatal(err)
	}
	if b, err := wrapped.Load(ctx, "k/v"); err != nil || string(b) != "x" {
		t.Fatalf("Load: %q, %v", b, err)
	}
	if _, err := wrapped.Load(ctx, "missing"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load of a missing key: %v, want fs.ErrNotExist", err)
	}
}
