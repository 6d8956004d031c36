package caddymodule_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/faultstorage"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// Regression tests of the storage side of the refresh protocol, through
// real Caddy processes sharing one storage directory. Most run
// cmd/caddy-faults, whose storage module restream_test_faults wraps
// file_system and fails, delays or hangs chosen operations as a control
// file says (internal/faultstorage).

func faultsBin(t *testing.T) string {
	t.Helper()
	skipIfShort(t, "builds and runs Caddy processes")
	bin, err := caddyFaultsBinary()
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// faultPair is two sidecar processes, A and B, on the fault storage over
// one root, with its control file and journal. A started and answered
// first, so A exchanged the seed; B adopted A's pair.
type faultPair struct {
	a, b                   procSite
	procA                  *testproc.Process
	root, control, journal string
}

// startFaultPair starts A, then B (timeout 2s each), and waits until each
// has answered a request with 200.
func startFaultPair(t *testing.T, fake *fakerestream.Server) faultPair {
	t.Helper()
	bin := faultsBin(t)
	var p faultPair
	p.root, p.control, p.journal = faultFiles(t)
	seed := fake.Seed()
	p.a = newProcSite(t, fake, p.root, seed, "timeout 2s").withFaults(p.control, p.journal)
	p.b = newProcSite(t, fake, p.root, seed, "timeout 2s").withFaults(p.control, p.journal)
	p.procA = p.a.start(t, bin)
	if got := timedGet(t, p.a.url()); got.status != http.StatusOK {
		t.Fatalf("A warm-up: %s", got)
	}
	p.b.start(t, bin)
	if got := timedGet(t, p.b.url()); got.status != http.StatusOK {
		t.Fatalf("B warm-up: %s", got)
	}
	return p
}

// faultFiles returns a storage root, a control file and a journal in a
// fresh directory.
func faultFiles(t *testing.T) (root, control, journal string) {
	dir := t.TempDir()
	return filepath.Join(dir, "storage"), filepath.Join(dir, "faults.json"), filepath.Join(dir, "faults.jsonl")
}

func storedGeneration(t *testing.T, root string) uint64 {
	t.Helper()
	g, err := loadGeneration(root)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// loadGeneration is the stored record's generation (usable off the test goroutine).
func loadGeneration(root string) (uint64, error) {
	rec, err := tokensource.LoadRecord(context.Background(), &certmagic.FileStorage{Path: root}, "default")
	if err != nil || rec == nil {
		return 0, fmt.Errorf("stored record: %v %v", rec, err)
	}
	return rec.Generation, nil
}

// injected counts the journal's faults of op on a key ending in suffix by pid.
func injected(t *testing.T, journal, op, suffix, action string, pid int) int {
	t.Helper()
	entries, err := faultstorage.ReadJournal(journal)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range entries {
		if e.Op == op && strings.HasSuffix(e.Key, suffix) && e.Action == action && e.PID == pid {
			n++
		}
	}
	return n
}

// The new pair cannot be written (every store of token.json fails).
// The instance that refreshed serves the pair from memory and keeps the
// lease while it retries the write (status, health and admin say
// degraded); a second process sharing the storage holds only the spent
// pair and never sends its refresh token (its clients get 503 with
// Retry-After meanwhile); once writes work again the pair reaches storage,
// the lease is released and the second process adopts the pair.
func TestFailedWriteKeepsLease(t *testing.T) {
	const timeout = 2 * time.Second
	fake := newFake(t, fakerestream.Options{Logf: quiet})
	pair := startFaultPair(t, fake)
	a, b, procA := pair.a, pair.b, pair.procA
	root, control, journal := pair.root, pair.control, pair.journal
	before := fake.Stats()

	if err := faultstorage.SetRules(control, faultstorage.Rule{Op: faultstorage.OpStore, KeySuffix: "/token.json", Action: faultstorage.ActionFail}); err != nil {
		t.Fatal(err)
	}
	status, st, raw := a.forceRefresh(t)
	if status != http.StatusOK || st.State != "degraded" || st.Persisted || st.Generation != 2 {
		t.Fatalf("A's forced refresh with failing writes: %d %s", status, raw)
	}
	if got := fake.Stats().RefreshOK; got != before.RefreshOK+1 {
		t.Fatalf("rotations %d -> %d, want one", before.RefreshOK, got)
	}
	lease, _ := readLease(t, root)
	if lease.Owner == "" {
		t.Fatalf("A released the lease with its pair only in memory: %+v", lease)
	}
	got := timedGet(t, a.url())
	if got.status != http.StatusOK || !fake.ValidAccessToken(strings.TrimPrefix(decodeEcho(t, got.body).Authorization, "Bearer ")) {
		t.Fatalf("A does not serve the new pair from memory: %s", got)
	}
	if code, state := a.health(t); code != http.StatusOK || state != "degraded" {
		t.Errorf("A's health while degraded: %d %s", code, state)
	}

	// B holds only the spent pair. For 5 s (several write retries by A) its
	// requests meet the dead access token and wait for A's lease.
	var bAnswers, bGood int
	var slowest time.Duration
	for end := time.Now().Add(5 * time.Second); time.Now().Before(end); {
		got := timedGet(t, b.url())
		bAnswers++
		slowest = max(slowest, got.took)
		if got.is503("temporarily_unavailable") && got.took <= timeout+time.Second {
			bGood++
		} else {
			t.Errorf("B while A's pair is only in memory: %s, want 503 temporarily_unavailable within %s", got, timeout+time.Second)
		}
		if l, _ := readLease(t, root); l.Owner != lease.Owner {
			t.Fatalf("the lease changed hands while A's pair is only in memory: %+v, was %+v", l, lease)
		}
		if st := a.status(t); st.State != "degraded" || st.Persisted {
			t.Fatalf("A's status while its writes fail: %+v", st)
		}
		if g := storedGeneration(t, root); g != 1 {
			t.Fatalf("stored generation %d while every write fails", g)
		}
	}
	fails := injected(t, journal, faultstorage.OpStore, "/token.json", faultstorage.ActionFail, procA.PID())
	if fails < 2 {
		t.Errorf("%d failed writes of token.json by A, want the first and at least one retry", fails)
	}
	if st := fake.Stats(); st.InvalidGrant != 0 || st.RefreshCalls != before.RefreshCalls+1 {
		t.Fatalf("while A's pair was only in memory: token calls %d (want 1), invalid_grant %d", st.RefreshCalls-before.RefreshCalls, st.InvalidGrant)
	}

	// Writes work again.
	if err := faultstorage.SetRules(control); err != nil {
		t.Fatal(err)
	}
	recovered := time.Now()
	waitFor(t, 10*time.Second, "the pair in storage and A persisted", func() bool {
		st := a.status(t)
		return storedGeneration(t, root) == 2 && st.State == "ok" && st.Persisted
	})
	waitFor(t, 5*time.Second, "A to release the lease", func() bool { l, _ := readLease(t, root); return l.Owner == "" })
	waitFor(t, 5*time.Second, "B to adopt the stored pair", func() bool { return timedGet(t, b.url()).status == http.StatusOK })
	took := time.Since(recovered)
	if got := timedGet(t, a.url()); got.status != http.StatusOK {
		t.Errorf("A after the write: %s", got)
	}
	end := fake.Stats()
	t.Logf("%d failed writes by A; B answered %d requests with 503+Retry-After (slowest %s); stored and adopted %s after writes worked again; fake: token calls %d, invalid_grant %d, max concurrent %d",
		fails, bGood, slowest.Round(time.Millisecond), took.Round(time.Millisecond), end.RefreshCalls-before.RefreshCalls, end.InvalidGrant, end.MaxConcurrentRefresh)
	if end.InvalidGrant != 0 || end.RefreshCalls != before.RefreshCalls+1 || end.MaxConcurrentRefresh != 1 {
		t.Errorf("fake: token calls %d (want 1), invalid_grant %d, max concurrent %d", end.RefreshCalls-before.RefreshCalls, end.InvalidGrant, end.MaxConcurrentRefresh)
	}
}

// The write after the token call is slow: each store of token.json
// waits 13 s (the storage operation gives up after 10 s), twice. From the
// token call until the pair is stored takes longer than the old lease TTL
// (timeout + 10 s); the refresher keeps and renews its lease throughout, so
// the second process never takes it and never sends the spent token.
func TestSlowWriteKeepsLease(t *testing.T) {
	fake := newFake(t, fakerestream.Options{Logf: quiet})
	pair := startFaultPair(t, fake)
	a, b, procA := pair.a, pair.b, pair.procA
	root, control, journal := pair.root, pair.control, pair.journal
	before := fake.Stats()
	if err := faultstorage.SetRules(control, faultstorage.Rule{Op: faultstorage.OpStore, KeySuffix: "/token.json",
		Action: faultstorage.ActionDelay, Delay: faultstorage.Duration(13 * time.Second), Count: 2}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	// The pair is not published before it is stored: the admin call gives
	// up after timeout; the refresh goes on.
	if status, _, raw := a.forceRefresh(t); status == http.StatusOK {
		t.Fatalf("A's forced refresh succeeded before its slow write: %s", raw)
	}
	if got := fake.Stats().RefreshOK; got != before.RefreshOK+1 {
		t.Fatalf("rotations %d -> %d, want one", before.RefreshOK, got)
	}
	lease, _ := readLease(t, root)
	if lease.Owner == "" {
		t.Fatalf("no lease held during A's write")
	}
	// Until the pair is stored, B must neither take the lease nor send; its
	// clients get 503 (a 200 is right only once the pair is stored).
	var bAnswers, b503 atomic.Int64
	var bBad atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			got := timedGet(t, b.url())
			bAnswers.Add(1)
			switch {
			case got.is503("temporarily_unavailable"):
				b503.Add(1)
			case got.status == http.StatusOK && func() bool { g, _ := loadGeneration(root); return g == 2 }():
			default:
				bBad.CompareAndSwap(nil, got.String())
			}
		}
	})
	var stored time.Duration
	for deadline := start.Add(40 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if storedGeneration(t, root) == 2 {
			stored = time.Since(start)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the pair never reached storage")
		}
		if l, _ := readLease(t, root); l.Owner != lease.Owner {
			t.Fatalf("the lease changed hands before the pair was stored (%s after the token call): %+v, was %+v", time.Since(start), l, lease)
		}
		if st := fake.Stats(); st.RefreshCalls != before.RefreshCalls+1 {
			t.Fatalf("a second token call before the pair was stored (invalid_grant %d)", st.InvalidGrant)
		}
	}
	close(stop)
	wg.Wait()
	delays := injected(t, journal, faultstorage.OpStore, "/token.json", faultstorage.ActionDelay, procA.PID())
	waitFor(t, 10*time.Second, "B to adopt the stored pair", func() bool { return timedGet(t, b.url()).status == http.StatusOK })
	end := fake.Stats()
	t.Logf("pair stored %s after the token call (old lease TTL 12 s) after %d slow writes by A; B: %d answers, %d of them 503 temporarily_unavailable; fake: token calls %d, invalid_grant %d",
		stored.Round(time.Millisecond), delays, bAnswers.Load(), b503.Load(), end.RefreshCalls-before.RefreshCalls, end.InvalidGrant)
	if stored < 12*time.Second || delays != 2 {
		t.Errorf("the write took %s after %d delays; the test wants longer than the old lease TTL (12 s) and 2 delays", stored, delays)
	}
	if end.InvalidGrant != 0 || end.RefreshCalls != before.RefreshCalls+1 {
		t.Errorf("fake: token calls %d (want 1), invalid_grant %d", end.RefreshCalls-before.RefreshCalls, end.InvalidGrant)
	}
	if b503.Load() == 0 || bBad.Load() != nil {
		t.Errorf("B answered %d requests, %d of them 503 temporarily_unavailable; first other answer before the pair was stored: %v", bAnswers.Load(), b503.Load(), bBad.Load())
	}
}

