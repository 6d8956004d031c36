package caddymodule_test

import (
	"bytes"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// Tests of `caddy restream-auth seed`, run from the built binary.

func TestCommandSeedInstallsChains(t *testing.T) {
	t.Parallel()
	fake := newFake(t, fakerestream.Options{})
	storage := t.TempDir()
	env := newCmdEnv(t)
	cfgPath := writeCmdConfig(t, cmdCaddyfile(t, storage, fake, cmdAccount{}))

	// A fresh seed starts generation 1.
	seed1 := fake.Seed()
	res := runCmd(t, env, seed1+"\n", "restream-auth", "seed", "--config", cfgPath, "--adapter", "caddyfile")
	t.Logf("seed:\n%s", res)
	if res.code != 0 {
		t.Fatalf("seed: %s", res)
	}
	rec := loadCmdRecord(t, storage, "default")
	if rec == nil || rec.Generation != 1 || !slices.Contains(rec.ConsumedSeeds, tokensource.Fingerprint(seed1)) {
		t.Fatalf("stored record after the first seed: %+v", rec)
	}
	if !strings.Contains(res.stdout, "generation      1") || !strings.Contains(res.stdout, rec.Chain) {
		t.Errorf("stdout does not report generation 1 and chain %s:\n%s", rec.Chain, res.stdout)
	}
	if st := fake.Stats(); st.RefreshCalls != 1 || st.InvalidGrant != 0 {
		t.Errorf("fake saw %d refresh calls, %d invalid_grant; want 1, 0", st.RefreshCalls, st.InvalidGrant)
	}
	if !fake.ValidAccessToken(rec.AccessToken) {
		t.Error("the stored access token is not valid at the fake")
	}
	noRestreamAuthUnder(t, env.home)

	// Another seed starts a new chain as the next generation.
	seed2 := fake.Seed()
	res = runCmd(t, env, seed2, "restream-auth", "seed", "--config", cfgPath)
	if res.code != 0 {
		t.Fatalf("second seed: %s", res)
	}
	rec2 := loadCmdRecord(t, storage, "default")
	if rec2.Generation != 2 || rec2.Chain == rec.Chain ||
		!slices.Contains(rec2.ConsumedSeeds, tokensource.Fingerprint(seed1)) ||
		!slices.Contains(rec2.ConsumedSeeds, tokensource.Fingerprint(seed2)) {
		t.Fatalf("stored record after the second seed: generation %d chain %s (first chain %s), %d consumed seeds",
			rec2.Generation, rec2.Chain, rec.Chain, len(rec2.ConsumedSeeds))
	}

	// A spent seed: invalid_grant, and storage is untouched.
	before := recordBytes(t, storage, "default")
	res = runCmd(t, env, seed1+"\n", "restream-auth", "seed", "--config", cfgPath)
	t.Logf("seed with a spent token:\n%s", res)
	if res.code != 1 || !strings.Contains(res.errText(), "invalid_grant") || !strings.Contains(res.errText(), "nothing was stored") {
		t.Fatalf("seed with a spent token: want exit 1 and an invalid_grant message: %s", res)
	}
	if after := recordBytes(t, storage, "default"); !bytes.Equal(before, after) {
		t.Error("a refused seed changed the stored record")
	}
	if st := fake.Stats(); st.RefreshCalls != 3 || st.InvalidGrant != 1 {
		t.Errorf("fake saw %d refresh calls, %d invalid_grant; want 3, 1", st.RefreshCalls, st.InvalidGrant)
	}
	noRestreamAuthUnder(t, env.home)
	mustContainNone(t, "seed output", res.stdout+res.stderr, fake.IssuedTokens()...)
}

func TestCommandSeedRefusals(t *testing.T) {
	t.Parallel()
	fake := newFake(t, fakerestream.Options{})
	storage := t.TempDir()
	env := newCmdEnv(t)
	cfgPath := writeCmdConfig(t, cmdCaddyfile(t, storage, fake, cmdAccount{}, cmdAccount{Name: "other"}))
	seed := fake.Seed()
	for _, tc := range []struct {
		name, stdin string
		args        []string
		want        string
	}{
		{"unknown account", seed, []string{"--account", "nope"}, `account "nope" is not configured: the config's restream_auth accounts are "default", "other"`},
		{"empty stdin", " \n\t\n", nil, "the refresh token on stdin is empty"},
		{"two lines", seed + "\n" + seed + "\n", nil, "more than one line"},
		{"inner space", "rt_a rt_b", nil, "contains spaces"},
		{"config on stdin", seed, []string{"--config", "-"}, "--config -"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"restream-auth", "seed", "--config", cfgPath}, tc.args...)
			res := runCmd(t, env, tc.stdin, args...)
			if res.code != 1 || !strings.Contains(res.errText(), tc.want) {
				t.Errorf("want exit 1 and %q: %s", tc.want, res)
			}
			mustContainNone(t, "output", res.stdout+res.stderr, seed)
		})
	}
	if st := fake.Stats(); st.RefreshCalls != 0 {
		t.Errorf("refused seeds reached the token endpoint %d times", st.RefreshCalls)
	}
	if b := recordBytes(t, storage, "default"); b != nil {
		t.Errorf("a refused seed stored a record: %d bytes", len(b))
	}
	// The seed is still good.
	if res := runCmd(t, env, seed, "restream-auth", "seed", "--config", cfgPath); res.code != 0 {
		t.Fatalf("seed after the refusals: %s", res)
	}
}

