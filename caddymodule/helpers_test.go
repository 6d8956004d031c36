package caddymodule_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	"github.com/caddyserver/certmagic"

	_ "github.com/restream-sidecar/caddy-restream-auth/caddymodule"
	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// freePort is testproc.Port, for the command tests that still call it
// by this name.
func freePort(t testing.TB) int { return testproc.Port(t) }

// siteConfig is a sidecar Caddyfile in front of the fake.
type siteConfig struct {
	Port, AdminPort int
	StorageDir      string
	Fake            *fakerestream.Server
	Seed            string
	Extra           string // more restream_auth subdirectives
	Global          string // more global options
	LogFile         string // if set, logs go here at DEBUG
	SiteExtra       string // more directives of the site
	Upstream        string // reverse_proxy's target; the fake's API if empty
}

// debugLogOptions are global options that write Caddy's log to path at
// DEBUG and trace every request through the handlers (servers { trace }):
// everything a test for leaked secrets must read.
func debugLogOptions(path string) string {
	return fmt.Sprintf("log {\n\t\toutput file %s\n\t\tlevel DEBUG\n\t}\n\tservers {\n\t\ttrace\n\t}", path)
}

// readFiles returns the files' contents one after the other: the logs of a
// Caddy that stopped, which flushed them.
func readFiles(t *testing.T, paths ...string) string {
	t.Helper()
	var out strings.Builder
	for _, path := range paths {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		out.Write(b)
	}
	return out.String()
}

// profileURL is the site's URL of Restream's profile endpoint.
func (c siteConfig) profileURL() string {
	return "http://127.0.0.1:" + itoa(c.Port) + "/v2/user/profile"
}

// runWarmedUp runs the site in this process (see runInProcess) and returns
// its profileURL once a request through it has been answered 200.
func runWarmedUp(t *testing.T, cfg siteConfig) string {
	t.Helper()
	runInProcess(t, cfg.Caddyfile())
	url := cfg.profileURL()
	if got := timedGet(t, url); got.status != http.StatusOK {
		t.Fatalf("warm-up: %s", got)
	}
	return url
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
	writeIndented(&b, "\t", c.Global)
	fmt.Fprintf(&b, "}\n\nhttp://127.0.0.1:%d {\n", c.Port)
	writeIndented(&b, "\t", c.SiteExtra)
	b.WriteString("\trestream_auth {\n\t\tclient_id test-client\n\t\tclient_secret test-secret\n")
	if c.Seed != "" {
		fmt.Fprintf(&b, "\t\trefresh_token %s\n", c.Seed)
	}
	fmt.Fprintf(&b, "\t\ttoken_url %s\n", c.Fake.TokenURL())
	writeIndented(&b, "\t\t", c.Extra)
	upstream := c.Upstream
	if upstream == "" {
		upstream = c.Fake.URL()
	}
	fmt.Fprintf(&b, "\t}\n\treverse_proxy %s\n}\n", upstream)
	return b.String()
}

// writeIndented writes each non-blank line of text, trimmed, after indent.
// Nested blocks come out flat, which the Caddyfile does not mind.
func writeIndented(b *strings.Builder, indent, text string) {
	for line := range strings.SplitSeq(text, "\n") {
		if line = strings.TrimSpace(line); line != "" {
			b.WriteString(indent + line + "\n")
		}
	}
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

// loadInProcess loads a Caddyfile into this process's Caddy, replacing the
// running config. The old config's servers close their idle connections,
// and a client that picks one of those from its pool before it sees the
// close gets EOF: the test clients drop theirs instead.
func loadInProcess(t *testing.T, caddyfileText string) {
	t.Helper()
	cfgJSON := adapt(t, caddyfileText)
	if err := caddy.Load(cfgJSON, true); err != nil {
		t.Fatalf("loading config: %v", err)
	}
	client.CloseIdleConnections()
	http.DefaultClient.CloseIdleConnections()
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
	Method           string `json:"method"`
	Path             string `json:"path"`
	Query            string `json:"query"`
	BodySHA256       string `json:"body_sha256"`
	BodyLen          int    `json:"body_len"`
	Authorization    string `json:"authorization"`
	AccessTokenQuery string `json:"access_token_query"`
}

var client = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}

