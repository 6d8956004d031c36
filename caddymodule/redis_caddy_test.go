package caddymodule_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/caddymodule"
	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/redistest"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource/redisstore"
)

// redisGlobal is the global option that puts the accounts in Redis.
func redisGlobal(url string, more ...string) string {
	return "restream_auth {\nredis " + url + "\n" + strings.Join(more, "\n") + "\n}"
}

func redisRecordKey(account string) string {
	return redisstore.DefaultKeyPrefix + "{" + account + "}/record"
}

// redisField is a field of an account's record hash in Redis, "" if none.
func redisField(srv *redistest.Server, account, field string) string {
	v, err := srv.Do("HGET", redisRecordKey(account), field)
	if s, ok := v.(string); ok && err == nil {
		return s
	}
	return ""
}

func redisGeneration(srv *redistest.Server, account string) uint64 {
	n, _ := strconv.ParseUint(redisField(srv, account, "gen"), 10, 64)
	return n
}

// serveWhile sends requests through the sidecar until cond holds; each
// must be answered 200 with a token the fake accepts.
func serveWhile(t *testing.T, url string, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		if status, body, _ := do(t, http.MethodGet, url, nil, nil); status != http.StatusOK {
			t.Fatalf("while waiting for %s: status %d %s", what, status, body)
		}
		time.Sleep(20 * time.Millisecond) // request pacing
	}
}

// Provisioning resolves the placeholders: errors name the placeholder or
// the reason, never a password, and nothing contacts Redis.
func TestRedisProvisionErrors(t *testing.T) {
	const secret = "provision-secret-pw-31c"
	t.Setenv("RESTREAM_TEST_REDIS_URL", "redis://u:"+secret+"@127.0.0.1:notaport/0")
	t.Setenv("RESTREAM_TEST_REDIS_PW", secret)
	for _, tc := range []struct{ url, reason string }{
		{"{env.RESTREAM_TEST_UNSET_VAR}", "evaluated placeholder {env.RESTREAM_TEST_UNSET_VAR} is empty"},
		{"{env.RESTREAM_TEST_REDIS_URL}", "not a valid URL"},
		{"redis://:{env.RESTREAM_TEST_REDIS_PW}@127.0.0.1:6379/x", "invalid database number"},
	} {
		text := "{\n\tadmin off\n\tstorage file_system " + t.TempDir() + "\n\t" + strings.ReplaceAll(redisGlobal(tc.url), "\n", "\n\t") +
			"\n}\n:8080 {\n\trestream_auth {\n\t\tclient_id a\n\t\tclient_secret cs_b\n\t}\n\treverse_proxy 127.0.0.1:9\n}\n"
		var cfg caddy.Config
		if err := json.Unmarshal(adapt(t, text), &cfg); err != nil {
			t.Fatal(err)
		}
		err := caddy.Validate(&cfg)
		if err == nil || !strings.Contains(err.Error(), tc.reason) {
			t.Fatalf("validate %s: %v, want %q", tc.url, err, tc.reason)
		}
		mustContainNone(t, "the error", err.Error(), secret)
	}
}

// A real Caddy serves through Redis against the fake, refreshing 2-second
// tokens several times; the chain lives in Redis only.
func TestRedisServesThroughCaddy(t *testing.T) {
	skipIfShort(t, "waits for rotations of 2-second tokens")
	srv := redistest.Start(t, redistest.Options{})
	fake := newFake(t, fakerestream.Options{AccessTTL: 2 * time.Second, Logf: func(string, ...any) {}})
	storageDir := t.TempDir()
	cfg := siteConfig{Port: testproc.Port(t), StorageDir: storageDir, Fake: fake, Seed: fake.Seed(), Global: redisGlobal(srv.URL())}
	runInProcess(t, cfg.Caddyfile())
	url := cfg.profileURL()
	serveWhile(t, url, 20*time.Second, "generation 4 in Redis", func() bool { return redisGeneration(srv, "default") >= 4 })
	if st := fake.Stats(); st.InvalidGrant != 0 || st.RefreshOK < 4 {
		t.Fatalf("fake: %d invalid_grant, %d rotations", st.InvalidGrant, st.RefreshOK)
	}
	if rec, err := tokensource.LoadRecord(context.Background(), &certmagic.FileStorage{Path: storageDir}, "default"); rec != nil || err != nil {
		t.Fatalf("the record went to Caddy storage too: %v %v", rec, err)
	}
}

