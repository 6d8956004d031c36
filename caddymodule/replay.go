package caddymodule

import (
	"bufio"
	"bytes"
	"errors"
	"io"
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
	body    bytes.Buffer
	hasBody bool
	saved   []headerEntry
	w       replayWriter
}

type headerEntry struct {
	key    string
	values []string
}

var replayPool = sync.Pool{New: func() any { return new(replayState) }}

func getReplayState() *replayState { return replayPool.Get().(*replayState) }

func (s *replayState) release() {
	if s.body.Cap() > DefaultMaxReplayBody || s.w.buf.Cap() > maxBuffered401 {
		return // let an oversized buffer go rather than pin it in the pool
	}
	s.body.Reset()
	s.hasBody = false
	clear(s.saved)
	s.saved = s.saved[:0]
	s.w.reset(nil)
	replayPool.Put(s)
}

// readBody buffers a body of known length up to limit. It reports false for
// bodies that must be streamed instead (unknown length or over the limit).
func (s *replayState) readBody(r *http.Request, limit int64) (bool, error) {
	if r.Body == nil || r.Body == http.NoBody || r.ContentLength == 0 {
		return true, nil
	}
	if r.ContentLength < 0 || r.ContentLength > limit {
		return false, nil
	}
	s.body.Grow(int(r.ContentLength))
	n, err := s.body.ReadFrom(io.LimitReader(r.Body, r.ContentLength))
	_ = r.Body.Close()
	if err != nil {
		return false, err
	}
	if n != r.ContentLength {
		return false, io.ErrUnexpectedEOF
	}
	s.hasBody = true
	return true, nil
}

// rewind gives the request a fresh reader over the buffered body.
func (s *replayState) rewind(r *http.Request) {
	if !s.hasBody {
		if r.Body != nil && r.Body != http.NoBody {
			r.Body = http.NoBody
		}
		return
	}
	data := s.body.Bytes()
	r.Body = io.NopCloser(bytes.NewReader(data))
	r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil }
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

// Hijack is refused while a 401 is held back (upgrades are never replayed).
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
