package caddymodule

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// stallBody gives first, then blocks (closing stalled) until resume is
// closed, then gives rest: a client that sends part of its body and waits.
type stallBody struct {
	first, rest []byte
	stalled     chan struct{}
	resume      chan struct{}
	once        sync.Once
}

func newStallBody(first, rest []byte) *stallBody {
	return &stallBody{first: first, rest: rest, stalled: make(chan struct{}), resume: make(chan struct{})}
}

func (b *stallBody) Read(p []byte) (int, error) {
	if len(b.first) > 0 {
		n := copy(p, b.first)
		b.first = b.first[n:]
		return n, nil
	}
	b.once.Do(func() { close(b.stalled) })
	<-b.resume
	if len(b.rest) == 0 {
		return 0, io.EOF
	}
	n := copy(p, b.rest)
	b.rest = b.rest[n:]
	return n, nil
}

func (b *stallBody) Close() error { return nil }

// A client claiming a 1 GiB body and sending 10 bytes costs one chunk, not
// 1 GiB: the body is read and reserved as it arrives.
func TestReplayBodyNoUpfrontAllocation(t *testing.T) {
	base := replayBytes.held.Load()
	h, _ := newReplayHandler(t, 1<<30, 1<<30)
	body := newStallBody([]byte("0123456789"), nil)
	req := bodyRequest(body, 1<<30)
	runtime.GC()
	var before, during runtime.MemStats
	runtime.ReadMemStats(&before)
	done := make(chan error, 1)
	go func() { done <- h.ServeHTTP(httptest.NewRecorder(), req, okNext) }()
	<-body.stalled
	runtime.ReadMemStats(&during)
	if got := during.TotalAlloc - before.TotalAlloc; got > 4<<20 {
		t.Errorf("allocated %d bytes for a body of which 10 bytes arrived, want at most 4 MiB", got)
	}
	if held := replayBytes.held.Load() - base; held != replayChunk {
		t.Errorf("bytes held for the stalled request: %d, want one chunk (%d)", held, replayChunk)
	}
	close(body.resume) // the client goes away: the body ends 10 bytes in
	err := <-done
	var he caddyhttp.HandlerError
	if !errors.As(err, &he) || he.StatusCode != http.StatusBadRequest || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("short body: got %v, want a 400 for an unexpected EOF", err)
	}
	waitHeld(t, base)
}

// The upstream's transport may read a body after the request ended (it
// need only close it eventually): the kept chunks stay intact until the
// last reader is closed, even while other requests reuse pooled chunks.
func TestReplayBodyOutlivesRequest(t *testing.T) {
	base := replayBytes.held.Load()
	h, _ := newReplayHandler(t, 1<<20, base+1<<20)
	first := pattern(40<<10, 'f')
	var kept io.ReadCloser
	var getBody func() (io.ReadCloser, error)
	err := h.ServeHTTP(httptest.NewRecorder(), bodyRequest(io.NopCloser(bytes.NewReader(first)), int64(len(first))),
		caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
			kept, getBody = r.Body, r.GetBody // left unread and open, as a late RoundTripper would
			return okNext(w, r)
		}))
	if err != nil {
		t.Fatal(err)
	}
	if held := replayBytes.held.Load(); held != base {
		t.Fatalf("the ended request still counts %d bytes", held-base)
	}
	for i := range 20 { // reuse the chunk pool
		other := pattern(40<<10, byte(i))
		_ = h.ServeHTTP(httptest.NewRecorder(), bodyRequest(io.NopCloser(bytes.NewReader(other)), int64(len(other))),
			caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				_, _ = io.Copy(io.Discard, r.Body)
				_ = r.Body.Close()
				return okNext(w, r)
			}))
	}
	again, err := getBody()
	if err != nil {
		t.Fatal(err)
	}
	for _, rd := range []io.ReadCloser{kept, again} {
		if got, err := io.ReadAll(rd); err != nil || !bytes.Equal(got, first) {
			t.Fatalf("late read: %d bytes, err %v; want the %d bytes sent", len(got), err, len(first))
		}
		_ = rd.Close()
	}
	if _, err := kept.Read(make([]byte, 1)); !errors.Is(err, http.ErrBodyReadAfterClose) {
		t.Errorf("read after close: %v", err)
	}
	if _, err := getBody(); err == nil {
		t.Errorf("GetBody after every reader was closed handed out a body")
	}
}

// blockingWriter collects what is written, waiting for a go-ahead before
// each write after the first.
type blockingWriter struct {
	got    bytes.Buffer
	writes int
	wrote  chan struct{}
	next   chan struct{}
}

func (w *blockingWriter) Write(p []byte) (int, error) {
	if w.writes > 0 {
		<-w.next
	}
	w.writes++
	w.got.Write(p)
	w.wrote <- struct{}{}
	return len(p), nil
}

// A transport may close a body from another goroutine while it is still
// writing it to the network: Close returns at once, and the chunks stay
// the body's until that write is done.
func TestReplayBodyCloseDuringRead(t *testing.T) {
	base := replayBytes.held.Load()
	h, _ := newReplayHandler(t, 1<<20, base+1<<20)
	data := pattern(40<<10, 'c') // 3 chunks
	var body io.ReadCloser
	_ = h.ServeHTTP(httptest.NewRecorder(), bodyRequest(io.NopCloser(bytes.NewReader(data)), int64(len(data))),
		caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
			body = r.Body
			return okNext(w, r)
		}))
	w := &blockingWriter{wrote: make(chan struct{}, 1), next: make(chan struct{})}
	done := make(chan error, 1)
	go func() {
		_, err := body.(io.WriterTo).WriteTo(w)
		done <- err
	}()
	<-w.wrote // the first chunk is out; the second write waits
	closed := make(chan struct{})
	go func() { _ = body.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("Close waited for a write in progress")
	}
	for range 20 { // other requests take pooled chunks meanwhile
		other := pattern(40<<10, 'o')
		_ = h.ServeHTTP(httptest.NewRecorder(), bodyRequest(io.NopCloser(bytes.NewReader(other)), int64(len(other))), okNext)
	}
	for range 2 {
		w.next <- struct{}{}
		<-w.wrote
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(w.got.Bytes(), data) {
		t.Fatalf("a body closed during its write went out changed (%d bytes)", w.got.Len())
	}
	if _, err := body.Read(make([]byte, 1)); !errors.Is(err, http.ErrBodyReadAfterClose) {
		t.Errorf("read after close: %v", err)
	}
}
