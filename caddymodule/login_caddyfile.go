package caddymodule

import (
	"fmt"
	"slices"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("restream_auth_login", parseLoginCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("restream_auth_login", httpcaddyfile.Before, "reverse_proxy")
}

func parseLoginCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Login)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

// loginFlags are the subdirectives that take no value.
var loginFlags = []string{"allow_unauthenticated", "allow_account_change"}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens:
//
//	restream_auth_login [<account>] {
//	    client_id     <id>
//	    client_secret <secret>
//	    token_url     <url>
//	    client_auth   basic|body
//	    authorize_url <url>
//	    redirect_uri  <url>
//	    encryption_key          <base64>
//	    encryption_key_previous <base64>
//	    expected_user_id <restream user id>
//	    allow_account_change
//	    allow_unauthenticated
//	}
func (l *Login) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	account, err := parseAccountArg(d)
	if err != nil {
		return err
	}
	l.Account = account
	client := clientConfig{&l.ClientID, &l.ClientSecret, &l.TokenURL, &l.ClientAuth}
	known := append(slices.Clone(clientOptions), "authorize_url", "redirect_uri", "encryption_key", "encryption_key_previous", "expected_user_id")
	for d.NextBlock(0) {
		sub := d.Val()
		if slices.Contains(loginFlags, sub) {
			if d.NextArg() {
				return d.Errf("%s takes no value", sub)
			}
			l.AllowUnauthenticated = l.AllowUnauthenticated || sub == "allow_unauthenticated"
			l.AllowAccountChange = l.AllowAccountChange || sub == "allow_account_change"
			continue
		}
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
		if err := l.setOption(client, sub, val); err != nil {
			return d.Err(err.Error())
		}
	}
	if err := requireCredentials(d, "restream_auth_login", l.ClientID, l.ClientSecret); err != nil {
		return err
	}
	if l.RedirectURI == "" {
		return d.Err("restream_auth_login: redirect_uri is required (the public URL of <prefix>/callback, as registered with the Restream application)")
	}
	return nil
}

// setOption stores one valued subdirective.
func (l *Login) setOption(client clientConfig, sub, val string) error {
	if ok, err := client.set(sub, val); ok {
		return err
	}
	switch sub {
	case "authorize_url":
		if _, err := checkAuthorizeURL(val); err != nil {
			return err
		}
		l.AuthorizeURL = val
	case "redirect_uri":
		if _, err := checkRedirectURI(val); err != nil {
			return err
		}
		l.RedirectURI = val
	case "encryption_key":
		l.EncryptionKey = val
	case "encryption_key_previous":
		l.EncryptionKeyPrevious = val
	case "expected_user_id":
		if !userIDPattern.MatchString(val) {
			return fmt.Errorf("expected_user_id %q: want Restream's numeric user id (GET /v2/user/profile, field id)", val)
		}
		l.ExpectedUserID = val
	}
	return nil
}

// Interface guards
var _ caddyfile.Unmarshaler = (*Login)(nil)
