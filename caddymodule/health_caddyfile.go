package caddymodule

import (
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("restream_auth_health", parseHealthCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("restream_auth_health", httpcaddyfile.Before, "reverse_proxy")
}

func parseHealthCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Health)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

// UnmarshalCaddyfile parses `restream_auth_health [<account>]`.
func (h *Health) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	account, err := parseAccountArg(d)
	if err != nil {
		return err
	}
	h.Account = account
	if d.NextBlock(0) {
		return d.Errf("restream_auth_health takes no block (unexpected %q)", d.Val())
	}
	return nil
}

// Interface guards
var _ caddyfile.Unmarshaler = (*Health)(nil)
