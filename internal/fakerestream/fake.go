// Package fakerestream is a strict in-process fake of the Restream OAuth and
// REST API (api.restream.io) for tests.
//
// Like the real service it ROTATES tokens: every successful refresh returns a
// new access+refresh pair and at the same moment invalidates both the old
// access token and the old refresh token of that chain. Presenting a
// superseded refresh token yields 400 invalid_grant and a superseded access
// token yields 401 on the API, so clients that race or reuse refresh tokens
// fail loudly.
//
// Server-side work is never aborted because the client went away: a refresh
// whose caller times out during the configured latency is still applied, just
// as a real server would rotate tokens whose response got lost in transit.
//
// The token endpoint (/oauth/token and /oauth/revoke) is served on URL() and
// also on a second listener of its own, whose address TokenURL() returns, so
// that SetFault(FaultRefuse) can take that port down (connection refused)
// while the API on URL() stays up. SetFault injects the other failures a real
// token endpoint or the proxies in front of it produce.
//
// Every chain belongs to a User (the one signed in when it was seeded or
// authorized, see SetUser). GET /v2/user/profile answers with that user's
// id, username and email, on URL() and on the token listener, so a client
// that derives the profile URL from the token URL finds it; SetProfileFault
// and SetProfileRedirect make it fail.
package fakerestream

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"mime"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Scope is the space-separated scope string returned with every token pair.
const Scope = "profile.default.read channels.read chat.default.read stream.default.read"

// User is a Restream account of the fake. Every chain belongs to the user
// who authorized it; GET /v2/user/profile answers with that user.
type User struct {
	ID       int64
	Username string
	Email    string
}

// DefaultUser is the user signed in at the fake unless Options.User or
// SetUser says otherwise.
var DefaultUser = User{ID: 1001, Username: "fake-streamer", Email: "fake-streamer@example.com"}

// Options configure a Server. Zero values get the defaults noted.
type Options struct {
	ClientID     string // default "test-client"
	ClientSecret string // default "test-secret"

	AccessTTL  time.Duration // default 1h
	RefreshTTL time.Duration // default 365*24h

	// User is the user signed in at the fake: seeds, codes and the consent
	// page start chains of this user until SetUser changes it. Default
	// DefaultUser.
	User User

	// Latency is a fixed extra delay on each /oauth/token call, plus a random
	// 0..LatencyJitter. The delay happens before the request is processed and
	// while it counts as in flight (see Stats.MaxConcurrentRefresh).
	Latency       time.Duration
	LatencyJitter time.Duration

	// DropDisconnected drops, unprocessed, a /oauth/token call whose client
	// has gone away by the time it would be processed (after the latency):
	// as if the request had been lost on the way rather than delivered to a
	// server that then could not answer. By default such a call is processed
	// (a refresh rotates, and the new pair is lost with the client: see
	// Stats.LostRotations). Chaos tests that kill clients set it, so that a
	// kill cannot make invalid_grant inevitable.
	DropDisconnected bool

	// Now is the clock used for token expiry; default time.Now.
	Now func() time.Time

	// Logf, if set, receives a line for notable events (issue, rotation,
	// revocation). Tokens are logged shortened so they never appear in full.
	Logf func(format string, args ...any)
}

// Stats are counters of what the Server has seen so far.
type Stats struct {
	RefreshCalls         int64 // /oauth/token calls with grant_type=refresh_token
	RefreshOK            int64 // successful rotations
	CodeCalls            int64 // /oauth/token calls with grant_type=authorization_code
	InvalidGrant         int64 // 400 invalid_grant answers
	InvalidClient        int64 // client authentication failures
	MaxConcurrentRefresh int64 // highest number of /oauth/token calls in progress at once
	APICalls             int64 // all /v2/... requests to URL(), public ones included
	API401               int64 // /v2/... requests to URL() rejected for a bad access token
	// FaultedCalls counts /oauth/token calls answered (or left unanswered) by
	// a fault set with SetFault or SetDown. Connections refused under
	// FaultRefuse never reach the server and are not counted anywhere.
	FaultedCalls int64
	// Hangs counts /oauth/token calls that FaultHang or FaultRotateThenHang
	// held without an answer; Hanging is how many are held right now.
	Hangs   int64
	Hanging int64
	// RefreshInFlight is how many /oauth/token calls are in progress now.
	RefreshInFlight int64
	// LostRotations counts rotations done for a client that had already gone
	// away: nobody will ever present the new pair, so the chain is dead.
	LostRotations int64
	// DroppedCalls counts calls dropped under Options.DropDisconnected.
	DroppedCalls int64
	// OpenAPIConns is how many connections to URL() are open now (idle
	// kept-alive ones included); OpenTokenConns the same for TokenURL().
	OpenAPIConns   int64
	OpenTokenConns int64
	// ProfileCalls counts GET /v2/user/profile requests on either
	// listener, answered or not.
	ProfileCalls int64
}

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

