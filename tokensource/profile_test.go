package tokensource

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
)

var (
	alice = fakerestream.User{ID: 4242, Username: "alice", Email: "alice@example.com"}
	bob   = fakerestream.User{ID: 77, Username: "bob"}
)

func wantUser(t *testing.T, what string, got *User, want fakerestream.User) {
	t.Helper()
	if got == nil || got.ID != itoa64(want.ID) || got.Username != want.Username {
		t.Fatalf("%s: user %+v, want id %d username %q", what, got, want.ID, want.Username)
	}
}

func itoa64(n int64) string { b, _ := json.Marshal(n); return string(b) }

// withProfile turns the profile read on, as caddymodule does.
func withProfile(cfg Config) Config {
	cfg.ProfileURL = ProfileURLFor(cfg.TokenURL)
	return cfg
}

// userStored signals each stored record of the account that carries a user,
// with the round in progress at that moment in the Source set in src
// (closed when that round ends).
func (e *testEnv) userStored() (signal <-chan *round, src *atomic.Pointer[Source]) {
	ch := make(chan *round, 8)
	src = new(atomic.Pointer[Source])
	e.st.setOnStore(func(key string, value []byte) error {
		var rec Record
		if key == RecordKey(testAccount) && json.Unmarshal(value, &rec) == nil && rec.User != nil {
			var r *round
			if s := src.Load(); s != nil {
				r = s.rounds.Load()
			}
			ch <- r
		}
		return nil
	})
	return ch, src
}

func TestProfileURLFor(t *testing.T) {
	for in, want := range map[string]string{
		"https://api.restream.io/oauth/token":        "https://api.restream.io/v2/user/profile",
		"http://127.0.0.1:8123/oauth/token?x=1#frag": "http://127.0.0.1:8123/v2/user/profile",
		"https://user:pw@api.example:444/a/b/token":  "https://api.example:444/v2/user/profile",
		"/oauth/token": "",
		"":             "",
		"::not a url":  "",
	} {
		if got := ProfileURLFor(in); got != want {
			t.Errorf("ProfileURLFor(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestParseProfile(t *testing.T) {
	for _, tc := range []struct {
		body string
		want *User
		err  string
	}{
		{`{"id":1001,"username":"fake-streamer","email":"x@example.com"}`, &User{ID: "1001", Username: "fake-streamer"}, ""},
		{`{"id":"1001","username":"quoted-id"}`, &User{ID: "1001", Username: "quoted-id"}, ""},
		{`{"id":98765432101234}`, &User{ID: "98765432101234"}, ""},
		{`{"id":7,"username":42}`, &User{ID: "7"}, ""},
		{`{"id":7,"username":"line\nbreak\u0000"}`, &User{ID: "7", Username: "line break "}, ""},
		{`{"id":0}`, nil, "no usable id"},
		{`{"id":-3}`, nil, "no usable id"},
		{`{"id":1.5}`, nil, "no usable id"},
		{`{"id":1e3}`, nil, "no usable id"},
		{`{"id":"abc"}`, nil, "no usable id"},
		{`{"id":null}`, nil, "no usable id"},
		{`{"username":"no id"}`, nil, "no usable id"},
		{`[]`, nil, "not a profile: unexpected JSON"},
		{`<html>`, nil, "not a profile: an HTML page"},
		{``, nil, "not a profile: an empty body"},
	} {
		got, err := parseProfile([]byte(tc.body), "")
		switch {
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%s: error %v, want %q", tc.body, err, tc.err)
		case tc.err == "" && (err != nil || *got != *tc.want):
			t.Errorf("%s: %+v, %v, want %+v", tc.body, got, err, tc.want)
		}
	}
}

// ReadUser reads the token's user; every failure is an error that says what
// the endpoint did without quoting it or the token, and a redirect is not
// followed.
func TestReadUser(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{User: alice})
	s := env.source(t, withProfile(env.config("", "o")))
	at, _ := env.fake.SeedPair()
	u, err := s.ReadUser(context.Background(), at)
	if err != nil {
		t.Fatal(err)
	}
	wantUser(t, "profile", u, alice)

	var hits atomic.Int64
	target := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { hits.Add(1) }))
	t.Cleanup(target.Close)
	for _, tc := range []struct {
		name  string
		set   func()
		token string
		want  string
	}{
		{"missing scope", func() { env.fake.SetProfileFault(fakerestream.ProfileForbidden) }, at, "answered 403 insufficient_scope (does the Restream application have the profile read scope?)"},
		{"outage", func() { env.fake.SetProfileFault(fakerestream.Profile500) }, at, "answered 500 server_error"},
		{"not JSON", func() { env.fake.SetProfileFault(fakerestream.ProfileGarbage) }, at, "not a profile: an HTML page (text/html"},
		{"too large", func() { env.fake.SetProfileFault(fakerestream.ProfileHuge) }, at, "larger than 65536 bytes"},
		{"redirect", func() { env.fake.SetProfileRedirect(target.URL + "/steal") }, at, "answered 302, a redirect (not followed"},
		{"dead token", func() { env.fake.SetProfileFault(fakerestream.ProfileNone) }, "at_dead_token_0123456789", "answered 401 invalid_token"},
	} {
		tc.set()
		u, err := s.ReadUser(context.Background(), tc.token)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %+v, %v; want an error saying %q", tc.name, u, err, tc.want)
			continue
		}
		if strings.Contains(err.Error(), tc.token) || strings.Contains(err.Error(), "<html") {
			t.Errorf("%s: the error quotes the token or the body: %v", tc.name, err)
		}
	}
	if hits.Load() != 0 {
		t.Fatalf("the redirect target got %d requests: the access token left for another host", hits.Load())
	}
	env.fake.Close() // connection refused
	if _, err := s.ReadUser(context.Background(), at); err == nil || strings.Contains(err.Error(), at) || strings.Contains(err.Error(), "http://") {
		t.Fatalf("endpoint down: %v", err)
	}
	if _, err := env.source(t, env.config("", "no-profile")).ReadUser(context.Background(), at); err == nil {
		t.Fatal("ReadUser without a ProfileURL did not fail")
	}
}

