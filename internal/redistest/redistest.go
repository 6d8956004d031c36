// Package redistest runs a real redis-server for tests: on a free loopback
// port, in a temporary directory, stopped by its PID when the test ends.
//
// Tests that need Redis call Start. Without a redis-server binary they are
// skipped, unless RESTREAM_REQUIRE_REDIS=1 (set by CI), which makes a
// missing binary a failure: a CI run must never pass by skipping them.
package redistest

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
)

// RequireEnv, set to 1, makes a missing redis-server fail the tests that
// need it instead of skipping them.
const RequireEnv = "RESTREAM_REQUIRE_REDIS"

// Options configure a server. The zero value is a server without
// persistence, password or replication.
type Options struct {
	// Password is required from clients (--requirepass) if set.
	Password string
	// AppendOnly turns on the append-only file (--appendonly yes), so a
	// Restart keeps the data; without it the server keeps nothing on disk
	// (--save "" --appendonly no) and a Restart starts empty.
	AppendOnly bool
	// ReplicaOf, as host:port, makes the server a replica of that one;
	// MasterAuth is the master's password.
	ReplicaOf  string
	MasterAuth string
	// Args are more redis-server options.
	Args []string
}

// Server is a redis-server process.
type Server struct {
	t    testing.TB
	bin  string
	opts Options
	// Port and Dir stay the same across Restart.
	Port int
	Dir  string

	mu   sync.Mutex        // guards proc
	proc *testproc.Process // the current run; a Restart replaces it
}

// Binary returns the redis-server to run; it skips the test (or fails it
// under RESTREAM_REQUIRE_REDIS=1) if there is none.
func Binary(t testing.TB) string {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err == nil {
		return bin
	}
	msg := "redis-server is not installed (Debian: apt-get install redis-server)"
	if os.Getenv(RequireEnv) == "1" {
		t.Fatalf("%s, and %s=1 requires it", msg, RequireEnv)
		return ""
	}
	t.Skip(msg + "; skipping")
	return ""
}

// Start runs a redis-server and waits until it answers PING. It is stopped
// (SIGTERM, then SIGKILL) when the test ends.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	s := &Server{t: t, bin: Binary(t), opts: opts, Dir: t.TempDir()}
	var err error
	for range 3 { // a free port can be taken between the probe and the bind
		s.Port = testproc.Port(t)
		if err = s.start(); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("starting redis-server: %v", err)
	}
	t.Cleanup(s.Stop)
	return s
}

// Addr is the server's host:port.
func (s *Server) Addr() string { return "127.0.0.1:" + strconv.Itoa(s.Port) }

// URL is a redis:// URL of the server, with its password if it has one.
func (s *Server) URL() string {
	if s.opts.Password != "" {
		return "redis://:" + s.opts.Password + "@" + s.Addr() + "/0"
	}
	return "redis://" + s.Addr() + "/0"
}

func (s *Server) args() []string {
	a := []string{"--port", strconv.Itoa(s.Port), "--bind", "127.0.0.1", "--dir", s.Dir,
		"--daemonize", "no", "--logfile", "", "--loglevel", "warning",
		"--repl-diskless-sync-delay", "0"} // replicas sync at once
	if s.opts.AppendOnly {
		a = append(a, "--appendonly", "yes", "--appendfsync", "always", "--save", "")
	} else {
		a = append(a, "--appendonly", "no", "--save", "")
	}
	if s.opts.Password != "" {
		a = append(a, "--requirepass", s.opts.Password)
	}
	if s.opts.ReplicaOf != "" {
		host, port, err := net.SplitHostPort(s.opts.ReplicaOf)
		if err != nil {
			s.t.Fatalf("ReplicaOf %q: %v", s.opts.ReplicaOf, err)
		}
		a = append(a, "--replicaof", host, port)
		if s.opts.MasterAuth != "" {
			a = append(a, "--masterauth", s.opts.MasterAuth)
		}
	}
	return append(a, s.opts.Args...)
}

// start runs the process and waits for PING; on failure the process is gone.
func (s *Server) start() error {
	p := testproc.Start(s.t, "redis-server", exec.Command(s.bin, s.args()...))
	s.mu.Lock()
	s.proc = p
	s.mu.Unlock()

	deadline := time.Now().Add(15 * time.Second)
	for {
		// Ask for the server's pid: the port may have been taken, between
		// testproc.Port and the bind, by another test's redis-server.
		info, err := s.Do("INFO", "server")
		if err == nil {
			if str, _ := info.(string); strings.Contains(str, "process_id:"+strconv.Itoa(p.PID())+"\r\n") {
				return nil
			}
			p.Kill()
			return fmt.Errorf("port %d answers for another redis-server", s.Port)
		}
		select {
		case <-p.Exited():
			return fmt.Errorf("redis-server exited: %s", p.Output())
		default:
		}
		if time.Now().After(deadline) {
			p.Kill()
			return fmt.Errorf("redis-server on port %d never answered PING: %v\n%s", s.Port, err, p.Output())
		}
		// An external process offers no readiness signal; poll briefly.
		time.Sleep(10 * time.Millisecond)
	}
}

