package caddymodule_test

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/caddymodule"
	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
)

// capSite is a sidecar with restream_auth in front of upstream; each route
// is a path prefix and its extra restream_auth subdirectives.
func capSite(t *testing.T, fake *fakerestream.Server, upstream string, routes map[string]string) int {
	t.Helper()
	port := testproc.Port(t)
	var b bytes.Buffer
	fmt.Fprintf(&b, "{\n\tadmin off\n\tstorage file_system %s\n\tauto_https off\n\tpersist_config off\n\tlog {\n\t\tlevel ERROR\n\t}\n}\n\nhttp://127.0.0.1:%d {\n", t.TempDir(), port)
	for path, extra := range routes {
		fmt.Fprintf(&b, "\troute %s {\n\t\trestream_auth {\n\t\t\tclient_id test-client\n\t\t\tclient_secret test-secret\n\t\t\trefresh_token %s\n\t\t\ttoken_url %s\n\t\t\t%s\n\t\t}\n\t\treverse_proxy %s\n\t}\n",
			path, fake.Seed(), fake.TokenURL(), extra, upstream)
	}
	b.WriteString("}\n")
	runInProcess(t, b.String())
	return port
}

// waitHeld waits for the process's replay byte count to be want; the
// handler offers no signal for it.
func waitHeld(t *testing.T, want int64) {
	t.Helper()
	waitFor(t, 10*time.Second, fmt.Sprintf("%d bytes held for replays (now %d)", want, caddymodule.ReplayBytesHeld()),
		func() bool { return caddymodule.ReplayBytesHeld() == want })
}

// Past max_replay_total, through real Caddy: while a stalled upload holds
// the whole total, another request is proxied with its whole body but
// without a replay copy, so the upstream's 401 reaches the client after one
// attempt; the stalled upload, once complete, is kept and replayed.
func TestReplayTotalCapPassesThrough401(t *testing.T) {
	fake := newFake(t, fakerestream.Options{Logf: func(string, ...any) {}})
	var mu sync.Mutex
	attempts := map[string]int{}
	upstream := startLocal(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		mu.Lock()
		attempts[r.Header.Get("X-Request")]++
		mu.Unlock()
		w.Header().Set("X-Body-Len", strconv.FormatInt(n, 10))
		w.WriteHeader(http.StatusUnauthorized)
	}))
	port := capSite(t, fake, upstream.URL, map[string]string{"/*": "max_replay_body 1KiB\n\t\t\tmax_replay_total 1KiB"})
	base := caddymodule.ReplayBytesHeld()
	skipped0 := caddymodule.ReplaySkipped("default")

	// The holder sends 10 bytes of 1 KiB and stalls: the total is taken.
	holder, err := net.Dial("tcp", "127.0.0.1:"+itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	fmt.Fprintf(holder, "PATCH /v2/user/channel/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request: holder\r\nContent-Length: 1024\r\n\r\n%s", bytes.Repeat([]byte("h"), 10))
	waitHeld(t, base+1024)

	status, _, hdr := do(t, http.MethodPatch, "http://127.0.0.1:"+itoa(port)+"/v2/user/channel/1", bytes.Repeat([]byte("x"), 1024),
		map[string]string{"X-Request": "over"})
	mu.Lock()
	overAttempts := attempts["over"]
	mu.Unlock()
	if status != http.StatusUnauthorized || overAttempts != 1 || hdr.Get("X-Body-Len") != "1024" {
		t.Fatalf("over the total: status %d after %d attempts, upstream read %s bytes; want 401 after 1 attempt with 1024 bytes",
			status, overAttempts, hdr.Get("X-Body-Len"))
	}
	if got := caddymodule.ReplaySkipped("default") - skipped0; got != 1 {
		t.Errorf("replay_skipped_total rose by %v, want 1", got)
	}

	if _, err := holder.Write(bytes.Repeat([]byte("h"), 1014)); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(holder), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	mu.Lock()
	holderAttempts := attempts["holder"]
	mu.Unlock()
	if resp.StatusCode != http.StatusUnauthorized || holderAttempts != 2 || resp.Header.Get("X-Body-Len") != "1024" {
		t.Fatalf("holder: status %d after %d attempts, upstream read %s bytes; want a replay (2 attempts) of 1024 bytes",
			resp.StatusCode, holderAttempts, resp.Header.Get("X-Body-Len"))
	}
	waitHeld(t, base)
}

