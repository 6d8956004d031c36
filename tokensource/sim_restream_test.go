package tokensource

// The simulation's Restream: a model of the token endpoint that rotates
// exactly as Restream does (one live pair per chain; anything else is
// invalid_grant), reached through each instance's transport, with the
// endpoint faults of the schedule. It checks I1 on every call.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// simToken is the model's view of one token.
type simToken struct {
	chain     int
	access    bool
	live      bool
	expires   time.Time
	spentBy   *simInstance // the refresh that rotated it
	delivered bool         // that refresh's answer reached its sender
	rejected  bool         // an invalid_grant for it was delivered
}

// simRestream models the token endpoint: each chain has one live pair;
// a refresh with the live refresh token rotates it; anything else is
// invalid_grant. It checks I1 on every call.
type simRestream struct {
	w        *simWorld
	tokens   map[string]*simToken
	chains   []string // chain -> live refresh token
	n        int
	lifetime time.Duration
	// invalidGrants counts invalid_grant answers; exempt is set when a run
	// lost a chain in a way no client can survive.
	invalidGrants  int             // distinct refresh tokens answered invalid_grant
	invalidTokens  map[string]bool // those tokens
	allowedInvalid int             // a spent seed is answered invalid_grant
	exempt         []string
	rotations      int
	storedAT       map[string]bool
}

// authorize starts a new chain (the browser flow) and returns its pair.
func (m *simRestream) authorize() (access, refresh string) {
	chain := len(m.chains)
	m.chains = append(m.chains, "")
	return m.issue(chain)
}

func (m *simRestream) issue(chain int) (string, string) {
	m.n++
	at, rt := fmt.Sprintf("at_%d_%d", chain, m.n), fmt.Sprintf("rt_%d_%d", chain, m.n)
	m.tokens[at] = &simToken{chain: chain, access: true, live: true, expires: m.w.now.Add(m.lifetime)}
	m.tokens[rt] = &simToken{chain: chain, live: true}
	if old := m.chains[chain]; old != "" {
		m.tokens[old].live = false
	}
	for tok, st := range m.tokens {
		if st.access && st.chain == chain && tok != at {
			st.live = false
		}
	}
	m.chains[chain] = rt
	return at, rt
}

// stored notes a record write, for the I2 check.
func (m *simRestream) stored(key string, value []byte, inst *simInstance) {
	rec, err := decodeRecord(value, key, simAccount, inst.keyring)
	if err != nil {
		m.w.violate("a written record does not decode: %v", err)
		return
	}
	if m.storedAT == nil {
		m.storedAT = map[string]bool{}
	}
	if rec.AccessToken != "" {
		m.storedAT[rec.AccessToken] = true
	}
}

// simTransport is the token endpoint as an instance reaches it.
type simTransport struct {
	m    *simRestream
	inst *simInstance
}

func (t *simTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	w, m := t.m.w, t.m
	p := t.inst.running
	body, _ := io.ReadAll(req.Body)
	form, _ := url.ParseQuery(string(body))
	rt := form.Get("refresh_token")
	dl, ok := opDeadline(req.Context(), t.inst)
	if !ok {
		w.violate("token call without a deadline")
		dl = w.now.Add(time.Hour)
	}
	f := w.faults
	arrive := w.now.Add(w.dur(5*time.Millisecond, 200*time.Millisecond))
	answer := w.dur(5*time.Millisecond, 200*time.Millisecond)
	if w.fault(f.endpointSlow) {
		answer = w.dur(time.Second, 20*time.Second)
	}
	if arrive.After(dl) {
		p.callAt(dl, func() any { return nil })
		return nil, context.DeadlineExceeded
	}
	var resp *simAnswer
	if err, ok := p.callAt(arrive, func() any {
		resp = m.handle(t.inst, rt)
		return nil
	}).(error); ok {
		return nil, err // cancelled before it reached the server
	}
	lost := func() {
		if resp.rotated != nil {
			m.exempt = append(m.exempt, fmt.Sprintf("answer to %s lost after rotation", t.inst.name))
		}
	}
	if resp.lost || w.now.Add(answer).After(dl) {
		lost()
		if err, ok := p.callAt(dl, func() any { return nil }).(error); ok {
			return nil, err
		}
		return nil, context.DeadlineExceeded
	}
	if err, ok := p.callAt(w.now.Add(answer), func() any {
		if resp.rotated != nil && !resp.garbage {
			resp.rotated.delivered = true
		}
		if resp.rejected != nil {
			resp.rejected.rejected = true
		}
		return nil
	}).(error); ok {
		lost()
		return nil, err
	}
	h := http.Header{"Content-Type": {"application/json"}}
	if resp.retryAfter != "" {
		h.Set("Retry-After", resp.retryAfter)
	}
	return &http.Response{StatusCode: resp.status, Header: h, Body: io.NopCloser(strings.NewReader(resp.body)), Request: req}, nil
}

