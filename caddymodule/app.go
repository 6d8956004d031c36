package caddymodule

import (
	"sync"

	"github.com/caddyserver/caddy/v2"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

func init() {
	caddy.RegisterModule(App{})
}

// App starts the token sources of a config. It exists so that refreshers start
// only when a config runs: `caddy validate` and `caddy adapt --validate`
// provision handlers too, and provisioning must never touch the token
// endpoint. Handlers load it with ctx.App; users never configure it.
type App struct {
	mu      *sync.Mutex
	sources []*tokensource.Source
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "restream_auth",
		New: func() caddy.Module { return &App{mu: new(sync.Mutex)} },
	}
}

// add registers a source to be started with the config.
func (a *App) add(src *tokensource.Source) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.sources = append(a.sources, src)
}

// Start starts every registered source; sources shared with a previous
// config (see sources) are already running and are not started twice.
func (a *App) Start() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, s := range a.sources {
		s.Start()
	}
	return nil
}

// Stop does nothing: sources outlive configs and stop when the last handler
// that uses them is cleaned up.
func (a *App) Stop() error { return nil }

// Interface guards
var (
	_ caddy.App = (*App)(nil)
)
