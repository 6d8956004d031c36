package testproc

import (
	"context"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestFreePortIsBindable(t *testing.T) {
	port := Port(t)
	l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		t.Fatalf("port %d not bindable: %v", port, err)
	}
	l.Close()
}

// TestStopEscalatesToKill: a process that ignores SIGINT is killed after the
// grace period, and Stop says so.
func TestStopEscalatesToKill(t *testing.T) {
	p := Start(t, "stubborn", exec.Command("sh", "-c", `trap "" INT; echo ready; while :; do sleep 0.05; done`))
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(p.Output(), "ready") {
		if time.Now().After(deadline) {
			t.Fatal("never printed ready")
		}
		time.Sleep(10 * time.Millisecond)
	}
	_, err := p.Stop(os.Interrupt, 200*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "killed") {
		t.Fatalf("Stop = %v, want a killed error", err)
	}
	select {
	case <-p.Exited():
	default:
		t.Fatal("not exited after Stop")
	}
	if _, err := p.Stop(os.Interrupt, time.Second); err != nil {
		t.Fatalf("second Stop = %v", err)
	}
}

func TestWaitHTTPReportsExit(t *testing.T) {
	p := Start(t, "quitter", exec.Command("true"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := WaitHTTP(ctx, "http://127.0.0.1:"+strconv.Itoa(Port(t)), p)
	if err == nil || !strings.Contains(err.Error(), "exited") {
		t.Fatalf("WaitHTTP = %v, want exited", err)
	}
}

func TestWaitHTTPAnswers(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.NotFoundHandler()}
	go srv.Serve(l)
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := WaitHTTP(ctx, "http://"+l.Addr().String(), nil); err != nil {
		t.Fatal(err)
	}
}

func TestBuildsOncePerPackage(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go build")
	}
	var b Builds
	defer b.Cleanup()
	first, err := b.Binary("./testdata/hello")
	if err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(first)
	second, err := b.Binary("./testdata/hello")
	if err != nil || second != first {
		t.Fatalf("second build = %q, %v; want %q", second, err, first)
	}
	st2, _ := os.Stat(second)
	if !st.ModTime().Equal(st2.ModTime()) {
		t.Fatal("rebuilt")
	}
	out, err := exec.Command(first).Output()
	if err != nil || string(out) != "hello\n" {
		t.Fatalf("run = %q, %v", out, err)
	}
	if err := b.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(first); !os.IsNotExist(err) {
		t.Fatalf("binary still there after Cleanup: %v", err)
	}
}

// Launch, outside a test, collects the output and reports the exit; a
// command that cannot start is an error.
func TestLaunch(t *testing.T) {
	p, err := Launch("echo", exec.Command("echo", "hi"))
	if err != nil {
		t.Fatal(err)
	}
	<-p.Exited()
	if got := p.Output(); got != "hi\n" {
		t.Fatalf("Output = %q", got)
	}
	if _, err := Launch("missing", exec.Command(t.TempDir()+"/no-such-binary")); err == nil || !strings.Contains(err.Error(), "start missing") {
		t.Fatalf("Launch of a missing binary = %v", err)
	}
}