type simAnswer struct {
	status     int
	body       string
	retryAfter string
	lost       bool
	garbage    bool
	rotated    *simToken // the refresh token this answer spent
	rejected   *simToken
}

// handle processes one refresh request on arrival.
func (m *simRestream) handle(inst *simInstance, rt string) *simAnswer {
	w, f := m.w, m.w.faults
	st := m.tokens[rt]
	lostMark, lostLease := w.redis.spared(rt, inst)
	if st != nil && !st.live && !lostMark {
		// I1: a refresh token that may be spent is sent only by the instance
		// that spent it, after an answer it did not get.
		switch {
		case st.rejected:
			w.violate("I1: %s sent a refresh token already answered invalid_grant", inst.name)
		case st.spentBy != nil && st.spentBy != inst:
			w.violate("I1: %s sent a refresh token that %s spent", inst.name, st.spentBy.name)
		case st.spentBy != nil && st.delivered:
			w.violate("I1: %s resent a refresh token whose new pair it had received", inst.name)
		}
	}
	if holder := m.w.leaseOwner(); holder != inst.owner && !lostLease {
		w.violate("I3: %s sent a refresh token while the lease is %q's", inst.name, holder)
	}
	switch {
	case w.fault(f.endpoint5xx):
		return &simAnswer{status: 503, body: `{"error":"temporarily_unavailable"}`}
	case w.fault(f.endpoint429):
		return &simAnswer{status: 429, body: `{"error":"slow_down"}`, retryAfter: "2"}
	}
	if st == nil || !st.live {
		if m.invalidTokens == nil {
			m.invalidTokens = map[string]bool{}
		}
		m.invalidTokens[rt] = true // a resend after a lost answer is the same loss
		m.invalidGrants = len(m.invalidTokens)
		w.trace("token endpoint: %s sent a dead refresh token: invalid_grant", inst.name)
		return &simAnswer{status: 400, body: `{"error":"invalid_grant","error_description":"Invalid refresh token"}`, rejected: st}
	}
	at, newRT := m.issue(st.chain)
	m.rotations++
	st.spentBy = inst
	ans := &simAnswer{status: 200, rotated: st}
	switch {
	case w.fault(f.endpointLost):
		ans.lost = true
		return ans
	case w.fault(f.endpointGarbage):
		ans.body, ans.garbage = "<html>bad gateway</html>", true
		m.exempt = append(m.exempt, fmt.Sprintf("answer to %s unusable after rotation", inst.name))
		return ans
	}
	exp := m.tokens[at].expires
	fields := map[string]any{
		"access_token": at, "refresh_token": newRT, "token_type": "Bearer",
		"expires_in": int64(m.lifetime / time.Second), "expires": exp.Unix(),
		"scope": "profile.default.read chat.default.read",
	}
	if !f.omitRefreshExpiry {
		fields["refreshTokenExpiresEpoch"] = w.now.Add(365 * 24 * time.Hour).Unix()
	}
	b, _ := json.Marshal(fields)
	ans.body = string(b)
	return ans
}
