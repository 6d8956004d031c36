package caddymodule

import (
	"net/http"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// The routes that decide which Restream account the sidecar acts as
// (restream_auth_login) or that spend the application's credentials
// (restream_token_proxy) answer only requests a Caddy authentication handler
// identified, unless the operator sets allow_unauthenticated. Caddy has no
// way to tell, at provisioning, what runs before a handler in a route, so
// the check is made per request, on the placeholder every authentication
// handler sets.

// authenticatedUser is the user a Caddy authentication handler (basic_auth,
// or forward_auth copying a header into {http.auth.user.id}) identified for
// r; "" if none did.
func authenticatedUser(r *http.Request) string {
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		return repl.ReplaceAll("{http.auth.user.id}", "")
	}
	return ""
}

// remoteIP is the client's address as Caddy resolved it (trusted proxies
// applied), for logs.
func remoteIP(r *http.Request) string {
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		if ip := repl.ReplaceAll("{http.vars.client_ip}", ""); ip != "" {
			return ip
		}
	}
	return r.RemoteAddr
}

// strangerLogInterval is how often a handler logs refused unauthenticated
// requests at WARN.
const strangerLogInterval = time.Minute

// strangerLog logs refused unauthenticated requests without letting a
// scanner flood the log: the first at WARN, then at most one WARN per
// strangerLogInterval carrying how many were refused since; the rest at
// DEBUG. The zero value is ready to use.
type strangerLog struct {
	mu         sync.Mutex
	lastWarn   time.Time
	suppressed int
	now        func() time.Time // time.Now if nil; tests set it
}

// refused logs one refusal.
func (s *strangerLog) refused(logger *zap.Logger, msg string, fields ...zap.Field) {
	now := time.Now
	if s.now != nil {
		now = s.now
	}
	t := now()
	s.mu.Lock()
	warn := s.lastWarn.IsZero() || t.Sub(s.lastWarn) >= strangerLogInterval
	suppressed := s.suppressed
	if warn {
		s.lastWarn, s.suppressed = t, 0
	} else {
		s.suppressed++
	}
	s.mu.Unlock()
	if !warn {
		logger.Debug(msg, fields...)
		return
	}
	if suppressed > 0 {
		fields = append(fields, zap.Int("refused_since_last_warning", suppressed))
	}
	logger.Warn(msg, fields...)
}
