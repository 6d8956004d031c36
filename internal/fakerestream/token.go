package fakerestream

import (
	mrand "math/rand/v2"
	"mime"
	"net/http"
	"strings"
	"time"
)

// handleToken serves /oauth/token: it counts the call, applies the latency
// and any outage or fault, checks the request and the client, and hands the
// grant to its handler. FaultRotateThenHang holds the answer after the work.
func (s *Server) handleToken(w http.ResponseWriter, r *http.Request) {
	defer s.trackTokenCall(r)()
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
	holdUntil, answered := s.faultBeforeProcessing(w, r)
	if answered {
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
	var p *pair
	switch grant {
	case "refresh_token":
		p = s.refreshGrant(w, r)
	case "authorization_code":
		p = s.codeGrant(w, r)
	default:
		writeOAuthError(w, http.StatusBadRequest, "unsupported_grant_type", "Unsupported grant type: grant_type is invalid")
	}
	if p == nil {
		return // answered with an error
	}
	if holdUntil != nil {
		s.faulted.Add(1)
		s.hang(r, holdUntil)
	}
	s.writeTokens(w, p)
}

// trackTokenCall counts r as in progress (Stats.RefreshInFlight and
// MaxConcurrentRefresh, TokenActivity, TokenIdleFor) until the returned
// function is called.
func (s *Server) trackTokenCall(r *http.Request) (done func()) {
	n := s.inflight.Add(1)
	s.callsMu.Lock()
	s.calls[r] = time.Now()
	s.callsMu.Unlock()
	for m := s.maxConcurrent.Load(); n > m && !s.maxConcurrent.CompareAndSwap(m, n); m = s.maxConcurrent.Load() {
	}
	return func() {
		s.callsMu.Lock()
		delete(s.calls, r)
		s.callsMu.Unlock()
		s.lastTokenEnd.Store(time.Now().UnixNano())
		s.inflight.Add(-1)
	}
}

// refreshGrant rotates the pair of the presented refresh token: the old
// access and refresh tokens die the moment the new pair is issued, even if
// the client has gone away. It returns the new pair, or nil once it has
// answered with an error.
func (s *Server) refreshGrant(w http.ResponseWriter, r *http.Request) *pair {
	rt := r.PostForm.Get("refresh_token")
	if rt == "" {
		writeOAuthError(w, http.StatusBadRequest, "invalid_request", "Missing parameter: refresh_token")
		return nil
	}
	s.mu.Lock()
	old := s.pairs[rt]
	if old == nil || old.refresh != rt || !s.opts.Now().Before(old.refreshExp) {
		s.mu.Unlock()
		s.logf("fakerestream: refresh with invalid token %s", short(rt))
		s.invalidGrantError(w, "Invalid grant: refresh token is invalid")
		return nil
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
	return p
}

// codeGrant redeems an authorization code for the first pair of a new
// chain. Any attempt spends the code, even one with the wrong redirect_uri.
// It returns the new pair, or nil once it has answered with an error.
func (s *Server) codeGrant(w http.ResponseWriter, r *http.Request) *pair {
	code, redirect := r.PostForm.Get("code"), r.PostForm.Get("redirect_uri")
	if code == "" || redirect == "" {
		writeOAuthError(w, http.StatusBadRequest, "invalid_request", "Missing parameter: code and redirect_uri are required")
		return nil
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
	}
	return p
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
	s.invalidClient.Add(1)
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
		"scope":                    strings.Join(s.opts.Scopes, " "),
		"token_type":               "Bearer",
		"accessToken":              p.access,
		"accessTokenExpiresIn":     accessIn,
		"accessTokenExpiresAt":     p.accessExp.UTC().Format(iso),
		"accessTokenExpiresEpoch":  p.accessExp.Unix(),
		"refreshToken":             p.refresh,
		"refreshTokenExpiresIn":    refreshIn,
		"refreshTokenExpiresAt":    p.refreshExp.UTC().Format(iso),
		"refreshTokenExpiresEpoch": p.refreshExp.Unix(),
		"scopeJson":                s.opts.Scopes,
		"tokenType":                "Bearer",
	})
}

func writeOAuthError(w http.ResponseWriter, status int, code, desc string) {
	writeJSON(w, status, map[string]string{"error": code, "error_description": desc})
}

func ceilSeconds(d time.Duration) int64 {
	s := int64((d + time.Second - 1) / time.Second)
	return max(s, 1)
}
