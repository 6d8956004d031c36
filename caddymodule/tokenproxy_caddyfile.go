package caddymodule

import (
	"fmt"
	"slices"
	"strconv"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("restream_token_proxy", parseTokenProxyCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("restream_token_proxy", httpcaddyfile.Before, "reverse_proxy")
}

func parseTokenProxyCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(TokenProxy)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens:
//
//	restream_token_proxy {
//	    client_id      <id>
//	    client_secret  <secret>
//	    token_url      <url>
//	    revoke_url     <url>
//	    client_auth    basic|body
//	    timeout        <duration>
//	    max_concurrent <n>
//	    redirect_uris  <uri...>
//	    allow_unauthenticated
//	}
//
// redirect_uris takes one or more URIs and may be repeated;
// allow_unauthenticated takes no value; the other subdirectives take one
// value each.
func (p *TokenProxy) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // directive name
	if d.NextArg() {
		return d.Errf("restream_token_proxy takes no arguments (unexpected %q)", d.Val())
	}
	if err := tokenProxyOptions.parseBlock(d, p); err != nil {
		return err
	}
	return requireCredentials(d, "restream_token_proxy", p.ClientID, p.ClientSecret)
}

// tokenProxyOptions are restream_token_proxy's subdirectives.
var tokenProxyOptions = clientOptions(func(p *TokenProxy) clientConfig {
	return clientConfig{&p.ClientID, &p.ClientSecret, &p.TokenURL, &p.ClientAuth}
}).with(optionTable[*TokenProxy]{
	"revoke_url": oneValue(func(p *TokenProxy, val string) error {
		if err := checkEndpointURL("revoke_url", val); err != nil {
			return err
		}
		p.RevokeURL = val
		return nil
	}),
	"timeout": oneValue(func(p *TokenProxy, val string) (err error) {
		p.Timeout, err = parsePositiveDuration("timeout", val)
		return err
	}),
	"max_concurrent": oneValue(func(p *TokenProxy, val string) error {
		n, err := strconv.Atoi(val)
		if err != nil || n <= 0 {
			return fmt.Errorf("max_concurrent %q: must be a positive integer", val)
		}
		p.MaxConcurrent = n
		return nil
	}),
	"redirect_uris":         (*TokenProxy).addRedirectURIs,
	"allow_unauthenticated": flag(func(p *TokenProxy) { p.AllowUnauthenticated = true }),
})

// addRedirectURIs reads `redirect_uris <uri...>`.
func (p *TokenProxy) addRedirectURIs(d *caddyfile.Dispenser) error {
	uris := d.RemainingArgs()
	if len(uris) == 0 {
		return d.Err("redirect_uris: expected at least one URI")
	}
	for _, u := range uris {
		if err := checkDeviceRedirectURI(u); err != nil {
			return d.Err(err.Error())
		}
		if slices.Contains(p.RedirectURIs, u) {
			return d.Errf("redirect_uris %q is listed twice", u)
		}
		p.RedirectURIs = append(p.RedirectURIs, u)
	}
	return nil
}

// Interface guards
var _ caddyfile.Unmarshaler = (*TokenProxy)(nil)