// noKeepAlive is for Caddy's admin endpoint in tests that load configs:
// every load restarts the admin server, closing kept-alive connections.
var noKeepAlive = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// do sends a request with the test client; a transport error fails the
// test and returns status 0.
func do(t testing.TB, method, url string, body []byte, hdr map[string]string) (status int, respBody []byte, header http.Header) {
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

// loadFor sends GETs from workers for d, worker w to urls[w%len(urls)].
// Every answer must be 200; it returns how many were and how many were not.
func loadFor(t *testing.T, urls []string, workers int, d time.Duration) (ok, failed int64) {
	t.Helper()
	var okCount, failedCount atomic.Int64
	deadline := time.Now().Add(d)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for time.Now().Before(deadline) {
				status, body, _ := do(t, http.MethodGet, urls[w%len(urls)], nil, nil)
				if status == http.StatusOK {
					okCount.Add(1)
				} else {
					failedCount.Add(1)
					t.Errorf("status %d: %s", status, body)
				}
			}
		})
	}
	wg.Wait()
	return okCount.Load(), failedCount.Load()
}

// skipIfShort skips a wall-clock test (real waits, processes, seconds of
// load) under -short, the inner loop; .ci/run runs everything.
func skipIfShort(t *testing.T, why string) {
	t.Helper()
	if testing.Short() {
		t.Skip("wall-clock: " + why)
	}
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

// builds holds the Caddy binaries built for the tests, once per test binary.
var builds testproc.Builds

// TestMain removes the Caddy binaries built for the tests.
func TestMain(m *testing.M) {
	code := m.Run()
	_ = builds.Cleanup()
	os.Exit(code)
}

// caddyBinary builds cmd/caddy once per test binary.
func caddyBinary() (string, error) { return builds.Binary("../cmd/caddy") }

// caddyFaultsBinary builds internal/faultstorage/cmd/caddy-faults (cmd/caddy
// plus the test-only storage module restream_test_faults) once per test binary.
func caddyFaultsBinary() (string, error) {
	return builds.Binary("../internal/faultstorage/cmd/caddy-faults")
}

// startProcess runs `caddy run` with the Caddyfile and stops it (by PID) at
// the end of the test.
func startProcess(t *testing.T, caddyfileText string, args ...string) *testproc.Process {
	t.Helper()
	return startProcessBin(t, builds.MustBinary(t, "../cmd/caddy"), caddyfileText, args...)
}

// startProcessBin is startProcess with another Caddy binary. HOME and the
// XDG directories point into the test's temporary directory, so Caddy
// writes nothing outside it.
func startProcessBin(t *testing.T, bin, caddyfileText string, args ...string) *testproc.Process {
	t.Helper()
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cfgPath, []byte(caddyfileText), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, append([]string{"run", "--config", cfgPath, "--adapter", "caddyfile"}, args...)...)
	cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	return testproc.Start(t, "caddy", cmd)
}

// killProcess SIGKILLs p, as a crash would, and waits for it. A process
// that exited before the kill fails the test: a crash of its own is worth
// seeing.
func killProcess(t *testing.T, p *testproc.Process) {
	t.Helper()
	select {
	case <-p.Exited():
		t.Fatalf("%s (pid %d) exited before the kill; its output ends:\n%s", p.Name, p.PID(), tailString(p.Output(), 30))
	default:
	}
	p.Kill()
}

// waitReady waits until url answers anything at all; p may be nil (a Caddy
// running in this process).
func waitReady(t *testing.T, url string, p *testproc.Process) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := testproc.WaitHTTP(ctx, url, p); err != nil {
		out := ""
		if p != nil {
			out = p.Output()
		}
		t.Fatalf("caddy at %s never came up: %v\n%s", url, err, out)
	}
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

func newFake(t *testing.T, opts fakerestream.Options) *fakerestream.Server {
	t.Helper()
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	f := fakerestream.New(opts)
	t.Cleanup(f.Close)
	return f
}

// get is a GET that reports transport errors instead of failing the test.
func get(cl *http.Client, url string) (status int, body []byte, err error) {
	resp, err := cl.Get(url)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, nil, err
	}
	return resp.StatusCode, b, nil
}

// answerKey names an answer by status and error code, for reports.
func answerKey(status int, body []byte) string {
	s := fmt.Sprint(status)
	for _, code := range []string{"reauth_required", "temporarily_unavailable", "no_chain", "invalid_token"} {
		if strings.Contains(string(body), code) {
			return s + " " + code
		}
	}
	return s
}