// ProfileFault is a failure mode of GET /v2/user/profile, applied to calls
// with a valid access token (a bad token gets 401 as always).
type ProfileFault int

const (
	// ProfileNone: the profile endpoint answers with the chain's user.
	ProfileNone ProfileFault = iota
	// ProfileForbidden answers 403 insufficient_scope, as Restream does for
	// a token whose application lacks the profile scope.
	ProfileForbidden
	// Profile500 answers 500 with Restream's JSON error shape.
	Profile500
	// ProfileGarbage answers 200 with an HTML page.
	ProfileGarbage
	// ProfileHuge answers 200 with a JSON body of HugeBodyBytes.
	ProfileHuge
	// ProfileRedirect answers 302 to the URL given to SetProfileRedirect.
	ProfileRedirect
)

// HugeBodyBytes is the size of the FaultHuge answer.
const HugeBodyBytes = 2 << 20

// Server is a running fake. All methods are safe for concurrent use.
type Server struct {
	opts      Options
	ts        *httptest.Server
	closed    chan struct{}
	closeOnce sync.Once
	down      atomic.Int64 // status to answer on /oauth/token, 0 = healthy

	fault      atomic.Int64 // current Fault
	profFault  atomic.Int64 // current ProfileFault
	retryAfter atomic.Int64 // seconds, for Fault429
	tokenMux   *http.ServeMux
	tokenAddr  string         // host:port of the token listener, fixed for the Server's life
	handlers   sync.WaitGroup // token listener: Serve loops and their handlers

	faultMu  sync.Mutex    // serializes SetFault and Close; guards the fields below
	released chan struct{} // closed (and replaced) whenever the fault changes
	tokenSrv *tokenServer  // nil while refused or after Close
	isClosed bool

	mu         sync.Mutex
	pairs      map[string]*pair    // keyed by BOTH tokens of every live (not rotated/revoked) pair
	codes      map[string]authCode // unused authorization codes
	chains     int
	chainUsers map[int]User // the user of every chain
	user       User         // signed in: new seeds and codes are this user's
	profileTo  string       // where ProfileRedirect sends the caller
	issued     []string     // every token ever issued, for leak checks

	inflight                                                     atomic.Int64
	refreshCalls, refreshOK, codeCalls, invalidGrant, invalidCli atomic.Int64
	maxConc, apiCalls, api401                                    atomic.Int64
	faulted, hangs, hanging, lost, dropped, profileCalls         atomic.Int64
	lastTokenEnd                                                 atomic.Int64 // unix nanos
	apiConns, tokenConns                                         atomic.Int64

	callsMu sync.Mutex
	calls   map[*http.Request]time.Time // /oauth/token calls in progress -> start
}

// tokenServer is one incarnation of the token listener; FaultRefuse ends it
// and clearing the fault starts a new one on the same port.
type tokenServer struct {
	srv  *http.Server
	down chan struct{} // closed when this incarnation is shut down
}

type tokenServerKey struct{}

// authCode is an unused authorization code: the redirect_uri it was issued for
// and the user who approved.
type authCode struct {
	redirectURI string
	user        User
}

// pair is one access+refresh pair; a chain is the sequence of pairs created by
// rotating from one authorization.
type pair struct {
	chain                 int
	access, refresh       string
	accessExp, refreshExp time.Time
	accessRevoked         bool // by RevokeAccessTokens; the refresh token stays usable
}