// A seed records its user after its first exchange: the pair is stored
// first, then the user is written into the same generation (no version
// bump); later generations copy it without asking again.
func TestSeedRecordsUser(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{User: alice})
	signal, src := env.userStored()
	s := env.source(t, withProfile(env.config(env.fake.Seed(), "o")))
	src.Store(s)
	tok := mustToken(t, s)
	wantGeneration(t, tok, 1)
	<-waitSignal(t, "the user written", signal).done // the round that wrote it has ended
	rec := env.record(t)
	wantUser(t, "stored", rec.User, alice)
	if rec.Generation != 1 || rec.AccessToken != tok.AccessToken || rec.Chain != tok.Chain || rec.Cause != CauseSeed {
		t.Fatalf("the user write changed the record: gen %d cause %q", rec.Generation, rec.Cause)
	}
	wantUser(t, "status", s.Status().User, alice)
	before := rec

	env.clk.Advance(time.Hour)
	rotated := mustToken(t, s)
	wantGeneration(t, rotated, 2)
	rec = env.record(t)
	wantUser(t, "next generation", rec.User, alice)
	if rec.Chain != before.Chain {
		t.Fatal("rotation changed the chain")
	}
	if n := env.fake.Stats().ProfileCalls; n != 1 {
		t.Fatalf("%d profile calls, want 1: a known user is not read again", n)
	}
	env.wantCalls(t, 2)
}

// A profile that cannot be read never blocks refreshing: the user stays
// unknown (logged once), and the next rotation tries again and records it.
func TestSeedUserUnknownRetriedAtRotation(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{User: alice})
	env.fake.SetProfileFault(fakerestream.ProfileForbidden)
	unknown := make(chan struct{}, 8)
	logger, logs := observedLogger(zapcore.DebugLevel, zap.Hooks(func(e zapcore.Entry) error {
		if strings.Contains(e.Message, "user of the token chain is unknown") {
			unknown <- struct{}{}
		}
		return nil
	}))
	signal, src := env.userStored()
	cfg := withProfile(env.config(env.fake.Seed(), "o"))
	cfg.Logger = logger
	s := env.source(t, cfg)
	src.Store(s)

	wantGeneration(t, mustToken(t, s), 1)
	waitSignal(t, "the unknown user logged", unknown)
	if rec := env.record(t); rec.User != nil || rec.Generation != 1 {
		t.Fatalf("stored %+v", rec)
	}
	if st := s.Status(); st.User != nil || st.State != StateOK {
		t.Fatalf("status %+v", st)
	}
	env.clk.Advance(time.Hour)
	wantGeneration(t, mustToken(t, s), 2)
	waitSignal(t, "the second failure logged", unknown)
	warned := logs.FilterMessageSnippet("user of the token chain is unknown").FilterLevelExact(zapcore.WarnLevel).Len()
	if warned != 1 {
		t.Fatalf("the unknown user was logged at WARN %d times, want once per chain", warned)
	}
	for _, e := range logs.All() {
		for _, f := range e.Context {
			if strings.Contains(f.String, "at_") || strings.Contains(f.String, "rt_") {
				t.Fatalf("a log line carries a token: %s %v", e.Message, f)
			}
		}
	}

	env.fake.SetProfileFault(fakerestream.ProfileNone)
	env.clk.Advance(time.Hour)
	wantGeneration(t, mustToken(t, s), 3)
	<-waitSignal(t, "the user written at the third generation", signal).done
	rec := env.record(t)
	wantUser(t, "third generation", rec.User, alice)
	if rec.Generation != 3 {
		t.Fatalf("generation %d", rec.Generation)
	}
	wantUser(t, "status", s.Status().User, alice)
	env.wantCalls(t, 3)
}