// slowBodies is one run of TestReplayTotalSlowBodies: conns clients each
// send prefix bytes of a size-byte body to path and stall.
type slowBodies struct {
	port                 int
	conns, size, prefix  int
	upstreamPrefixesRead *atomic.Int64
}

type slowConn struct {
	c   net.Conn
	crc uint32
}

// open connects every client and sends its headers and prefix.
func (s slowBodies) open(t *testing.T, path string, body []byte) []slowConn {
	t.Helper()
	conns := make([]slowConn, s.conns)
	s.parallel(t, func(i int) error {
		c, err := net.Dial("tcp", "127.0.0.1:"+itoa(s.port))
		if err != nil {
			return err
		}
		conns[i].c = c
		var id [8]byte
		binary.BigEndian.PutUint64(id[:], uint64(i))
		conns[i].crc = crc32.Update(crc32.ChecksumIEEE(id[:]), crc32.IEEETable, body[8:])
		if _, err := fmt.Fprintf(c, "POST %s%d HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n", path, i, s.size); err != nil {
			return err
		}
		if _, err := c.Write(id[:]); err != nil {
			return err
		}
		_, err = c.Write(body[8:s.prefix])
		return err
	})
	return conns
}

// finish sends the rest of every body and checks each answer: 200, and
// the upstream got the whole body.
func (s slowBodies) finish(t *testing.T, conns []slowConn, body []byte) {
	t.Helper()
	s.parallel(t, func(i int) error {
		c := conns[i].c
		defer c.Close()
		if _, err := c.Write(body[s.prefix:]); err != nil {
			return err
		}
		_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || resp.Header.Get("X-Body-Len") != strconv.Itoa(s.size) ||
			resp.Header.Get("X-Body-CRC") != strconv.FormatUint(uint64(conns[i].crc), 10) {
			return fmt.Errorf("client %d: status %d, upstream got %s bytes (crc %s, want %d)", i, resp.StatusCode,
				resp.Header.Get("X-Body-Len"), resp.Header.Get("X-Body-CRC"), conns[i].crc)
		}
		return nil
	})
}