// New starts a Server listening on 127.0.0.1 with a random port.
func New(opts Options) *Server {
	if opts.ClientID == "" {
		opts.ClientID = "test-client"
	}
	if opts.ClientSecret == "" {
		opts.ClientSecret = "test-secret"
	}
	if opts.AccessTTL == 0 {
		opts.AccessTTL = time.Hour
	}
	if opts.RefreshTTL == 0 {
		opts.RefreshTTL = 365 * 24 * time.Hour
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.User == (User{}) {
		opts.User = DefaultUser
	}
	s := &Server{
		opts:       opts,
		closed:     make(chan struct{}),
		pairs:      make(map[string]*pair),
		codes:      make(map[string]authCode),
		chainUsers: make(map[int]User),
		user:       opts.User,
		released:   make(chan struct{}),
		calls:      make(map[*http.Request]time.Time),
	}
	s.retryAfter.Store(2)
	s.lastTokenEnd.Store(time.Now().UnixNano())
	mux := http.NewServeMux()
	mux.HandleFunc("/oauth/token", s.handleToken)
	mux.HandleFunc("/oauth/revoke", s.handleRevoke)
	mux.HandleFunc("/v2/", s.handleAPI)
	s.tokenMux = http.NewServeMux()
	s.tokenMux.HandleFunc("/oauth/token", s.handleToken)
	s.tokenMux.HandleFunc("/oauth/revoke", s.handleRevoke)
	// The profile also answers on the token listener: clients derive its
	// URL from the token URL (same scheme and host, as at api.restream.io).
	s.tokenMux.HandleFunc("/v2/user/profile", s.handleAPI)

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic("fakerestream: listen: " + err.Error())
	}
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic("fakerestream: listen: " + err.Error())
	}
	s.tokenAddr = tl.Addr().String()
	s.startTokenServerLocked(tl)
	s.ts = httptest.NewUnstartedServer(mux)
	s.ts.Listener.Close()
	s.ts.Listener = l
	s.ts.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		switch st {
		case http.StateNew:
			s.apiConns.Add(1)
		case http.StateHijacked, http.StateClosed:
			s.apiConns.Add(-1)
		}
	}
	s.ts.Start()
	return s
}

// URL returns the base URL of the API, e.g. "http://127.0.0.1:12345". It
// serves /oauth/token and /oauth/revoke too, unaffected by FaultRefuse.
func (s *Server) URL() string { return s.ts.URL }

// TokenURL returns the token endpoint on its own listener,
// e.g. "http://127.0.0.1:23456/oauth/token". FaultRefuse takes it down.
func (s *Server) TokenURL() string { return "http://" + s.tokenAddr + "/oauth/token" }

// Close cuts short any latency sleeps and hangs and shuts the server down,
// waiting for outstanding requests.
func (s *Server) Close() {
	s.closeOnce.Do(func() { close(s.closed) })
	s.faultMu.Lock()
	s.isClosed = true
	s.stopTokenServerLocked()
	s.faultMu.Unlock()
	s.ts.Close()
	s.handlers.Wait()
}

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

func (s *Server) startTokenServerLocked(l net.Listener) {
	ts := &tokenServer{down: make(chan struct{})}
	ts.srv = &http.Server{
		Handler:           s.tokenMux,
		ReadHeaderTimeout: 10 * time.Second,
		BaseContext: func(net.Listener) context.Context {
			return context.WithValue(context.Background(), tokenServerKey{}, ts)
		},
		ConnState: func(_ net.Conn, st http.ConnState) {
			// Track connection goroutines so that Close waits for them.
			switch st {
			case http.StateNew:
				s.handlers.Add(1)
				s.tokenConns.Add(1)
			case http.StateHijacked, http.StateClosed:
				s.tokenConns.Add(-1)
				s.handlers.Done()
			}
		},
	}
	s.tokenSrv = ts
	s.handlers.Add(1)
	go func() {
		defer s.handlers.Done()
		_ = ts.srv.Serve(l)
	}()
}

// stopTokenServerLocked closes the token listener and every connection to it.
func (s *Server) stopTokenServerLocked() {
	if s.tokenSrv == nil {
		return
	}
	close(s.tokenSrv.down)
	_ = s.tokenSrv.srv.Close()
	s.tokenSrv = nil
}

