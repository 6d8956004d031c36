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
package fakerestream

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	mrand "math/rand/v2"
	"mime"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Scope is the space-separated scope string returned with every token pair.
const Scope = "profile.default.read channels.read chat.default.read stream.default.read"

// Options configure a Server. Zero values get the defaults noted.
type Options struct {
	ClientID     string // default "test-client"
	ClientSecret string // default "test-secret"

	AccessTTL  time.Duration // default 1h
	RefreshTTL time.Duration // default 365*24h

	// Latency is a fixed extra delay on each /oauth/token call, plus a random
	// 0..LatencyJitter. The delay happens before the request is processed and
	// while it counts as in flight (see Stats.MaxConcurrentRefresh).
	Latency       time.Duration
	LatencyJitter time.Duration

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
	APICalls             int64 // all /v2/... requests, public ones included
	API401               int64 // /v2/... requests rejected for a bad access token
}

// Server is a running fake. All methods are safe for concurrent use.
type Server struct {
	opts      Options
	ts        *httptest.Server
	closed    chan struct{}
	closeOnce sync.Once
	down      atomic.Int64 // status to answer on /oauth/token, 0 = healthy

	mu     sync.Mutex
	pairs  map[string]*pair  // keyed by BOTH tokens of every live (not rotated/revoked) pair
	codes  map[string]string // unused authorization code -> redirect_uri
	chains int
	issued []string // every token ever issued, for leak checks

	inflight                                                     atomic.Int64
	refreshCalls, refreshOK, codeCalls, invalidGrant, invalidCli atomic.Int64
	maxConc, apiCalls, api401                                    atomic.Int64
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
	s := &Server{
		opts:   opts,
		closed: make(chan struct{}),
		pairs:  make(map[string]*pair),
		codes:  make(map[string]string),
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/oauth/token", s.handleToken)
	mux.HandleFunc("/oauth/revoke", s.handleRevoke)
	mux.HandleFunc("/v2/", s.handleAPI)

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic("fakerestream: listen: " + err.Error())
	}
	s.ts = httptest.NewUnstartedServer(mux)
	s.ts.Listener.Close()
	s.ts.Listener = l
	s.ts.Start()
	return s
}

// URL returns the base URL, e.g. "http://127.0.0.1:12345".
func (s *Server) URL() string { return s.ts.URL }

// TokenURL returns URL()+"/oauth/token".
func (s *Server) TokenURL() string { return s.ts.URL + "/oauth/token" }

// Close cuts short any latency sleeps and shuts the server down, waiting for
// outstanding requests.
func (s *Server) Close() {
	s.closeOnce.Do(func() { close(s.closed) })
	s.ts.Close()
}

// Seed issues a brand-new pair as an authorization would, starting a new chain,
// and returns its refresh token. Existing chains are untouched.
func (s *Server) Seed() string {
	_, rt := s.SeedPair()
	return rt
}

// SeedPair is like Seed but returns both tokens of the new pair.
func (s *Server) SeedPair() (access, refresh string) {
	s.mu.Lock()
	p := s.newChainLocked()
	s.mu.Unlock()
	return p.access, p.refresh
}

// IssueCode returns a single-use authorization code bound to redirectURI.
// Any exchange attempt consumes it, even one that fails (e.g. wrong
// redirect_uri), as RFC 6749 recommends for suspected replay.
func (s *Server) IssueCode(redirectURI string) string {
	code := randToken("code_")
	s.mu.Lock()
	s.codes[code] = redirectURI
	s.mu.Unlock()
	return code
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
	}
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

func (s *Server) newChainLocked() *pair {
	s.chains++
	p := s.issueLocked(s.chains)
	s.logf("fakerestream: chain %d started: %s / %s", p.chain, short(p.access), short(p.refresh))
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
	defer s.inflight.Add(-1)
	for m := s.maxConc.Load(); n > m && !s.maxConc.CompareAndSwap(m, n); m = s.maxConc.Load() {
	}
	s.sleep()

	// Best effort parse (only form bodies of POSTs are read) so calls are
	// counted by grant type even during an outage or when malformed.
	_ = r.ParseForm()
	grant := r.PostForm.Get("grant_type")
	switch grant {
	case "refresh_token":
		s.refreshCalls.Add(1)
	case "authorization_code":
		s.codeCalls.Add(1)
	}
	if st := int(s.down.Load()); st != 0 {
		writeJSON(w, st, map[string]string{"error": "server_error"})
		return
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
		if ok && want == redirect {
			p = s.newChainLocked()
		}
		s.mu.Unlock()
		if p == nil {
			s.invalidGrantError(w, "Invalid grant: authorization code is invalid")
			return
		}
		s.writeTokens(w, p)

	default:
		writeOAuthError(w, http.StatusBadRequest, "unsupported_grant_type", "Unsupported grant type: grant_type is invalid")
	}
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
	s.apiCalls.Add(1)
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
	if tok == "" || !s.ValidAccessToken(tok) {
		s.api401.Add(1)
		writeJSON(w, http.StatusUnauthorized, map[string]any{"error": map[string]any{
			"statusCode": 401, "status": 401, "code": 401,
			"message": "Invalid token: access token is invalid", "name": "invalid_token",
		}})
		return
	}
	sum := sha256.Sum256(body)
	writeJSON(w, http.StatusOK, map[string]any{
		"method":             r.Method,
		"path":               r.URL.Path,
		"query":              r.URL.RawQuery,
		"body_sha256":        hex.EncodeToString(sum[:]),
		"body_len":           len(body),
		"authorization":      authz,
		"access_token_query": queryTok,
	})
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
