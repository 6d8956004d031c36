package caddymodule

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
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

// checkBinding refuses a restream_auth of the account that is bound
// otherwise than this login: the chain the login installs would be
// refreshed with other credentials, or stored where, or as, that source
// cannot read it. Secrets are compared by fingerprint and keys by key id;
// neither is printed.
func (l *Login) checkBinding(srcs []*tokensource.Source) error {
	mine := l.own.Binding()
	for _, src := range srcs {
		b := src.Binding()
		if b.Account != l.Account {
			continue
		}
		there := fmt.Sprintf("restream_auth %q", b.Account)
		var diffs []string
		if b.ClientID != mine.ClientID {
			diffs = append(diffs, fmt.Sprintf("client_id differs from %s (%q here, %q there)", there, mine.ClientID, b.ClientID))
		}
		if b.SecretFingerprint != mine.SecretFingerprint {
			diffs = append(diffs, fmt.Sprintf("client_secret differs from %s (values not shown)", there))
		}
		if b.TokenURL != mine.TokenURL {
			diffs = append(diffs, fmt.Sprintf("token_url differs from %s (%q here, %q there)", there, mine.TokenURL, b.TokenURL))
		}
		if a, z := storageIdentity(mine.Storage), storageIdentity(b.Storage); a != z {
			diffs = append(diffs, fmt.Sprintf("storage differs from %s (%s here, %s there)", there, a, z))
		}
		if b.KeyIDs != mine.KeyIDs {
			diffs = append(diffs, fmt.Sprintf("encryption keys differ from %s (key ids %s here, %s there)", there, keyIDsText(mine.KeyIDs), keyIDsText(b.KeyIDs)))
		}
		if len(diffs) > 0 {
			return fmt.Errorf("restream_auth_login %q: %s; the login installs the chain that restream_auth refreshes: "+
				"give both the same client_id, client_secret, token_url, storage and encryption keys", l.Account, strings.Join(diffs, "; "))
		}
	}
	return nil
}

func keyIDsText(ids string) string {
	if ids == "" {
		return "none"
	}
	return strconv.Quote(ids)
}

// appSources lists the sources a config's restream_auth handlers registered.
func appSources(a *App) []*tokensource.Source {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.sources)
}

// installer is the source the callback installs into: this config's
// restream_auth of the account, bound like the login (as checked when the
// config loaded), so it serves the new chain at once; without one, the
// login's own source stores the chain for the sources that will read it.
func (l *Login) installer() (src *tokensource.Source, live bool) {
	for _, s := range appSources(l.app) {
		if s.Account() == l.Account && l.checkBinding([]*tokensource.Source{s}) == nil {
			return s, true
		}
	}
	return l.own, false
}