// relistenLocked listens again on the token listener's port. The port was
// ours a moment ago; retry briefly in case the kernel is slow to free it.
func (s *Server) relistenLocked() {
	var err error
	for range 100 {
		var l net.Listener
		if l, err = net.Listen("tcp", s.tokenAddr); err == nil {
			s.startTokenServerLocked(l)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	panic(fmt.Sprintf("fakerestream: listening again on %s: %v", s.tokenAddr, err))
}

// Seed issues a brand-new pair as an authorization would, starting a new chain
// of the signed-in user, and returns its refresh token. Existing chains are
// untouched.
func (s *Server) Seed() string {
	_, rt := s.SeedPair()
	return rt
}

// SeedPair is like Seed but returns both tokens of the new pair.
func (s *Server) SeedPair() (access, refresh string) {
	s.mu.Lock()
	p := s.newChainLocked(s.user)
	s.mu.Unlock()
	return p.access, p.refresh
}

// SeedFor is Seed for a chain of user u.
func (s *Server) SeedFor(u User) string {
	s.mu.Lock()
	p := s.newChainLocked(u)
	s.mu.Unlock()
	return p.refresh
}

// SetUser signs u in: later seeds, codes and consents start chains of u.
// Existing chains keep their user.
func (s *Server) SetUser(u User) {
	s.mu.Lock()
	s.user = u
	s.mu.Unlock()
}

// IssueCode returns a single-use authorization code bound to redirectURI,
// approved by the signed-in user. Any exchange attempt consumes it, even one
// that fails (e.g. wrong redirect_uri), as RFC 6749 recommends for suspected
// replay.
func (s *Server) IssueCode(redirectURI string) string {
	s.mu.Lock()
	u := s.user
	s.mu.Unlock()
	return s.IssueCodeFor(redirectURI, u)
}

// IssueCodeFor is IssueCode for a code approved by user u.
func (s *Server) IssueCodeFor(redirectURI string, u User) string {
	c := randToken("code_")
	s.mu.Lock()
	s.codes[c] = authCode{redirectURI: redirectURI, user: u}
	s.mu.Unlock()
	return c
}

// UserOf returns the user of the chain that access token tok belongs to,
// if tok is live.
func (s *Server) UserOf(tok string) (User, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.pairs[tok]
	if p == nil {
		return User{}, false
	}
	return s.chainUsers[p.chain], true
}

// SetProfileFault makes GET /v2/user/profile fail as f describes, for
// valid tokens, until the next call; ProfileNone restores it.
func (s *Server) SetProfileFault(f ProfileFault) { s.profFault.Store(int64(f)) }

// SetProfileRedirect makes GET /v2/user/profile answer 302 to target (the
// ProfileRedirect fault); "" restores it.
func (s *Server) SetProfileRedirect(target string) {
	s.mu.Lock()
	s.profileTo = target
	s.mu.Unlock()
	if target == "" {
		s.profFault.Store(int64(ProfileNone))
		return
	}
	s.profFault.Store(int64(ProfileRedirect))
}

// RevokeAccessTokens invalidates every access token issued so far, leaving
// refresh tokens valid, to simulate server-side revocation.
func (s *Server) RevokeAccessTokens() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range s.pairs {
		p.accessRevoked = true
	}
	s.logf("fakerestream: revoked all access tokens")
}

// ValidAccessToken reports whether tok would currently be accepted by the API.
func (s *Server) ValidAccessToken(tok string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.accessValidLocked(tok, s.opts.Now())
}

// CurrentAccessTokens returns how many access tokens are currently valid.
func (s *Server) CurrentAccessTokens() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	now, n := s.opts.Now(), 0
	for tok := range s.pairs {
		if s.accessValidLocked(tok, now) {
			n++
		}
	}
	return n
}

