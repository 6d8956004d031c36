package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
)

// setup is one of the three Caddy configurations.
type setup struct {
	Key  string // A, B or C
	Name string
}

var setups = []setup{
	{"A", "restream_auth + reverse_proxy"},
	{"B", "reverse_proxy + constant header_up (floor)"},
	{"C", "reverse_proxy alone"},
}

const (
	clientID = "bench-client"
	// loadPath is a public route of the fake: it answers 200 with or without
	// a token, so the upstream does the same work for A, B and C.
	loadPath = "/v2/platform/all"
	// checkPath needs a valid token: the preflight uses it to show that A and
	// B really send one (and C none).
	checkPath = "/v2/user/profile"
)

// env is what all rounds share: the Caddy binary, the fake, a temp dir and
// the processes started so far.
type env struct {
	logf    func(string, ...any)
	tmp     string
	caddy   string
	fake    *fakerestream.Server
	secret  string // client secret file
	bToken  string // B's constant access token
	machine machine

	mu    sync.Mutex
	procs map[int]*proc
	once  sync.Once
}

func newEnv(ctx context.Context, logf func(string, ...any)) (_ *env, err error) {
	e := &env{logf: logf, procs: make(map[int]*proc)}
	defer func() {
		if err != nil {
			e.close()
		}
	}()
	if e.tmp, err = os.MkdirTemp("", "restream-bench-"); err != nil {
		return nil, err
	}
	e.machine = describeMachine()

	root, err := moduleRoot(ctx)
	if err != nil {
		return nil, err
	}
	e.caddy = filepath.Join(e.tmp, "caddy")
	logf("building Caddy: go build -o %s ./cmd/caddy (in %s)", e.caddy, root)
	t0 := time.Now()
	build := exec.CommandContext(ctx, goTool(), "build", "-o", e.caddy, "./cmd/caddy")
	build.Dir = root
	if outp, err := build.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("building Caddy: %v\n%s", err, outp)
	}
	logf("built in %s", time.Since(t0).Round(10*time.Millisecond))
	if v, err := exec.CommandContext(ctx, e.caddy, "version").Output(); err == nil {
		e.machine.Caddy = strings.Fields(string(v) + " ?")[0]
	}

	secret := make([]byte, 32)
	_, _ = rand.Read(secret)
	e.fake = fakerestream.New(fakerestream.Options{
		ClientID:     clientID,
		ClientSecret: hex.EncodeToString(secret),
		AccessTTL:    time.Hour, // no refresh during a run
	})
	e.secret = filepath.Join(e.tmp, "client_secret")
	if err := os.WriteFile(e.secret, []byte(hex.EncodeToString(secret)), 0o600); err != nil {
		return nil, err
	}
	e.bToken, _ = e.fake.SeedPair()
	logf("fake Restream at %s (token endpoint %s), access tokens live 1h", e.fake.URL(), e.fake.TokenURL())
	return e, nil
}

// close kills every process still running and removes the temp dir.
func (e *env) close() {
	e.once.Do(func() {
		e.mu.Lock()
		procs := make([]*proc, 0, len(e.procs))
		for _, p := range e.procs {
			procs = append(procs, p)
		}
		e.mu.Unlock()
		for _, p := range procs {
			e.kill(p)
		}
		if e.fake != nil {
			e.fake.Close()
		}
		if e.tmp != "" {
			_ = os.RemoveAll(e.tmp)
		}
	})
}

func moduleRoot(ctx context.Context) (string, error) {
	outp, err := exec.CommandContext(ctx, goTool(), "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %v", err)
	}
	gomod := strings.TrimSpace(string(outp))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("not inside a Go module: run from the repository, e.g. go run ./bench")
	}
	root := filepath.Dir(gomod)
	if _, err := os.Stat(filepath.Join(root, "cmd", "caddy")); err != nil {
		return "", fmt.Errorf("%s has no cmd/caddy: run from the caddy-restream-auth repository", root)
	}
	return root, nil
}

// goTool is the go command: the one `go run` put first on PATH, else the
// toolchain this program was built with.
func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return filepath.Join(runtime.GOROOT(), "bin", "go")
}

// proc is a started Caddy.
type proc struct {
	*testproc.Process
	port int
	log  string
}

