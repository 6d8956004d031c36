package caddymodule_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/redistest"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource/redisstore"
)

// Three Caddy processes share one storage directory in front of the fake
// (2-second tokens, 100-300 ms token latency, refresh_ahead 1s, timeout 2s)
// under load from 12 workers for 60 s, while a random instance is SIGKILLed
// every 3-5 s and restarted on the same port with the same Caddyfile.
//
// A kill after Restream rotated the pair but before the new pair was
// persisted loses the chain whatever the client does
// (TestKillDuringRefreshLosesChain shows it), so the driver never kills in
// that window: it waits until no token call is in flight, none ended in the
// last chaosQuiet, and the stored generation has caught up with every
// rotation the fake made (a persist can wait a second or more for the
// storage lock); and the fake drops calls whose client is gone
// (DropDisconnected), so a call sent just before a kill cannot rotate.
// Nor does it kill while the refresh lease is held (the others would wait
// for it to expire, timeout + 10 s, by design) or while a storage lock file
// exists: killing the holder of the file_system lock stalls every instance
// for about 35 s (certmagic's flaw keeps the dead holder's lock fresh until
// restream_auth's guard breaks it), which RESTREAM_AUTH_CHAOS=hard exercises
// and reports. From the check to the kill the driver holds the account's
// storage lock itself (the one every instance takes to write the lease), so
// no refresh can start in between; TestChaosRedis's driver holds the lease.
// The driver is runChaos, shared with TestChaosRedis.
//
// Asserted: 0 invalid_grant; every completed HTTP response is 200; no
// transport error except to an instance that was being killed or restarted
// (counted and reported); each instance answers 200 at the end.
//
// RESTREAM_AUTH_CHAOS=hard kills more boldly: also while token calls are in
// flight, as long as they are young enough that the fake will see their
// client gone before processing them, and preferring moments when a
// storage lock file exists. Kills then hit lease holders during their token
// calls and storage lock holders, and the others wait, by design, for the
// dead holder's lease (timeout + 10 s) or lock (the lock guard's bound,
// about 35 s): requests may time out or get 503. Those are reported, not
// failed; what is asserted is 0 invalid_grant, a live chain at the end, and
// no outage (time without any 200 from any instance) longer than
// chaosSettle.
func TestChaosKillRestart(t *testing.T) {
	skipIfShort(t, "chaos: three Caddy processes for over a minute")
	storageDir := t.TempDir()
	storage := &fileChaosStorage{dir: storageDir, store: &certmagic.FileStorage{Path: storageDir}, hard: os.Getenv("RESTREAM_AUTH_CHAOS") == "hard"}
	run := chaosRun{name: "file_system", duration: chaosDuration, storageDir: storageDir, storage: storage, hard: storage.hard, minRotations: 20}
	// RESTREAM_AUTH_CHAOS_ENCRYPT=1 runs the same chaos with the record
	// encrypted at rest.
	if os.Getenv("RESTREAM_AUTH_CHAOS_ENCRYPT") == "1" {
		key := bytes.Repeat([]byte{42}, 32)
		t.Setenv("RESTREAM_TEST_CHAOS_KEY", base64.StdEncoding.EncodeToString(key))
		run.extra = "encryption_key {env.RESTREAM_TEST_CHAOS_KEY}"
		var err error
		if storage.keyring, err = tokensource.NewKeyring(key); err != nil {
			t.Fatal(err)
		}
	}
	runChaos(t, run)
}