// `caddy restream-auth seed` (InstallSeed) records the new chain's user
// before it returns; a chain installed over it (InstallPair) brings its own
// user or none, never the replaced chain's.
func TestInstallRecordsOwnUser(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{User: alice})
	cli := env.source(t, withProfile(env.config("", "cli")))
	tok, err := cli.InstallSeed(context.Background(), env.fake.SeedFor(bob))
	if err != nil {
		t.Fatal(err)
	}
	rec := env.record(t)
	wantUser(t, "seeded", rec.User, bob)
	if rec.Generation != tok.Generation || rec.Chain != tok.Chain {
		t.Fatalf("the user write changed the version: %d %s", rec.Generation, rec.Chain)
	}
	wantUser(t, "status", cli.Status().User, bob)

	// A code exchanged without reading the profile: its user is unknown,
	// and the replaced chain's (bob) is not carried over.
	const redirect = "https://sidecar.example/restream/callback"
	pair, err := cli.ExchangeCode(context.Background(), env.fake.IssueCode(redirect), redirect)
	if err != nil {
		t.Fatal(err)
	}
	var seen *Record
	if _, err := cli.InstallPair(context.Background(), pair, func(stored *Record) error { seen = stored; return nil }); err != nil {
		t.Fatal(err)
	}
	if seen == nil || seen.Chain != rec.Chain || seen.User == nil {
		t.Fatalf("the check did not see the stored record: %+v", seen)
	}
	if got := env.record(t); got.User != nil || got.Chain == rec.Chain || got.Generation != rec.Generation+1 {
		t.Fatalf("installed %+v: a new chain took the old chain's user", got.User)
	}
	if st := cli.Status(); st.User != nil {
		t.Fatalf("status still shows the replaced chain's user %+v", st.User)
	}
}

// The chain's user is recorded under the refresh lease (recordUser, called
// before the lease is released): its compare-and-set checks only the
// version, and under the lease nobody else writes that version. The tests
// below hold the profile read (profileGate) while another instance wants
// the lease, then let it answer, fail or hang.

// profileGate stands in front of the fake's profile endpoint and holds each
// request until the test answers it: forwarded to the fake, failed with a
// 500, or never (a hang, until the caller gives up).
type profileGate struct {
	url     string
	entered chan struct{}
	answer  chan bool // true: forward to the fake; false: answer 500
}

func newProfileGate(t *testing.T, fake *fakerestream.Server) *profileGate {
	t.Helper()
	upstream := ProfileURLFor(fake.TokenURL())
	g := &profileGate{entered: make(chan struct{}, 8), answer: make(chan bool, 8)}
	closing := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		g.entered <- struct{}{}
		select {
		case forward := <-g.answer:
			if !forward {
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusInternalServerError)
				_, _ = io.WriteString(w, `{"error":"server_error"}`)
				return
			}
			req, _ := http.NewRequestWithContext(r.Context(), http.MethodGet, upstream, nil)
			req.Header.Set("Authorization", r.Header.Get("Authorization"))
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				w.WriteHeader(http.StatusBadGateway)
				return
			}
			defer resp.Body.Close()
			w.Header().Set("Content-Type", resp.Header.Get("Content-Type"))
			w.WriteHeader(resp.StatusCode)
			_, _ = io.Copy(w, resp.Body)
		case <-r.Context().Done(): // the caller gave up
		case <-closing:
		}
	}))
	t.Cleanup(func() { close(closing); srv.Close() })
	g.url = srv.URL
	return g
}

// leaseWaits counts a Source's waits for another instance's lease.
type leaseWaits struct {
	nopObserver
	n atomic.Int64
}