// The Redis client is shared by every source of a URL and survives a
// reload that replaces the sources; it closes with the last one.
func TestRedisClientSharedAcrossReloads(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	fake := newFake(t, fakerestream.Options{Logf: func(string, ...any) {}})
	cfg := siteConfig{Port: testproc.Port(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(), Global: redisGlobal(srv.URL())}
	url := cfg.profileURL()

	inProcessMu.Lock()
	defer inProcessMu.Unlock()
	loadInProcess(t, cfg.Caddyfile())
	if status, body, _ := do(t, http.MethodGet, url, nil, nil); status != http.StatusOK {
		t.Fatalf("status %d %s", status, body)
	}
	before := caddymodule.RedisClientsInPool()
	if len(before) != 1 {
		t.Fatalf("%d Redis clients, want 1", len(before))
	}
	// A reload that changes the account's settings builds a new source.
	cfg.Extra = "refresh_ahead 10m"
	loadInProcess(t, cfg.Caddyfile())
	if status, body, _ := do(t, http.MethodGet, url, nil, nil); status != http.StatusOK {
		t.Fatalf("after reload: status %d %s", status, body)
	}
	after := caddymodule.RedisClientsInPool()
	if len(after) != 1 || after[0] != before[0] {
		t.Fatalf("after a reload: %d clients (same as before: %v), want the same one", len(after), len(after) == 1 && after[0] == before[0])
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	if n := len(caddymodule.RedisClientsInPool()); n != 0 {
		t.Fatalf("%d Redis clients left after stop", n)
	}
	if err := before[0].Ping(context.Background()).Err(); err == nil {
		t.Fatal("the last source's client was not closed")
	}
}

// An account on Caddy storage moves to Redis by adding the global option:
// the record is imported once, nothing is lost, and the storage copy is
// marked so an instance left on Caddy storage never sends its token.
func TestRedisImportsFromCaddyStorage(t *testing.T) {
	skipIfShort(t, "waits for rotations of 2-second tokens")
	srv := redistest.Start(t, redistest.Options{})
	fake := newFake(t, fakerestream.Options{AccessTTL: 2 * time.Second, Logf: func(string, ...any) {}})
	storageDir := t.TempDir()
	st := &certmagic.FileStorage{Path: storageDir}
	cfg := siteConfig{Port: testproc.Port(t), StorageDir: storageDir, Fake: fake, Seed: fake.Seed()}
	url := cfg.profileURL()

	inProcessMu.Lock()
	defer inProcessMu.Unlock()
	loadInProcess(t, cfg.Caddyfile())
	serveWhile(t, url, 15*time.Second, "two rotations on Caddy storage", func() bool { return fake.Stats().RefreshOK >= 2 })
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	rec1, err := tokensource.LoadRecord(context.Background(), st, "default")
	if err != nil || rec1 == nil {
		t.Fatalf("record on Caddy storage: %v %v", rec1, err)
	}

	cfg.Global = redisGlobal(srv.URL())
	loadInProcess(t, cfg.Caddyfile())
	defer caddy.Stop()
	serveWhile(t, url, 15*time.Second, "two more rotations in Redis", func() bool { return redisGeneration(srv, "default") >= rec1.Generation+2 })
	if chain := redisField(srv, "default", "chain"); chain != rec1.Chain {
		t.Fatalf("Redis holds chain %q, want the imported %q", chain, rec1.Chain)
	}
	if ig := fake.Stats().InvalidGrant; ig != 0 {
		t.Fatalf("%d invalid_grant across the move to Redis", ig)
	}
	// The storage copy is untouched, and marked as imported.
	ss := tokensource.NewStorageStore(st, "default", nil, nil, nil)
	l, err := ss.TakeLease(context.Background(), "probe", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if l.Mark != tokensource.Fingerprint(rec1.RefreshToken) || l.MarkedBy != redisstore.ImportedBy {
		t.Fatalf("storage lease mark %q by %q, want the imported refresh token by %q", l.Mark, l.MarkedBy, redisstore.ImportedBy)
	}
	_ = ss.ReleaseLease(context.Background(), l)
	if again, _ := tokensource.LoadRecord(context.Background(), st, "default"); again.Generation != rec1.Generation {
		t.Fatalf("the storage record changed: generation %d -> %d", rec1.Generation, again.Generation)
	}
}

// Redis loses its data under a running Caddy: the record comes back from
// the instance's memory and the chain goes on, with no invalid_grant.
func TestRedisFlushUnderCaddy(t *testing.T) {
	skipIfShort(t, "waits for rotations across a Redis flush (about 10 s)")
	srv := redistest.Start(t, redistest.Options{})
	fake := newFake(t, fakerestream.Options{AccessTTL: 2 * time.Second, Logf: func(string, ...any) {}})
	cfg := siteConfig{Port: testproc.Port(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(), Global: redisGlobal(srv.URL())}
	runInProcess(t, cfg.Caddyfile())
	url := cfg.profileURL()
	serveWhile(t, url, 15*time.Second, "generation 2", func() bool { return redisGeneration(srv, "default") >= 2 })
	for _, lose := range []func(){
		func() { srv.MustDo("FLUSHALL") },
		func() { srv.Kill(); srv.Restart() }, // restarted without persistence
	} {
		gen := redisGeneration(srv, "default")
		lose()
		lost := time.Now()
		waitFor(t, 10*time.Second, "the record written back", func() bool { return redisGeneration(srv, "default") >= gen })
		t.Logf("written back after %s", time.Since(lost).Round(time.Millisecond))
		waitFor(t, 20*time.Second, "two more rotations", func() bool { return redisGeneration(srv, "default") >= gen+2 })
	}
	serveWhile(t, url, 5*time.Second, "one more rotation", func() bool { return fake.Stats().RefreshOK >= 7 })
	if ig := fake.Stats().InvalidGrant; ig != 0 {
		t.Fatalf("%d invalid_grant after Redis lost its data", ig)
	}
}

// The Redis password, given by placeholder, appears in no log line, error,
// status or HTTP answer, whether it is wrong (errors galore) or right.
func TestRedisCredentialsNeverShown(t *testing.T) {
	skipIfShort(t, "builds and runs the caddy binary")
	const right, wrong = "right-redis-pw-5e1d", "wrong-redis-pw-8c2a"
	srv := redistest.Start(t, redistest.Options{Password: right})
	for _, pw := range []string{wrong, right} {
		t.Run(map[string]string{wrong: "wrong", right: "right"}[pw], func(t *testing.T) {
			t.Setenv("RESTREAM_TEST_REDIS_PW", pw)
			fake := newFake(t, fakerestream.Options{Logf: func(string, ...any) {}})
			dir := t.TempDir()
			cfg := siteConfig{Port: testproc.Port(t), AdminPort: testproc.Port(t), StorageDir: dir, Fake: fake, Seed: fake.Seed(),
				LogFile: filepath.Join(dir, "caddy.log"),
				Global:  redisGlobal("redis://:{env.RESTREAM_TEST_REDIS_PW}@" + srv.Addr() + "/0")}
			p := startProcess(t, cfg.Caddyfile())
			base := "http://127.0.0.1:" + itoa(cfg.Port)
			waitReady(t, base, p)
			var seen strings.Builder
			for range 3 {
				status, body, _ := do(t, http.MethodGet, base+"/v2/user/profile", nil, nil)
				seen.Write(body)
				if pw == right && status != http.StatusOK {
					t.Fatalf("with the right password: status %d %s", status, body)
				}
				if pw == wrong && status != http.StatusServiceUnavailable {
					t.Fatalf("with a wrong password: status %d %s, want 503", status, body)
				}
			}
			admin := "http://127.0.0.1:" + itoa(cfg.AdminPort)
			for _, path := range []string{"/config/", "/restream_auth/"} {
				resp, err := noKeepAlive.Get(admin + path)
				if err != nil {
					t.Fatal(err)
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				seen.Write(b)
				if path == "/config/" && !strings.Contains(string(b), "{env.RESTREAM_TEST_REDIS_PW}") {
					t.Errorf("the admin config does not show the URL as written: %s", b)
				}
			}
			if _, err := p.Stop(os.Interrupt, 10*time.Second); err != nil {
				t.Error(err)
			}
			logs, _ := os.ReadFile(cfg.LogFile)
			if pw == wrong && !strings.Contains(string(logs), "WRONGPASS") {
				t.Errorf("the log does not show Redis refusing the password:\n%s", logs)
			}
			for where, text := range map[string]string{"the log file": string(logs), "the process output": p.Output(),
				"answers and admin API": seen.String()} {
				mustContainNone(t, where, text, right, wrong)
			}
		})
	}
}

// caddy validate provisions everything and connects to nothing: no Redis
// connection is opened.
func TestRedisValidateNeverConnects(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	connections := func() int {
		info := srv.MustDo("INFO", "stats").(string)
		for _, line := range strings.Split(info, "\r\n") {
			if v, ok := strings.CutPrefix(line, "total_connections_received:"); ok {
				n, _ := strconv.Atoi(v)
				return n
			}
		}
		t.Fatalf("no total_connections_received in %q", info)
		return 0
	}
	fake := newFake(t, fakerestream.Options{Logf: func(string, ...any) {}})
	cfg := siteConfig{Port: testproc.Port(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(), Global: redisGlobal(srv.URL())}
	var c caddy.Config
	if err := json.Unmarshal(adapt(t, cfg.Caddyfile()), &c); err != nil {
		t.Fatal(err)
	}
	before := connections()
	if err := caddy.Validate(&c); err != nil {
		t.Fatal(err)
	}
	if after := connections(); after != before+1 { // +1: this INFO's own
		t.Fatalf("validate opened %d Redis connections", after-before-1)
	}
	if st := fake.Stats(); st.RefreshCalls != 0 {
		t.Fatalf("validate called the token endpoint %d times", st.RefreshCalls)
	}
}
