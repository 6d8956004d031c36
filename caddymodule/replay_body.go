package caddymodule

import (
	"errors"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
)

// replayChunk is the step in which a request body is read and reserved
// against max_replay_total: memory follows the bytes that arrive, never the
// Content-Length a client claims.
const replayChunk = 16 << 10

// Chunks come from pools of five sizes, 1 KiB to replayChunk, doubling. A
// body's last chunk takes the smallest that holds it, so a small body holds
// less than twice its length (at least 1 KiB). What is reserved against
// max_replay_total is the size of the buffer, the memory actually held.
const minChunk = 1 << 10

var chunkPools [5]sync.Pool // of *[]byte, minChunk << i bytes long

// chunkSize is the buffer size for n bytes (n <= replayChunk): a pool's
// size, or n itself if that would not fit in limit at all.
func chunkSize(n, limit int64) int64 {
	size := int64(minChunk)
	for size < n {
		size <<= 1
	}
	if size > limit {
		return n
	}
	return size
}

// takeChunk returns a buffer of size bytes, and the pooled slice it came
// from (nil if size is no pool's).
func takeChunk(size int64) ([]byte, *[]byte) {
	for i := range chunkPools {
		if size == minChunk<<i {
			if p, ok := chunkPools[i].Get().(*[]byte); ok {
				return *p, p
			}
			b := make([]byte, size)
			return b, &b
		}
	}
	return make([]byte, size), nil
}

func putChunk(p *[]byte) {
	if p == nil {
		return
	}
	for i := range chunkPools {
		if len(*p) == minChunk<<i {
			chunkPools[i].Put(p)
			return
		}
	}
}

// bodyFit says whether a request body was kept for a replay.
type bodyFit int

const (
	bodyKept      bodyFit = iota // kept (or there is none): the request can be replayed
	bodyTooLarge                 // over max_replay_body: streamed (after the part read, for an unknown length)
	bodyOverTotal                // max_replay_total reached: streamed after the part already read
)

// readBody keeps a body of up to limit bytes, reading and reserving it chunk
// by chunk as it arrives. A body of unknown length (chunked) is read until
// it ends or passes limit; one that passes it goes on without a replay copy,
// its body being what was read so far and then the rest (bodyTooLarge), as
// does one whose next chunk would take the bytes held by all requests past
// total (bodyOverTotal). A body whose Content-Length is over limit is not
// read at all.
func (s *replayState) readBody(r *http.Request, limit, total int64) (bodyFit, error) {
	if r.Body == nil || r.Body == http.NoBody || r.ContentLength == 0 {
		return bodyKept, nil
	}
	if r.ContentLength > limit {
		return bodyTooLarge, nil
	}
	unknownLength := r.ContentLength < 0
	left := r.ContentLength
	if unknownLength {
		left = limit + 1 // one byte more than limit shows the body is too large
	}
	kb := new(keptBody)
	kb.chunks, kb.bufs = kb.inlineChunks[:0], kb.inlineBufs[:0]
	kb.refs.Store(1) // the request's, dropped by release
	s.body = kb
	for left > 0 {
		n := min(left, replayChunk)
		size := chunkSize(n, total)
		if !replayBytes.reserve(size, total) {
			s.spill(r)
			return bodyOverTotal, nil
		}
		s.reserved += size
		buf, pooled := takeChunk(size)
		got, err := io.ReadFull(r.Body, buf[:n])
		if got > 0 || err == nil {
			kb.chunks, kb.bufs = append(kb.chunks, buf[:got]), append(kb.bufs, pooled)
		} else {
			putChunk(pooled)
		}
		if unknownLength && (err == io.EOF || err == io.ErrUnexpectedEOF) {
			break // the whole body, within limit
		}
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return bodyKept, err
		}
		left -= n
	}
	if unknownLength && left == 0 {
		s.spill(r)
		return bodyTooLarge, nil
	}
	_ = r.Body.Close()
	s.hasBody = true
	return bodyKept, nil
}

// spill hands the chunks read so far, all full, and their reservation to a
// reader that gives them to the upstream before the rest of the body.
func (s *replayState) spill(r *http.Request) {
	chunks, bufs := s.body.chunks, s.body.bufs
	s.body.chunks, s.body.bufs = nil, nil
	s.body.drop()
	s.body = nil
	if len(chunks) == 0 {
		return // nothing read: the body goes on untouched
	}
	sp := &spillReader{chunks: chunks, bufs: bufs, rest: r.Body}
	sp.reserved.Store(s.reserved)
	s.spilled = sp
	s.reserved = 0
	r.Body, r.GetBody = sp, nil
}

// rewind gives the request a new reader over the kept body for an attempt.
func (s *replayState) rewind(r *http.Request) {
	if !s.hasBody {
		if r.Body != nil && r.Body != http.NoBody {
			r.Body = http.NoBody
		}
		return
	}
	kb := s.body
	r.Body = kb.reader()
	r.GetBody = func() (io.ReadCloser, error) {
		if rd := kb.reader(); rd != nil {
			return rd, nil
		}
		return nil, errBodyReleased
	}
}

var errBodyReleased = errors.New("restream_auth: request body already released")