// Stop shuts the server down (SIGTERM, SIGKILL after 10s) and waits for it.
// Stopping a stopped server does nothing.
func (s *Server) Stop() {
	if p := s.current(); p != nil {
		if _, err := p.Stop(syscall.SIGTERM, 10*time.Second); err != nil {
			s.t.Error(err)
		}
	}
}

// Kill ends the server with SIGKILL, as a crash would, and waits for it.
func (s *Server) Kill() {
	if p := s.current(); p != nil {
		p.Kill()
	}
}

func (s *Server) current() *testproc.Process {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.proc
}

// Restart stops the server if it runs and starts it again on the same port
// and directory: without AppendOnly it comes back empty, like a Redis
// restarted without persistence.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	if err := s.start(); err != nil {
		s.t.Fatalf("restarting redis-server on port %d: %v", s.Port, err)
	}
}

// Output is what the server has printed since it was last (re)started.
func (s *Server) Output() string {
	if p := s.current(); p != nil {
		return p.Output()
	}
	return ""
}

// Do sends one command on a new connection (authenticated if the server has
// a password) and returns the reply: a string, an int64, nil, or a []any.
// An error reply is returned as an error.
func (s *Server) Do(args ...string) (any, error) {
	replies, err := s.DoAll(args)
	if err != nil {
		return nil, err
	}
	return replies[0], nil
}

// DoAll sends commands in turn on one new connection, as WAIT needs (it
// counts the acknowledgements of its own connection's writes), and returns
// their replies; it stops at the first error.
func (s *Server) DoAll(cmds ...[]string) ([]any, error) {
	c, err := net.DialTimeout("tcp", s.Addr(), 2*time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	if s.opts.Password != "" {
		if _, err := roundTrip(c, r, "AUTH", s.opts.Password); err != nil {
			return nil, err
		}
	}
	var out []any
	for _, args := range cmds {
		v, err := roundTrip(c, r, args...)
		if err != nil {
			return out, err
		}
		out = append(out, v)
	}
	return out, nil
}

// MustDo is Do that fails the test on an error.
func (s *Server) MustDo(args ...string) any {
	s.t.Helper()
	v, err := s.Do(args...)
	if err != nil {
		s.t.Fatalf("redis %s: %v", args[0], err)
	}
	return v
}

// WaitReplicaUp waits until this replica's link to its master is up and
// the master counts it, so that WAIT on the master can be answered.
func (s *Server) WaitReplicaUp(master *Server) {
	s.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		info, _ := s.Do("INFO", "replication")
		minfo, _ := master.Do("INFO", "replication")
		if str, ok := info.(string); ok && strings.Contains(str, "master_link_status:up") {
			if mstr, ok := minfo.(string); ok && strings.Contains(mstr, "state=online") {
				return
			}
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("replica on port %d never linked to its master: %v\n%s", s.Port, info, s.Output())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func roundTrip(w io.Writer, r *bufio.Reader, args ...string) (any, error) {
	var b bytes.Buffer
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := w.Write(b.Bytes()); err != nil {
		return nil, err
	}
	return readReply(r)
}

func readReply(r *bufio.Reader) (any, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return nil, err
	}
	line = strings.TrimSuffix(line, "\r\n")
	if line == "" {
		return nil, errors.New("empty reply line")
	}
	switch line[0] {
	case '+':
		return line[1:], nil
	case '-':
		return nil, errors.New(line[1:])
	case ':':
		return strconv.ParseInt(line[1:], 10, 64)
	case '$':
		n, err := strconv.Atoi(line[1:])
		if err != nil || n < 0 {
			return nil, err
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(r, buf); err != nil {
			return nil, err
		}
		return string(buf[:n]), nil
	case '*':
		n, err := strconv.Atoi(line[1:])
		if err != nil || n < 0 {
			return nil, err
		}
		out := make([]any, n)
		for i := range out {
			if out[i], err = readReply(r); err != nil {
				return nil, err
			}
		}
		return out, nil
	}
	return nil, fmt.Errorf("unexpected reply %q", line)
}
