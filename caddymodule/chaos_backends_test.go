package caddymodule_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/redistest"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// chaosStorage is where the instances keep the chain, as the driver needs
// to see it.
type chaosStorage interface {
	// waitForKill waits up to chaosSafeWait for a moment when killing an
	// instance cannot lose a rotated pair: no token call in flight or ended
	// within chaosQuiet, no refresh lease held, and the stored generation
	// caught up with every rotation the fake made. It holds that moment
	// (no instance can start a refresh) until the returned release.
	waitForKill(fake *fakerestream.Server) killMoment
}

// killMoment is what waitForKill found.
type killMoment struct {
	safe     bool   // false: none within chaosSafeWait, and the kill goes ahead
	lockFile bool   // an instance's storage lock file existed (file_system)
	release  func() // gives back what the driver held, once the instance is dead
}

// pollFor calls cond every millisecond until it holds, or until limit has
// passed since start.
func pollFor(start time.Time, limit time.Duration, cond func() bool) bool {
	for {
		if cond() {
			return true
		}
		if time.Since(start) >= limit {
			return false
		}
		time.Sleep(time.Millisecond)
	}
}

// fileChaosStorage is file_system storage shared by the instances.
type fileChaosStorage struct {
	dir     string
	store   *certmagic.FileStorage
	keyring *tokensource.Keyring // the record's key, if it is encrypted
	// hard: kill also while token calls are in flight (young enough that the
	// fake drops them), preferring moments when a storage lock file exists.
	hard bool
}

func (s *fileChaosStorage) persisted(fake *fakerestream.Server) bool {
	rotations := fake.Stats().RefreshOK
	rec, err := tokensource.LoadRecordKeyring(context.Background(), s.store, "default", s.keyring)
	return err == nil && rec != nil && int64(rec.Generation) == rotations
}

func (s *fileChaosStorage) lockFileExists() bool {
	m, _ := filepath.Glob(filepath.Join(s.dir, "locks", "*.lock"))
	return len(m) > 0
}

func (s *fileChaosStorage) leaseFree() bool {
	b, err := os.ReadFile(filepath.Join(s.dir, filepath.FromSlash(tokensource.LeaseKey("default"))))
	if errors.Is(err, fs.ErrNotExist) {
		return true
	}
	var l leaseFile
	return err == nil && json.Unmarshal(b, &l) == nil && (l.Owner == "" || time.Now().After(l.ExpiresAt))
}

// tryLock makes one attempt at the account's storage lock, the one every
// instance takes to write the lease or the record.
func (s *fileChaosStorage) tryLock() bool {
	once, cancel := context.WithCancel(context.Background())
	cancel() // certmagic waits a second between attempts unless the context has ended
	return s.store.Lock(once, storageLockName("default")) == nil
}

func (s *fileChaosStorage) unlock() {
	_ = s.store.Unlock(context.Background(), storageLockName("default"))
}

// waitForKill holds the account's storage lock while the chain is at rest:
// no instance can then take the lease, so no refresh can start between the
// check and the kill. It looks first without the lock (the instances poll
// for it every 25 ms, and most moments are not quiet), then takes it and
// looks again.
func (s *fileChaosStorage) waitForKill(fake *fakerestream.Server) killMoment {
	start := time.Now()
	if s.hard {
		return s.waitForHardKill(fake, start)
	}
	atRest := func() bool { return fake.TokenIdleFor() >= chaosQuiet && s.leaseFree() && s.persisted(fake) }
	safe := pollFor(start, chaosSafeWait, func() bool {
		if s.lockFileExists() || !atRest() || !s.tryLock() {
			return false
		}
		if atRest() {
			return true
		}
		s.unlock()
		return false
	})
	if !safe {
		return killMoment{lockFile: s.lockFileExists(), release: func() {}}
	}
	return killMoment{safe: true, release: s.unlock}
}

// waitForHardKill is RESTREAM_AUTH_CHAOS=hard's rule: token calls may be in
// flight if the fake will see their client gone before processing them, and
// for up to a second it waits for a storage lock file to exist too. It
// holds nothing.
func (s *fileChaosStorage) waitForHardKill(fake *fakerestream.Server, start time.Time) killMoment {
	safe := func() bool {
		n, oldest, sinceEnd := fake.TokenActivity()
		return sinceEnd >= chaosQuiet && (n == 0 || oldest < chaosLatency-30*time.Millisecond) && s.persisted(fake)
	}
	for !(s.lockFileExists() && safe()) && time.Since(start) < time.Second {
		time.Sleep(200 * time.Microsecond)
	}
	ok := pollFor(start, chaosSafeWait, safe)
	return killMoment{safe: ok, lockFile: s.lockFileExists(), release: func() {}}
}

// redisChaosStorage is a redis-server shared by the instances.
type redisChaosStorage struct {
	srv *redistest.Server
}

func (s *redisChaosStorage) leaseKey() string {
	return strings.TrimSuffix(redisRecordKey("default"), "record") + "lease"
}

