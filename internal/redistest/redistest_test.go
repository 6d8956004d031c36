package redistest

import (
	"fmt"
	"testing"
)

func TestRestartKeepsDataOnlyWithAppendOnly(t *testing.T) {
	for _, aof := range []bool{false, true} {
		t.Run(fmt.Sprint("appendonly=", aof), func(t *testing.T) {
			s := Start(t, Options{AppendOnly: aof, Password: "pw"})
			s.MustDo("SET", "k", "v")
			s.Kill()
			if _, err := s.Do("PING"); err == nil {
				t.Fatal("the server answers after Kill")
			}
			port := s.Port
			s.Restart()
			if s.Port != port {
				t.Fatalf("restarted on port %d, want %d", s.Port, port)
			}
			got := s.MustDo("GET", "k")
			if aof && got != "v" || !aof && got != nil {
				t.Fatalf("after a restart GET k = %v (appendonly %v)", got, aof)
			}
		})
	}
}

func TestReplica(t *testing.T) {
	primary := Start(t, Options{})
	replica := Start(t, Options{ReplicaOf: primary.Addr()})
	replica.WaitReplicaUp(primary)
	r, err := primary.DoAll([]string{"SET", "k", "v"}, []string{"WAIT", "1", "5000"})
	if err != nil || r[1] != int64(1) {
		t.Fatalf("SET, WAIT 1: %v %v", r, err)
	}
	if got := replica.MustDo("GET", "k"); got != "v" {
		t.Fatalf("replica GET k = %v", got)
	}
}

// A server whose port another redis-server holds does not take that one
// for its own: start checks the PID of whoever answers.
func TestStartRefusesAnotherServersPort(t *testing.T) {
	other := Start(t, Options{})
	s := &Server{t: t, bin: Binary(t), Dir: t.TempDir(), Port: other.Port}
	if err := s.start(); err == nil {
		t.Fatalf("started on port %d, which another redis-server holds", other.Port)
	} else {
		t.Logf("start on a taken port: %v", err)
	}
	if got := other.MustDo("PING"); got != "PONG" {
		t.Fatalf("the other server: PING = %v", got)
	}
}

// fakeTB records how Binary ends a test without ending this one.
type fakeTB struct {
	testing.TB
	fatal, skip bool
}

func (f *fakeTB) Helper()               {}
func (f *fakeTB) Fatalf(string, ...any) { f.fatal = true }
func (f *fakeTB) Skip(...any)           { f.skip = true }
func (f *fakeTB) Skipf(string, ...any)  { f.skip = true }

func TestMissingBinarySkipsUnlessRequired(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	t.Setenv(RequireEnv, "")
	f := &fakeTB{TB: t}
	Binary(f)
	if !f.skip || f.fatal {
		t.Fatalf("without %s: skip %v fatal %v, want a skip", RequireEnv, f.skip, f.fatal)
	}
	t.Setenv(RequireEnv, "1")
	f = &fakeTB{TB: t}
	Binary(f)
	if !f.fatal || f.skip {
		t.Fatalf("with %s=1: skip %v fatal %v, want a failure", RequireEnv, f.skip, f.fatal)
	}
}