func (w *leaseWaits) LockWaited(string, time.Duration) { w.n.Add(1) }

// recordingUser starts a source (owner "recorder") on a fresh seed of
// alice's, with its profile read behind gate, and returns once its first
// round reads the user: the pair is stored and published, and the round
// still holds the lease. roundEnded is closed when that round ends.
func recordingUser(t *testing.T, env *testEnv, gate *profileGate, timeout time.Duration) (recorder *Source, tok *Token, roundEnded <-chan struct{}) {
	t.Helper()
	cfg := env.config(env.fake.Seed(), "recorder")
	cfg.ProfileURL, cfg.Timeout = gate.url, timeout
	recorder = env.source(t, cfg)
	tok = mustToken(t, recorder)
	wantGeneration(t, tok, 1)
	waitSignal(t, "the recorder to read the profile", gate.entered)
	if l := env.lease(); l == nil || l.Owner != "recorder" {
		t.Errorf("the lease is not the recorder's while it records the chain's user: %+v", l)
	}
	return recorder, tok, recorder.rounds.Load().done
}

// A dead-token record written by another instance is never overwritten by
// the user's write, whatever the profile read does: the other instance
// waits for the lease (a spent seed in its configuration, about to be
// recorded as dead at the same generation), and the lease is released
// after the user is recorded or given up.
func TestUserRecordedUnderTheLease(t *testing.T) {
	t.Parallel()
	const spentSeed = "rt_spent_elsewhere_0123456789"
	recordedDead := func(t *testing.T, env *testEnv) bool {
		rec := env.record(t)
		return rec != nil && slices.Contains(rec.DeadTokens, Fingerprint(spentSeed))
	}
	for _, tc := range []struct {
		name    string
		timeout time.Duration // the recorder's Config.Timeout, which bounds its profile read
		profile func(t *testing.T, env *testEnv, gate *profileGate)
		user    bool // the user is recorded
	}{
		{name: "answers", timeout: 5 * time.Second, user: true,
			profile: func(_ *testing.T, _ *testEnv, gate *profileGate) { gate.answer <- true }},
		{name: "fails", timeout: 5 * time.Second,
			profile: func(_ *testing.T, _ *testEnv, gate *profileGate) { gate.answer <- false }},
		// Until the read's own timeout (real time: the fake clock does not
		// bound HTTP calls).
		{name: "hangs", timeout: time.Second,
			profile: func(*testing.T, *testEnv, *profileGate) {}},
		// Until the lease, as the recorder counts it on its own clock, has
		// lapsed and the other instance has taken it over and recorded its
		// spent seed; then it answers.
		{name: "hangs past the lease", timeout: 5 * time.Second,
			profile: func(t *testing.T, env *testEnv, gate *profileGate) {
				env.clk.Advance(5*time.Second + 2*StorageTimeout + leaseSlack) // the lease's TTL
				eventually(t, "the other instance to take the lapsed lease and record its spent seed",
					func() bool { return recordedDead(t, env) })
				gate.answer <- true
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			env := newTestEnv(t, fakerestream.Options{User: alice})
			gate := newProfileGate(t, env.fake)
			_, tok, recorderDone := recordingUser(t, env, gate, tc.timeout)

			// Another instance, configured with a seed spent elsewhere, wants
			// the lease: it would record that seed as dead at the same
			// generation.
			waits := &leaseWaits{}
			otherCfg := env.config(spentSeed, "other")
			otherCfg.Observer = waits
			other := env.source(t, otherCfg)
			other.Start()
			eventually(t, "the other instance's first attempt", func() bool {
				return waits.n.Load() > 0 || env.fake.Stats().InvalidGrant > 0
			})
			tc.profile(t, env, gate)
			waitSignal(t, "the recorder's round to end", recorderDone)
			env.waitLeaseReleased(t, "the lease to be released after the user is recorded")
			env.clk.Advance(leasePoll) // the other instance's next look at the lease
			// It sends its seed, records it as dead, releases the lease, and
			// then serves the stored chain.
			eventually(t, "the other instance to adopt the stored chain", func() bool { return other.Current() != nil })
			env.waitLeaseReleased(t, "the other instance to release the lease")

			rec := env.record(t)
			if rec.Generation != 1 || rec.Chain != tok.Chain || rec.AccessToken != tok.AccessToken {
				t.Fatalf("stored generation %d: the chain changed", rec.Generation)
			}
			if !slices.Contains(rec.DeadTokens, Fingerprint(spentSeed)) {
				t.Errorf("the spent seed the other instance recorded as dead is gone from the record: the user's write replaced it")
			}
			switch {
			case tc.user:
				wantUser(t, "stored", rec.User, alice)
			case rec.User != nil && rec.User.ID != itoa64(alice.ID):
				t.Fatalf("stored user %+v, want alice's or none", rec.User)
			}
			// A restart on the spent seed does not send it again (I6).
			mustToken(t, env.source(t, env.config(spentSeed, "restarted")))
			if st := env.fake.Stats(); st.InvalidGrant != 1 {
				t.Fatalf("the spent seed was sent %d times", st.InvalidGrant)
			}
		})
	}
}