func (s slowBodies) parallel(t *testing.T, f func(i int) error) {
	t.Helper()
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, s.conns)
	for range 16 {
		wg.Go(func() {
			for i := int(next.Add(1) - 1); i < s.conns; i = int(next.Add(1) - 1) {
				if err := f(i); err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// liveHeap is the heap in use by live objects, pools flushed.
func liveHeap() int64 {
	runtime.GC()
	runtime.GC() // the second cycle drops what sync.Pools kept as victims
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapAlloc)
}

// raiseFileLimit makes room for n more descriptors, or skips the test.
func raiseFileLimit(t *testing.T, n uint64) {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Skipf("cannot read the open file limit: %v", err)
	}
	if lim.Cur < n && lim.Max >= n {
		lim.Cur = n
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			t.Logf("raising the open file limit to %d: %v", n, err)
		}
		_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	if lim.Cur < n {
		t.Skipf("this test holds about %d open files and the limit is %d (hard %d): raise it with ulimit -n", n, lim.Cur, lim.Max)
	}
}

// 1,000 clients each send 192 KiB of a 256 KiB body and stall (250 MiB
// announced, 188 MiB sent) to a sidecar with max_replay_total 8MiB. The
// bytes held for replays stay within the cap, the heap grows by no more
// than the cap beyond what the same stalled connections cost when nothing
// is kept (measured first, on a route whose max_replay_body is below the
// body), and every request, kept or not, completes with 200 once its body
// does.
//
// The bodies are 256 KiB because a body streamed to the upstream while its
// client stalls costs about 100 KiB in net/http's copy buffers: with 64 KiB
// bodies, keeping all of them would cost less heap than streaming them, and
// the heap could not tell a capped sidecar from an uncapped one.
func TestReplayTotalSlowBodies(t *testing.T) {
	skipIfShort(t, "1,000 stalled uploads (about 4 s)")
	const (
		conns  = 1000
		size   = 256 << 10
		prefix = 192 << 10
		total  = 8 << 20
		// A kept request has read its prefix and reserved the next chunk.
		perKept = prefix + caddymodule.ReplayChunk
	)
	raiseFileLimit(t, 4*conns+1024) // clients, Caddy's side of them, Caddy's upstream connections, the upstream's side
	fake := newFake(t, fakerestream.Options{Logf: func(string, ...any) {}})
	var prefixesRead atomic.Int64
	upstream := startLocal(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := crc32.NewIEEE()
		buf := make([]byte, 4<<10)
		n, err := io.CopyBuffer(h, io.LimitReader(r.Body, prefix), buf)
		if err != nil || n != prefix {
			http.Error(w, fmt.Sprintf("prefix: %d bytes, %v", n, err), http.StatusBadRequest)
			return
		}
		prefixesRead.Add(1)
		m, err := io.CopyBuffer(h, r.Body, buf)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("X-Body-Len", strconv.FormatInt(n+m, 10))
		w.Header().Set("X-Body-CRC", strconv.FormatUint(uint64(h.Sum32()), 10))
	}))
	port := capSite(t, fake, upstream.URL, map[string]string{
		"/control/*": "max_replay_body 32KiB",
		"/capped/*":  fmt.Sprintf("max_replay_total %dMiB", total>>20),
	})
	body := bytes.Repeat([]byte("0123456789abcdef"), size/16)
	run := slowBodies{port: port, conns: conns, size: size, prefix: prefix, upstreamPrefixesRead: &prefixesRead}
	// Warm up: the token, connection pools, and every lazily made structure.
	if status, b, _ := do(t, http.MethodPost, "http://127.0.0.1:"+itoa(port)+"/capped/warm", body, nil); status != http.StatusOK {
		t.Fatalf("warm-up: %d %s", status, b)
	}
	base := caddymodule.ReplayBytesHeld()
	prefixesRead.Store(0)

	// Control: the same connections when no body is kept.
	start := time.Now()
	heap0 := liveHeap()
	cs := run.open(t, "/control/", body)
	waitFor(t, 30*time.Second, "every control prefix upstream", func() bool { return prefixesRead.Load() == conns })
	control := liveHeap() - heap0
	run.finish(t, cs, body)
	controlTook := time.Since(start)

	// Capped: a kept request holds perKept; one past the total spills the
	// chunks it read to the upstream, which frees them as it reads them.
	// The run has settled when every request is one or the other (one still
	// on its way holds less than perKept and is not upstream yet).
	start = time.Now()
	prefixesRead.Store(0)
	skipped0 := caddymodule.ReplaySkipped("default")
	heap0 = liveHeap()
	cs = run.open(t, "/capped/", body)
	var held int64
	waitFor(t, 30*time.Second, "every capped request kept or upstream", func() bool {
		held = caddymodule.ReplayBytesHeld() - base
		return held%perKept == 0 && prefixesRead.Load()+held/perKept == conns
	})
	capped := liveHeap() - heap0
	kept, streamed := held/perKept, prefixesRead.Load()
	skipped := caddymodule.ReplaySkipped("default") - skipped0
	run.finish(t, cs, body)
	cappedTook := time.Since(start)
	waitHeld(t, base)

	t.Logf("control: %d stalled connections, nothing kept: heap +%.1f MiB (%.1f KiB each), %.1fs", conns, mib(control), float64(control)/conns/1024, controlTook.Seconds())
	t.Logf("capped: %d kept (%.1f MiB held), %d streamed without a copy (%v counted): heap +%.1f MiB, %.1f MiB over control (cap %.0f MiB), %.1fs",
		kept, mib(held), streamed, skipped, mib(capped), mib(capped-control), mib(total), cappedTook.Seconds())
	t.Logf("without the cap, keeping every body would hold %.1f MiB", mib(conns*size))
	if held > total {
		t.Errorf("%d bytes held for replays, over max_replay_total %d", held, total)
	}
	if kept < total/perKept/2 || streamed == 0 || int64(skipped) != streamed {
		t.Errorf("kept %d, streamed %d, replay_skipped_total %v: want the cap reached (at least %d kept), some streamed, each counted",
			kept, streamed, skipped, total/perKept/2)
	}
	if slack := int64(2 << 20); capped-control > total+slack {
		t.Errorf("the heap grew %.1f MiB more than with nothing kept, want at most the cap (%.0f MiB) + %.0f MiB",
			mib(capped-control), mib(total), mib(slack))
	}
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

// After the fake revokes every access token, 300 concurrent POSTs with
// distinct bodies all meet a 401 with the same generation: exactly one refresh,
// every request replayed with its body intact.
func TestRevokedTokenConcurrentPostsReplayOnce(t *testing.T) {
	fake := newFake(t, fakerestream.Options{Latency: 100 * time.Millisecond, Logf: func(string, ...any) {}})
	cfg := siteConfig{Port: testproc.Port(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed()}
	runInProcess(t, cfg.Caddyfile())
	url := "http://127.0.0.1:" + itoa(cfg.Port) + "/v2/user/channel-meta/42"
	if status, body, _ := do(t, http.MethodGet, url, nil, nil); status != http.StatusOK {
		t.Fatalf("warm-up: %d %s", status, body)
	}
	before := fake.Stats()
	fake.RevokeAccessTokens()

	const n = 300
	var wg sync.WaitGroup
	var failed atomic.Int64
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := []byte(strings.Repeat(fmt.Sprintf("body-%d;", i), 50+i))
			status, resp, hdr := do(t, http.MethodPost, url, body, map[string]string{"Content-Type": "text/plain"})
			if status != http.StatusOK {
				failed.Add(1)
				t.Errorf("request %d: status %d: %s", i, status, resp)
				return
			}
			e := decodeEcho(t, resp)
			sum := sha256.Sum256(body)
			if e.BodySHA256 != hex.EncodeToString(sum[:]) || e.BodyLen != len(body) || e.Method != http.MethodPost {
				t.Errorf("request %d: upstream saw %s %d bytes sha %s, want POST %d bytes", i, e.Method, e.BodyLen, e.BodySHA256, len(body))
			}
			if cl := hdr.Values("Content-Length"); len(cl) > 1 {
				t.Errorf("request %d: duplicate Content-Length %v", i, cl)
			}
		}()
	}
	wg.Wait()
	after := fake.Stats()
	t.Logf("%d POSTs: failed=%d; upstream 401s=%d; refreshes=%d; invalid_grant=%d",
		n, failed.Load(), after.API401-before.API401, after.RefreshCalls-before.RefreshCalls, after.InvalidGrant)
	if got := after.RefreshCalls - before.RefreshCalls; got != 1 {
		t.Fatalf("refreshes after revocation = %d, want exactly 1", got)
	}
	if after.InvalidGrant != 0 {
		t.Fatalf("invalid_grant = %d", after.InvalidGrant)
	}
}

