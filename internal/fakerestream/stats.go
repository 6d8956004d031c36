package fakerestream

import "time"

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
		InvalidClient:        s.invalidClient.Load(),
		MaxConcurrentRefresh: s.maxConcurrent.Load(),
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

// TokenIdleFor is how long no /oauth/token call has been in progress: 0
// while one is, and the time since the last one ended otherwise (since New
// if there was none).
func (s *Server) TokenIdleFor() time.Duration {
	if s.inflight.Load() > 0 {
		return 0
	}
	return time.Duration(time.Now().UnixNano() - s.lastTokenEnd.Load())
}
