package caddymodule_test

import (
	"context"
	"encoding/json"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/redistest"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource/redisstore"
)

// Tests of `caddy restream-auth status|seed|encrypt` on a config whose
// accounts live in Redis, run from the built binary against a real,
// password-protected redis-server, the password written in the Caddyfile.

// cmdRun runs restream-auth subcommands in env and keeps everything they
// print, to check no secret ever appears in it.
type cmdRun struct {
	t   *testing.T
	env cmdEnv
	out strings.Builder
}

func (r *cmdRun) run(stdin string, args ...string) cmdResult {
	r.t.Helper()
	res := runCmd(r.t, r.env, stdin, append([]string{"restream-auth"}, args...)...)
	r.out.WriteString(res.stdout + res.stderr)
	return res
}

// loadRedisRecord reads an account's record from Redis, decrypted with kr.
func loadRedisRecord(t *testing.T, srv *redistest.Server, account string, kr *tokensource.Keyring) *tokensource.Record {
	t.Helper()
	opt, err := redisstore.ParseURL(srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	c := redisstore.NewClient(opt)
	defer c.Close()
	s, err := redisstore.New(c, account, redisstore.Options{Keyring: kr, WatchInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rec, err := s.Load(ctx)
	if err != nil {
		t.Fatalf("loading the record of %q from Redis: %v", account, err)
	}
	return rec
}

func redisKey(account, name string) string {
	return redisstore.DefaultKeyPrefix + "{" + account + "}/" + name
}

// seed installs a chain in Redis that a running Caddy on the same Redis
// adopts; status shows its generation, user, lease and mark from Redis.
func TestCommandRedisSeedStatusAdopt(t *testing.T) {
	t.Parallel()
	const password = "cli-redis-pw-6d1f0b"
	srv := redistest.Start(t, redistest.Options{Password: password})
	fake := newFake(t, fakerestream.Options{})
	storage := t.TempDir()
	cmd := &cmdRun{t: t, env: newCmdEnv(t)}
	cfg := siteConfig{Port: freePort(t), StorageDir: storage, Fake: fake, Global: redisGlobal(srv.URL())}
	cfgPath := writeCmdConfig(t, cfg.Caddyfile())
	place := "redis " + srv.Addr() + " db 0"

	p := startProcess(t, cfg.Caddyfile())
	base := "http://127.0.0.1:" + itoa(cfg.Port)
	waitReady(t, base+"/v2/user/profile", p)
	waitFor(t, 10*time.Second, "503 no_chain", func() bool {
		status, body, _ := do(t, http.MethodGet, base+"/v2/user/profile", nil, nil)
		return status == http.StatusServiceUnavailable && strings.Contains(string(body), `"error":"no_chain"`)
	})

	res := cmd.run("", "status", "--config", cfgPath)
	t.Logf("status before seed:\n%s", res)
	if res.code != 1 {
		t.Errorf("status without a chain: exit %d, want 1", res.code)
	}
	for _, want := range []string{"storage: " + place + ", key prefix restream_auth/", `account "default": no_chain`,
		"nothing stored at restream_auth/{default}/record"} {
		if !strings.Contains(res.stdout, want) {
			t.Errorf("status before seed lacks %q", want)
		}
	}

	res = cmd.run(fake.Seed(), "seed", "--config", cfgPath)
	t.Logf("seed:\n%s", res)
	if res.code != 0 || !strings.Contains(res.stdout, "installed a new token chain in "+place+", keys restream_auth/{default}/") {
		t.Fatalf("seed: %s", res)
	}
	rec := loadRedisRecord(t, srv, "default", nil)
	if rec == nil || rec.Generation != 1 || redisGeneration(srv, "default") != 1 {
		t.Fatalf("Redis after the seed: %+v", rec)
	}
	if b := recordBytes(t, storage, "default"); b != nil {
		t.Fatalf("the seed wrote to Caddy storage: %d bytes", len(b))
	}

	waitFor(t, 15*time.Second, "the running instance to adopt the seeded chain", func() bool {
		status, _, _ := do(t, http.MethodGet, base+"/v2/user/profile", nil, nil)
		return status == http.StatusOK
	})
	if st := fake.Stats(); st.RefreshCalls != 1 || st.InvalidGrant != 0 {
		t.Errorf("fake saw %d refresh calls and %d invalid_grant; want 1 (the seed) and 0", st.RefreshCalls, st.InvalidGrant)
	}

	res = cmd.run("", "status", "--config", cfgPath)
	t.Logf("status after seed:\n%s", res)
	for _, want := range []string{`account "default": ok\n`, `generation\s+1\n`, `chain\s+` + rec.Chain + `\n`,
		`user\s+fake-streamer \(id 1001\)\n`, `consumed seeds\s+1\n`, `lease\s+free\n`} {
		if !regexp.MustCompile(want).MatchString(res.stdout) {
			t.Errorf("status after seed does not match %s", want)
		}
	}
	if res.code != 0 {
		t.Errorf("status after seed: exit %d, want 0", res.code)
	}

	// A lease as an instance holds it in the middle of a refresh: its
	// token with a PX expiry, and the stored refresh token marked.
	storedFP := tokensource.Fingerprint(rec.RefreshToken)
	srv.MustDo("SET", redisKey("default", "lease"), `{"owner":"instance-42","nonce":"n1","ttl_ms":60000}`, "PX", "60000")
	srv.MustDo("HSET", redisKey("default", "mark"), "mark", storedFP, "marked_by", "instance-42")
	res = cmd.run("", "status", "--config", cfgPath, "--json")
	t.Logf("status --json with a lease:\n%s", res)
	var st struct {
		Storage  string `json:"storage"`
		Accounts []struct {
			State      string `json:"state"`
			Key        string `json:"key"`
			Generation uint64 `json:"generation"`
			User       *struct {
				ID       string `json:"id"`
				Username string `json:"username"`
			} `json:"user"`
			Lease *struct {
				Owner            string    `json:"owner"`
				ExpiresAt        time.Time `json:"expires_at"`
				TTLMillis        int64     `json:"ttl_ms"`
				TTLLeftMillis    int64     `json:"ttl_left_ms"`
				Marked           bool      `json:"marked"`
				MarkedBy         string    `json:"marked_by"`
				MarksStoredToken bool      `json:"marks_stored_token"`
			} `json:"lease"`
		} `json:"accounts"`
	}
	if err := json.Unmarshal([]byte(res.stdout), &st); err != nil || len(st.Accounts) != 1 {
		t.Fatalf("status --json: %v\n%s", err, res)
	}
	a := st.Accounts[0]
	if a.State != "ok" || a.Key != "restream_auth/{default}/record" || a.Generation != 1 || a.User == nil || a.User.ID != "1001" ||
		!strings.HasPrefix(st.Storage, place) {
		t.Errorf("status --json: %+v (storage %q)", a, st.Storage)
	}
	if l := a.Lease; l == nil || l.Owner != "instance-42" || l.TTLMillis != 60000 || l.TTLLeftMillis <= 30000 || l.TTLLeftMillis > 60000 ||
		time.Until(l.ExpiresAt) <= 0 || !l.Marked || l.MarkedBy != "instance-42" || !l.MarksStoredToken {
		t.Errorf("status --json does not show the lease in Redis and its mark: %+v", a.Lease)
	}
	if strings.Contains(res.stdout, storedFP) {
		t.Error("status --json prints the mark's fingerprint")
	}
	res = cmd.run("", "status", "--config", cfgPath)
	for _, want := range []string{`lease\s+held by instance-42, Redis ends it in \d+(\.\d+)?s \(at \S+, TTL 1m0s\)\n`,
		`marked\s+the stored refresh token, by instance-42\n`, `account "default": ok\n`} {
		if !regexp.MustCompile(want).MatchString(res.stdout) {
			t.Errorf("status with a lease in Redis does not match %s:\n%s", want, res.stdout)
		}
	}

	// The lease gone with the stored token still marked: its sender
	// stopped before storing the answer, the token is in doubt.
	srv.MustDo("DEL", redisKey("default", "lease"))
	res = cmd.run("", "status", "--config", cfgPath)
	if res.code != 1 || !strings.Contains(res.stdout, `account "default": in_doubt`) || !regexp.MustCompile(`lease\s+free`).MatchString(res.stdout) ||
		!strings.Contains(res.stdout, "the stored refresh token, by instance-42") {
		t.Errorf("status with the stored token marked and no lease: %s", res)
	}
	srv.MustDo("DEL", redisKey("default", "mark"))

	mustContainNone(t, "command output", cmd.out.String(), append(fake.IssuedTokens(), password)...)
	mustContainNone(t, "caddy output", p.Output(), append(fake.IssuedTokens(), password)...)
}

// encrypt seals a plain record in Redis in place; a running Caddy with the
// key, which refused the plain record, adopts it without a refresh.
func TestCommandRedisEncryptSealsPlainRecord(t *testing.T) {
	t.Parallel()
	const password = "cli-redis-pw-encrypt-93a"
	srv := redistest.Start(t, redistest.Options{Password: password})
	fake := newFake(t, fakerestream.Options{})
	storage := t.TempDir()
	cmd := &cmdRun{t: t, env: newCmdEnv(t)}
	_, keyB64, kr := newTestKey(t)

	plain := siteConfig{Port: freePort(t), StorageDir: storage, Fake: fake, Global: redisGlobal(srv.URL())}
	plainPath := writeCmdConfig(t, plain.Caddyfile())
	if res := cmd.run(fake.Seed(), "seed", "--config", plainPath); res.code != 0 {
		t.Fatalf("seed: %s", res)
	}
	seeded := loadRedisRecord(t, srv, "default", nil)
	if data := redisField(srv, "default", "data"); !strings.Contains(data, seeded.RefreshToken) {
		t.Fatalf("the seeded record in Redis is not plain")
	}

	keyed := siteConfig{Port: freePort(t), StorageDir: storage, Fake: fake, Global: redisGlobal(srv.URL()), Extra: "encryption_key " + keyB64}
	keyedPath := writeCmdConfig(t, keyed.Caddyfile())
	p := startProcess(t, keyed.Caddyfile())
	base := "http://127.0.0.1:" + itoa(keyed.Port)
	waitReady(t, base+"/v2/user/profile", p)
	if status, body, _ := do(t, http.MethodGet, base+"/v2/user/profile", nil, nil); status != http.StatusServiceUnavailable {
		t.Fatalf("a plain record in Redis with encryption_key set: %d %s", status, body)
	}

	res := cmd.run("", "status", "--config", keyedPath)
	t.Logf("status before encrypt:\n%s", res)
	if res.code != 1 || !strings.Contains(res.stdout, `account "default": unreadable: unencrypted stored record restream_auth/{default}/record`) {
		t.Errorf("status with a plain record in Redis and a key: %s", res)
	}

	res = cmd.run("", "encrypt", "--config", keyedPath)
	t.Logf("encrypt:\n%s", res)
	if res.code != 0 || !strings.Contains(res.stdout, "sealed the record at restream_auth/{default}/record with key "+kr.KeyID()+
		" (it was not encrypted): generation 1, chain "+seeded.Chain) {
		t.Fatalf("encrypt: %s", res)
	}
	data := redisField(srv, "default", "data")
	mustContainNone(t, "the sealed record in Redis", data, fake.IssuedTokens()...)
	if !strings.Contains(data, `"aad":"account+key"`) {
		t.Errorf("not a current envelope: %s", data)
	}
	if rec := loadRedisRecord(t, srv, "default", kr); rec == nil || rec.Generation != seeded.Generation || rec.Chain != seeded.Chain ||
		rec.RefreshToken != seeded.RefreshToken {
		t.Fatalf("the sealed record: %+v", rec)
	}
	if b := recordBytes(t, storage, "default"); b != nil {
		t.Fatalf("encrypt wrote to Caddy storage: %d bytes", len(b))
	}
	if n := srv.MustDo("EXISTS", redisKey("default", "lease")); n != int64(0) {
		t.Error("encrypt left its lease in Redis")
	}

	waitFor(t, 15*time.Second, "the instance to serve the sealed chain", func() bool {
		status, _, _ := do(t, http.MethodGet, base+"/v2/user/profile", nil, nil)
		return status == http.StatusOK
	})
	if st := fake.Stats(); st.RefreshCalls != 1 || st.InvalidGrant != 0 {
		t.Errorf("fake saw %d refresh calls and %d invalid_grant; want 1 (the seed) and 0", st.RefreshCalls, st.InvalidGrant)
	}

	// Idempotent.
	res = cmd.run("", "encrypt", "--config", keyedPath)
	if res.code != 0 || !strings.Contains(res.stdout, "already encrypted with the current key "+kr.KeyID()) {
		t.Errorf("encrypt again: %s", res)
	}
	if redisField(srv, "default", "data") != data {
		t.Error("encrypt rewrote a record already sealed with the current key")
	}
	if res = cmd.run("", "status", "--config", keyedPath); res.code != 0 || !strings.Contains(res.stdout, `account "default": ok`) {
		t.Errorf("status after encrypt: %s", res)
	}
	mustContainNone(t, "command output", cmd.out.String(), append(fake.IssuedTokens(), password, keyB64)...)
	mustContainNone(t, "caddy output", p.Output(), append(fake.IssuedTokens(), password, keyB64)...)
}

// With a wrong Redis password, every command fails clearly, naming Redis's
// refusal and never a password; seed refuses before it reads the token.
func TestCommandRedisWrongPassword(t *testing.T) {
	t.Parallel()
	const right, wrong = "cli-right-pw-17ce", "cli-wrong-pw-2b90"
	srv := redistest.Start(t, redistest.Options{Password: right})
	fake := newFake(t, fakerestream.Options{})
	cmd := &cmdRun{t: t, env: newCmdEnv(t)}
	_, keyB64, _ := newTestKey(t)
	cfg := siteConfig{Port: freePort(t), StorageDir: t.TempDir(), Fake: fake, Extra: "encryption_key " + keyB64,
		Global: redisGlobal("redis://app:" + wrong + "@" + srv.Addr() + "/0")}
	cfgPath := writeCmdConfig(t, cfg.Caddyfile())

	res := cmd.run("", "status", "--config", cfgPath)
	t.Logf("status:\n%s", res)
	if res.code != 1 || !strings.Contains(res.stdout, `account "default": unreadable: reading restream_auth/{default}/record: WRONGPASS`) ||
		!regexp.MustCompile(`lease\s+unreadable: not read`).MatchString(res.stdout) {
		t.Errorf("status with a wrong password: %s", res)
	}
	seed := fake.Seed()
	res = cmd.run(seed, "seed", "--config", cfgPath)
	t.Logf("seed:\n%s", res)
	if res.code != 1 || !strings.Contains(res.errText(), "WRONGPASS") || !strings.Contains(res.errText(), "the refresh token was not read") {
		t.Errorf("seed with a wrong password: %s", res)
	}
	res = cmd.run("", "encrypt", "--config", cfgPath)
	t.Logf("encrypt:\n%s", res)
	if res.code != 1 || !strings.Contains(res.errText(), "WRONGPASS") || !strings.Contains(res.errText(), "nothing was changed") {
		t.Errorf("encrypt with a wrong password: %s", res)
	}
	if st := fake.Stats(); st.RefreshCalls != 0 {
		t.Errorf("the token endpoint was called %d times", st.RefreshCalls)
	}
	mustContainNone(t, "command output", cmd.out.String(), right, wrong, seed, keyB64)
}
