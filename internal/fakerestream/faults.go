package fakerestream

import (
	"io"
	"net/http"
	"strconv"
	"strings"
)

// Fault is a failure mode of the token endpoint, applied to /oauth/token
// calls after the latency and after the call is counted in Stats.
type Fault int

const (
	// FaultNone: the token endpoint works.
	FaultNone Fault = iota
	// Fault500 answers 500 {"error":"server_error"}.
	Fault500
	// FaultHang holds the call without an answer, as a server or a proxy that
	// accepted the connection and then stalls. Nothing rotates. The call ends
	// when the client goes away (no answer), when the server closes (no
	// answer), or when the fault changes: then it gets 503 server_error.
	FaultHang
	// FaultGarbage answers 200 with a body that is not JSON (while claiming
	// Content-Type application/json).
	FaultGarbage
	// FaultHTML answers 502 with a text/html error page, as a load balancer
	// in front of the endpoint would.
	FaultHTML
	// Fault429 answers 429 with Retry-After (see SetRetryAfter; default 2 s).
	Fault429
	// FaultHuge answers 200 with a 2 MiB JSON-looking body (HugeBodyBytes).
	FaultHuge
	// FaultRefuse closes the token listener (TokenURL) and every connection
	// to it: new calls get "connection refused" and never reach the server.
	// Calls already accepted on it are dropped unanswered and do not rotate.
	// Clearing the fault listens again on the same port. URL() (the API and
	// its own /oauth/token) is unaffected.
	FaultRefuse
	// FaultRotateThenHang processes the call (a valid refresh rotates the
	// pair, invalidating the old one) and then holds the answer, like a
	// timeout after the server did the work: the caller cannot know the
	// outcome. If the fault changes while the client still waits, it gets
	// the new pair late. Invalid calls are answered as usual.
	FaultRotateThenHang
)

var faultNames = [...]string{"none", "500", "hang", "garbage", "html", "429", "huge", "refuse", "rotate_then_hang"}

func (f Fault) String() string {
	if f >= 0 && int(f) < len(faultNames) {
		return faultNames[f]
	}
	return "Fault(" + strconv.Itoa(int(f)) + ")"
}

// HugeBodyBytes is the size of the FaultHuge answer.
const HugeBodyBytes = 2 << 20

// SetFault makes /oauth/token fail in the way f describes until the next
// SetFault; FaultNone restores it. Calls held by FaultHang or
// FaultRotateThenHang are released whenever the fault changes. SetDown is
// independent and, while set, takes precedence.
func (s *Server) SetFault(f Fault) {
	if f < FaultNone || int(f) >= len(faultNames) {
		panic("fakerestream: unknown fault " + f.String())
	}
	s.faultMu.Lock()
	defer s.faultMu.Unlock()
	if s.isClosed {
		s.fault.Store(int64(f))
		return
	}
	old := Fault(s.fault.Swap(int64(f)))
	if old == f {
		return
	}
	close(s.released)
	s.released = make(chan struct{})
	switch {
	case f == FaultRefuse:
		s.stopTokenServerLocked()
	case s.tokenSrv == nil:
		s.relistenLocked()
	}
	s.logf("fakerestream: token endpoint fault %s -> %s", old, f)
}

// Fault returns the current fault.
func (s *Server) Fault() Fault { return Fault(s.fault.Load()) }

// SetRetryAfter sets the Retry-After seconds that Fault429 sends (default 2).
func (s *Server) SetRetryAfter(seconds int) { s.retryAfter.Store(int64(seconds)) }

// SetDown makes /oauth/token answer status with {"error":"server_error"}
// while status is non-zero (after latency and call counting); 0 restores it.
func (s *Server) SetDown(status int) { s.down.Store(int64(status)) }