type accountStatus struct {
	Account          string `json:"account"`
	State            string `json:"state"`
	Generation       uint64 `json:"generation"`
	AccessExpiresAt  string `json:"access_expires_at"`
	RefreshExpiresAt string `json:"refresh_expires_at"`
	Persisted        bool   `json:"persisted"`
	LastRefreshAt    string `json:"last_refresh_at"`
	LastResult       string `json:"last_result"`
	LastError        string `json:"last_error"`
	NextRefreshAt    string `json:"next_refresh_at"`
}

func adminStatus(t *testing.T, admin string) map[string]accountStatus {
	t.Helper()
	status, body, _ := do(t, http.MethodGet, admin+"/restream_auth/", nil, nil)
	if status != http.StatusOK {
		t.Fatalf("admin status: %d %s", status, body)
	}
	var out struct{ Accounts []accountStatus }
	if err := json.Unmarshal(body, &out); err != nil {
		t.Fatalf("admin status JSON: %v: %s", err, body)
	}
	m := make(map[string]accountStatus)
	for _, a := range out.Accounts {
		m[a.Account] = a
	}
	return m
}

func sleepUntil(at time.Time) {
	if d := time.Until(at); d > 0 {
		time.Sleep(d)
	}
}

// procSite is the Caddyfile of one sidecar process: an admin endpoint, a
// health route, and file_system storage at Root, or the fault storage over
// the same root when Control is set.
type procSite struct {
	Port, AdminPort int
	Root            string
	Control         string
	Journal         string
	Fake            *fakerestream.Server
	Seed            string
	Extra           string // more restream_auth subdirectives
}

// withFaults makes the site use the fault storage with control and journal.
func (c procSite) withFaults(control, journal string) procSite {
	c.Control, c.Journal = control, journal
	return c
}

func (c procSite) Caddyfile() string {
	var b strings.Builder
	fmt.Fprintf(&b, "{\n\tadmin 127.0.0.1:%d\n\tauto_https off\n\tpersist_config off\n", c.AdminPort)
	if c.Control != "" {
		fmt.Fprintf(&b, "\tstorage restream_test_faults {\n\t\troot %s\n\t\tcontrol %s\n\t\tjournal %s\n\t}\n", c.Root, c.Control, c.Journal)
	} else {
		fmt.Fprintf(&b, "\tstorage file_system %s\n", c.Root)
	}
	fmt.Fprintf(&b, "}\n\nhttp://127.0.0.1:%d {\n\thandle /healthz {\n\t\trestream_auth_health\n\t}\n\thandle {\n", c.Port)
	b.WriteString("\t\trestream_auth {\n\t\t\tclient_id test-client\n\t\t\tclient_secret test-secret\n")
	if c.Seed != "" {
		fmt.Fprintf(&b, "\t\t\trefresh_token %s\n", c.Seed)
	}
	fmt.Fprintf(&b, "\t\t\ttoken_url %s\n", c.Fake.TokenURL())
	writeIndented(&b, "\t\t\t", c.Extra)
	fmt.Fprintf(&b, "\t\t}\n\t\treverse_proxy %s\n\t}\n}\n", c.Fake.URL())
	return b.String()
}

func (c procSite) url() string { return fmt.Sprintf("http://127.0.0.1:%d/v2/user/profile", c.Port) }

func (c procSite) admin() string { return fmt.Sprintf("http://127.0.0.1:%d", c.AdminPort) }

// start runs the site with bin and waits until it answers.
func (c procSite) start(t *testing.T, bin string) *testproc.Process {
	t.Helper()
	p := startProcessBin(t, bin, c.Caddyfile())
	waitReady(t, c.url(), p)
	return p
}

func (c procSite) status(t *testing.T) accountStatus { return adminStatus(t, c.admin())["default"] }