// Stats returns a snapshot of the counters.
func (s *Server) Stats() Stats {
	return Stats{
		RefreshCalls:         s.refreshCalls.Load(),
		RefreshOK:            s.refreshOK.Load(),
		CodeCalls:            s.codeCalls.Load(),
		InvalidGrant:         s.invalidGrant.Load(),
		InvalidClient:        s.invalidCli.Load(),
		MaxConcurrentRefresh: s.maxConc.Load(),
		APICalls:             s.apiCalls.Load(),
		API401:               s.api401.Load(),
		FaultedCalls:         s.faulted.Load(),
		Hangs:                s.hangs.Load(),
		Hanging:              s.hanging.Load(),
		RefreshInFlight:      s.inflight.Load(),
		LostRotations:        s.lost.Load(),
		DroppedCalls:         s.dropped.Load(),
		OpenAPIConns:         s.apiConns.Load(),
		OpenTokenConns:       s.tokenConns.Load(),
		ProfileCalls:         s.profileCalls.Load(),
	}
}

// TokenActivity describes the /oauth/token calls: how many are in progress,
// how long ago the oldest of them started (0 if none), and how long ago the
// last one ended (since New if none has).
func (s *Server) TokenActivity() (inFlight int, oldest, sinceLastEnd time.Duration) {
	s.callsMu.Lock()
	now := time.Now()
	for _, start := range s.calls {
		inFlight++
		oldest = max(oldest, now.Sub(start))
	}
	s.callsMu.Unlock()
	return inFlight, oldest, time.Duration(now.UnixNano() - s.lastTokenEnd.Load())
}

// CloseAPIConnections closes every connection to URL(), idle or not, such
// as the kept-alive upstream connections a reverse proxy holds. The token
// listener is untouched.
func (s *Server) CloseAPIConnections() { s.ts.CloseClientConnections() }

// TokenIdleFor is how long no /oauth/token call has been in progress: 0
// while one is, and the time since the last one ended otherwise (since New
// if there was none).
func (s *Server) TokenIdleFor() time.Duration {
	if s.inflight.Load() > 0 {
		return 0
	}
	return time.Duration(time.Now().UnixNano() - s.lastTokenEnd.Load())
}

// SetDown makes /oauth/token answer status with {"error":"server_error"}
// while status is non-zero (after latency and call counting); 0 restores it.
func (s *Server) SetDown(status int) { s.down.Store(int64(status)) }

func (s *Server) logf(format string, args ...any) {
	if s.opts.Logf != nil {
		s.opts.Logf(format, args...)
	}
}

func (s *Server) accessValidLocked(tok string, now time.Time) bool {
	p := s.pairs[tok]
	return p != nil && p.access == tok && !p.accessRevoked && now.Before(p.accessExp)
}

func (s *Server) newChainLocked(u User) *pair {
	s.chains++
	s.chainUsers[s.chains] = u
	p := s.issueLocked(s.chains)
	s.logf("fakerestream: chain %d of user %d started: %s / %s", p.chain, u.ID, short(p.access), short(p.refresh))
	return p
}

func (s *Server) issueLocked(chain int) *pair {
	now := s.opts.Now()
	p := &pair{
		chain:      chain,
		access:     randToken("at_"),
		refresh:    randToken("rt_"),
		accessExp:  now.Add(s.opts.AccessTTL),
		refreshExp: now.Add(s.opts.RefreshTTL),
	}
	s.pairs[p.access] = p
	s.pairs[p.refresh] = p
	s.issued = append(s.issued, p.access, p.refresh)
	return p
}

// IssuedTokens returns every access and refresh token the Server has issued,
// so tests can check that none leaked into logs or responses.
func (s *Server) IssuedTokens() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.issued...)
}

// dropLocked invalidates both tokens of p at once.
func (s *Server) dropLocked(p *pair) {
	delete(s.pairs, p.access)
	delete(s.pairs, p.refresh)
}

