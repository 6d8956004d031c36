package caddymodule

import (
	"bytes"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// Reservations never take the count past the cap, whatever the
// interleaving (run with -race).
func TestReplayBudgetNeverExceedsCap(t *testing.T) {
	var b replayBudget
	const limit = 100 << 10
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 1))
			var mine int64
			for range 20000 {
				if n := rng.Int64N(replayChunk) + 1; rng.IntN(2) == 0 && b.reserve(n, limit) {
					mine += n
					if held := b.held.Load(); held > limit {
						t.Errorf("held %d > cap %d", held, limit)
						return
					}
				} else if mine > 0 {
					n := rng.Int64N(mine) + 1
					b.release(n)
					mine -= n
				}
			}
			b.release(mine)
		})
	}
	wg.Wait()
	if b.held.Load() != 0 {
		t.Fatalf("after every release %d bytes are held", b.held.Load())
	}
}

// One log line per interval however many requests are skipped, with the
// count since the previous line; the metric counts each one.
func TestReplaySkipLogRateLimited(t *testing.T) {
	skipped0 := ReplaySkipped("skiplog")
	counter, err := registerReplayMetrics(nil, "skiplog")
	if err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1_700_000_000, 0)
	l := &skipLog{every: 30 * time.Second, now: func() time.Time { return now }, counter: counter}
	core, logs := observer.New(zapcore.DebugLevel)
	logger := zap.New(core)
	for range 100 {
		l.note(logger, "skiplog", 8<<20)
	}
	now = now.Add(29 * time.Second)
	l.note(logger, "skiplog", 8<<20)
	now = now.Add(time.Second)
	l.note(logger, "skiplog", 8<<20)
	var got []int64
	for _, e := range logs.All() {
		got = append(got, e.ContextMap()["requests"].(int64))
	}
	if len(got) != 2 || got[0] != 1 || got[1] != 101 {
		t.Errorf("log lines counted %v requests, want [1 101]", got)
	}
	if n := ReplaySkipped("skiplog") - skipped0; n != 102 {
		t.Errorf("replay_skipped_total rose by %v, want 102", n)
	}
}

// Past max_replay_total a request is proxied without a replay copy: the
// upstream gets the whole body (what was read, then the rest), a 401 goes
// to the client after one attempt, and the share of the total it held
// is given back as the upstream reads it.
func TestReplayTotalCapStreamsWithoutCopy(t *testing.T) {
	base := replayBytes.held.Load()
	const total = 48 << 10
	h, logs := newReplayHandler(t, 40<<10, base+total)
	skipped0 := ReplaySkipped("replay")

	// A holds 32 KiB: its body is kept, and its upstream waits.
	aBody := pattern(32<<10, 'a')
	aEntered, aRelease := make(chan struct{}), make(chan struct{})
	aDone := make(chan error, 1)
	go func() {
		aDone <- h.ServeHTTP(httptest.NewRecorder(), bodyRequest(io.NopCloser(bytes.NewReader(aBody)), int64(len(aBody))),
			caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				close(aEntered)
				<-aRelease
				return okNext(w, r)
			}))
	}()
	<-aEntered
	if held := replayBytes.held.Load() - base; held != 32<<10 {
		t.Fatalf("A holds %d bytes, want %d", held, 32<<10)
	}

	// B (40 KiB) gets one chunk (16 KiB: 48 KiB in all), not a second: it
	// is streamed, and answered 401 by the upstream once.
	for i := range 3 {
		bBody := pattern(40<<10, byte('b'+i))
		attempts := 0
		var heldAfterRead int64
		rec := httptest.NewRecorder()
		err := h.ServeHTTP(rec, bodyRequest(io.NopCloser(bytes.NewReader(bBody)), int64(len(bBody))),
			caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				attempts++
				got, err := io.ReadAll(r.Body)
				if err != nil {
					return err
				}
				if !bytes.Equal(got, bBody) {
					t.Errorf("B: upstream got %d bytes, not the %d sent", len(got), len(bBody))
				}
				heldAfterRead = replayBytes.held.Load() - base
				w.WriteHeader(http.StatusUnauthorized)
				return nil
			}))
		if err != nil || rec.Code != http.StatusUnauthorized || attempts != 1 {
			t.Fatalf("B: err %v, status %d after %d attempts; want the 401 after one attempt", err, rec.Code, attempts)
		}
		if heldAfterRead != 32<<10 {
			t.Errorf("B: once its body was read upstream %d bytes were held, want A's %d", heldAfterRead, 32<<10)
		}
	}
	if got := ReplaySkipped("replay") - skipped0; got != 3 {
		t.Errorf("replay_skipped_total rose by %v, want 3", got)
	}
	lines := logs.FilterMessageSnippet("max_replay_total reached").All()
	if len(lines) != 1 {
		t.Fatalf("%d log lines about the cap for 3 skipped requests, want 1 (rate-limited)", len(lines))
	}
	if f := lines[0].ContextMap(); f["requests"] != int64(1) || f["max_replay_total"] != int64(base+total) || lines[0].Level != zapcore.WarnLevel {
		t.Errorf("log line: %v %v", lines[0].Level, f)
	}

	close(aRelease)
	if err := <-aDone; err != nil {
		t.Fatal(err)
	}
	waitHeld(t, base)

	// With the total free again, the same request is kept and replayed.
	attempts := 0
	rec := httptest.NewRecorder()
	bBody := pattern(40<<10, 'z')
	_ = h.ServeHTTP(rec, bodyRequest(io.NopCloser(bytes.NewReader(bBody)), int64(len(bBody))),
		caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
			attempts++
			if got, _ := io.ReadAll(r.Body); !bytes.Equal(got, bBody) {
				t.Errorf("attempt %d: upstream got %d bytes, not the %d sent", attempts, len(got), len(bBody))
			}
			w.WriteHeader(http.StatusUnauthorized)
			return nil
		}))
	if attempts != 2 {
		t.Errorf("under the cap: %d attempts, want 2 (a replay)", attempts)
	}
	waitHeld(t, base)
}