func TestCommandSeedResolvesEnvPlaceholder(t *testing.T) {
	t.Parallel()
	fake := newFake(t, fakerestream.Options{})
	storage := t.TempDir()
	cfgPath := writeCmdConfig(t, cmdCaddyfile(t, storage, fake, cmdAccount{ClientSecret: "{env.RESTREAM_TEST_SECRET}"}))
	seed := fake.Seed()

	// Unset: a clear error, before the token endpoint is called.
	res := runCmd(t, newCmdEnv(t), seed, "restream-auth", "seed", "--config", cfgPath)
	if res.code != 1 || !strings.Contains(res.errText(), "client_secret") || !strings.Contains(res.errText(), "{env.RESTREAM_TEST_SECRET}") {
		t.Fatalf("seed without RESTREAM_TEST_SECRET: want exit 1 naming client_secret and the placeholder: %s", res)
	}
	if st := fake.Stats(); st.RefreshCalls != 0 {
		t.Fatalf("an unresolved secret reached the token endpoint %d times", st.RefreshCalls)
	}

	// Set: resolved from the environment.
	res = runCmd(t, newCmdEnv(t, "RESTREAM_TEST_SECRET=test-secret"), seed, "restream-auth", "seed", "--config", cfgPath)
	if res.code != 0 {
		t.Fatalf("seed with RESTREAM_TEST_SECRET: %s", res)
	}
	if rec := loadCmdRecord(t, storage, "default"); rec == nil || rec.Generation != 1 {
		t.Fatalf("stored record: %+v", rec)
	}
	mustContainNone(t, "seed output", res.stdout+res.stderr, "test-secret")
}

// TestCommandSeedDefaultStorage: without a storage option, the command uses
// Caddy's default storage, in the data directory of its environment.
func TestCommandSeedDefaultStorage(t *testing.T) {
	t.Parallel()
	fake := newFake(t, fakerestream.Options{})
	env := newCmdEnv(t)
	cfgPath := writeCmdConfig(t, cmdCaddyfile(t, "", fake, cmdAccount{Name: "acct"}))
	res := runCmd(t, env, fake.Seed(), "restream-auth", "seed", "--config", cfgPath, "--account", "acct")
	if res.code != 0 {
		t.Fatalf("seed: %s", res)
	}
	dataDir := filepath.Join(env.home, "caddy") // $XDG_DATA_HOME/caddy
	if rec := loadCmdRecord(t, dataDir, "acct"); rec == nil || rec.Generation != 1 {
		t.Fatalf("no generation 1 record in the default storage %s: %+v\n%s", dataDir, rec, res)
	}
	res = runCmd(t, env, "", "restream-auth", "status", "--config", cfgPath)
	if res.code != 0 || !strings.Contains(res.stdout, "FileStorage:"+dataDir) {
		t.Errorf("status on the default storage: %s", res)
	}
}

