package caddymodule_test

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/caddymodule"
	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// Regression tests through real Caddy: a reload while another instance
// holds the lease (item 12), what a client gets after its token was
// rejected upstream and the refresh fails (item 13), and a lease holder
// killed in the middle of its token call (item 18).

// Item 12: a reload that changes an account's configuration replaces its
// token source, and Caddy waits for the old one to close. While another
// instance holds the account's lease (a live lease.json with a foreign
// owner and a 60 s TTL) and the old source is polling for it, the admin
// /load must still return within timeout + 2 s.
func TestItem12ReloadWithForeignLeaseIsQuick(t *testing.T) {
	const timeout = 2 * time.Second
	fake := newFake(t, fakerestream.Options{Logf: quiet})
	cfg := siteConfig{Port: freePort(t), AdminPort: freePort(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(), Extra: "timeout 2s"}
	runInProcess(t, cfg.Caddyfile())
	site := "http://127.0.0.1:" + itoa(cfg.Port) + "/v2/user/profile"
	if got := timedGet(t, site); got.status != http.StatusOK {
		t.Fatalf("warm-up: %s", got)
	}
	planted, _ := plantLease(t, cfg.StorageDir, leaseFile{Owner: "another-instance", Nonce: "n", Seq: 1, TTLMillis: 60000})
	before := fake.Stats()

	// The served token is revoked: the source needs a refresh and waits,
	// round after round, for the other instance's lease.
	fake.RevokeAccessTokens()
	if got := timedGet(t, site); !got.is503("temporarily_unavailable") || got.took > timeout+time.Second {
		t.Fatalf("while another instance holds the lease: %s, want 503 within %s", got, timeout+time.Second)
	}

	cfg.Extra = "timeout 3s" // a changed account configuration: a new token source
	req, _ := http.NewRequest(http.MethodPost, fmt.Sprintf("http://127.0.0.1:%d/load", cfg.AdminPort), strings.NewReader(cfg.Caddyfile()))
	req.Header.Set("Content-Type", "text/caddyfile")
	start := time.Now()
	resp, err := noKeepAlive.Do(req)
	reload := time.Since(start)
	if err != nil {
		t.Fatalf("reload: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("reload: %d", resp.StatusCode)
	}
	// The new source waits for the same lease: nothing was sent, nothing
	// written, and only one refresher runs.
	after := timedGet(t, site)
	_, raw := readLease(t, cfg.StorageDir)
	n, inPool := refreshers(t), caddymodule.SourcesInPool()
	t.Logf("item 12: reload with a foreign lease took %s (bound %s); then %s; refreshers %d, sources in pool %d; token calls %d",
		reload.Round(time.Millisecond), timeout+2*time.Second, after, n, inPool, fake.Stats().RefreshCalls-before.RefreshCalls)
	if reload > timeout+2*time.Second {
		t.Errorf("the reload took %s, more than timeout + 2 s", reload)
	}
	if !after.is503("temporarily_unavailable") || string(raw) != string(planted) || fake.Stats().RefreshCalls != before.RefreshCalls {
		t.Errorf("after the reload, with the lease still held: %s; lease.json %s; %d token calls", after, raw, fake.Stats().RefreshCalls-before.RefreshCalls)
	}
	if n != 1 || inPool != 1 {
		t.Errorf("%d refreshers and %d pooled sources after the reload, want 1 and 1", n, inPool)
	}

	// The other instance releases its lease: the new source refreshes.
	releasePlanted(t, cfg.StorageDir)
	waitFor(t, 10*time.Second, "a 200 once the lease is released", func() bool { return timedGet(t, site).status == http.StatusOK })
	if st := fake.Stats(); st.RefreshCalls != before.RefreshCalls+1 || st.InvalidGrant != 0 {
		t.Errorf("token calls %d (want 1), invalid_grant %d", st.RefreshCalls-before.RefreshCalls, st.InvalidGrant)
	}
}

// revokeGrant revokes a refresh token at the fake (RFC 7009): the whole
// pair dies, so its access token is rejected upstream and its refresh
// token gets invalid_grant.
func revokeGrant(t *testing.T, fake *fakerestream.Server, refreshToken string) {
	t.Helper()
	form := url.Values{"token": {refreshToken}, "token_type_hint": {"refresh_token"}}
	req, _ := http.NewRequest(http.MethodPost, fake.URL()+"/oauth/revoke", strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth("test-client", "test-secret")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("revoke: %d", resp.StatusCode)
	}
}

// Item 13, terminal: the grant is revoked, so the upstream answers 401 and
// the refresh that follows gets invalid_grant. The request that met the
// 401 gets 503 reauth_required, not the upstream's 401; from then on the
// rejected token is never sent again: every request gets 503
// reauth_required at once, without reaching the upstream.
func TestItem13RejectedAndDeadChainAnswers503(t *testing.T) {
	fake := newFake(t, fakerestream.Options{Logf: quiet})
	cfg := siteConfig{Port: freePort(t), AdminPort: freePort(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(), Extra: "timeout 2s"}
	runInProcess(t, cfg.Caddyfile())
	site := "http://127.0.0.1:" + itoa(cfg.Port) + "/v2/user/profile"
	if got := timedGet(t, site); got.status != http.StatusOK {
		t.Fatalf("warm-up: %s", got)
	}
	rec, err := tokensource.LoadRecord(context.Background(), &certmagic.FileStorage{Path: cfg.StorageDir}, "default")
	if err != nil || rec == nil {
		t.Fatalf("stored record: %v", err)
	}
	revokeGrant(t, fake, rec.RefreshToken)
	before := fake.Stats()

	first := timedGet(t, site)
	if !first.is503("reauth_required") || !strings.Contains(string(first.body), "re-authorize") {
		t.Fatalf("the request whose token was rejected, after a terminal refresh: %s, want 503 reauth_required", first)
	}
	const n = 20
	var slowest time.Duration
	for range n {
		got := timedGet(t, site)
		slowest = max(slowest, got.took)
		if !got.is503("reauth_required") {
			t.Fatalf("after the chain was declared dead: %s, want 503 reauth_required", got)
		}
	}
	st := fake.Stats()
	t.Logf("item 13 (terminal): first answer %s; %d more answers 503 reauth_required, slowest %s; fake: upstream 401s %d, token calls %d, invalid_grant %d",
		first, n, slowest.Round(time.Millisecond), st.API401-before.API401, st.RefreshCalls-before.RefreshCalls, st.InvalidGrant)
	if slowest > 500*time.Millisecond {
		t.Errorf("an answer took %s: reauth_required should come at once", slowest)
	}
	if st.API401-before.API401 != 1 || st.RefreshCalls-before.RefreshCalls != 1 || st.InvalidGrant != 1 {
		t.Errorf("fake: upstream 401s %d, token calls %d, invalid_grant %d; want 1, 1, 1 (the rejected token and the dead refresh token each sent once)",
			st.API401-before.API401, st.RefreshCalls-before.RefreshCalls, st.InvalidGrant)
	}
	if s := adminStatus(t, fmt.Sprintf("http://127.0.0.1:%d", cfg.AdminPort))["default"]; s.State != "reauth_required" {
		t.Errorf("admin status: %+v", s)
	}
}

// Item 13, transient: the access token is revoked (the grant stays valid)
// and the token endpoint answers 500 during the refresh that the 401
// forces. The client gets 503 with Retry-After, not the upstream's 401;
// once the endpoint works again, 200.
func TestItem13RejectedAndFailedRefreshAnswers503(t *testing.T) {
	fake := newFake(t, fakerestream.Options{Logf: quiet})
	cfg := siteConfig{Port: freePort(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(), Extra: "timeout 2s"}
	runInProcess(t, cfg.Caddyfile())
	site := "http://127.0.0.1:" + itoa(cfg.Port) + "/v2/user/profile"
	if got := timedGet(t, site); got.status != http.StatusOK {
		t.Fatalf("warm-up: %s", got)
	}
	fake.RevokeAccessTokens()
	fake.SetFault(fakerestream.Fault500)
	before := fake.Stats()
	var answers []string
	for range 5 {
		got := timedGet(t, site)
		answers = append(answers, got.key())
		if !got.is503("temporarily_unavailable") || !strings.Contains(string(got.body), "500") || got.took > 3*time.Second {
			t.Fatalf("after a 401 and a failed refresh: %s, want 503 temporarily_unavailable naming the 500, with Retry-After", got)
		}
		time.Sleep(300 * time.Millisecond)
	}
	during := fake.Stats()
	fake.SetFault(fakerestream.FaultNone)
	cleared := time.Now()
	waitFor(t, 10*time.Second, "a 200 once the endpoint works", func() bool { return timedGet(t, site).status == http.StatusOK })
	st := fake.Stats()
	t.Logf("item 13 (transient): answers during the fault %v; token calls during it %d; 200 %s after it cleared; invalid_grant %d",
		answers, during.RefreshCalls-before.RefreshCalls, time.Since(cleared).Round(time.Millisecond), st.InvalidGrant)
	if during.RefreshCalls == before.RefreshCalls || st.InvalidGrant != 0 {
		t.Errorf("token calls during the fault %d (want some), invalid_grant %d", during.RefreshCalls-before.RefreshCalls, st.InvalidGrant)
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
	if err := pa.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-pa.exited
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
