package demo

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
)

// hermetic points every directory Caddy or the demo could write to at
// temporary ones, and returns the directory the demo's own temp dir goes in.
func hermetic(t *testing.T) string {
	t.Helper()
	home, tmp := t.TempDir(), t.TempDir()
	t.Setenv("HOME", home)
	t.Setenv("XDG_DATA_HOME", home)
	t.Setenv("XDG_CONFIG_HOME", home)
	t.Setenv("TMPDIR", tmp)
	return tmp
}

// freeAddr is a loopback address for the demo's sidecar to listen on.
func freeAddr(t *testing.T) string {
	t.Helper()
	return "127.0.0.1:" + strconv.Itoa(testproc.Port(t))
}

// A full token is "at_"/"rt_" and 40 hex digits; the client secret is 64 hex
// digits. Shortened tokens show 5 of them.
var longHex = regexp.MustCompile(`[0-9a-f]{12,}`)

func TestRunRotates(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the demo for 3 s, until a token rotates")
	}
	tmp := hermetic(t)
	var out bytes.Buffer
	res, err := Run(context.Background(), Options{
		Duration: 3 * time.Second,
		TokenTTL: 2 * time.Second,
		Listen:   freeAddr(t),
		Out:      &out,
	})
	text := out.String()
	t.Logf("demo output:\n%s", text)
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if !res.Success() {
		t.Fatalf("demo failed: %+v", res)
	}
	if res.Rotations < 1 || !strings.Contains(text, "token rotated: generation 1 ") {
		t.Fatalf("no rotation shown (result %+v)", res)
	}
	if res.Bogus == 0 || res.BogusReplaced != res.Bogus || !strings.Contains(text, "instead: replaced") {
		t.Fatalf("bogus Authorization not shown replaced (result %+v)", res)
	}
	// A request sent while a rotation is in flight meets a 401 (Restream
	// kills the old token before the sidecar has stored and published the
	// new one) and is replayed: the client still gets 200 (res.Success).
	// The demo sends one request at a time, so at most one per rotation.
	if res.Fake.InvalidGrant != 0 || res.Fake.API401 > res.Fake.RefreshOK-1 || res.Fake.MaxConcurrentRefresh != 1 {
		t.Fatalf("fake saw trouble: %+v", res.Fake)
	}
	for _, want := range []string{"restream_auth demo {", "Summary", "PASS"} {
		if !strings.Contains(text, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if m := longHex.FindString(text); m != "" {
		t.Errorf("output contains a full token or secret (%.6s…)", m)
	}
	if ents, _ := os.ReadDir(tmp); len(ents) != 0 {
		t.Errorf("temp dir not cleaned up: %v", ents)
	}
}

func TestListenBusy(t *testing.T) {
	hermetic(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var out bytes.Buffer
	_, err = Run(context.Background(), Options{Duration: time.Second, Listen: l.Addr().String(), Out: &out})
	if !errors.Is(err, ErrListenBusy) || !strings.Contains(err.Error(), "--listen") {
		t.Fatalf("want ErrListenBusy suggesting --listen, got %v", err)
	}
}

func TestRunInterrupted(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the demo for 1.5 s before interrupting it")
	}
	tmp := hermetic(t)
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	var out bytes.Buffer
	start := time.Now()
	res, err := Run(ctx, Options{Duration: time.Minute, TokenTTL: 2 * time.Second, Listen: freeAddr(t), Out: &out})
	if err != nil {
		t.Fatalf("Run: %v\n%s", err, out.String())
	}
	if took := time.Since(start); took > 15*time.Second {
		t.Fatalf("interrupted run took %s", took)
	}
	if !res.Interrupted || !res.Success() || !strings.Contains(out.String(), "Interrupted after") {
		t.Fatalf("want a clean interrupted run, got %+v\n%s", res, out.String())
	}
	if ents, _ := os.ReadDir(tmp); len(ents) != 0 {
		t.Errorf("temp dir not cleaned up: %v", ents)
	}
}

func TestShort(t *testing.T) {
	if got := Short("at_0123456789abcdef"); got != "at_01234…" {
		t.Fatalf("Short = %q", got)
	}
}