// A body over max_replay_body is streamed, not buffered: its 401 passes
// through after one attempt, while a body within the limit is replayed,
// with or without a Content-Length.
func TestLargeBodyNotReplayed(t *testing.T) {
	var attempts atomic.Int64
	upstream := startLocal(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		attempts.Add(1)
		w.Header().Set("X-Body-Len", strconv.FormatInt(n, 10))
		w.WriteHeader(http.StatusUnauthorized)
	}))
	for _, tc := range []struct {
		size, attempts int
		chunked        bool // sent without Content-Length
	}{{1024, 2, false}, {1025, 1, false}, {1024, 2, true}, {1025, 1, true}} {
		// A sidecar of its own each: a second 401-forced refresh within
		// seconds would be refused.
		t.Run(fmt.Sprintf("%d bytes chunked %v", tc.size, tc.chunked), func(t *testing.T) {
			fake := newFake(t, fakerestream.Options{Logf: func(string, ...any) {}})
			cfg := siteConfig{Port: testproc.Port(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed(),
				Extra: "max_replay_body 1KiB", Upstream: upstream.URL}
			runInProcess(t, cfg.Caddyfile())
			attempts.Store(0)
			body := io.Reader(bytes.NewReader(bytes.Repeat([]byte("x"), tc.size)))
			if tc.chunked {
				body = struct{ io.Reader }{body} // hides the length: the client sends it chunked
			}
			req, err := http.NewRequest(http.MethodPatch, "http://127.0.0.1:"+itoa(cfg.Port)+"/v2/user/channel/1", body)
			if err != nil {
				t.Fatal(err)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusUnauthorized || attempts.Load() != int64(tc.attempts) || resp.Header.Get("X-Body-Len") != strconv.Itoa(tc.size) {
				t.Fatalf("status %d, %d attempts (want %d), upstream read %s bytes",
					resp.StatusCode, attempts.Load(), tc.attempts, resp.Header.Get("X-Body-Len"))
			}
		})
	}
}
