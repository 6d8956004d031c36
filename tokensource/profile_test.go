package tokensource

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
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
