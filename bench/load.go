package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"math/bits"
	"net"
	"net/http"
	"sync"
	"time"
)

// requestTimeout bounds how long a request may run past the end of the
// window, so a stuck Caddy cannot hold a round for longer than this.
const requestTimeout = 10 * time.Second

// conn is one worker's kept-alive HTTP/1.1 connection. It is a minimal
// client (write the request, read the response with net/http's parser) and
// not an http.Transport: with two CPUs shared by Caddy and the load
// generator, every microsecond the generator saves goes to Caddy, which is
// what is measured.
type conn struct {
	addr string
	req  []byte // the whole request, body included
	c    net.Conn
	br   *bufio.Reader
}

func newConn(addr, path string, body []byte) *conn {
	var b bytes.Buffer
	if len(body) == 0 {
		fmt.Fprintf(&b, "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: restream-bench\r\n\r\n", path, addr)
	} else {
		fmt.Fprintf(&b, "POST %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: restream-bench\r\n"+
			"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n", path, addr, len(body))
		b.Write(body)
	}
	return &conn{addr: addr, req: b.Bytes()}
}

// do sends the request and reads the whole response; it reconnects if the
// connection was closed. Every read and write ends by deadline.
func (c *conn) do(deadline time.Time) (status int, err error) {
	if c.c == nil {
		d := net.Dialer{Timeout: 5 * time.Second}
		if c.c, err = d.Dial("tcp", c.addr); err != nil {
			return 0, err
		}
		if c.br == nil {
			c.br = bufio.NewReaderSize(c.c, 16<<10)
		} else {
			c.br.Reset(c.c)
		}
	}
	if err := c.c.SetDeadline(deadline); err != nil {
		c.close()
		return 0, err
	}
	if _, err := c.c.Write(c.req); err != nil {
		c.close()
		return 0, err
	}
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		c.close()
		return 0, err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil || resp.Close {
		c.close()
	}
	return resp.StatusCode, err
}

func (c *conn) close() {
	if c.c != nil {
		c.c.Close()
		c.c = nil
	}
}

// interrupt makes a blocked do return at once.
func (c *conn) interrupt() {
	if c.c != nil {
		_ = c.c.SetDeadline(time.Now())
	}
}

// load is what one drive observed.
type load struct {
	OK       int64         // 200 answers completed within the window
	Errors   int64         // other answers and transport errors
	FirstErr string        // the first error, for messages
	Elapsed  time.Duration // the window
	Hist     histogram     // latencies of the 200 answers
}

// drive sends requests for d, one worker per connection, each sending one
// request at a time. Requests completed after the window are not counted;
// none is cut off at the end of the window (so Caddy never sees an abort),
// but none may run past it by more than requestTimeout, and canceling ctx
// stops everything at once.
func drive(ctx context.Context, conns []*conn, d time.Duration) load {
	workers := make([]load, len(conns))
	var wg sync.WaitGroup
	start := time.Now()
	end := start.Add(d)
	deadline := end.Add(requestTimeout)
	for i, c := range conns {
		wg.Add(1)
		go func(w *load) {
			defer wg.Done()
			stop := context.AfterFunc(ctx, c.interrupt)
			defer stop()
			for ctx.Err() == nil {
				t0 := time.Now()
				if !t0.Before(end) {
					return
				}
				status, err := c.do(deadline)
				t1 := time.Now()
				if ctx.Err() != nil || t1.After(end) {
					return
				}
				switch {
				case err != nil:
					w.fail(err.Error())
					time.Sleep(10 * time.Millisecond) // no hot loop if Caddy is gone
				case status != http.StatusOK:
					w.fail(fmt.Sprintf("HTTP %d", status))
				default:
					w.OK++
					w.Hist.record(t1.Sub(t0))
				}
			}
		}(&workers[i])
	}
	wg.Wait()
	total := load{Elapsed: d}
	for i := range workers {
		w := &workers[i]
		total.OK += w.OK
		total.Errors += w.Errors
		if total.FirstErr == "" {
			total.FirstErr = w.FirstErr
		}
		total.Hist.merge(&w.Hist)
	}
	return total
}

// add accumulates o (another slice of the same setup) into l.
func (l *load) add(o load) {
	l.OK += o.OK
	l.Errors += o.Errors
	if l.FirstErr == "" {
		l.FirstErr = o.FirstErr
	}
	l.Elapsed += o.Elapsed
	l.Hist.merge(&o.Hist)
}

func (w *load) fail(msg string) {
	w.Errors++
	if w.FirstErr == "" {
		w.FirstErr = msg
	}
}

// histogram is a fixed log-linear latency histogram: 64 buckets per power of
// two, so a quantile is known to within 1/64 (1.6 %), with no allocation
// while recording.
type histogram struct {
	counts [histBuckets]uint64
	n      uint64
	max    time.Duration
}

const (
	subBits     = 6
	subBuckets  = 1 << subBits
	histBuckets = 48 * subBuckets // up to 2^48 ns, 3 days
)

func bucketOf(v uint64) int {
	if v < subBuckets {
		return int(v)
	}
	e := bits.Len64(v) - subBits - 1 // v>>e is in [64, 128)
	return min(e*subBuckets+int(v>>e), histBuckets-1)
}

// bucketRange returns the values bucket i holds: [lo, hi).
func bucketRange(i int) (lo, hi uint64) {
	if i < subBuckets {
		return uint64(i), uint64(i) + 1
	}
	e := i/subBuckets - 1
	m := uint64(i%subBuckets + subBuckets)
	return m << e, (m + 1) << e
}

func (h *histogram) record(d time.Duration) {
	if d < 0 {
		d = 0
	}
	h.counts[bucketOf(uint64(d))]++
	h.n++
	h.max = max(h.max, d)
}

func (h *histogram) merge(o *histogram) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.max = max(h.max, o.max)
}

// quantile returns the q-quantile (0 < q <= 1): the middle of its bucket,
// never above the largest value recorded.
func (h *histogram) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(q*float64(h.n) + 0.5)
	rank = min(max(rank, 1), h.n)
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			lo, hi := bucketRange(i)
			return min(time.Duration((lo+hi)/2), h.max)
		}
	}
	return h.max
}
