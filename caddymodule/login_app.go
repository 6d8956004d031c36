package caddymodule

import (
	"sync"

	"github.com/caddyserver/caddy/v2"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

func init() {
	caddy.RegisterModule(LoginApp{})
}

// LoginApp holds a config's restream_auth_login handlers, so that a
// restream_auth provisioned after a login of its account can be checked
// against it (see Login.checkBinding): handlers are provisioned in an order
// the config does not fix (servers are a map), and a mismatch must fail
// provisioning, `caddy validate` included, whichever comes first. Handlers
// load it with ctx.App; users never configure it.
type LoginApp struct {
	mu     *sync.Mutex
	logins []*Login
}

// CaddyModule returns the Caddy module information.
func (LoginApp) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "restream_auth_login",
		New: func() caddy.Module { return &LoginApp{mu: new(sync.Mutex)} },
	}
}

func (a *LoginApp) add(l *Login) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.logins = append(a.logins, l)
}

// checkLogins refuses src, a restream_auth source just provisioned, if a
// login of its account provisioned earlier in the config is bound
// otherwise.
func checkLogins(ctx caddy.Context, src *tokensource.Source) error {
	app, err := ctx.App("restream_auth_login")
	if err != nil {
		return err
	}
	a := app.(*LoginApp)
	a.mu.Lock()
	logins := a.logins
	a.mu.Unlock()
	for _, l := range logins {
		if err := l.checkBinding([]*tokensource.Source{src}); err != nil {
			return err
		}
	}
	return nil
}

// Start does nothing: the checks ran at provisioning.
func (a *LoginApp) Start() error { return nil }

// Stop does nothing.
func (a *LoginApp) Stop() error { return nil }

// Interface guards
var _ caddy.App = (*LoginApp)(nil)
