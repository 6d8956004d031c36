package caddymodule

import (
	"slices"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// parseAccountArg reads a directive's name and its optional <account>
// argument ("" when absent).
func parseAccountArg(d *caddyfile.Dispenser) (string, error) {
	d.Next() // directive name
	var account string
	if d.NextArg() {
		account = d.Val()
		if !accountPattern.MatchString(account) {
			return "", d.Errf("account %q: use 1-64 letters, digits, '.', '_' or '-'", account)
		}
	}
	if d.NextArg() {
		return "", d.ArgErr()
	}
	return account, nil
}

// eachOption walks a block of subdirectives that each take exactly one
// non-empty value and hands them to set (a repeated one wins, as in Caddy's
// own directives). Errors, from the walk or from set, are Caddyfile errors
// at the subdirective's line.
func eachOption(d *caddyfile.Dispenser, known []string, set func(sub, val string) error) error {
	for d.NextBlock(0) {
		sub := d.Val()
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
		if err := set(sub, val); err != nil {
			return d.Err(err.Error())
		}
	}
	return nil
}

// clientOptions are the subdirectives of every directive that talks to the
// token endpoint.
var clientOptions = []string{"client_id", "client_secret", "token_url", "client_auth"}

// clientConfig holds clientOptions as parsed.
type clientConfig struct {
	ClientID, ClientSecret, TokenURL, ClientAuth *string
}

// set stores one of clientOptions; it reports false for other subdirectives.
func (c clientConfig) set(sub, val string) (bool, error) {
	switch sub {
	case "client_id":
		*c.ClientID = val
	case "client_secret":
		*c.ClientSecret = val
	case "token_url":
		if err := checkEndpointURL("token_url", val); err != nil {
			return true, err
		}
		*c.TokenURL = val
	case "client_auth":
		if _, err := parseClientAuth(val); err != nil {
			return true, err
		}
		*c.ClientAuth = val
	default:
		return false, nil
	}
	return true, nil
}

// requireCredentials reports a missing client_id or client_secret at the
// end of a directive's block.
func requireCredentials(d *caddyfile.Dispenser, directive, clientID, clientSecret string) error {
	switch {
	case clientID == "":
		return d.Errf("%s: client_id is required", directive)
	case clientSecret == "":
		return d.Errf("%s: client_secret is required", directive)
	}
	return nil
}