// caddyfile returns the Caddyfile of setup s listening on 127.0.0.1:port.
func (e *env) caddyfile(s setup, port, adminPort int, dir, seedFile string) string {
	var site string
	switch s.Key {
	case "A":
		site = fmt.Sprintf(`	restream_auth bench {
		client_id %s
		client_secret %s
		refresh_token %s
		token_url %s
	}
	reverse_proxy %s
`, clientID, quote("{file."+e.secret+"}"), quote("{file."+seedFile+"}"), e.fake.TokenURL(), e.fake.URL())
	case "B":
		site = fmt.Sprintf(`	reverse_proxy %s {
		header_up Authorization %s
	}
`, e.fake.URL(), quote("Bearer "+e.bToken))
	case "C":
		site = fmt.Sprintf("\treverse_proxy %s\n", e.fake.URL())
	}
	admin := "off"
	if adminPort != 0 {
		admin = fmt.Sprintf("127.0.0.1:%d", adminPort) // for -pprof only
	}
	return fmt.Sprintf(`{
	admin %s
	auto_https off
	persist_config off
	storage file_system %s
	servers {
		protocols h1
	}
	log {
		level ERROR
	}
}

http://:%d {
	bind 127.0.0.1
%s}
`, admin, quote(filepath.Join(dir, "storage")), port, site)
}

// quote quotes a Caddyfile token if it needs it.
func quote(s string) string {
	if !strings.ContainsAny(s, " \t\"#\\") {
		return s
	}
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(s) + `"`
}

// start writes setup s's config in a new directory name and starts a fresh
// Caddy for it; adminPort 0 turns the admin endpoint off.
func (e *env) start(ctx context.Context, s setup, name string, adminPort int) (*proc, error) {
	dir := filepath.Join(e.tmp, name)
	if err := os.MkdirAll(filepath.Join(dir, "xdg"), 0o700); err != nil {
		return nil, err
	}
	seedFile := ""
	if s.Key == "A" {
		// A new chain per process: a fresh storage dir with an already
		// spent seed would (rightly) end in invalid_grant.
		seedFile = filepath.Join(dir, "refresh_token")
		if err := os.WriteFile(seedFile, []byte(e.fake.Seed()), 0o600); err != nil {
			return nil, err
		}
	}
	port, err := testproc.FreePort()
	if err != nil {
		return nil, err
	}
	cfgPath := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cfgPath, []byte(e.caddyfile(s, port, adminPort, dir, seedFile)), 0o600); err != nil {
		return nil, err
	}
	logPath := filepath.Join(dir, "caddy.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	cmd := exec.Command(e.caddy, "run", "--config", cfgPath, "--adapter", "caddyfile")
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logFile, logFile
	xdg := filepath.Join(dir, "xdg")
	cmd.Env = append(os.Environ(), "XDG_DATA_HOME="+xdg, "XDG_CONFIG_HOME="+xdg, "XDG_CACHE_HOME="+xdg)
	dieWithParent(cmd)
	started, err := testproc.Launch("caddy", cmd)
	if err != nil {
		return nil, err
	}
	p := &proc{Process: started, port: port, log: logPath}
	e.mu.Lock()
	e.procs[p.PID()] = p
	e.mu.Unlock()
	if err := e.waitReady(ctx, p); err != nil {
		e.kill(p)
		return nil, err
	}
	return p, nil
}

// kill kills p by its PID and waits for it to exit.
func (e *env) kill(p *proc) {
	p.Kill()
	e.mu.Lock()
	delete(e.procs, p.PID())
	e.mu.Unlock()
}