// health returns the health route's status code and state.
func (c procSite) health(t *testing.T) (int, string) {
	t.Helper()
	status, body, _ := do(t, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/healthz", c.Port), nil, nil)
	var h struct {
		State string `json:"state"`
	}
	_ = json.Unmarshal(body, &h)
	return status, h.State
}

// forceRefresh asks the admin API for a refresh and returns its answer.
func (c procSite) forceRefresh(t *testing.T) (status int, st accountStatus, raw string) {
	t.Helper()
	status, body, _ := do(t, http.MethodPost, c.admin()+"/restream_auth/default/refresh", nil, nil)
	_ = json.Unmarshal(body, &st)
	return status, st, strings.TrimSpace(string(body))
}

func newProcSite(t *testing.T, fake *fakerestream.Server, root, seed, extra string) procSite {
	return procSite{Port: testproc.Port(t), AdminPort: testproc.Port(t), Root: root, Fake: fake, Seed: seed, Extra: extra}
}

// leaseFile is lease.json as tokensource writes it.
type leaseFile struct {
	Owner     string    `json:"owner"`
	Nonce     string    `json:"nonce,omitempty"`
	Seq       uint64    `json:"seq,omitempty"`
	TTLMillis int64     `json:"ttl_ms,omitempty"`
	Mark      string    `json:"mark,omitempty"`
	MarkedBy  string    `json:"marked_by,omitempty"`
	ExpiresAt time.Time `json:"expires_at,omitzero"`
}

// storageLockName is the storage lock an instance takes for each read and
// write of an account's lease and record (tokensource's storageStore).
func storageLockName(account string) string { return tokensource.KeyPrefix(account) + "/lease" }

// readLease reads root's lease.json; the zero leaseFile if there is none.
func readLease(t *testing.T, root string) (leaseFile, []byte) {
	t.Helper()
	path := filepath.Join(root, filepath.FromSlash(tokensource.LeaseKey("default")))
	var l leaseFile
	for range 50 { // a file being replaced may read empty for a moment
		b, err := os.ReadFile(path)
		if os.IsNotExist(err) {
			return l, nil
		}
		if err == nil && json.Unmarshal(b, &l) == nil {
			return l, b
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s stays unreadable", path)
	return l, nil
}

// plantLease writes lease.json as another instance would: under the
// account's storage lock, and only while no instance holds the lease (so no
// token call is in flight). It returns what it wrote, and when.
func plantLease(t *testing.T, root string, l leaseFile) ([]byte, time.Time) {
	t.Helper()
	return writeLease(t, root, l, true)
}

// releasePlanted releases a planted lease, as its holder would.
func releasePlanted(t *testing.T, root string) {
	t.Helper()
	writeLease(t, root, leaseFile{}, false)
}

func writeLease(t *testing.T, root string, l leaseFile, onlyIfFree bool) ([]byte, time.Time) {
	t.Helper()
	st := &certmagic.FileStorage{Path: root}
	ctx := context.Background()
	name := storageLockName("default")
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no moment with the storage lock free and the lease released in 30 s")
		}
		// One attempt at the lock: certmagic waits a second between
		// attempts unless the context has ended.
		done, cancel := context.WithCancel(ctx)
		cancel()
		if st.Lock(done, name) != nil {
			continue
		}
		if cur, _ := readLease(t, root); cur.Owner == "" || !onlyIfFree {
			break
		}
		_ = st.Unlock(ctx, name)
	}
	defer func() { _ = st.Unlock(ctx, name) }()
	if l.ExpiresAt.IsZero() && l.Owner != "" {
		l.ExpiresAt = time.Now().Add(time.Duration(l.TTLMillis) * time.Millisecond)
	}
	b, _ := json.Marshal(l)
	at := time.Now()
	if err := st.Store(ctx, tokensource.LeaseKey("default"), b); err != nil {
		t.Fatal(err)
	}
	return b, at
}

// timedGet is one GET and how long it took.
type timedAnswer struct {
	status int
	body   []byte
	hdr    http.Header
	took   time.Duration
}

func (a timedAnswer) key() string { return answerKey(a.status, a.body) }

// is503 reports a 503 with the error code and a Retry-After in seconds.
func (a timedAnswer) is503(code string) bool {
	ra, err := strconv.Atoi(a.hdr.Get("Retry-After"))
	return a.status == http.StatusServiceUnavailable && strings.Contains(string(a.body), `"error":"`+code+`"`) && err == nil && ra >= 1
}

func (a timedAnswer) String() string {
	return fmt.Sprintf("%d %s (Retry-After %q, %s)", a.status, strings.TrimSpace(string(a.body)), a.hdr.Get("Retry-After"), a.took.Round(time.Millisecond))
}

func timedGet(t *testing.T, url string) timedAnswer {
	t.Helper()
	start := time.Now()
	status, body, hdr := do(t, http.MethodGet, url, nil, nil)
	return timedAnswer{status, body, hdr, time.Since(start)}
}

func quiet(string, ...any) {}

// startLocal starts an httptest server on 127.0.0.1.
func startLocal(t *testing.T, h http.Handler) *httptest.Server {
	t.Helper()
	srv := httptest.NewUnstartedServer(h)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv.Listener = l
	srv.Start()
	t.Cleanup(srv.Close)
	return srv
}