// Two processes whose timeouts differ (1 s and 5 s) under load with
// 2-second tokens, after another instance left a lease that looks expired
// by its timestamp (an hour ago) but carries a fresh TTL of 4 s. Nobody
// takes that lease before seeing it unchanged for 4 s, and leases carry
// their own TTL, so the two never refresh at once (the fake's maximum of
// concurrent token calls is 1) and no refresh token is sent twice
// (invalid_grant 0). Lease writes are slowed by 200 ms (fault storage) to
// widen every take-over race.
func TestDifferentTimeoutsOneRefresher(t *testing.T) {
	bin := faultsBin(t)
	const ghostTTL = 4 * time.Second
	fake := newFake(t, fakerestream.Options{AccessTTL: 2 * time.Second, Latency: 100 * time.Millisecond, LatencyJitter: 200 * time.Millisecond, Logf: quiet})
	root, control, journal := faultFiles(t)
	if err := faultstorage.SetRules(control, faultstorage.Rule{Op: faultstorage.OpStore, KeySuffix: "/lease.json",
		Action: faultstorage.ActionDelay, Delay: faultstorage.Duration(200 * time.Millisecond)}); err != nil {
		t.Fatal(err)
	}
	seed := fake.Seed()
	a := newProcSite(t, fake, root, seed, "timeout 1s\nrefresh_ahead 1s").withFaults(control, journal)
	b := newProcSite(t, fake, root, seed, "timeout 5s\nrefresh_ahead 1s").withFaults(control, journal)
	a.start(t, bin)
	waitFor(t, 10*time.Second, "A serving", func() bool { return timedGet(t, a.url()).status == http.StatusOK })
	b.start(t, bin)
	waitFor(t, 10*time.Second, "B serving", func() bool { return timedGet(t, b.url()).status == http.StatusOK })

	// The ghost's lease, planted while no instance holds the lease.
	_, planted := plantLease(t, root, leaseFile{Owner: "ghost-instance", Nonce: "g", Seq: 7, TTLMillis: ghostTTL.Milliseconds(), ExpiresAt: time.Now().Add(-time.Hour)})
	before := fake.Stats()

	// Load on both for 12 s; note when the first token call after the plant starts.
	var firstCall atomic.Int64
	stop := make(chan struct{})
	var watch sync.WaitGroup
	watch.Go(func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			if n, _, _ := fake.TokenActivity(); n > 0 && firstCall.Load() == 0 {
				firstCall.Store(time.Now().UnixNano())
			}
		}
	})
	var ok, unavailable, other atomic.Int64
	var firstOther atomic.Value
	var wg sync.WaitGroup
	until := time.Now().Add(12 * time.Second)
	for w := range 4 {
		site := []procSite{a, b}[w%2]
		wg.Go(func() {
			for time.Now().Before(until) {
				got := timedGet(t, site.url())
				switch {
				case got.status == http.StatusOK:
					ok.Add(1)
				case got.is503("temporarily_unavailable"):
					unavailable.Add(1)
				default:
					other.Add(1)
					firstOther.CompareAndSwap(nil, got.String())
				}
			}
		})
	}
	wg.Wait()
	close(stop)
	watch.Wait()
	st := fake.Stats()
	wait := time.Duration(firstCall.Load() - planted.UnixNano())
	t.Logf("first token call %s after the ghost lease (TTL %s, expires_at an hour ago); requests: %d x 200, %d x 503 temporarily_unavailable, %d other; fake: token calls %d, rotations %d, max concurrent %d, invalid_grant %d",
		wait.Round(time.Millisecond), ghostTTL, ok.Load(), unavailable.Load(), other.Load(), st.RefreshCalls-before.RefreshCalls, st.RefreshOK-before.RefreshOK, st.MaxConcurrentRefresh, st.InvalidGrant)
	if firstCall.Load() == 0 || wait < ghostTTL {
		t.Errorf("the first token call came %s after the ghost's lease, before its TTL (%s) was observed", wait, ghostTTL)
	}
	if st.MaxConcurrentRefresh != 1 || st.InvalidGrant != 0 {
		t.Errorf("max concurrent token calls %d, invalid_grant %d: want 1 and 0", st.MaxConcurrentRefresh, st.InvalidGrant)
	}
	if other.Load() != 0 {
		t.Errorf("%d answers neither 200 nor 503 temporarily_unavailable; first: %v", other.Load(), firstOther.Load())
	}
	if st.RefreshOK-before.RefreshOK < 3 {
		t.Errorf("only %d rotations in the 8 s after the ghost's lease lapsed", st.RefreshOK-before.RefreshOK)
	}
	for _, s := range []procSite{a, b} {
		waitFor(t, 10*time.Second, "both instances serving at the end", func() bool { return timedGet(t, s.url()).status == http.StatusOK })
	}
}

