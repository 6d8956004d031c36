package caddymodule_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/restream-sidecar/caddy-restream-auth/caddymodule"
	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
)

// freePort returns a port on 127.0.0.1 that was free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// siteConfig is a sidecar Caddyfile in front of the fake.
type siteConfig struct {
	Port, AdminPort int
	StorageDir      string
	Fake            *fakerestream.Server
	Seed            string
	Extra           string // more restream_auth subdirectives
	Global          string // more global options
	LogFile         string // if set, logs go here at DEBUG
}

func (c siteConfig) Caddyfile() string {
	var b strings.Builder
	b.WriteString("{\n")
	if c.AdminPort != 0 {
		fmt.Fprintf(&b, "\tadmin 127.0.0.1:%d\n", c.AdminPort)
	} else {
		b.WriteString("\tadmin off\n")
	}
	fmt.Fprintf(&b, "\tstorage file_system %s\n\tauto_https off\n\tpersist_config off\n", c.StorageDir)
	if c.LogFile != "" {
		fmt.Fprintf(&b, "\tlog {\n\t\toutput file %s\n\t\tlevel DEBUG\n\t}\n", c.LogFile)
	}
	for _, line := range strings.Split(c.Global, "\n") {
		if line = strings.TrimSpace(line); line != "" {
			b.WriteString("\t" + line + "\n")
		}
	}
	fmt.Fprintf(&b, "}\n\nhttp://127.0.0.1:%d {\n\trestream_auth {\n\t\tclient_id test-client\n\t\tclient_secret test-secret\n", c.Port)
	if c.Seed != "" {
		fmt.Fprintf(&b, "\t\trefresh_token %s\n", c.Seed)
	}
	fmt.Fprintf(&b, "\t\ttoken_url %s\n", c.Fake.TokenURL())
	for _, line := range strings.Split(c.Extra, "\n") {
		if line = strings.TrimSpace(line); line != "" {
			b.WriteString("\t\t" + line + "\n")
		}
	}
	fmt.Fprintf(&b, "\t}\n\treverse_proxy %s\n}\n", c.Fake.URL())
	return b.String()
}

// inProcessMu serializes tests that run Caddy in this process: Caddy has one
// running config per process.
var inProcessMu sync.Mutex

// runInProcess loads a Caddyfile into this process's Caddy and stops it at
// the end of the test.
func runInProcess(t *testing.T, caddyfileText string) {
	t.Helper()
	inProcessMu.Lock()
	t.Cleanup(inProcessMu.Unlock)
	loadInProcess(t, caddyfileText)
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping caddy: %v", err)
		}
	})
}

func loadInProcess(t *testing.T, caddyfileText string) {
	t.Helper()
	cfgJSON := adapt(t, caddyfileText)
	if err := caddy.Load(cfgJSON, true); err != nil {
		t.Fatalf("loading config: %v", err)
	}
}

func adapt(t testing.TB, caddyfileText string) []byte {
	t.Helper()
	cfgJSON, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfileText), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatalf("adapting Caddyfile: %v\n%s", err, caddyfileText)
	}
	for _, w := range warnings {
		t.Logf("adapt warning: %s", w)
	}
	return cfgJSON
}

// echo is what the fake's API echoes back.
type echo struct {
	Method        string `json:"method"`
	Path          string `json:"path"`
	Query         string `json:"query"`
	BodySHA256    string `json:"body_sha256"`
	BodyLen       int    `json:"body_len"`
	Authorization string `json:"authorization"`
	AccessTokenQ  string `json:"access_token_query"`
}

var client = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}

// noKeepAlive is for Caddy's admin endpoint in tests that load configs:
// every load restarts the admin server, closing kept-alive connections.
var noKeepAlive = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

func do(t testing.TB, method, url string, body []byte, hdr map[string]string) (int, []byte, http.Header) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Errorf("%s %s: %v", method, url, err)
		return 0, nil, nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b, resp.Header
}

