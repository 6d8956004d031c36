package caddymodule

import (
	"encoding/json"
	"net/http"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	caddy.RegisterModule(Health{})
}

// Health answers liveness/readiness probes for an account: 200 with a short
// JSON when the account can serve requests, 503 when it cannot
// (re-authorization required, or no valid token).
//
//	restream_auth_health [<account>]
type Health struct {
	// The account whose state the probe reports. 1 to 64 letters, digits,
	// '.', '_' or '-'. Default: "default".
	Account string `json:"account,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (Health) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.restream_auth_health",
		New: func() caddy.Module { return new(Health) },
	}
}

// Provision applies the default account and checks its name.
func (h *Health) Provision(caddy.Context) error {
	if h.Account == "" {
		h.Account = DefaultAccount
	}
	return checkAccountName(h.Account)
}

// healthNotConfigured is the state a probe reports for an account no
// restream_auth of the config serves (a typo in the probe must not look
// healthy); every other state is a tokensource.State.
const healthNotConfigured = "not_configured"

type healthBody struct {
	Account         string `json:"account"`
	State           string `json:"state"`
	Generation      uint64 `json:"generation"`
	AccessExpiresAt string `json:"access_expires_at"`
}

// ServeHTTP answers the probe; it is terminal and never calls next.
func (h *Health) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	body := healthBody{Account: h.Account, State: healthNotConfigured}
	status := http.StatusServiceUnavailable
	for _, src := range sourcesFor(h.Account) {
		st := src.Status()
		body = healthBody{Account: h.Account, State: string(st.State), Generation: st.Generation, AccessExpiresAt: rfc3339(st.AccessExpiry)}
		if src.CanServe() {
			status = http.StatusOK
			break
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	if r.Method == http.MethodHead {
		return nil
	}
	return json.NewEncoder(w).Encode(body)
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Health)(nil)
	_ caddyhttp.MiddlewareHandler = (*Health)(nil)
)
