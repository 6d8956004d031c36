package tokensource

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
)

// Onboarding: a code exchanged and installed by one Source becomes the
// chain of another one stuck on a dead seed, at its next request, without
// a restart and without resending the dead seed.
func TestInstallPairRevivesDeadAccount(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	running := env.source(t, env.config("rt_never_issued_by_restream", "running"))
	if _, err := running.Token(context.Background()); !IsTerminal(err) {
		t.Fatalf("dead seed: %v", err)
	}
	login := env.source(t, env.config("", "login"))
	const redirect = "https://sidecar.example/restream/callback"
	rec, err := login.ExchangeCode(context.Background(), env.fake.IssueCode(redirect), redirect)
	if err != nil {
		t.Fatal(err)
	}
	installed, err := login.InstallPair(context.Background(), rec)
	if err != nil {
		t.Fatal(err)
	}
	wantGeneration(t, installed, 1)
	stored := env.record(t)
	if stored.Chain == "" || stored.Chain != installed.Chain {
		t.Fatalf("stored %+v", stored)
	}
	env.clk.Advance(recheckInterval)
	tok, err := running.Token(context.Background())
	if err != nil || tok.AccessToken != installed.AccessToken {
		t.Fatalf("running source did not pick the installed chain up: %v", err)
	}
	// The token is published inside the round that adopts it; the round
	// clears the reauth_required verdict when it ends.
	eventually(t, "state ok after adopting the installed chain", func() bool { return running.Status().State == StateOK })
	if fakeStats := env.fake.Stats(); fakeStats.RefreshCalls != 1 || fakeStats.InvalidGrant != 1 || fakeStats.CodeCalls != 1 {
		t.Fatalf("fake stats %+v", fakeStats)
	}
	// The installed chain rotates normally.
	env.clk.Advance(time.Hour)
	rotated := mustToken(t, running)
	wantGeneration(t, rotated, 2)
	if rotated.Chain != installed.Chain {
		t.Fatal("rotation changed the chain")
	}
}

// The CLI path: a refresh token from elsewhere becomes a new chain over a
// live one, whose generations go on growing.
func TestInstallSeedReplacesChain(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	s := env.seededSource(t, "o")
	first := mustToken(t, s)
	env.clk.runRealtime(t) // the install polls s's lease on the clock until s releases it
	cli := env.source(t, env.config("", "cli"))
	seed := env.fake.Seed()
	tok, err := cli.InstallSeed(context.Background(), seed)
	if err != nil {
		t.Fatal(err)
	}
	wantGeneration(t, tok, 2)
	if tok.Chain == first.Chain {
		t.Fatal("a new seed did not start a new chain")
	}
	if rec := env.record(t); !slices.Contains(rec.ConsumedSeeds, Fingerprint(seed)) || rec.Generation != 2 {
		t.Fatalf("stored %+v", rec)
	}
	// The running source refreshes the new chain, not its own.
	env.clk.Advance(time.Hour)
	got := mustToken(t, s)
	if got.Chain != tok.Chain {
		t.Fatalf("running source kept the old chain (gen %d)", got.Generation)
	}
	env.wantCalls(t, 3)
}

// An install check that refuses leaves storage as it was and returns its
// error; the pair it was handed is not published.
func TestInstallCheckRefuses(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{User: alice})
	s := env.source(t, withProfile(env.config(env.fake.Seed(), "o")))
	first := mustToken(t, s)
	env.clk.runRealtime(t) // the install polls the lease on the clock
	before := env.record(t)
	const redirect = "https://sidecar.example/restream/callback"
	login := env.source(t, env.config("", "login"))
	pair, err := login.ExchangeCode(context.Background(), env.fake.IssueCodeFor(redirect, bob), redirect)
	if err != nil {
		t.Fatal(err)
	}
	pair.User = &User{ID: "77", Username: "bob"}
	refuse := errors.New("another account")
	_, err = s.InstallPair(context.Background(), pair, func(stored *Record) error {
		if stored == nil || stored.Chain != first.Chain {
			t.Errorf("check saw %+v", stored)
		}
		return refuse
	})
	if !errors.Is(err, refuse) {
		t.Fatalf("InstallPair: %v, want the check's error", err)
	}
	after := env.record(t)
	if after.Chain != before.Chain || after.Generation != before.Generation || after.AccessToken != before.AccessToken {
		t.Fatal("a refused install changed the stored record")
	}
	if cur := s.Current(); cur.Chain != first.Chain {
		t.Fatal("a refused install published its pair")
	}
	// Accepted, the pair is installed with the user it brought.
	if _, err := s.InstallPair(context.Background(), pair); err != nil {
		t.Fatal(err)
	}
	got := env.record(t)
	wantUser(t, "installed", got.User, bob)
	wantUser(t, "status", s.Status().User, bob)
}