// Reads of lease.json fail. The instance needs a refresh (its
// access token was revoked) while another instance's lease, with a TTL of
// 2 s, sits in storage: it neither takes that lease over nor calls the
// token endpoint while it cannot read the lease, for twice the lease's TTL;
// lease.json stays as it was; clients get 503 with Retry-After. Once reads
// work, it sees the lease, waits out its TTL, takes it and refreshes.
func TestFailedLeaseReadNoTakeover(t *testing.T) {
	bin := faultsBin(t)
	const timeout, foreignTTL = 2 * time.Second, 2 * time.Second
	fake := newFake(t, fakerestream.Options{Logf: quiet})
	root, control, journal := faultFiles(t)
	a := newProcSite(t, fake, root, fake.Seed(), "timeout 2s").withFaults(control, journal)
	procA := a.start(t, bin)
	if got := timedGet(t, a.url()); got.status != http.StatusOK {
		t.Fatalf("warm-up: %s", got)
	}
	planted, _ := plantLease(t, root, leaseFile{Owner: "another-instance", Nonce: "x", Seq: 1, TTLMillis: foreignTTL.Milliseconds()})
	if err := faultstorage.SetRules(control, faultstorage.Rule{Op: faultstorage.OpLoad, KeySuffix: "/lease.json", Action: faultstorage.ActionFail}); err != nil {
		t.Fatal(err)
	}
	before := fake.Stats()
	fake.RevokeAccessTokens()

	var answers int
	for end := time.Now().Add(2 * foreignTTL); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		got := timedGet(t, a.url())
		answers++
		if !got.is503("temporarily_unavailable") || got.took > timeout+time.Second {
			t.Errorf("while lease.json cannot be read: %s, want 503 temporarily_unavailable within %s", got, timeout+time.Second)
		}
		if _, raw := readLease(t, root); string(raw) != string(planted) {
			t.Fatalf("lease.json changed while it could not be read: %s", raw)
		}
		if st := fake.Stats(); st.RefreshCalls != before.RefreshCalls {
			t.Fatalf("a token call while the lease could not be read")
		}
	}
	fails := injected(t, journal, faultstorage.OpLoad, "/lease.json", faultstorage.ActionFail, procA.PID())
	st := a.status(t)
	if fails == 0 || st.State != "backoff" || !strings.Contains(st.LastError, "lease.json") {
		t.Errorf("after %d failed reads of lease.json: status %+v", fails, st)
	}

	if err := faultstorage.SetRules(control); err != nil {
		t.Fatal(err)
	}
	readable := time.Now()
	waitFor(t, 20*time.Second, "a 200 once lease.json can be read", func() bool { return timedGet(t, a.url()).status == http.StatusOK })
	took := time.Since(readable)
	end := fake.Stats()
	t.Logf("%d failed reads of lease.json, %d answers of 503 while failing, 0 token calls; a 200 %s after reads worked (the foreign lease's TTL is %s); fake: token calls %d, invalid_grant %d",
		fails, answers, took.Round(time.Millisecond), foreignTTL, end.RefreshCalls-before.RefreshCalls, end.InvalidGrant)
	if took < foreignTTL {
		t.Errorf("took the foreign lease over %s after it became readable, before seeing it unchanged for its TTL (%s)", took, foreignTTL)
	}
	if end.RefreshCalls != before.RefreshCalls+1 || end.InvalidGrant != 0 {
		t.Errorf("fake: token calls %d (want 1), invalid_grant %d", end.RefreshCalls-before.RefreshCalls, end.InvalidGrant)
	}
}

