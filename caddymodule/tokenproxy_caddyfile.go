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
//	}
//
// redirect_uris takes one or more URIs and may be repeated; the other
// subdirectives take one value each.
func (p *TokenProxy) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // directive name
	if d.NextArg() {
		return d.Errf("restream_token_proxy takes no arguments (unexpected %q)", d.Val())
	}
	client := clientConfig{&p.ClientID, &p.ClientSecret, &p.TokenURL, &p.ClientAuth}
	known := append(slices.Clone(clientOptions), "revoke_url", "timeout", "max_concurrent")
	for d.NextBlock(0) {
		sub := d.Val()
		if sub == "redirect_uris" {
			if err := p.addRedirectURIs(d); err != nil {
				return err
			}
			continue
		}
		// As eachOption: one non-empty value, errors at the line.
		if !slices.Contains(known, sub) {
			return d.Errf("unknown subdirective %q", sub)
		}
		var val string
		if !d.Args(&val) {
			return d.Errf("%s: expected one value", sub)
		}
		if d.NextArg() {
			return d.Errf("%s: expected one value, got more", sub)
		}
		if val == "" {
			return d.Errf("%s: empty value", sub)
		}
		if err := p.setOption(client, sub, val); err != nil {
			return d.Err(err.Error())
		}
	}
	return requireCredentials(d, "restream_token_proxy", p.ClientID, p.ClientSecret)
}

// setOption stores one single-valued subdirective.
func (p *TokenProxy) setOption(client clientConfig, sub, val string) error {
	if ok, err := client.set(sub, val); ok {
		return err
	}
	switch sub {
	case "revoke_url":
		if err := checkEndpointURL(sub, val); err != nil {
			return err
		}
		p.RevokeURL = val
	case "timeout":
		dur, err := parsePositiveDuration(sub, val)
		if err != nil {
			return err
		}
		p.Timeout = dur
	case "max_concurrent":
		n, err := strconv.Atoi(val)
		if err != nil || n <= 0 {
			return fmt.Errorf("%s %q: must be a positive integer", sub, val)
		}
		p.MaxConcurrent = n
	}
	return nil
}

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