// waitFor polls cond until it holds or the deadline passes. It is for
// conditions in other processes, which offer no signal to wait on.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestMain removes the Caddy binaries built for the tests.
func TestMain(m *testing.M) {
	code := m.Run()
	for _, dir := range []string{caddyBinaryDir, faultsBinaryDir} {
		if dir != "" {
			_ = os.RemoveAll(dir)
		}
	}
	os.Exit(code)
}

var caddyBinaryDir, faultsBinaryDir string

// caddyBinary builds cmd/caddy once per test binary.
var caddyBinary = sync.OnceValues(func() (string, error) {
	return buildCaddy(&caddyBinaryDir, "caddy", "../cmd/caddy")
})

// caddyFaultsBinary builds internal/faultstorage/cmd/caddy-faults (cmd/caddy
// plus the test-only storage module restream_test_faults) once per test binary.
var caddyFaultsBinary = sync.OnceValues(func() (string, error) {
	return buildCaddy(&faultsBinaryDir, "caddy-faults", "../internal/faultstorage/cmd/caddy-faults")
})

func buildCaddy(dirVar *string, name, pkg string) (string, error) {
	dir, err := os.MkdirTemp("", "restream-auth-"+name+"-")
	if err != nil {
		return "", err
	}
	*dirVar = dir
	bin := filepath.Join(dir, name)
	cmd := exec.Command("go", "build", "-o", bin, pkg)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("go build %s: %v\n%s", pkg, err, out.String())
	}
	return bin, nil
}

// caddyProc is a Caddy process started from the built binary.
type caddyProc struct {
	cmd    *exec.Cmd
	output *bytes.Buffer
	mu     sync.Mutex
	exited chan struct{}
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

// startProcess runs `caddy run` with the Caddyfile and stops it (by PID) at
// the end of the test.
func startProcess(t *testing.T, caddyfileText string, args ...string) *caddyProc {
	t.Helper()
	bin, err := caddyBinary()
	if err != nil {
		t.Fatal(err)
	}
	return startProcessBin(t, bin, caddyfileText, args...)
}

// startProcessBin is startProcess with another Caddy binary.
func startProcessBin(t *testing.T, bin, caddyfileText string, args ...string) *caddyProc {
	t.Helper()
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cfgPath, []byte(caddyfileText), 0o600); err != nil {
		t.Fatal(err)
	}
	p := &caddyProc{output: new(bytes.Buffer), exited: make(chan struct{})}
	p.cmd = exec.Command(bin, append([]string{"run", "--config", cfgPath, "--adapter", "caddyfile"}, args...)...)
	p.cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	w := lockedWriter{&p.mu, p.output}
	p.cmd.Stdout, p.cmd.Stderr = w, w
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = p.cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() { p.stop(t) })
	return p
}

func (p *caddyProc) Output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.output.String()
}

func (p *caddyProc) stop(t *testing.T) {
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.cmd.Process.Signal(os.Interrupt)
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
		t.Errorf("caddy (pid %d) did not stop on SIGINT; killed", p.cmd.Process.Pid)
	}
}

// waitReady waits until url answers anything at all.
func waitReady(t *testing.T, url string, p *caddyProc) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
			return
		}
		select {
		case <-ctx.Done():
			out := ""
			if p != nil {
				out = p.Output()
			}
			t.Fatalf("caddy at %s never came up: %v\n%s", url, err, out)
		case <-p.exitedChan():
			t.Fatalf("caddy exited early:\n%s", p.Output())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (p *caddyProc) exitedChan() <-chan struct{} {
	if p == nil {
		return nil
	}
	return p.exited
}

func decodeEcho(t testing.TB, b []byte) echo {
	t.Helper()
	var e echo
	if err := json.Unmarshal(b, &e); err != nil {
		t.Fatalf("not an echo: %v: %s", err, b)
	}
	return e
}

func mustContainNone(t testing.TB, where, text string, secrets ...string) {
	t.Helper()
	for _, s := range secrets {
		if s != "" && strings.Contains(text, s) {
			t.Errorf("%s contains a secret (%.6s…)", where, s)
		}
	}
}

func itoa(i int) string { return fmt.Sprint(i) }
