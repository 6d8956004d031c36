// Package testproc starts the processes tests need (Caddy binaries,
// redis-server) on free loopback ports and stops each one by its PID, so
// tests stay hermetic when packages run in parallel.
//
// Production code never imports it; tests and the benchmark (bench/) do.
package testproc

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
// Another process may take it before the caller binds it; callers that
// cannot retry should bind the returned port promptly.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Port is FreePort for tests: it fails the test when no port is free.
func Port(t testing.TB) int {
	t.Helper()
	port, err := FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return port
}

// Buffer is a bytes.Buffer safe for a process writing and a test reading.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *Buffer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

// String returns everything written so far.
func (w *Buffer) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// Process is a started child process whose output is collected.
type Process struct {
	Name string
	Cmd  *exec.Cmd

	output Buffer
	exited chan struct{}
}

// Start starts cmd with its stdout and stderr collected (Output) and stops
// it by PID when the test ends: SIGINT, then SIGKILL after 10 s, which fails
// the test (a process that ignores SIGINT is a bug worth seeing).
func Start(t testing.TB, name string, cmd *exec.Cmd) *Process {
	t.Helper()
	p, err := Launch(name, cmd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := p.Stop(os.Interrupt, 10*time.Second); err != nil {
			t.Error(err)
		}
	})
	return p
}

// Launch starts cmd as Start does but outside a test, for the benchmark:
// the caller stops the process (Stop or Kill). Its stdout and stderr are
// collected (Output) unless cmd sets them.
func Launch(name string, cmd *exec.Cmd) (*Process, error) {
	p := &Process{Name: name, Cmd: cmd, exited: make(chan struct{})}
	if cmd.Stdout == nil {
		cmd.Stdout = &p.output
	}
	if cmd.Stderr == nil {
		cmd.Stderr = &p.output
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() { _ = cmd.Wait(); close(p.exited) }()
	return p, nil
}

// Output returns what the process has written to stdout and stderr so far.
func (p *Process) Output() string { return p.output.String() }

// Exited is closed once the process has exited and been reaped.
func (p *Process) Exited() <-chan struct{} { return p.exited }

// PID returns the process ID.
func (p *Process) PID() int { return p.Cmd.Process.Pid }

// Stop sends sig and waits up to grace for the process to exit, then kills
// it. It returns how long the process took, and an error if it had to be
// killed. Stopping an exited process returns at once.
func (p *Process) Stop(sig os.Signal, grace time.Duration) (time.Duration, error) {
	start := time.Now()
	select {
	case <-p.exited:
		return 0, nil
	default:
	}
	_ = p.Cmd.Process.Signal(sig)
	select {
	case <-p.exited:
		return time.Since(start), nil
	case <-time.After(grace):
		_ = p.Cmd.Process.Kill()
		<-p.exited
		return time.Since(start), fmt.Errorf("%s (pid %d) did not stop within %v of %v; killed", p.Name, p.PID(), grace, sig)
	}
}

// Kill ends the process with SIGKILL, as a crash would, and waits for it.
func (p *Process) Kill() {
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.Cmd.Process.Kill()
	<-p.exited
}

// WaitHTTP polls url until it answers with any status, the process exits
// (p may be nil) or ctx ends.
func WaitHTTP(ctx context.Context, url string, p *Process) error {
	var exited <-chan struct{}
	if p != nil {
		exited = p.exited
	}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s never answered: %v", url, err)
		case <-exited:
			return fmt.Errorf("%s exited before %s answered", p.Name, url)
		case <-tick.C:
		}
	}
}

// Builds compiles Go commands once per test binary into a temporary
// directory that Cleanup removes (Run calls it after the tests).
type Builds struct {
	mu   sync.Mutex
	dir  string
	bins map[string]*build
}

type build struct {
	once sync.Once
	name string // unique in the directory: <n>-<base of the package>
	path string
	err  error
}

// Binary builds the Go package pkg (a path relative to the test's package
// directory, such as "../cmd/caddy") once and returns the binary's path.
func (b *Builds) Binary(pkg string) (string, error) {
	b.mu.Lock()
	if b.bins == nil {
		b.bins = make(map[string]*build)
	}
	if b.dir == "" {
		dir, err := os.MkdirTemp("", "restream-auth-bin-")
		if err != nil {
			b.mu.Unlock()
			return "", err
		}
		b.dir = dir
	}
	one := b.bins[pkg]
	if one == nil {
		one = &build{name: fmt.Sprintf("%d-%s", len(b.bins), filepath.Base(pkg))}
		b.bins[pkg] = one
	}
	dir := b.dir
	b.mu.Unlock()

	one.once.Do(func() {
		out := filepath.Join(dir, one.name)
		cmd := exec.Command("go", "build", "-o", out, pkg)
		var log bytes.Buffer
		cmd.Stdout, cmd.Stderr = &log, &log
		if err := cmd.Run(); err != nil {
			one.err = fmt.Errorf("go build %s: %v\n%s", pkg, err, log.String())
			return
		}
		one.path = out
	})
	return one.path, one.err
}

// MustBinary is Binary for tests.
func (b *Builds) MustBinary(t testing.TB, pkg string) string {
	t.Helper()
	path, err := b.Binary(pkg)
	if err != nil {
		t.Fatal(err)
	}
	return path
}

// Run runs the tests, then removes the built binaries, and returns the exit
// code: func TestMain(m *testing.M) { os.Exit(builds.Run(m)) }.
func (b *Builds) Run(m *testing.M) int {
	code := m.Run()
	if err := b.Cleanup(); err != nil {
		fmt.Fprintln(os.Stderr, "testproc: removing the built binaries:", err)
	}
	return code
}

// Cleanup removes the built binaries.
func (b *Builds) Cleanup() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.dir == "" {
		return nil
	}
	err := os.RemoveAll(b.dir)
	b.dir, b.bins = "", nil
	return err
}