// A generation stored while the user is read is never replaced by the
// user's write: the instance that rotates waits for the lease, so its
// rotation carries the user on.
func TestUserNeverWrittenOverNewerGeneration(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{User: alice})
	gate := newProfileGate(t, env.fake)
	_, tok, recorderDone := recordingUser(t, env, gate, 5*time.Second)

	// An upstream rejects generation 1 at another instance: it rotates.
	waits := &leaseWaits{}
	otherCfg := env.config("", "other")
	otherCfg.Observer = waits
	other := env.source(t, otherCfg)
	newer := make(chan *Token, 1)
	go func() {
		tok, _, err := other.TokenNewerThan(context.Background(), tok)
		if err != nil {
			t.Errorf("TokenNewerThan: %v", err)
		}
		newer <- tok
	}()
	eventually(t, "the other instance to want the lease", func() bool {
		return waits.n.Load() > 0 || env.fake.Stats().RefreshCalls > 1
	})
	gate.answer <- true
	waitSignal(t, "the recorder's round to end", recorderDone)
	env.waitLeaseReleased(t, "the lease to be released after the user is recorded")
	env.clk.Advance(leasePoll) // the other instance's next look at the lease
	rotated := waitSignal(t, "the other instance's rotation", newer)
	wantGeneration(t, rotated, 2)
	env.waitLeaseReleased(t, "the other instance to release the lease")

	rec := env.record(t)
	if rec.Generation != 2 || rec.AccessToken != rotated.AccessToken || rec.Chain != tok.Chain {
		t.Fatalf("stored generation %d: the rotation was replaced", rec.Generation)
	}
	wantUser(t, "rotated", rec.User, alice)
	env.wantCalls(t, 2)
}

// A chain installed while the user of the chain before it is read gets its
// own user, never the one being read: the install waits for the lease, and
// the new chain's first rotation reads its own user.
func TestUserNeverCopiedAcrossChains(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{User: alice})
	gate := newProfileGate(t, env.fake)
	recorder, tok, recorderDone := recordingUser(t, env, gate, 5*time.Second)

	// Bob authorizes in the browser: his pair is installed as a new chain,
	// without a user read at the login.
	const redirect = "https://sidecar.example/restream/callback"
	login := env.source(t, env.config("", "login"))
	pair, err := login.ExchangeCode(context.Background(), env.fake.IssueCodeFor(redirect, bob), redirect)
	if err != nil {
		t.Fatal(err)
	}
	installed := make(chan error, 1)
	go func() {
		_, err := login.InstallPair(context.Background(), pair)
		installed <- err
	}()
	env.clk.waitForWaiter(t, env.clk.Now().Add(leasePoll)) // the install waits for the lease
	gate.answer <- true
	waitSignal(t, "the recorder's round to end", recorderDone)
	env.waitLeaseReleased(t, "the lease to be released after the user is recorded")
	env.clk.Advance(leasePoll)
	if err := waitSignal(t, "the install", installed); err != nil {
		t.Fatal(err)
	}
	rec := env.record(t)
	if rec.Chain == tok.Chain || rec.Generation != 2 || rec.User != nil {
		t.Fatalf("installed generation %d, user %+v: want a new chain without the old chain's user", rec.Generation, rec.User)
	}

	// The recorder rotates the new chain and reads its user: bob.
	env.clk.Advance(time.Hour)
	wantGeneration(t, mustToken(t, recorder), 3)
	waitSignal(t, "the recorder to read the new chain's profile", gate.entered)
	roundEnded := recorder.rounds.Load().done
	gate.answer <- true
	<-roundEnded
	env.waitLeaseReleased(t, "the lease to be released after the new chain's user is recorded")
	rec = env.record(t)
	wantUser(t, "new chain", rec.User, bob)
	wantUser(t, "status", recorder.Status().User, bob)
}
