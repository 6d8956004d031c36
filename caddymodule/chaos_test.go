package caddymodule_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
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
// exists: killing the holder of
// the file_system lock stalls every instance for about 35 s (certmagic's
// flaw keeps the dead holder's lock fresh until restream_auth's guard breaks
// it), which RESTREAM_AUTH_CHAOS=hard exercises and reports.
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
	if testing.Short() {
		t.Skip("chaos: three Caddy processes for over a minute")
	}
	hard := os.Getenv("RESTREAM_AUTH_CHAOS") == "hard"
	var journal chaosJournal
	fake := newFake(t, fakerestream.Options{
		AccessTTL: 2 * time.Second, Latency: chaosLatency, LatencyJitter: 200 * time.Millisecond,
		DropDisconnected: true, Logf: journal.add,
	})
	storageDir := t.TempDir()
	store := &certmagic.FileStorage{Path: storageDir}
	seed := fake.Seed()
	// RESTREAM_AUTH_CHAOS_ENCRYPT=1 runs the same chaos with the record
	// encrypted at rest.
	extra := "refresh_ahead 1s\ntimeout 2s"
	var keyring *tokensource.Keyring
	if os.Getenv("RESTREAM_AUTH_CHAOS_ENCRYPT") == "1" {
		key := bytes.Repeat([]byte{42}, 32)
		t.Setenv("RESTREAM_TEST_CHAOS_KEY", base64.StdEncoding.EncodeToString(key))
		extra += "\nencryption_key {env.RESTREAM_TEST_CHAOS_KEY}"
		var err error
		if keyring, err = tokensource.NewKeyring(key); err != nil {
			t.Fatal(err)
		}
	}
	instances := make([]*chaosInstance, chaosInstances)
	for i := range instances {
		cfg := siteConfig{Port: testproc.Port(t), StorageDir: storageDir, Fake: fake, Seed: seed, Extra: extra}
		in := &chaosInstance{idx: i, cfg: cfg, url: "http://127.0.0.1:" + itoa(cfg.Port) + "/v2/user/profile"}
		in.proc = startProcess(t, cfg.Caddyfile())
		in.all = append(in.all, in.proc)
		instances[i] = in
	}
	for _, in := range instances {
		waitReady(t, in.url, in.proc)
	}
	diagnose := func() {
		t.Logf("merged restream_auth timeline of all processes (tail):\n%s", mergedTimeline(instances, 150))
		t.Logf("driver and fake events (tail):\n%s", journal.tail(150))
	}

	cl := &http.Client{Timeout: chaosClientTimeout, Transport: &http.Transport{MaxIdleConnsPerHost: chaosWorkers}}
	defer cl.CloseIdleConnections()
	var (
		okMu     sync.Mutex
		lastOK   = time.Now()
		outage   time.Duration // longest time without any 200
		outageAt time.Time
		ok       atomic.Int64
		evMu     sync.Mutex
		events   []chaosEvent
		stop     = make(chan struct{})
		wg       sync.WaitGroup
		loadDone = time.Now().Add(chaosDuration)
	)
	for w := range chaosWorkers {
		wg.Go(func() {
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				in := instances[(w+n)%chaosInstances]
				start := time.Now()
				status, body, err := get(cl, in.url)
				if err == nil && status == http.StatusOK {
					ok.Add(1)
					okMu.Lock()
					if now := time.Now(); now.Sub(lastOK) > outage {
						outage, outageAt = now.Sub(lastOK), lastOK
					}
					lastOK = time.Now()
					okMu.Unlock()
					continue
				}
				ev := chaosEvent{instance: in.idx, start: start, end: time.Now(), status: status}
				if err != nil {
					ev.detail = err.Error()
				} else {
					ev.detail = strings.TrimSpace(string(body))
				}
				evMu.Lock()
				events = append(events, ev)
				evMu.Unlock()
				if err != nil {
					time.Sleep(20 * time.Millisecond) // don't spin on a refused port
				}
			}
		})
	}
	stopLoad := sync.OnceFunc(func() { close(stop); wg.Wait() })
	defer stopLoad()

	// The killer. safe says when a kill cannot lose a rotated pair.
	persisted := func() bool {
		rotations := fake.Stats().RefreshOK
		rec, err := tokensource.LoadRecordKeyring(context.Background(), store, "default", keyring)
		return err == nil && rec != nil && int64(rec.Generation) == rotations
	}
	lockHeld := func() bool {
		m, _ := filepath.Glob(filepath.Join(storageDir, "locks", "*.lock"))
		return len(m) > 0
	}
	leaseFree := func() bool {
		b, err := os.ReadFile(filepath.Join(storageDir, tokensource.KeyPrefix("default"), "lease.json"))
		if errors.Is(err, fs.ErrNotExist) {
			return true
		}
		var l struct {
			Owner   string    `json:"owner"`
			Expires time.Time `json:"expires_at"`
		}
		return err == nil && json.Unmarshal(b, &l) == nil && (l.Owner == "" || time.Now().After(l.Expires))
	}
	safe := func() bool { return fake.TokenIdleFor() >= chaosQuiet && !lockHeld() && leaseFree() && persisted() }
	if hard {
		safe = func() bool {
			n, oldest, sinceEnd := fake.TokenActivity()
			return sinceEnd >= chaosQuiet && (n == 0 || oldest < chaosLatency-30*time.Millisecond) && persisted()
		}
	}
	var kills, lockKills, forced int
	var safeWaits []time.Duration
	var driverErr error
	for driverErr == nil {
		next := time.Now().Add(chaosKillMin + rand.N(chaosKillMax-chaosKillMin))
		if next.After(loadDone) {
			sleepUntil(loadDone)
			break
		}
		sleepUntil(next)
		in := instances[rand.IntN(chaosInstances)]
		waitStart := time.Now()
		if hard {
			for !(lockHeld() && safe()) && time.Since(waitStart) < time.Second {
				time.Sleep(200 * time.Microsecond)
			}
		}
		isSafe := safe()
		for ; !isSafe && time.Since(waitStart) < 10*time.Second; isSafe = safe() {
			time.Sleep(time.Millisecond)
		}
		if !isSafe {
			forced++
		}
		safeWaits = append(safeWaits, time.Since(waitStart))
		locked := lockHeld()
		if locked {
			lockKills++
		}
		p := in.current()
		n, oldest, sinceEnd := fake.TokenActivity()
		journal.add("driver: SIGKILL instance %d pid %d (safe=%v, lock file=%v, token calls in flight=%d oldest=%s, last ended %s ago)",
			in.idx, p.PID(), isSafe, locked, n, oldest.Round(time.Millisecond), sinceEnd.Round(time.Millisecond))
		in.mu.Lock()
		in.down = append(in.down, downtime{from: time.Now()})
		in.mu.Unlock()
		if exitedBeforeKill(p) {
			// Exited by itself: show why (a crash, or the host out of memory).
			driverErr = fmt.Errorf("instance %d (pid %d) exited before the kill; its output ends:\n%s", in.idx, p.PID(), tailString(p.Output(), 30))
			break
		}
		p.Kill()
		kills++
		np := startProcess(t, in.cfg.Caddyfile())
		journal.add("driver: restarted instance %d as pid %d", in.idx, np.PID())
		if err := waitAnswer(in.url, np); err != nil {
			driverErr = fmt.Errorf("restarting instance %d: %v\n%s", in.idx, err, np.Output())
		}
		journal.add("driver: instance %d answers", in.idx)
		in.mu.Lock()
		in.proc = np
		in.all = append(in.all, np)
		in.down[len(in.down)-1].until = time.Now()
		in.mu.Unlock()
	}
	stopLoad()
	if driverErr != nil {
		diagnose()
		t.Fatal(driverErr)
	}

	// Classify what did not end in 200.
	var failed, connErrs, liveErrs []chaosEvent
	for _, ev := range events {
		switch {
		case ev.status != 0:
			failed = append(failed, ev)
		case instances[ev.instance].wasDown(ev.start, ev.end, 50*time.Millisecond):
			connErrs = append(connErrs, ev)
		default:
			liveErrs = append(liveErrs, ev)
		}
	}

	// The chain must be alive: every instance answers 200 once settled.
	settleStart := time.Now()
	var dead []string
	for _, in := range instances {
		deadline := settleStart.Add(chaosSettle)
		for {
			status, body, err := get(cl, in.url)
			if err == nil && status == http.StatusOK {
				break
			}
			if time.Now().After(deadline) {
				dead = append(dead, fmt.Sprintf("instance %d: %d %s %v", in.idx, status, bytes.TrimSpace(body), err))
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	settled := time.Since(settleStart)

	st := fake.Stats()
	var maxWait time.Duration
	for _, w := range safeWaits {
		maxWait = max(maxWait, w)
	}
	mode := "normal"
	if hard {
		mode = "hard"
	}
	t.Logf("chaos (%s): kills survived=%d (%d while a storage lock file existed, %d without a safe moment) requests ok=%d failed=%d connection_errors=%d (to killed/restarting instances) other_transport_errors=%d refresh_calls=%d invalid_grant=%d max_concurrent_refreshes=%d dropped_calls=%d lost_rotations=%d api401=%d longest_outage=%s (from %s) settle=%s max_wait_for_safe_kill=%s",
		mode, kills, lockKills, forced, ok.Load(), len(failed), len(connErrs), len(liveErrs), st.RefreshCalls, st.InvalidGrant, st.MaxConcurrentRefresh,
		st.DroppedCalls, st.LostRotations, st.API401, outage.Round(time.Millisecond), outageAt.Format("15:04:05.000"), settled.Round(time.Millisecond), maxWait.Round(time.Millisecond))
	report := func(what string, evs []chaosEvent) {
		for i, ev := range evs {
			if i == 10 {
				t.Logf("... %d more %s", len(evs)-10, what)
				break
			}
			t.Logf("%s: instance %d at %s (took %s): %d %.300s", what, ev.instance, ev.start.Format("15:04:05.000"), ev.end.Sub(ev.start).Round(time.Millisecond), ev.status, ev.detail)
		}
	}
	report("failed response", failed)
	report("transport error on a live instance", liveErrs)
	if testing.Verbose() {
		report("connection error (kill)", connErrs)
	}

	if len(dead) > 0 {
		t.Errorf("the chain is not alive %s after the load:\n%s", chaosSettle, strings.Join(dead, "\n"))
	}
	if st.InvalidGrant != 0 {
		t.Errorf("invalid_grant = %d (lost rotations %d)", st.InvalidGrant, st.LostRotations)
	}
	switch {
	case hard:
		if outage > chaosSettle {
			t.Errorf("no instance answered 200 for %s (from %s)", outage, outageAt.Format("15:04:05.000"))
		}
	default:
		if len(failed) != 0 {
			t.Errorf("%d completed responses were not 200", len(failed))
		}
		if len(liveErrs) != 0 {
			t.Errorf("%d requests to live instances got no answer (client timeout %s)", len(liveErrs), chaosClientTimeout)
		}
		if kills < int(chaosDuration/chaosKillMax)-1 {
			t.Errorf("only %d kills in %s", kills, chaosDuration)
		}
	}
	if ok.Load() == 0 || st.RefreshOK < 20 {
		t.Errorf("too little traffic to mean anything: %d ok requests, %d rotations", ok.Load(), st.RefreshOK)
	}
	if t.Failed() || hard {
		diagnose()
	}
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
	if testing.Short() {
		t.Skip("starts Caddy processes")
	}
	const timeout = 2 * time.Second
	fake := newFake(t, fakerestream.Options{AccessTTL: 4 * time.Second, Latency: 400 * time.Millisecond, Logf: func(string, ...any) {}})
	cfg := siteConfig{Port: testproc.Port(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(), Extra: "refresh_ahead 2s\ntimeout 2s"}
	url := "http://127.0.0.1:" + itoa(cfg.Port) + "/v2/user/profile"
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

// Item 18: two Caddy processes share storage, with 2-second tokens and
// timeout 2s. The lease holder is SIGKILLed inside its token call (the
// endpoint hangs) and the current token expires. The survivor answers 503
// with Retry-After within timeout + 1 s, never hanging. The killed holder
// had marked the refresh token in the lease (it was sending it), so once
// its lease has lapsed the survivor treats that token as in doubt: 503
// reauth_required, and the token is never sent a second time (invalid_grant
// 0, no token call after the kill).
func TestItem18HolderKilledMidRefresh(t *testing.T) {
	if testing.Short() {
		t.Skip("starts Caddy processes")
	}
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
	pa := a.start(t, bin)
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
	killProcess(t, pa)
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
	t.Logf("item 18: B answered %d requests 503 temporarily_unavailable (slowest %s), then %s, %s after the kill; B's status: %s (%s); fake: token calls after the kill %d, invalid_grant %d",
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
// and Redis's generation caught up with every rotation the fake made. Redis
// kills wait for nothing; the first of each sub-run even aims at a token
// call just sent (waiting up to 3 s for one), so that Restream rotates while
// Redis is down. Without persistence that was a window that lost the chain
// (invalid_grant): see TestRedisRestartDuringRefreshStoresNewPair.
//
// Asserted: 0 invalid_grant; every completed response is 200, except 503
// temporarily_unavailable while Redis is down or recovering (see
// chaosRedisRun.recovery); no transport error except to an instance being
// killed or restarted; each instance answers 200 at the end.
func TestChaosRedis(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos: three Caddy processes and a redis-server for 90 s")
	}
	for _, run := range []chaosRedisRun{
		{name: "appendonly", appendOnly: true, duration: 60 * time.Second, redisKills: 2, recovery: 2 * time.Second},
		{name: "no persistence", duration: 30 * time.Second, redisKills: 2, recovery: 2*time.Second + redisstore.DefaultRestoreSettle},
	} {
		t.Run(run.name, func(t *testing.T) { runChaosRedis(t, run) })
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