// A SIGKILL while the instance's own refresh is in flight, after Restream
// has rotated the pair: the new pair dies with the process. No client can
// avoid this. The killed instance marked the refresh token in the lease
// before sending it, so the restarted sidecar waits for that lease to
// lapse (seen unchanged for its TTL, timeout + 25 s), answering 503
// temporarily_unavailable meanwhile, each answer within timeout + 1 s; then
// it finds the mark: the token may be spent, so it is never sent (0
// invalid_grant), and requests get 503 reauth_required.
func TestKillDuringRefreshLosesChain(t *testing.T) {
	skipIfShort(t, "starts Caddy processes")
	const timeout = 2 * time.Second
	fake := newFake(t, fakerestream.Options{AccessTTL: 4 * time.Second, Latency: 400 * time.Millisecond, Logf: func(string, ...any) {}})
	cfg := siteConfig{Port: testproc.Port(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(), Extra: "refresh_ahead 2s\ntimeout 2s"}
	url := cfg.profileURL()
	p := startProcess(t, cfg.Caddyfile())
	waitReady(t, url, p)
	if status, body, _ := do(t, http.MethodGet, url, nil, nil); status != http.StatusOK {
		t.Fatalf("warm-up: %d %s", status, body)
	}
	waitFor(t, 10*time.Second, "the proactive refresh to be in flight", func() bool {
		st := fake.Stats()
		return st.RefreshInFlight == 1 && st.RefreshCalls == 1 // counted after the latency: this is call 2
	})
	killProcess(t, p)
	waitFor(t, 5*time.Second, "the fake to rotate for the dead client", func() bool { return fake.Stats().LostRotations == 1 })
	callsAtKill := fake.Stats().RefreshCalls

	restarted := time.Now()
	p = startProcess(t, cfg.Caddyfile())
	waitReady(t, url, p)
	answers := map[string]int{}
	var order []string
	var status int
	var body []byte
	var hdr http.Header
	var slowest time.Duration
	// The lease lapses timeout + 25 s after the restarted process first saw it.
	deadline := time.Now().Add(timeout + 40*time.Second)
	for time.Now().Before(deadline) {
		start := time.Now()
		status, body, hdr = do(t, http.MethodGet, url, nil, nil)
		slowest = max(slowest, time.Since(start))
		key := answerKey(status, body)
		if answers[key] == 0 {
			order = append(order, fmt.Sprintf("%s (first %.1fs after restart)", key, time.Since(restarted).Seconds()))
		}
		answers[key]++
		if strings.Contains(key, "reauth_required") {
			break
		}
		if key != "503 temporarily_unavailable" || hdr.Get("Retry-After") == "" {
			t.Errorf("while the dead holder's lease is live: %d %s (Retry-After %q)", status, body, hdr.Get("Retry-After"))
		}
		time.Sleep(200 * time.Millisecond)
	}
	st := fake.Stats()
	t.Logf("kill during refresh: answers after restart %v (in order %s), slowest %s; fake: refresh calls=%d ok=%d lost rotations=%d invalid_grant=%d api401=%d",
		answers, strings.Join(order, ", "), slowest.Round(time.Millisecond), st.RefreshCalls, st.RefreshOK, st.LostRotations, st.InvalidGrant, st.API401)
	if status != http.StatusServiceUnavailable || !strings.Contains(string(body), `"reauth_required"`) || !strings.Contains(string(body), "re-authorize") || hdr.Get("Retry-After") == "" {
		t.Fatalf("want 503 reauth_required after the chain was lost, got %d %s\n%s", status, body, tailString(p.Output(), 40))
	}
	if slowest > timeout+time.Second {
		t.Errorf("an answer took %s, more than timeout + 1 s", slowest)
	}
	// Keep asking: the token in doubt is never sent.
	for range 10 {
		if status, body, _ := do(t, http.MethodGet, url, nil, nil); status != http.StatusServiceUnavailable || !strings.Contains(string(body), `"reauth_required"`) {
			t.Errorf("after reauth_required: %d %s", status, body)
		}
	}
	if st := fake.Stats(); st.InvalidGrant != 0 || st.RefreshCalls != callsAtKill {
		t.Fatalf("invalid_grant = %d, token calls since the kill = %d; want 0 and 0 (the token in doubt is never sent)", st.InvalidGrant, st.RefreshCalls-callsAtKill)
	}
}

// Two Caddy processes share storage, with 2-second tokens and
// timeout 2s. The lease holder is SIGKILLed inside its token call (the
// endpoint hangs) and the current token expires. The survivor answers 503
// with Retry-After within timeout + 1 s, never hanging. The killed holder
// had marked the refresh token in the lease (it was sending it), so once
// its lease has lapsed the survivor treats that token as in doubt: 503
// reauth_required, and the token is never sent a second time (invalid_grant
// 0, no token call after the kill).
func TestHolderKilledMidRefresh(t *testing.T) {
	skipIfShort(t, "starts Caddy processes")
	const timeout = 2 * time.Second
	fake := newFake(t, fakerestream.Options{AccessTTL: 2 * time.Second, Logf: quiet})
	root := t.TempDir()
	seed := fake.Seed()
	a := newProcSite(t, fake, root, seed, "timeout 2s\nrefresh_ahead 1s")
	b := newProcSite(t, fake, root, seed, "timeout 2s\nrefresh_ahead 1s")
	bin, err := caddyBinary()
	if err != nil {
		t.Fatal(err)
	}
	procA := a.start(t, bin)
	if got := timedGet(t, a.url()); got.status != http.StatusOK {
		t.Fatalf("A warm-up: %s", got)
	}
	// A's proactive refresh hangs at the endpoint: A holds the lease and
	// has marked the refresh token in it. B starts only now, so A is the
	// holder.
	fake.SetFault(fakerestream.FaultHang)
	waitFor(t, 10*time.Second, "A's token call to hang", func() bool { return fake.Stats().Hanging == 1 })
	b.start(t, bin)
	// A resends under its mark after each timed-out call: kill it inside
	// one, once the token both serve has expired.
	rec, err := tokensource.LoadRecord(context.Background(), &certmagic.FileStorage{Path: root}, "default")
	if err != nil || rec == nil || rec.Generation != 1 {
		t.Fatalf("stored record: %+v %v", rec, err)
	}
	sleepUntil(rec.Expiry)
	waitFor(t, 10*time.Second, "A inside its token call", func() bool { return fake.Stats().Hanging == 1 })
	held, _ := readLease(t, root)
	if held.Owner == "" || held.Mark == "" || held.MarkedBy != held.Owner {
		t.Fatalf("A's lease does not mark the token it is sending: %+v", held)
	}
	killProcess(t, procA)
	killed := time.Now()
	waitFor(t, 5*time.Second, "the fake to drop the dead call", func() bool { return fake.Stats().Hanging == 0 })
	callsAtKill := fake.Stats().RefreshCalls

	// The lease lapses once B has seen it unchanged for its TTL (timeout +
	// 25 s). Until then B answers 503 temporarily_unavailable.
	var waiting int
	var slowest time.Duration
	var final timedAnswer
	for deadline := killed.Add(timeout + 40*time.Second); ; {
		got := timedGet(t, b.url())
		slowest = max(slowest, got.took)
		if got.is503("reauth_required") {
			final = got
			break
		}
		waiting++
		if !got.is503("temporarily_unavailable") {
			t.Errorf("B while the dead holder's lease is live: %s", got)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no reauth_required %s after the kill; last %s", time.Since(killed), got)
		}
		time.Sleep(200 * time.Millisecond)
	}
	inDoubtAfter := time.Since(killed)
	// The endpoint works again; the token in doubt is still never sent.
	fake.SetFault(fakerestream.FaultNone)
	for range 10 {
		if got := timedGet(t, b.url()); !got.is503("reauth_required") {
			t.Errorf("after the token was found in doubt: %s", got)
		}
		time.Sleep(100 * time.Millisecond)
	}
	st := fake.Stats()
	bStatus := b.status(t)
	t.Logf("B answered %d requests 503 temporarily_unavailable (slowest %s), then %s, %s after the kill; B's status: %s (%s); fake: token calls after the kill %d, invalid_grant %d",
		waiting, slowest.Round(time.Millisecond), final.key(), inDoubtAfter.Round(time.Millisecond), bStatus.State, bStatus.LastError, st.RefreshCalls-callsAtKill, st.InvalidGrant)
	if slowest > timeout+time.Second {
		t.Errorf("an answer took %s, more than timeout + 1 s", slowest)
	}
	if !strings.Contains(string(final.body), "re-authorize") {
		t.Errorf("the reauth_required answer does not say what to do: %s", final)
	}
	if st.InvalidGrant != 0 || st.RefreshCalls != callsAtKill {
		t.Errorf("invalid_grant %d, token calls after the kill %d: the token in doubt was sent again", st.InvalidGrant, st.RefreshCalls-callsAtKill)
	}
	// (tokensource, as of this writing: a refresher that waited for
	// another's lease keeps its "refreshing" flag through the failure that
	// ends the wait, so Status says refreshing and the reauth_required gauge
	// stays 0.)
	if bStatus.State != "reauth_required" {
		t.Errorf("B's admin status says %q, want reauth_required (its requests get 503 reauth_required)", bStatus.State)
	}
}

// TestChaosRedis is TestChaosKillRestart on Redis, with Redis itself killed
// too: three Caddy processes (the built binary) share the account through
// one redis-server, in front of the fake (2-second tokens, 100-300 ms token
// latency, refresh_ahead 1s, timeout 2s), under load from 12 workers, while
// a random instance is SIGKILLed every 3-5 s and restarted, and Redis is
// SIGKILLed and restarted on the same port and directory, down 1-2 s each
// time.
//
//   - "appendonly" (60 s, Redis killed twice): appendfsync always, so Redis
//     comes back with every write it acknowledged, leases and marks included.
//   - "no persistence" (30 s, Redis killed twice): Redis comes back empty;
//     the instances write back the newest record they know (redisstore's
//     write-back) and the chain goes on.
//
// Caddy kills follow TestChaosKillRestart's rule (a kill inside the rotation
// window loses the chain by design, see TestKillDuringRefreshLosesChain):
// no token call in flight or ended in the last chaosQuiet, the lease free,
// and Redis's generation caught up with every rotation the fake made; the
// driver holds the lease in Redis (SET NX PX) from the check to the kill. Redis
// kills wait for nothing; the first of each sub-run even aims at a token
// call just sent (waiting up to 3 s for one), so that Restream rotates while
// Redis is down. Without persistence that was a window that lost the chain
// (invalid_grant): see TestRedisRestartDuringRefreshStoresNewPair.
//
// Asserted: 0 invalid_grant; every completed response is 200, except 503
// temporarily_unavailable while Redis is down or recovering (see
// redisOutages.recovery); no transport error except to an instance being
// killed or restarted; each instance answers 200 at the end.
func TestChaosRedis(t *testing.T) {
	skipIfShort(t, "chaos: three Caddy processes and a redis-server for 90 s")
	for _, tc := range []struct {
		name       string
		appendOnly bool
		duration   time.Duration
		recovery   time.Duration // see redisOutages.recovery
	}{
		{name: "appendonly", appendOnly: true, duration: 60 * time.Second, recovery: 2 * time.Second},
		{name: "no persistence", duration: 30 * time.Second, recovery: 2*time.Second + redisstore.DefaultRestoreSettle},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := redistest.Start(t, redistest.Options{AppendOnly: tc.appendOnly})
			runChaos(t, chaosRun{
				name: "redis, " + tc.name, duration: tc.duration, storageDir: t.TempDir(), global: redisGlobal(srv.URL()),
				storage: &redisChaosStorage{srv: srv}, redis: &redisOutages{srv: srv, kills: 2, recovery: tc.recovery},
				minRotations: int64(tc.duration / (2 * time.Second)),
			})
		})
	}
}

