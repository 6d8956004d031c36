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
//
// AuthorizeHandler stands in for Restream's login and consent page, and
// NewWebsocket for its chat and streaming websockets. Where Restream's
// documentation is silent the fake makes assumptions, listed in
// docs/testing.md ("What the fake assumes").
//
// The files follow the endpoints: token.go (/oauth/token and
// /oauth/revoke), faults.go (the token endpoint's failure modes), api.go
// (/v2/ and the profile), authorize.go, websocket.go; fake.go holds the
// Server, its options and its chains, stats.go the counters.
package fakerestream

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Scope is what the fake grants unless Options.Scopes says otherwise: the
// scope names of Restream's documentation, space separated as in the token
// answer's scope field.
const Scope = "profile.read channels.read chat.read stream.read"

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

	// Scopes are the scope names granted to every chain: in the token
	// answer's scope (space separated) and scopeJson (an array), and in the
	// consent callback's scope (comma separated). Default: the names in
	// Scope. Real grants show other names, such as profile.default.read;
	// tests set those here to show a client does not match scopes exactly.
	// A name must be non-empty, without spaces or commas.
	Scopes []string

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

// Server is a running fake. All methods are safe for concurrent use.
type Server struct {
	opts      Options
	apiServer *httptest.Server
	closed    chan struct{}
	closeOnce sync.Once
	down      atomic.Int64 // status to answer on /oauth/token, 0 = healthy

	fault        atomic.Int64 // current Fault
	profileFault atomic.Int64 // current ProfileFault
	retryAfter   atomic.Int64 // seconds, for Fault429
	tokenMux     *http.ServeMux
	tokenAddr    string         // host:port of the token listener, fixed for the Server's life
	handlers     sync.WaitGroup // token listener: Serve loops and their handlers

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

	inflight                                                        atomic.Int64
	refreshCalls, refreshOK, codeCalls, invalidGrant, invalidClient atomic.Int64
	maxConcurrent, apiCalls, api401                                 atomic.Int64
	faulted, hangs, hanging, lost, dropped, profileCalls            atomic.Int64
	lastTokenEnd                                                    atomic.Int64 // unix nanos
	apiConns, tokenConns                                            atomic.Int64

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
	opts = opts.withDefaults()
	opts.check()
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

	apiListener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic("fakerestream: listen: " + err.Error())
	}
	tokenListener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic("fakerestream: listen: " + err.Error())
	}
	s.tokenAddr = tokenListener.Addr().String()
	s.startTokenServerLocked(tokenListener)
	s.apiServer = httptest.NewUnstartedServer(mux)
	s.apiServer.Listener.Close()
	s.apiServer.Listener = apiListener
	s.apiServer.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		switch st {
		case http.StateNew:
			s.apiConns.Add(1)
		case http.StateHijacked, http.StateClosed:
			s.apiConns.Add(-1)
		}
	}
	s.apiServer.Start()
	return s
}

// withDefaults returns o with its zero values replaced by the defaults.
func (o Options) withDefaults() Options {
	if o.ClientID == "" {
		o.ClientID = "test-client"
	}
	if o.ClientSecret == "" {
		o.ClientSecret = "test-secret"
	}
	if o.AccessTTL == 0 {
		o.AccessTTL = time.Hour
	}
	if o.RefreshTTL == 0 {
		o.RefreshTTL = 365 * 24 * time.Hour
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.User == (User{}) {
		o.User = DefaultUser
	}
	if len(o.Scopes) == 0 {
		o.Scopes = strings.Fields(Scope)
	} else {
		o.Scopes = slices.Clone(o.Scopes)
	}
	return o
}

// check panics, naming the field, on options no real server could have.
// New has no error to return; the fake serves tests only.
func (o Options) check() {
	for _, name := range o.Scopes {
		if name == "" || strings.ContainsAny(name, " ,\t\r\n") {
			panic(fmt.Sprintf("fakerestream: Options.Scopes: %q is not a scope name (empty, or holds a space or comma)", name))
		}
	}
}

// URL returns the base URL of the API, e.g. "http://127.0.0.1:12345". It
// serves /oauth/token and /oauth/revoke too, unaffected by FaultRefuse.
func (s *Server) URL() string { return s.apiServer.URL }

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
	s.apiServer.Close()
	s.handlers.Wait()
}

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

// CloseAPIConnections closes every connection to URL(), idle or not, such
// as the kept-alive upstream connections a reverse proxy holds. The token
// listener is untouched.
func (s *Server) CloseAPIConnections() { s.apiServer.CloseClientConnections() }

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
