package caddymodule

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"math"
	"net"
	"net/http"
	"sync"
)

// maxBuffered401 bounds how much of a 401 response body is held for a
// possible replay; a larger one is sent on to the client and not replayed.
const maxBuffered401 = 64 << 10

// replayState is what one replayable request needs: its body, a snapshot of
// the response headers as they were before the first attempt, and a writer
// that holds back a 401. It is pooled, so the hot path allocates nothing.
type replayState struct {
	body     *keptBody    // nil without a body
	reserved int64        // bytes of body reserved in replayBytes
	hasBody  bool         // body is complete
	spilled  *spillReader // the body handed on without a replay copy, if any
	saved    []headerEntry
	w        replayWriter
}

type headerEntry struct {
	key    string
	values []string
}

var replayPool = sync.Pool{New: func() any { return new(replayState) }}

func getReplayState() *replayState { return replayPool.Get().(*replayState) }

// release gives back the request's share of max_replay_total and its
// hold on the body. ServeHTTP defers it, so it runs however the request
// ends, panics included.
func (s *replayState) release() {
	replayBytes.release(s.reserved)
	s.reserved = 0
	if s.spilled != nil {
		s.spilled.free(math.MaxInt64)
		s.spilled = nil
	}
	if s.body != nil {
		s.body.drop()
		s.body = nil
	}
	if s.w.buf.Cap() > maxBuffered401 {
		return // let an oversized buffer go rather than pin it in the pool
	}
	s.hasBody = false
	clear(s.saved)
	s.saved = s.saved[:0]
	s.w.reset(nil)
	replayPool.Put(s)
}

// saveHeaders remembers the response headers set before the first attempt.
// The snapshot shares value slices: handlers replace or append to them, and
// neither changes what the snapshot sees.
func (s *replayState) saveHeaders(h http.Header) {
	for k, v := range h {
		s.saved = append(s.saved, headerEntry{k, v})
	}
}

// restoreHeaders undoes what the first attempt wrote into the headers, so a
// replay does not send duplicate headers (two Content-Length values).
func (s *replayState) restoreHeaders(h http.Header) {
	clear(h)
	for _, e := range s.saved {
		h[e.key] = e.values
	}
}

// replayWriter passes a response through unless its status is 401, whose
// body it holds back (up to maxBuffered401) so the request can be replayed.
// With passThrough it holds nothing back and only notes the status.
type replayWriter struct {
	http.ResponseWriter
	buf         bytes.Buffer
	status      int
	wroteHeader bool
	held        bool // a 401 is being held back
	passThrough bool
}

func (rw *replayWriter) reset(w http.ResponseWriter) {
	rw.ResponseWriter = w
	rw.status, rw.wroteHeader, rw.held, rw.passThrough = 0, false, false, false
	rw.buf.Reset()
}

// WriteHeader holds back a 401; everything else, and every 1xx, goes through.
func (rw *replayWriter) WriteHeader(code int) {
	if rw.wroteHeader {
		return
	}
	if code >= 100 && code <= 199 && code != http.StatusSwitchingProtocols {
		rw.ResponseWriter.WriteHeader(code)
		return
	}
	rw.wroteHeader, rw.status = true, code
	if code == http.StatusUnauthorized && !rw.passThrough {
		rw.held = true
		return
	}
	rw.ResponseWriter.WriteHeader(code)
}

func (rw *replayWriter) Write(p []byte) (int, error) {
	if !rw.wroteHeader {
		rw.WriteHeader(http.StatusOK)
	}
	if !rw.held {
		return rw.ResponseWriter.Write(p)
	}
	if rw.buf.Len()+len(p) > maxBuffered401 {
		// Too big to hold: give up on the replay and stream the 401.
		if err := rw.release(); err != nil {
			return 0, err
		}
		return rw.ResponseWriter.Write(p)
	}
	return rw.buf.Write(p)
}

// ReadFrom keeps the wrapped writer's fast path for streamed responses.
func (rw *replayWriter) ReadFrom(r io.Reader) (int64, error) {
	if !rw.wroteHeader {
		rw.WriteHeader(http.StatusOK)
	}
	if rw.held {
		return io.Copy(writerOnly{rw}, r)
	}
	if rf, ok := rw.ResponseWriter.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(rw.ResponseWriter, r)
}

// writerOnly hides ReadFrom so io.Copy does not loop back into it.
type writerOnly struct{ io.Writer }

// FlushError does nothing while a 401 is held back.
func (rw *replayWriter) FlushError() error {
	if rw.held {
		return nil
	}
	return http.NewResponseController(rw.ResponseWriter).Flush()
}

// Hijack is refused while a 401 is held back: a handshake the upstream
// refused is replayed, and only a 101 leads to a hijack.
func (rw *replayWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	if rw.held {
		return nil, nil, errors.New("restream_auth: cannot hijack a held-back response")
	}
	return http.NewResponseController(rw.ResponseWriter).Hijack()
}

// Unwrap lets http.ResponseController reach deadlines and full duplex.
func (rw *replayWriter) Unwrap() http.ResponseWriter { return rw.ResponseWriter }

// release sends a held-back 401 to the client as it was.
func (rw *replayWriter) release() error {
	if !rw.held {
		return nil
	}
	rw.held = false
	rw.ResponseWriter.WriteHeader(rw.status)
	_, err := rw.ResponseWriter.Write(rw.buf.Bytes())
	rw.buf.Reset()
	return err
}