// The window TestChaosRedis found (no persistence), step by step: instance
// A holds the lease and has sent generation 1's refresh token when Redis
// restarts empty; instance B, which knows generation 1, writes it back and
// takes the settle lease. A's new pair (generation 2) must still be
// stored: the settle lease ends 2.5 s later, and whoever refreshes then,
// with no mark left in Redis, sends generation 1's spent token
// (invalid_grant). Before the fix, A's write was refused as lease_lost
// until A's own lease would have needed renewing, 12 s later.
func TestRedisRestartDuringRefreshStoresNewPair(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	a, b := newRedisStores(t, srv)
	ctx := t.Context()
	if err := a.CompareAndStore(ctx, chaosRecord(1), tokensource.Version{}); err != nil {
		t.Fatal(err)
	}
	if rec, err := b.Load(ctx); err != nil || rec.Generation != 1 {
		t.Fatalf("B loads generation %s, %v", genOf(rec), err)
	}
	if _, err := a.Load(ctx); err != nil {
		t.Fatal(err)
	}
	l, err := a.TakeLease(ctx, "A", 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	l.Mark, l.MarkedBy = tokensource.Fingerprint("rt-1"), "A"
	if err := a.RenewLease(ctx, l); err != nil {
		t.Fatal(err)
	}

	srv.Kill()
	srv.Restart() // empty: record, lease and mark are gone
	if rec, err := b.Load(ctx); err != nil || rec.Generation != 1 {
		t.Fatalf("B's write-back: generation %s, %v", genOf(rec), err)
	}
	if _, err := b.TakeLease(ctx, "B", 30*time.Second); err == nil {
		t.Fatal("B took the lease during the settle")
	}
	if err := a.CompareAndStore(ctx, chaosRecord(2), tokensource.Version{Generation: 1, Chain: "chain-1"}); err != nil {
		t.Fatalf("A stores the new pair under the settle lease: %v", err)
	}
	if rec, err := b.Load(ctx); err != nil || rec.Generation != 2 {
		t.Fatalf("B then loads generation %s, %v; want generation 2", genOf(rec), err)
	}
}

// newRedisStores returns two stores of account "default" on srv, each with
// its own client, as two instances have; their watch is off, so the test
// says when each one loads.
func newRedisStores(t *testing.T, srv *redistest.Server) (a, b *redisstore.Store) {
	t.Helper()
	opt, err := redisstore.ParseURL(srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	stores := make([]*redisstore.Store, 2)
	for i := range stores {
		c := redisstore.NewClient(opt)
		t.Cleanup(func() { _ = c.Close() })
		if stores[i], err = redisstore.New(c, "default", redisstore.Options{WatchInterval: -1}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(stores[i].Close)
	}
	return stores[0], stores[1]
}

// genOf names a loaded record by its generation, never its tokens.
func genOf(rec *tokensource.Record) string {
	if rec == nil {
		return "none"
	}
	return fmt.Sprint(rec.Generation)
}

func chaosRecord(gen uint64) *tokensource.Record {
	now := time.Now()
	return &tokensource.Record{Version: 1, Generation: gen, Chain: "chain-1", AccessToken: fmt.Sprintf("at-%d", gen),
		RefreshToken: fmt.Sprintf("rt-%d", gen), TokenType: "Bearer", Expiry: now.Add(time.Hour), IssuedAt: now}
}

// The same window when A's write fails while Redis is down and B writes
// generation 1 back before A retries: A's store knows the pair it failed to
// write, so its next Load (the watch, every second, within the settle)
// writes generation 2 back, and A's retry finds it stored. Before the fix,
// A's Load returned generation 1 and its retry was refused as lease_lost.
func TestRedisFailedWriteIsWrittenBack(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	a, b := newRedisStores(t, srv)
	ctx := t.Context()
	if err := a.CompareAndStore(ctx, chaosRecord(1), tokensource.Version{}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Load(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := a.TakeLease(ctx, "A", 30*time.Second); err != nil {
		t.Fatal(err)
	}

	srv.Kill()
	rec2, base := chaosRecord(2), tokensource.Version{Generation: 1, Chain: "chain-1"}
	down, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	err := a.CompareAndStore(down, rec2, base)
	cancel()
	if err == nil {
		t.Fatal("a write to a dead Redis succeeded")
	}
	srv.Restart()
	if rec, err := b.Load(ctx); err != nil || rec.Generation != 1 {
		t.Fatalf("B's write-back: generation %s, %v", genOf(rec), err)
	}
	if rec, err := a.Load(ctx); err != nil || rec.Generation != 2 {
		t.Fatalf("A's Load returns generation %s, %v; want its unwritten generation 2 written back", genOf(rec), err)
	}
	if err := a.CompareAndStore(ctx, rec2, base); err != nil {
		t.Fatalf("A's retry: %v", err)
	}
	if rec, err := b.Load(ctx); err != nil || rec.Generation != 2 {
		t.Fatalf("B then loads generation %s, %v; want generation 2", genOf(rec), err)
	}
}