// However a request ends (a panic, an abort, a body cut short, a spilled
// body nobody read), its share of max_replay_total is given back.
func TestReplayTotalReleasedWhenRequestEnds(t *testing.T) {
	base := replayBytes.held.Load()
	const total = 128 << 10
	h, _ := newReplayHandler(t, total, base+total)
	panics := func(v any) caddyhttp.Handler {
		return caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { panic(v) })
	}
	for _, tc := range []struct {
		name   string
		others int64 // held by other requests: 100 KiB makes a 100 KiB body spill after one chunk
		size   int
		body   func([]byte) io.ReadCloser
		next   caddyhttp.Handler
	}{
		{"panic with the body kept", 0, 100 << 10, nil, panics("boom")},
		{"abort with the body kept", 0, 100 << 10, nil, panics(http.ErrAbortHandler)},
		{"panic with the body spilled, unread", 100 << 10, 100 << 10, nil, panics("boom")},
		{"spilled body unread", 100 << 10, 100 << 10, nil, okNext},
		{"spilled body half read", 100 << 10, 100 << 10, nil, caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
			_, err := io.CopyN(io.Discard, r.Body, 20<<10)
			return err
		})},
		{"body cut short", 0, 100 << 10, func(b []byte) io.ReadCloser { return io.NopCloser(bytes.NewReader(b[:37<<10])) }, okNext},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if !replayBytes.reserve(tc.others, base+total) {
				t.Fatal("could not hold the other requests' share")
			}
			defer replayBytes.release(tc.others)
			base := base + tc.others
			data := pattern(tc.size, 'p')
			var body io.ReadCloser = io.NopCloser(bytes.NewReader(data))
			if tc.body != nil {
				body = tc.body(data)
			}
			skipped0 := ReplaySkipped("replay")
			func() {
				defer func() { _ = recover() }()
				_ = h.ServeHTTP(httptest.NewRecorder(), bodyRequest(body, int64(tc.size)), tc.next)
			}()
			if spilled := ReplaySkipped("replay") - skipped0; spilled != min(float64(tc.others), 1) {
				t.Errorf("%v requests went without a replay copy, want %v", spilled, min(float64(tc.others), 1))
			}
			if held := replayBytes.held.Load(); held != base {
				t.Fatalf("after the request: %d bytes held, want %d", held-base, 0)
			}
		})
	}
}