// faultBeforeProcessing answers r, and reports that it did, when SetDown or
// the current fault leaves the call unprocessed; a call accepted on a token
// listener that FaultRefuse has since shut down is dropped. Otherwise r is
// processed, and holdUntil, non-nil under FaultRotateThenHang, is what
// releases its held answer.
func (s *Server) faultBeforeProcessing(w http.ResponseWriter, r *http.Request) (holdUntil <-chan struct{}, answered bool) {
	if st := int(s.down.Load()); st != 0 {
		s.faulted.Add(1)
		writeJSON(w, st, map[string]string{"error": "server_error"})
		return nil, true
	}
	fault, released := s.faultState()
	if s.refused(r) {
		// Accepted before the listener went down: the connection is gone.
		// Drop the call unprocessed, whatever the fault is by now.
		s.faulted.Add(1)
		panic(http.ErrAbortHandler)
	}
	switch fault {
	case FaultNone, FaultRefuse:
		return nil, false
	case FaultRotateThenHang:
		return released, false
	}
	s.faulted.Add(1)
	s.writeFault(w, r, fault, released)
	return nil, true
}

// refused reports whether r came in on an incarnation of the token listener
// that FaultRefuse (or Close) has shut down since.
func (s *Server) refused(r *http.Request) bool {
	ts, _ := r.Context().Value(tokenServerKey{}).(*tokenServer)
	if ts == nil {
		return false
	}
	select {
	case <-ts.down:
		return true
	default:
		return false
	}
}

// writeFault answers a call under one of the faults that do not process it.
func (s *Server) writeFault(w http.ResponseWriter, r *http.Request, f Fault, released <-chan struct{}) {
	switch f {
	case Fault500:
		writeJSON(w, http.StatusInternalServerError, map[string]string{"error": "server_error"})
	case FaultHang:
		s.hang(r, released)
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "server_error", "error_description": "held during an outage"})
	case FaultGarbage:
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, "\x00\x1f<<not json>> access_token=; {{{ "+strings.Repeat("garbage ", 16))
	case FaultHTML:
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.WriteHeader(http.StatusBadGateway)
		_, _ = io.WriteString(w, "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n"+
			"<body><center><h1>502 Bad Gateway</h1></center><hr><center>cloudflare</center></body></html>\n")
	case Fault429:
		w.Header().Set("Retry-After", strconv.FormatInt(s.retryAfter.Load(), 10))
		writeOAuthError(w, http.StatusTooManyRequests, "too_many_requests", "Rate limit exceeded")
	case FaultHuge:
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.WriteHeader(http.StatusOK)
		const head, tail = `{"access_token":"at_`, `","token_type":"Bearer","expires_in":3600}`
		pad := []byte(strings.Repeat("0123456789abcdef", 4096)) // 64 KiB
		_, _ = io.WriteString(w, head)
		for n := len(head) + len(tail); n < HugeBodyBytes; n += len(pad) {
			chunk := pad[:min(len(pad), HugeBodyBytes-n)]
			if _, err := w.Write(chunk); err != nil {
				return // the client stopped reading
			}
		}
		_, _ = io.WriteString(w, tail)
	}
}

// faultState returns the current fault and the channel closed when it changes.
func (s *Server) faultState() (Fault, <-chan struct{}) {
	s.faultMu.Lock()
	defer s.faultMu.Unlock()
	return Fault(s.fault.Load()), s.released
}

// hang holds a call without answering until the fault changes; then the
// caller answers. If the client goes away or the server closes first, it
// drops the connection without an answer (net/http would otherwise send an
// empty 200 for a handler that returns without writing).
func (s *Server) hang(r *http.Request, released <-chan struct{}) {
	var down chan struct{}
	if ts, _ := r.Context().Value(tokenServerKey{}).(*tokenServer); ts != nil {
		down = ts.down
	}
	s.hangs.Add(1)
	s.hanging.Add(1)
	defer s.hanging.Add(-1)
	select {
	case <-released:
		return
	case <-r.Context().Done():
	case <-s.closed:
	case <-down:
	}
	panic(http.ErrAbortHandler)
}