func (s *Server) handleToken(w http.ResponseWriter, r *http.Request) {
	n := s.inflight.Add(1)
	s.callsMu.Lock()
	s.calls[r] = time.Now()
	s.callsMu.Unlock()
	defer func() {
		s.callsMu.Lock()
		delete(s.calls, r)
		s.callsMu.Unlock()
		s.lastTokenEnd.Store(time.Now().UnixNano())
		s.inflight.Add(-1)
	}()
	for m := s.maxConc.Load(); n > m && !s.maxConc.CompareAndSwap(m, n); m = s.maxConc.Load() {
	}
	// Best effort parse (only form bodies of POSTs are read) so calls are
	// counted by grant type even during an outage or when malformed. Reading
	// the body before the latency also lets net/http notice a client that
	// goes away during it.
	_ = r.ParseForm()
	s.sleep()

	grant := r.PostForm.Get("grant_type")
	switch grant {
	case "refresh_token":
		s.refreshCalls.Add(1)
	case "authorization_code":
		s.codeCalls.Add(1)
	}
	if st := int(s.down.Load()); st != 0 {
		s.faulted.Add(1)
		writeJSON(w, st, map[string]string{"error": "server_error"})
		return
	}
	fault, released := s.faultState()
	if s.refused(r) {
		// Accepted before the listener went down: the connection is gone.
		// Drop the call unprocessed, whatever the fault is by now.
		s.faulted.Add(1)
		panic(http.ErrAbortHandler)
	}
	if fault != FaultNone && fault != FaultRotateThenHang && fault != FaultRefuse {
		s.faulted.Add(1)
		s.writeFault(w, r, fault, released)
		return
	}
	if s.opts.DropDisconnected && r.Context().Err() != nil {
		s.dropped.Add(1)
		s.logf("fakerestream: dropped a token call whose client has gone away")
		panic(http.ErrAbortHandler)
	}
	if !s.checkFormPost(w, r) {
		return
	}
	if grant == "" {
		writeOAuthError(w, http.StatusBadRequest, "invalid_request", "Missing parameter: grant_type")
		return
	}
	if !s.authClient(w, r) {
		return
	}
	f := r.PostForm
	switch grant {
	case "refresh_token":
		rt := f.Get("refresh_token")
		if rt == "" {
			writeOAuthError(w, http.StatusBadRequest, "invalid_request", "Missing parameter: refresh_token")
			return
		}
		s.mu.Lock()
		old := s.pairs[rt]
		if old == nil || old.refresh != rt || !s.opts.Now().Before(old.refreshExp) {
			s.mu.Unlock()
			s.logf("fakerestream: refresh with invalid token %s", short(rt))
			s.invalidGrantError(w, "Invalid grant: refresh token is invalid")
			return
		}
		s.dropLocked(old)
		p := s.issueLocked(old.chain)
		s.mu.Unlock()
		s.refreshOK.Add(1)
		s.logf("fakerestream: chain %d rotated %s -> %s", p.chain, short(rt), short(p.refresh))
		if r.Context().Err() != nil {
			s.lost.Add(1)
			s.logf("fakerestream: chain %d rotated for a client that has gone away: the new pair is lost", p.chain)
		}
		if fault == FaultRotateThenHang {
			s.faulted.Add(1)
			s.hang(r, released)
		}
		s.writeTokens(w, p)

	case "authorization_code":
		code, redirect := f.Get("code"), f.Get("redirect_uri")
		if code == "" || redirect == "" {
			writeOAuthError(w, http.StatusBadRequest, "invalid_request", "Missing parameter: code and redirect_uri are required")
			return
		}
		s.mu.Lock()
		want, ok := s.codes[code]
		delete(s.codes, code)
		var p *pair
		if ok && want.redirectURI == redirect {
			p = s.newChainLocked(want.user)
		}
		s.mu.Unlock()
		if p == nil {
			s.invalidGrantError(w, "Invalid grant: authorization code is invalid")
			return
		}
		if fault == FaultRotateThenHang {
			s.faulted.Add(1)
			s.hang(r, released)
		}
		s.writeTokens(w, p)

	default:
		writeOAuthError(w, http.StatusBadRequest, "unsupported_grant_type", "Unsupported grant type: grant_type is invalid")
	}
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

// handleRevoke implements RFC 7009-style revocation: either token of a pair
// kills the whole pair; unknown tokens are silently accepted.
func (s *Server) handleRevoke(w http.ResponseWriter, r *http.Request) {
	_ = r.ParseForm()
	if !s.checkFormPost(w, r) || !s.authClient(w, r) {
		return
	}
	tok := r.PostForm.Get("token")
	if tok == "" {
		writeOAuthError(w, http.StatusBadRequest, "invalid_request", "Missing parameter: token")
		return
	}
	s.mu.Lock()
	if p := s.pairs[tok]; p != nil {
		s.dropLocked(p)
		s.logf("fakerestream: chain %d revoked via %s", p.chain, short(tok))
	}
	s.mu.Unlock()
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
}

// sleep applies the configured latency; it ignores client cancellation on
// purpose (see package doc) but stops early when the server closes.
func (s *Server) sleep() {
	d := s.opts.Latency
	if j := s.opts.LatencyJitter; j > 0 {
		d += time.Duration(mrand.Int64N(int64(j) + 1))
	}
	if d <= 0 {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-s.closed:
	}
}

// checkFormPost requires a POST with a form-urlencoded body.
func (s *Server) checkFormPost(w http.ResponseWriter, r *http.Request) bool {
	mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if r.Method != http.MethodPost || mt != "application/x-www-form-urlencoded" {
		writeOAuthError(w, http.StatusBadRequest, "invalid_request",
			"Invalid request: method must be POST and content must be application/x-www-form-urlencoded")
		return false
	}
	return true
}

// authClient accepts HTTP Basic or client_id/client_secret form fields. If
// both are given, any form value present must agree with the Basic one.
func (s *Server) authClient(w http.ResponseWriter, r *http.Request) bool {
	f := r.PostForm
	id, secret, basic := r.BasicAuth()
	ok := basic || f.Has("client_id") || f.Has("client_secret")
	if basic {
		ok = (!f.Has("client_id") || f.Get("client_id") == id) &&
			(!f.Has("client_secret") || f.Get("client_secret") == secret)
	} else {
		id, secret = f.Get("client_id"), f.Get("client_secret")
	}
	if ok && id == s.opts.ClientID && secret == s.opts.ClientSecret {
		return true
	}
	s.invalidCli.Add(1)
	status := http.StatusBadRequest
	if basic {
		w.Header().Set("WWW-Authenticate", `Basic realm="restream"`)
		status = http.StatusUnauthorized
	}
	writeOAuthError(w, status, "invalid_client", "Client authentication failed")
	return false
}

func (s *Server) invalidGrantError(w http.ResponseWriter, desc string) {
	s.invalidGrant.Add(1)
	writeOAuthError(w, http.StatusBadRequest, "invalid_grant", desc)
}

// writeTokens answers with both the OAuth (snake_case) and Restream
// (camelCase) field sets. expires/expires_in are whole seconds, so with
// sub-second TTLs they are approximate; the true expiry is p.accessExp.
func (s *Server) writeTokens(w http.ResponseWriter, p *pair) {
	const iso = "2006-01-02T15:04:05.000Z07:00" // like JavaScript's toISOString
	accessIn, refreshIn := ceilSeconds(s.opts.AccessTTL), ceilSeconds(s.opts.RefreshTTL)
	writeJSON(w, http.StatusOK, map[string]any{
		"access_token":             p.access,
		"expires":                  p.accessExp.Unix(),
		"expires_in":               accessIn,
		"refresh_token":            p.refresh,
		"scope":                    Scope,
		"token_type":               "Bearer",
		"accessToken":              p.access,
		"accessTokenExpiresIn":     accessIn,
		"accessTokenExpiresAt":     p.accessExp.UTC().Format(iso),
		"accessTokenExpiresEpoch":  p.accessExp.Unix(),
		"refreshToken":             p.refresh,
		"refreshTokenExpiresIn":    refreshIn,
		"refreshTokenExpiresAt":    p.refreshExp.UTC().Format(iso),
		"refreshTokenExpiresEpoch": p.refreshExp.Unix(),
		"scopeJson":                strings.Fields(Scope),
		"tokenType":                "Bearer",
	})
}

var (
	platforms = []map[string]any{
		{"id": 1, "name": "Twitch", "url": "http://twitch.tv", "image": map[string]string{"png": "https://restream.io/img/api/platforms/platform-1.png"}},
		{"id": 5, "name": "Youtube", "url": "https://www.youtube.com", "image": map[string]string{"png": "https://restream.io/img/api/platforms/platform-5.png"}},
	}
	servers = []map[string]any{
		{"id": 0, "name": "Autodetect", "url": "live.restream.io", "rtmpUrl": "rtmp://live.restream.io/live", "latitude": "0", "longitude": "0"},
		{"id": 1, "name": "EU-West (London, GB)", "url": "london.restream.io", "rtmpUrl": "rtmp://london.restream.io/live", "latitude": "51.5073", "longitude": "-0.1277"},
	}
)

func (s *Server) handleAPI(w http.ResponseWriter, r *http.Request) {
	// Profile reads on the token listener are the clients' own (they derive
	// the URL from the token URL); APICalls and API401 count the API on
	// URL(), where proxied traffic goes.
	api := r.Context().Value(tokenServerKey{}) == nil
	if api {
		s.apiCalls.Add(1)
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, "read body: "+err.Error(), http.StatusBadRequest)
		return
	}
	switch r.URL.Path {
	case "/v2/platform/all":
		writeJSON(w, http.StatusOK, platforms)
		return
	case "/v2/server/all":
		writeJSON(w, http.StatusOK, servers)
		return
	}

	authz := r.Header.Get("Authorization")
	queryTok := r.URL.Query().Get("accessToken")
	tok := queryTok
	if authz != "" {
		tok = ""
		if scheme, t, ok := strings.Cut(authz, " "); ok && strings.EqualFold(scheme, "Bearer") {
			tok = strings.TrimSpace(t)
		}
	}
	profile := r.URL.Path == "/v2/user/profile" && r.Method == http.MethodGet
	if profile {
		s.profileCalls.Add(1)
	}
	if tok == "" || !s.ValidAccessToken(tok) {
		if api {
			s.api401.Add(1)
		}
		writeAPIError(w, http.StatusUnauthorized, "invalid_token", "Invalid token: access token is invalid")
		return
	}
	sum := sha256.Sum256(body)
	echo := map[string]any{
		"method":             r.Method,
		"path":               r.URL.Path,
		"query":              r.URL.RawQuery,
		"body_sha256":        hex.EncodeToString(sum[:]),
		"body_len":           len(body),
		"authorization":      authz,
		"access_token_query": queryTok,
	}
	if profile && s.writeProfileFault(w, r) {
		return
	}
	if profile {
		// Restream's profile: id (a number), username, email. The echo
		// fields stay, for tests that check what a proxy sent.
		u, _ := s.UserOf(tok)
		echo["id"], echo["username"], echo["email"] = u.ID, u.Username, u.Email
	}
	writeJSON(w, http.StatusOK, echo)
}