// TestCommandSeedRunningInstanceAdopts: a running instance without a chain
// answers 503 no_chain, and serves as soon as the command seeds its storage,
// without a restart or reload.
func TestCommandSeedRunningInstanceAdopts(t *testing.T) {
	t.Parallel()
	fake := newFake(t, fakerestream.Options{})
	cfg := siteConfig{Port: freePort(t), StorageDir: t.TempDir(), Fake: fake}
	p := startProcess(t, cfg.Caddyfile())
	base := "http://127.0.0.1:" + itoa(cfg.Port)
	waitReady(t, base+"/v2/user/profile", p)

	waitFor(t, 10*time.Second, "503 no_chain", func() bool {
		status, body, _ := do(t, http.MethodGet, base+"/v2/user/profile", nil, nil)
		return status == http.StatusServiceUnavailable && strings.Contains(string(body), `"error":"no_chain"`)
	})

	res := runCmd(t, newCmdEnv(t), fake.Seed(), "restream-auth", "seed", "--config", writeCmdConfig(t, cfg.Caddyfile()))
	if res.code != 0 {
		t.Fatalf("seed: %s", res)
	}
	seededAt := time.Now()
	waitFor(t, 15*time.Second, "requests to pass after the seed", func() bool {
		status, _, _ := do(t, http.MethodGet, base+"/v2/user/profile", nil, nil)
		return status == http.StatusOK
	})
	t.Logf("requests pass %s after the seed", time.Since(seededAt).Round(time.Millisecond))
	for range 5 {
		status, body, _ := do(t, http.MethodGet, base+"/v2/user/profile", nil, nil)
		if status != http.StatusOK {
			t.Fatalf("after adoption: %d %s", status, body)
		}
		if e := decodeEcho(t, body); !fake.ValidAccessToken(strings.TrimPrefix(e.Authorization, "Bearer ")) {
			t.Fatalf("upstream saw an invalid token")
		}
	}
	// The instance adopted the stored pair: only the command called the endpoint.
	if st := fake.Stats(); st.RefreshCalls != 1 || st.InvalidGrant != 0 {
		t.Errorf("fake saw %d refresh calls and %d invalid_grant; want 1 and 0", st.RefreshCalls, st.InvalidGrant)
	}
	mustContainNone(t, "caddy output", p.Output(), fake.IssuedTokens()...)
}

// `caddy restream-auth seed` records the new chain's user before it exits.
func TestCommandSeedRecordsRestreamUser(t *testing.T) {
	t.Parallel()
	fake := newFake(t, fakerestream.Options{User: fakerestream.User{ID: 77, Username: "bob"}})
	storage := t.TempDir()
	cfgPath := writeCmdConfig(t, cmdCaddyfile(t, storage, fake, cmdAccount{}))
	res := runCmd(t, newCmdEnv(t), fake.Seed(), "restream-auth", "seed", "--config", cfgPath)
	if res.code != 0 {
		t.Fatalf("seed: %s", res)
	}
	rec := loadCmdRecord(t, storage, "default")
	if rec == nil || rec.Generation != 1 || rec.User == nil || rec.User.ID != "77" || rec.User.Username != "bob" {
		t.Fatalf("stored after the seed command: %v", rec != nil && rec.User != nil)
	}
	mustContainNone(t, "seed output", res.stdout+res.stderr, fake.IssuedTokens()...)
}