// Two Caddy processes share one storage directory under load with 2-second
// tokens: no failed request and no invalid_grant; once more with the record
// encrypted at rest, where the storage must never hold a token in the clear.
func TestTwoProcessesShareStorage(t *testing.T) {
	skipIfShort(t, "starts two Caddy processes")
	t.Run("plain", func(t *testing.T) { twoProcesses(t, "") })
	t.Run("encrypted", func(t *testing.T) {
		t.Setenv("RESTREAM_TEST_ENCRYPTION_KEY", base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{7}, 32)))
		twoProcesses(t, "encryption_key {env.RESTREAM_TEST_ENCRYPTION_KEY}")
	})
}

func twoProcesses(t *testing.T, extra string) {
	fake := newFake(t, fakerestream.Options{AccessTTL: 2 * time.Second, Latency: 100 * time.Millisecond, LatencyJitter: 200 * time.Millisecond, Logf: func(string, ...any) {}})
	storageDir := t.TempDir()
	seed := fake.Seed()
	var urls []string
	for range 2 {
		cfg := siteConfig{Port: testproc.Port(t), StorageDir: storageDir, Fake: fake, Seed: seed, Extra: "refresh_ahead 1s\n" + extra}
		p := startProcess(t, cfg.Caddyfile())
		u := cfg.profileURL()
		waitReady(t, u, p)
		urls = append(urls, u)
	}
	ok, failed := loadFor(t, urls, 8, 10*time.Second)
	st := fake.Stats()
	t.Logf("two processes: ok=%d failed=%d; fake: refreshes=%d invalid_grant=%d max concurrent refreshes=%d upstream 401s=%d",
		ok, failed, st.RefreshCalls, st.InvalidGrant, st.MaxConcurrentRefresh, st.API401)
	if failed != 0 || st.InvalidGrant != 0 || st.MaxConcurrentRefresh != 1 {
		t.Fatalf("want 0 failures, 0 invalid_grant, 1 concurrent refresh at most")
	}
	if st.RefreshCalls < 5 {
		t.Fatalf("only %d refreshes in 10 s of 2 s tokens", st.RefreshCalls)
	}
	raw, err := os.ReadFile(filepath.Join(storageDir, "restream_auth", "default", "token.json"))
	if err != nil {
		t.Fatal(err)
	}
	if extra != "" {
		if !bytes.Contains(raw, []byte(`"aes-256-gcm"`)) {
			t.Fatalf("record not encrypted: %.80s", raw)
		}
		mustContainNone(t, "encrypted record", string(raw), fake.IssuedTokens()...)
	}
}
