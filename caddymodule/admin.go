package caddymodule

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

func init() {
	caddy.RegisterModule(AdminAPI{})
}

// AdminAPI serves the accounts' state on Caddy's admin endpoint:
//
//	GET  /restream_auth/                   state of every account
//	POST /restream_auth/<account>/refresh  force a refresh (under the full protocol)
//
// It never shows a token. Admin modules are created before apps load, so it
// reads the live token sources from the package-level pool.
type AdminAPI struct{}

// CaddyModule returns the Caddy module information.
func (AdminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.restream_auth",
		New: func() caddy.Module { return new(AdminAPI) },
	}
}

// Routes returns the admin routes.
func (a *AdminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{Pattern: "/restream_auth/", Handler: caddy.AdminHandlerFunc(a.serve)}}
}

// AccountStatus is the JSON form of an account's state. The refresh
// token's expiry is omitted while it is unknown (the endpoint did not say).
type AccountStatus struct {
	Account          string            `json:"account"`
	State            tokensource.State `json:"state"`
	Generation       uint64            `json:"generation"`
	AccessExpiresAt  string            `json:"access_expires_at"`
	RefreshExpiresAt string            `json:"refresh_expires_at,omitempty"`
	// Persisted is false while the served pair lives only in memory (state
	// degraded: its write to storage failed and is being retried).
	Persisted     bool                      `json:"persisted"`
	LastRefreshAt string                    `json:"last_refresh_at"`
	LastResult    tokensource.RefreshResult `json:"last_result"`
	LastError     string                    `json:"last_error"`
	NextRefreshAt string                    `json:"next_refresh_at"`
	// User is the Restream user the chain acts as ({"id":"…","username":"…"});
	// omitted while unknown.
	User *tokensource.User `json:"user,omitempty"`
}

func statusJSON(st tokensource.Status) AccountStatus {
	return AccountStatus{
		Account:          st.Account,
		State:            st.State,
		Generation:       st.Generation,
		AccessExpiresAt:  rfc3339(st.AccessExpiry),
		RefreshExpiresAt: rfc3339(st.RefreshExpiry),
		Persisted:        st.Persisted,
		LastRefreshAt:    rfc3339(st.LastRefresh),
		LastResult:       st.LastResult,
		LastError:        st.LastError,
		NextRefreshAt:    rfc3339(st.NextRefresh),
		User:             st.User,
	}
}

func rfc3339(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339)
}

func (a *AdminAPI) serve(w http.ResponseWriter, r *http.Request) error {
	rest := strings.Trim(strings.TrimPrefix(r.URL.Path, "/restream_auth/"), "/")
	switch {
	case rest == "":
		if r.Method != http.MethodGet {
			return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method %s not allowed; use GET", r.Method)}
		}
		var out struct {
			Accounts []AccountStatus `json:"accounts"`
		}
		out.Accounts = []AccountStatus{}
		for _, src := range allSources() {
			out.Accounts = append(out.Accounts, statusJSON(src.Status()))
		}
		w.Header().Set("Content-Type", "application/json")
		return json.NewEncoder(w).Encode(out)

	case strings.HasSuffix(rest, "/refresh"):
		if r.Method != http.MethodPost {
			return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method %s not allowed; use POST", r.Method)}
		}
		account := strings.TrimSuffix(rest, "/refresh")
		srcs := sourcesFor(account)
		if len(srcs) == 0 {
			return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("no restream_auth account %q is configured", account)}
		}
		ctx, cancel := context.WithTimeout(r.Context(), time.Minute)
		defer cancel()
		// One source is enough: sources of one account coordinate through
		// storage, and the others adopt the new pair.
		err := srcs[0].Refresh(ctx)
		st := statusJSON(srcs[0].Status())
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusBadGateway, Err: fmt.Errorf("refresh failed: %v", err)}
		}
		w.Header().Set("Content-Type", "application/json")
		return json.NewEncoder(w).Encode(st)
	}
	return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("unknown path %s", r.URL.Path)}
}

// allSources lists the running token sources, sorted by account.
func allSources() []*tokensource.Source {
	var out []*tokensource.Source
	sources.Range(func(_, v any) bool {
		out = append(out, v.(pooledSource).Source)
		return true
	})
	sort.SliceStable(out, func(i, j int) bool { return out[i].Account() < out[j].Account() })
	return out
}

// sourcesFor lists the sources of one account (several briefly during a
// reload that changed the account's configuration).
func sourcesFor(account string) []*tokensource.Source {
	var out []*tokensource.Source
	for _, s := range allSources() {
		if s.Account() == account {
			out = append(out, s)
		}
	}
	return out
}

// Interface guards
var _ caddy.AdminRouter = (*AdminAPI)(nil)