// waitReady waits until Caddy accepts connections (at most 30 s).
func (e *env) waitReady(ctx context.Context, p *proc) error {
	deadline := time.Now().Add(30 * time.Second)
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(p.port))
	for {
		select {
		case <-p.Exited():
			return fmt.Errorf("caddy exited during start-up: %s", tail(p.log))
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("caddy not listening on %s after 30s: %s", addr, tail(p.log))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// tail returns the end of a log file, for error messages.
func tail(path string) string {
	b, _ := os.ReadFile(path)
	b = bytes.TrimSpace(b)
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	if len(b) == 0 {
		return "(no output)"
	}
	return "caddy output:\n" + string(b)
}

// preflight checks, once per process, that the measured route answers 200
// and that the token route sees what the setup should send: a valid token
// for A and B, none for C (401).
func (e *env) preflight(ctx context.Context, s setup, base string) error {
	c := &http.Client{Timeout: 15 * time.Second, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
	get := func(path string) (int, []byte, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+path, nil)
		if err != nil {
			return 0, nil, err
		}
		resp, err := c.Do(req)
		if err != nil {
			return 0, nil, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return resp.StatusCode, b, err
	}
	st, _, err := get(loadPath)
	if err != nil {
		return fmt.Errorf("preflight GET %s: %w", loadPath, err)
	}
	if st != http.StatusOK {
		return fmt.Errorf("preflight GET %s: HTTP %d, want 200", loadPath, st)
	}
	st, body, err := get(checkPath)
	if err != nil {
		return fmt.Errorf("preflight GET %s: %w", checkPath, err)
	}
	want := http.StatusOK
	if s.Key == "C" {
		want = http.StatusUnauthorized
	}
	if st != want {
		return fmt.Errorf("preflight GET %s: HTTP %d, want %d", checkPath, st, want)
	}
	if want == http.StatusOK {
		var echo struct {
			Authorization string `json:"authorization"`
		}
		if err := json.Unmarshal(body, &echo); err != nil {
			return fmt.Errorf("preflight GET %s: not the fake's echo: %v", checkPath, err)
		}
		tok, ok := strings.CutPrefix(echo.Authorization, "Bearer ")
		if !ok || !e.fake.ValidAccessToken(tok) {
			return fmt.Errorf("preflight GET %s: upstream did not receive a valid bearer token", checkPath)
		}
	}
	return nil
}

// prepare checks a started Caddy (preflight), opens the load connections
// and warms it up. The caller closes the connections.
func (e *env) prepare(ctx context.Context, cfg config, s setup, p *proc) ([]*conn, error) {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(p.port))
	if err := e.preflight(ctx, s, "http://"+addr); err != nil {
		return nil, fmt.Errorf("%w (%s)", err, tail(p.log))
	}
	body := make([]byte, cfg.Body)
	for i := range body {
		body[i] = 'a' + byte(i%26)
	}
	conns := make([]*conn, cfg.Conns)
	for i := range conns {
		conns[i] = newConn(addr, loadPath, body)
	}
	if cfg.Warmup > 0 {
		if w := drive(ctx, conns, cfg.Warmup); w.OK == 0 {
			closeAll(conns)
			return nil, fmt.Errorf("warm-up: no request succeeded (%d failed; first: %s)", w.Errors, w.FirstErr)
		}
	}
	if err := ctx.Err(); err != nil {
		closeAll(conns)
		return nil, err
	}
	return conns, nil
}

func closeAll(conns []*conn) {
	for _, c := range conns {
		c.close()
	}
}

// setupRun is one setup's Caddy in a round, and what was measured of it.
type setupRun struct {
	p     *proc
	conns []*conn
	res   result
	cpu   time.Duration // Caddy's CPU during this setup's slices
	self  time.Duration // this program's CPU during them
	other time.Duration // everyone else's
	noCPU bool          // some CPU figure could not be read
}

// cpuSnapshot is the CPU used so far by the machine (without interrupts),
// this program and each Caddy of a round.
type cpuSnapshot struct {
	sys, self time.Duration
	caddy     []time.Duration
	ok        bool
}

func snapshot(runs []*setupRun) cpuSnapshot {
	s := cpuSnapshot{caddy: make([]time.Duration, len(runs))}
	var ok1, ok2 bool
	s.sys, ok1 = readSystemCPU()
	s.self, ok2 = readCPU(os.Getpid())
	s.ok = ok1 && ok2
	for i, r := range runs {
		var ok bool
		if s.caddy[i], ok = readCPU(r.p.PID()); !ok {
			s.ok = false
		}
	}
	return s
}

// measureRound runs one round: a fresh Caddy per setup, each checked and
// warmed up, then -duration of load for each, the setups taking turns in
// slices (A, B, C, A, B, C, ... rotated by round) so that drift and other
// processes' bursts hit all three alike.
func (e *env) measureRound(ctx context.Context, cfg config, round int) ([]result, error) {
	runs := make([]*setupRun, len(setups))
	defer func() {
		for _, r := range runs {
			if r != nil {
				closeAll(r.conns)
				e.kill(r.p)
			}
		}
	}()
	for i := range setups {
		s := setups[(i+round)%len(setups)]
		p, err := e.start(ctx, s, fmt.Sprintf("r%d-%s", round+1, s.Key), 0)
		if err != nil {
			return nil, fmt.Errorf("setup %s: %w", s.Key, err)
		}
		runs[i] = &setupRun{p: p, res: result{Setup: s, Round: round + 1}}
		if runs[i].conns, err = e.prepare(ctx, cfg, s, p); err != nil {
			return nil, fmt.Errorf("setup %s: %w", s.Key, err)
		}
	}

	slice := cfg.Slice
	if slice <= 0 || slice > cfg.Duration {
		slice = cfg.Duration
	}
	runtime.GC() // the load generator starts the measurement with a clean heap
	refresh0 := e.fake.Stats().RefreshCalls
	for done := time.Duration(0); done < cfg.Duration; done += slice {
		d := min(slice, cfg.Duration-done)
		for i, r := range runs {
			before := snapshot(runs)
			l := drive(ctx, r.conns, d)
			after := snapshot(runs)
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			r.res.Load.add(l)
			if before.ok && after.ok {
				r.cpu += after.caddy[i] - before.caddy[i]
				r.self += after.self - before.self
				other := after.sys - before.sys - (after.self - before.self)
				for k := range runs {
					other -= after.caddy[k] - before.caddy[k]
				}
				r.other += max(0, other)
			} else {
				r.noCPU = true
			}
		}
	}
	refreshes := e.fake.Stats().RefreshCalls - refresh0

	results := make([]result, len(runs))
	for i, r := range runs {
		select {
		case <-r.p.Exited():
			return nil, fmt.Errorf("setup %s: caddy exited during the measurement: %s", r.res.Setup.Key, tail(r.p.log))
		default:
		}
		res := r.res
		l := res.Load
		if !r.noCPU && l.Elapsed > 0 {
			res.CPUUtil = float64(r.cpu) / float64(l.Elapsed)
			res.SelfUtil = float64(r.self) / float64(l.Elapsed)
			res.OtherUtil = float64(r.other) / float64(l.Elapsed)
			if l.OK > 0 {
				res.CPUPerReq = r.cpu / time.Duration(l.OK)
				res.SelfPerReq = r.self / time.Duration(l.OK)
			}
		}
		if res.Setup.Key == "A" {
			res.Refreshes = refreshes // B and C never refresh
		}
		res.PeakRSS = readPeakRSS(r.p.PID())
		results[i] = res
	}
	return results, nil
}

// profile runs setup s once more, with Caddy's admin endpoint on, and saves
// a CPU profile of Caddy under load (about -duration long) to dir. It is not
// a measurement: the admin endpoint and the profiler change the figures.
func (e *env) profile(ctx context.Context, cfg config, s setup, dir string) (string, error) {
	adminPort, err := testproc.FreePort()
	if err != nil {
		return "", err
	}
	p, err := e.start(ctx, s, "pprof-"+s.Key, adminPort)
	if err != nil {
		return "", err
	}
	defer e.kill(p)
	conns, err := e.prepare(ctx, cfg, s, p)
	if err != nil {
		return "", err
	}
	defer closeAll(conns)

	secs := max(1, int(cfg.Duration/time.Second))
	loaded := make(chan load, 1)
	go func() { loaded <- drive(ctx, conns, time.Duration(secs)*time.Second+time.Second) }()
	defer func() { <-loaded }()
	url := fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/profile?seconds=%d", adminPort, secs)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	c := &http.Client{Timeout: time.Duration(secs)*time.Second + 30*time.Second, Transport: &http.Transport{Proxy: nil}}
	resp, err := c.Do(req)
	if err != nil {
		return "", fmt.Errorf("fetching the profile: %w", err)
	}
	defer resp.Body.Close()
	prof, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return "", fmt.Errorf("fetching the profile: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("fetching the profile: HTTP %d: %.200s", resp.StatusCode, prof)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	path := filepath.Join(dir, "caddy-"+s.Key+".pprof")
	return path, os.WriteFile(path, prof, 0o644)
}