// writeProfileFault answers a profile call under the current ProfileFault;
// false if there is none.
func (s *Server) writeProfileFault(w http.ResponseWriter, r *http.Request) bool {
	switch ProfileFault(s.profFault.Load()) {
	case ProfileForbidden:
		writeAPIError(w, http.StatusForbidden, "insufficient_scope", "Insufficient scope: authorized scope is insufficient")
	case Profile500:
		writeAPIError(w, http.StatusInternalServerError, "server_error", "Internal server error")
	case ProfileGarbage:
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, "<!DOCTYPE html>\n<html><body><h1>Restream</h1><p>Something went wrong.</p></body></html>\n")
	case ProfileHuge:
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, `{"id":1,"username":"`+strings.Repeat("x", HugeBodyBytes)+`"}`)
	case ProfileRedirect:
		s.mu.Lock()
		to := s.profileTo
		s.mu.Unlock()
		http.Redirect(w, r, to, http.StatusFound)
	default:
		return false
	}
	return true
}

// writeAPIError answers in the API's error shape.
func writeAPIError(w http.ResponseWriter, status int, name, msg string) {
	writeJSON(w, status, map[string]any{"error": map[string]any{
		"statusCode": status, "status": status, "code": status, "message": msg, "name": name,
	}})
}

func writeOAuthError(w http.ResponseWriter, status int, code, desc string) {
	writeJSON(w, status, map[string]string{"error": code, "error_description": desc})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func randToken(prefix string) string {
	b := make([]byte, 20)
	_, _ = rand.Read(b) // crypto/rand.Read never fails on supported platforms
	return prefix + hex.EncodeToString(b)
}

// short abbreviates a token for logs so full tokens never leak into them.
func short(tok string) string {
	if len(tok) > 9 {
		return tok[:9] + "…"
	}
	return tok
}

func ceilSeconds(d time.Duration) int64 {
	s := int64((d + time.Second - 1) / time.Second)
	return max(s, 1)
}