// keptBody is a request body kept for a replay. The request and each
// reader given out hold a reference, and the chunks go back to chunkPool
// when the last one lets go: a RoundTripper may read a body after
// RoundTrip returns (it need only close it eventually), so the request's
// end alone does not free them. A keptBody is not itself reused, so a late
// GetBody cannot reach another request's body.
type keptBody struct {
	chunks [][]byte
	bufs   []*[]byte // the pooled buffers under chunks, to give back
	refs   atomic.Int32
	// The first backing arrays: bodies up to 64 KiB need no others.
	inlineChunks [4][]byte
	inlineBufs   [4]*[]byte
}

// reader returns a reader holding a reference, or nil if none is left.
func (b *keptBody) reader() *chunkReader {
	for {
		n := b.refs.Load()
		if n == 0 {
			return nil
		}
		if b.refs.CompareAndSwap(n, n+1) {
			return &chunkReader{body: b}
		}
	}
}

func (b *keptBody) drop() {
	if b.refs.Add(-1) != 0 {
		return
	}
	for i, p := range b.bufs {
		putChunk(p)
		b.chunks[i], b.bufs[i] = nil, nil
	}
	b.chunks, b.bufs = nil, nil
}

// chunkReader reads a kept body. Close may come from another goroutine
// than Read (RoundTrippers do that): a Close during a read leaves the
// reference to the read, so the chunks cannot be recycled under it, and
// Close never waits for a Write to the network. One atomic word, no lock.
type chunkReader struct {
	body  *keptBody
	i     int // next byte: body.chunks[i][off]
	off   int
	state atomic.Int32 // readerBusy | readerClosed
}

const (
	readerBusy   = 1 << iota // a Read or WriteTo is under way
	readerClosed             // Close was called
)

func (c *chunkReader) Read(p []byte) (int, error) {
	if err := c.begin(); err != nil {
		return 0, err
	}
	defer c.end()
	chunks := c.body.chunks
	for c.i < len(chunks) && c.off == len(chunks[c.i]) {
		c.i, c.off = c.i+1, 0
	}
	if c.i == len(chunks) {
		return 0, io.EOF
	}
	n := copy(p, chunks[c.i][c.off:])
	c.off += n
	return n, nil
}

// WriteTo writes the chunks straight to w, as bytes.Reader would.
func (c *chunkReader) WriteTo(w io.Writer) (int64, error) {
	if err := c.begin(); err != nil {
		return 0, err
	}
	defer c.end()
	var total int64
	for chunks := c.body.chunks; c.i < len(chunks); c.i, c.off = c.i+1, 0 {
		n, err := w.Write(chunks[c.i][c.off:])
		total += int64(n)
		c.off += n
		if err != nil {
			return total, err
		}
	}
	return total, nil
}

func (c *chunkReader) begin() error {
	for {
		v := c.state.Load()
		if v&readerClosed != 0 {
			return http.ErrBodyReadAfterClose
		}
		if c.state.CompareAndSwap(v, v|readerBusy) {
			return nil
		}
	}
}

// end drops the reference if Close came during the read.
func (c *chunkReader) end() {
	for {
		v := c.state.Load()
		if c.state.CompareAndSwap(v, v&^readerBusy) {
			if v&readerClosed != 0 {
				c.body.drop()
			}
			return
		}
	}
}

// Close drops the reference, or leaves it to a read under way.
func (c *chunkReader) Close() error {
	for {
		v := c.state.Load()
		if v&readerClosed != 0 {
			return nil
		}
		if c.state.CompareAndSwap(v, v|readerClosed) {
			if v&readerBusy == 0 {
				c.body.drop()
			}
			return nil
		}
	}
}

// spillReader is the body of a request sent on without a replay copy after
// part of it was read: the chunks read, then the rest from the client. Each
// chunk leaves max_replay_total, and goes back to the pool, as soon as it
// has been read, so a request stalled upstream keeps no share of the total.
type spillReader struct {
	chunks [][]byte
	bufs   []*[]byte // under chunks
	off    int       // into chunks[0]
	rest   io.ReadCloser
	// reserved is what the unread chunks hold in replayBytes. Read frees it
	// chunk by chunk and the request's end frees what is left, perhaps at
	// the same time (a RoundTripper may read after the request ends): each
	// takes its part out of reserved first, so nothing is freed twice.
	reserved atomic.Int64
}

func (sp *spillReader) Read(p []byte) (int, error) {
	if len(sp.chunks) == 0 {
		return sp.rest.Read(p)
	}
	head := sp.chunks[0]
	n := copy(p, head[sp.off:])
	sp.off += n
	if sp.off == len(head) {
		size := int64(len(head))
		if buf := sp.bufs[0]; buf != nil {
			size = int64(len(*buf))
			putChunk(buf)
		}
		sp.chunks[0], sp.bufs[0] = nil, nil
		sp.chunks, sp.bufs, sp.off = sp.chunks[1:], sp.bufs[1:], 0
		sp.free(size)
	}
	return n, nil
}

// Close closes the client's body; the request's end frees the reservation.
func (sp *spillReader) Close() error { return sp.rest.Close() }

// free gives back up to n bytes of the reservation.
func (sp *spillReader) free(n int64) {
	for {
		cur := sp.reserved.Load()
		take := min(cur, n)
		if take == 0 || sp.reserved.CompareAndSwap(cur, cur-take) {
			replayBytes.release(take)
			return
		}
	}
}