func (s *redisChaosStorage) persisted(fake *fakerestream.Server) bool {
	gen, err := s.srv.Do("HGET", redisRecordKey("default"), "gen")
	stored, _ := gen.(string)
	return err == nil && stored == fmt.Sprint(fake.Stats().RefreshOK)
}

// takeLease takes the refresh lease unless anyone holds it (an instance, or
// the settle lease of a write-back).
func (s *redisChaosStorage) takeLease() bool {
	v, err := s.srv.Do("SET", s.leaseKey(), redisDriverLease, "NX", "PX", "5000")
	return err == nil && v == "OK"
}

func (s *redisChaosStorage) releaseLease() {
	_, _ = s.srv.Do("EVAL", "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
		"1", s.leaseKey(), redisDriverLease)
}

// waitForKill holds the refresh lease itself while it checks, as an
// instance would: no instance can then be between marking a refresh token
// and storing its answer, so no refresh can start between the check and
// the kill (a free lease alone let one start in that gap under load, and the
// kill landed in the window no client survives).
func (s *redisChaosStorage) waitForKill(fake *fakerestream.Server) killMoment {
	safe := pollFor(time.Now(), chaosSafeWait, func() bool {
		if !s.takeLease() {
			return false
		}
		if fake.TokenIdleFor() >= chaosQuiet && s.persisted(fake) {
			return true
		}
		s.releaseLease()
		return false
	})
	if !safe {
		return killMoment{release: func() {}}
	}
	return killMoment{safe: true, release: s.releaseLease}
}

// redisDriverLease is the lease the driver holds in Redis while it kills.
// Instances meet it as a lease of an unknown owner and wait.
const redisDriverLease = `{"owner":"chaos driver","nonce":"driver"}`

// Redis downtime: long enough for the served 2-second tokens to expire.
const (
	chaosRedisDownMin = time.Second
	chaosRedisDownMax = 2 * time.Second
)

// redisOutages kills and restarts the redis-server during a run, and keeps
// its downtimes, from just before each kill to the restarted server
// answering.
type redisOutages struct {
	srv   *redistest.Server
	kills int
	// recovery is how long after Redis answers again a 503 still counts as
	// caused by its downtime: the refresher's next round (recheckInterval,
	// 1 s) plus a token call (at most 300 ms), and, when Redis came back
	// empty, the settle lease of the record written back from memory
	// (redisstore.DefaultRestoreSettle), during which nobody refreshes.
	recovery time.Duration

	mu    sync.Mutex
	down  []downtime
	notes []string
}

// schedule spreads the kills evenly over the run, give or take a second.
func (o *redisOutages) schedule(started time.Time, duration time.Duration) []time.Time {
	var at []time.Time
	for i := 1; i <= o.kills; i++ {
		when := started.Add(duration * time.Duration(i) / time.Duration(o.kills+1))
		at = append(at, when.Add(rand.N(2*time.Second)-time.Second))
	}
	return at
}

// killAndRestart SIGKILLs Redis wherever the protocol is, keeps it down for
// 1-2 s and restarts it. The first kill aims at a rotation: a token call
// just sent, whose answer comes after Redis is gone (waiting up to 3 s for
// one). Without persistence that was a window that lost the chain
// (invalid_grant): see TestRedisRestartDuringRefreshStoresNewPair.
func (o *redisOutages) killAndRestart(fake *fakerestream.Server, journal *chaosJournal, first bool) {
	if first {
		aim := time.Now()
		for time.Since(aim) < 3*time.Second {
			if n, oldest, _ := fake.TokenActivity(); n > 0 && oldest < chaosLatency/2 {
				break
			}
			time.Sleep(time.Millisecond)
		}
	}
	downFor := chaosRedisDownMin + rand.N(chaosRedisDownMax-chaosRedisDownMin)
	n, oldest, sinceEnd := fake.TokenActivity()
	rotationsAtKill := fake.Stats().RefreshOK
	journal.add("driver: SIGKILL redis-server for %s (token calls in flight=%d oldest=%s, last ended %s ago; rotations=%d)",
		downFor.Round(time.Millisecond), n, oldest.Round(time.Millisecond), sinceEnd.Round(time.Millisecond), rotationsAtKill)
	o.mu.Lock()
	o.down = append(o.down, downtime{from: time.Now()})
	o.mu.Unlock()
	o.srv.Kill()
	time.Sleep(downFor) // the downtime itself: nothing to wait for
	o.srv.Restart()
	o.mu.Lock()
	d := &o.down[len(o.down)-1]
	d.until = time.Now()
	o.notes = append(o.notes, fmt.Sprintf("down %s, token calls in flight at the kill %d, rotations while down %d",
		d.until.Sub(d.from).Round(time.Millisecond), n, fake.Stats().RefreshOK-rotationsAtKill))
	o.mu.Unlock()
	journal.add("driver: redis-server answers again (generation %s, rotations %d)", redisField(o.srv, "default", "gen"), fake.Stats().RefreshOK)
}

// around returns the downtime that [from, to] overlaps, recovery included.
func (o *redisOutages) around(from, to time.Time) (downtime, bool) {
	if o == nil {
		return downtime{}, false
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	return overlapping(o.down, from, to, 0, o.recovery)
}
