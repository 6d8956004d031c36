package deploy_test

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/redistest"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
)

// builds holds cmd/caddy (Caddy, the standard modules and this plugin),
// built once per test binary.
var builds testproc.Builds

func TestMain(m *testing.M) { os.Exit(builds.Run(m)) }

func randomHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// rewrite applies replacements that must each match: a deployment file
// that drifts from what this test expects fails here, not silently.
func rewrite(t *testing.T, name, text string, pairs ...string) string {
	t.Helper()
	for i := 0; i < len(pairs); i += 2 {
		re := regexp.MustCompile(pairs[i])
		if !re.MatchString(text) {
			t.Fatalf("%s: no match for %q: update this test with the file", name, pairs[i])
		}
		text = re.ReplaceAllLiteralString(text, pairs[i+1])
	}
	return text
}

// replica is one sidecar process.
type replica struct {
	bin, dir string
	config   string   // the Caddyfile it runs
	env      []string // its environment

	name      string
	api, ops  string // base URLs
	adminSock string
	shutdown  time.Duration     // the longest a stop may take
	proc      *testproc.Process // the current run; start replaces it
}

// start runs the replica, and stops it when the test ends.
func (r *replica) start(t *testing.T) {
	t.Helper()
	cfgPath := filepath.Join(r.dir, "Caddyfile")
	if err := os.WriteFile(cfgPath, []byte(r.config), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(r.bin, "run", "--config", cfgPath, "--adapter", "caddyfile")
	cmd.Env = append([]string{"HOME=" + r.dir, "XDG_DATA_HOME=" + r.dir, "XDG_CONFIG_HOME=" + r.dir, "PATH=" + os.Getenv("PATH")}, r.env...)
	p := testproc.Start(t, r.name, cmd)
	r.proc = p
	t.Cleanup(func() {
		r.stop(t)
		if t.Failed() {
			t.Logf("%s output:\n%s", r.name, p.Output())
		}
	})
}

// waitReady waits until the replica's health route answers 200. Another
// process gives no signal to wait on, so this polls.
func (r *replica) waitReady(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, body, err := get200(r.ops + "/healthz")
		if code == http.StatusOK {
			return
		}
		select {
		case <-r.proc.Exited():
			t.Fatalf("%s exited:\n%s", r.name, r.proc.Output())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: /healthz never answered 200 (last: %d %s %v)", r.name, code, body, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop sends SIGTERM, as docker stop and the kubelet do, and returns how
// long Caddy took to exit; after 30 s it kills Caddy and fails the test.
func (r *replica) stop(t *testing.T) time.Duration {
	t.Helper()
	took, err := r.proc.Stop(syscall.SIGTERM, 30*time.Second)
	if err != nil {
		t.Error(err)
	}
	return took
}

func get200(url string) (int, string, error) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

// TestReplicasShareOneChain runs the deployment's sidecars for real: the
// Compose Caddyfile and the Kubernetes ConfigMap's, each as its own Caddy
// process (two replicas), with the same Secret values, sharing one Redis
// (password, append-only file) in front of the strict fake Restream with
// 6-second tokens and token calls that take a second. Only addresses are
// rewritten: ports (both replicas run on this host), the admin socket's
// directory, the Redis address, and the token endpoint and API, which
// point at the fake. Both replicas become ready; their clients get 200
// through several rotations with no invalid_grant and one refresh at a
// time; Redis holds the chain under key_prefix, encrypted. Stopped with
// SIGTERM while a refresh is in flight, each replica exits within its
// grace period and the new pair is stored, not lost: a replica started
// afterwards serves with it.
func TestReplicasShareOneChain(t *testing.T) {
	if testing.Short() {
		t.Skip("runs two Caddy processes for several token rotations")
	}
	redisPassword := randomHex(t, 16)
	redis := redistest.Start(t, redistest.Options{Password: redisPassword, AppendOnly: true})
	fake := fakerestream.New(fakerestream.Options{AccessTTL: 6 * time.Second, Latency: time.Second})
	t.Cleanup(fake.Close)
	bin := builds.MustBinary(t, "../cmd/caddy")

	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		t.Fatal(err)
	}
	env := []string{
		"RESTREAM_CLIENT_ID=test-client",
		"RESTREAM_CLIENT_SECRET=test-secret",
		"RESTREAM_REFRESH_TOKEN=" + fake.Seed(),
		"RESTREAM_ENCRYPTION_KEY=" + base64.StdEncoding.EncodeToString(key),
		"REDIS_PASSWORD=" + redisPassword,
		"POD_IP=127.0.0.1",
	}

	replicas := startReplicas(t, bin, env, redis, fake)

	// Ready: the seed exchanged by one replica, the stored chain adopted by
	// the other.
	for _, r := range replicas {
		r.waitReady(t)
		if fi, err := os.Stat(r.adminSock); err != nil || fi.Mode()&os.ModeSocket == 0 {
			t.Errorf("%s: no admin socket at %s: %v", r.name, r.adminSock, err)
		}
	}

	loadThroughRotations(t, replicas, fake, 4)
	checkStoredChain(t, replicas, redis, fake)
	before := stopDuringRefresh(t, replicas, fake)

	// A replica started afterwards serves with the stored chain.
	r := replicas[0]
	r.start(t)
	r.waitReady(t)
	if code, body, err := get200(r.api + "/v2/user/profile"); code != http.StatusOK {
		t.Errorf("%s restarted: GET /v2/user/profile: %d %s %v", r.name, code, body, err)
	}
	if st := fake.Stats(); st.InvalidGrant != 0 || st.RefreshOK > before+2 {
		t.Errorf("after the restart: %d invalid_grant, %d more rotations: want the stored chain used", st.InvalidGrant, st.RefreshOK-before-1)
	}
}

// startReplicas starts a replica per Caddyfile of the deployment, only its
// addresses rewritten: ports, the admin socket, Redis, the token endpoint
// and the API (the fake).
func startReplicas(t *testing.T, bin string, env []string, redis *redistest.Server, fake *fakerestream.Server) []*replica {
	t.Helper()
	var replicas []*replica
	for _, cf := range deployCaddyfiles(t) {
		dir := t.TempDir()
		apiPort, opsPort := testproc.Port(t), testproc.Port(t)
		r := &replica{
			bin:       bin,
			dir:       dir,
			env:       env,
			name:      cf.name,
			api:       fmt.Sprintf("http://127.0.0.1:%d", apiPort),
			ops:       fmt.Sprintf("http://127.0.0.1:%d", opsPort),
			adminSock: filepath.Join(dir, "admin.sock"),
			shutdown:  caddyShutdown(t, cf.name, cf.body),
		}
		r.config = rewrite(t, cf.name, cf.body,
			`http://:8080 \{`, fmt.Sprintf("http://:%d {", apiPort),
			`http://:9180 \{`, fmt.Sprintf("http://:%d {", opsPort),
			`admin unix//run/caddy/admin\.sock`, "admin unix/"+r.adminSock,
			`@[a-z-]+:6379/0`, "@"+redis.Addr()+"/0",
			`refresh_token \{env\.RESTREAM_REFRESH_TOKEN\}\n`, "refresh_token {env.RESTREAM_REFRESH_TOKEN}\ntoken_url "+fake.TokenURL()+"\n",
			`reverse_proxy https://api\.restream\.io \{`, "reverse_proxy "+fake.URL()+" {",
		)
		r.start(t)
		replicas = append(replicas, r)
	}
	return replicas
}

// loadThroughRotations sends requests through every replica until the fake
// has rotated the chain rotations times: every answer must be 200, with no
// invalid_grant and one refresh at a time.
func loadThroughRotations(t *testing.T, replicas []*replica, fake *fakerestream.Server, rotations int64) {
	t.Helper()
	statuses := map[int]int{}
	start := fake.Stats().RefreshOK
	deadline := time.Now().Add(40 * time.Second)
	for fake.Stats().RefreshOK < start+rotations {
		if time.Now().After(deadline) {
			t.Fatalf("only %d rotations in 40 s, want %d", fake.Stats().RefreshOK-start, rotations)
		}
		for _, r := range replicas {
			code, body, err := get200(r.api + "/v2/user/profile")
			if err != nil {
				t.Fatalf("%s: %v", r.name, err)
			}
			statuses[code]++
			if code != http.StatusOK && statuses[code] == 1 {
				t.Errorf("%s: GET /v2/user/profile: %d %s", r.name, code, body)
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	st := fake.Stats()
	t.Logf("answers %v; fake: %d rotations, %d invalid_grant, at most %d refreshes at once", statuses, st.RefreshOK, st.InvalidGrant, st.MaxConcurrentRefresh)
	if st.InvalidGrant != 0 || st.MaxConcurrentRefresh > 1 {
		t.Errorf("invalid_grant %d, concurrent refreshes %d: the replicas did not act as one", st.InvalidGrant, st.MaxConcurrentRefresh)
	}
	if len(statuses) != 1 || statuses[http.StatusOK] == 0 {
		t.Errorf("answers %v: want only 200", statuses)
	}
}

// checkStoredChain checks the replicas' metrics on the probes listener
// (state ok), and that Redis holds the chain under key_prefix, sealed with
// encryption_key.
func checkStoredChain(t *testing.T, replicas []*replica, redis *redistest.Server, fake *fakerestream.Server) {
	t.Helper()
	for _, r := range replicas {
		_, body, err := get200(r.ops + "/metrics")
		if err != nil || !strings.Contains(body, `caddy_restream_auth_state{account="default",state="ok"} 1`) {
			t.Errorf("%s: /metrics does not show account default ok (%v)", r.name, err)
		}
	}
	keys, _ := redis.MustDo("KEYS", "*").([]any)
	var prefixed int
	for _, k := range keys {
		name := fmt.Sprint(k)
		if strings.HasPrefix(name, "restream_auth/") {
			prefixed++
		} else {
			t.Errorf("Redis key %q is outside key_prefix restream_auth/", name)
		}
	}
	if prefixed == 0 {
		t.Error("Redis holds no key under restream_auth/")
	}
	t.Logf("Redis keys: %v", keys)
	// DEBUG-free check that no token is stored in the clear: every string
	// and hash field value of every key.
	var stored strings.Builder
	for _, k := range keys {
		name := fmt.Sprint(k)
		switch redis.MustDo("TYPE", name) {
		case "string":
			fmt.Fprint(&stored, redis.MustDo("GET", name))
		case "hash":
			fmt.Fprint(&stored, redis.MustDo("HGETALL", name))
		}
	}
	for _, tok := range fake.IssuedTokens() {
		if strings.Contains(stored.String(), tok) {
			t.Errorf("Redis holds a token in the clear (%.6s…): encryption_key not applied", tok)
		}
	}
}

// stopDuringRefresh sends SIGTERM, as docker stop and the kubelet send it,
// to every replica while a refresh is in flight (each token call takes a
// second at the fake): each must stop within Caddy's grace_period plus a
// token source's close (inside stop_grace_period and
// terminationGracePeriodSeconds), and the refreshing one must store the
// new pair before it exits, so the rotation is not lost. It returns the
// fake's count of rotations from before the stop.
func stopDuringRefresh(t *testing.T, replicas []*replica, fake *fakerestream.Server) int64 {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for inFlight, _, _ := fake.TokenActivity(); inFlight == 0; inFlight, _, _ = fake.TokenActivity() {
		if time.Now().After(deadline) {
			t.Fatal("no refresh in flight within 20 s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	before := fake.Stats().RefreshOK
	var wg sync.WaitGroup
	for _, r := range replicas {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if took := r.stop(t); took > r.shutdown {
				t.Errorf("%s took %v to stop, more than grace_period plus close (%v)", r.name, took, r.shutdown)
			} else {
				t.Logf("%s stopped %v after SIGTERM during a refresh", r.name, took.Round(time.Millisecond))
			}
		}()
	}
	wg.Wait()
	st := fake.Stats()
	if st.RefreshOK != before+1 || st.LostRotations != 0 {
		t.Errorf("during the stop: %d rotations, %d lost (their pair never stored): want 1 and 0", st.RefreshOK-before, st.LostRotations)
	}
	return before
}
