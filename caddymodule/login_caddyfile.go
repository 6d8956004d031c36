package caddymodule

import (
	"fmt"

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
	if err := loginOptions.parseBlock(d, l); err != nil {
		return err
	}
	if err := requireCredentials(d, "restream_auth_login", l.ClientID, l.ClientSecret); err != nil {
		return err
	}
	if l.RedirectURI == "" {
		return d.Err("restream_auth_login: redirect_uri is required (the public URL of <prefix>/callback, as registered with the Restream application)")
	}
	return nil
}

// loginOptions are restream_auth_login's subdirectives.
var loginOptions = clientOptions(func(l *Login) clientConfig {
	return clientConfig{&l.ClientID, &l.ClientSecret, &l.TokenURL, &l.ClientAuth}
}).with(optionTable[*Login]{
	"authorize_url": oneValue(func(l *Login, val string) error {
		if _, err := checkAuthorizeURL(val); err != nil {
			return err
		}
		l.AuthorizeURL = val
		return nil
	}),
	"redirect_uri": oneValue(func(l *Login, val string) error {
		if _, err := checkRedirectURI(val); err != nil {
			return err
		}
		l.RedirectURI = val
		return nil
	}),
	"encryption_key": oneValue(func(l *Login, val string) error {
		l.EncryptionKey = val
		return nil
	}),
	"encryption_key_previous": oneValue(func(l *Login, val string) error {
		l.EncryptionKeyPrevious = val
		return nil
	}),
	"expected_user_id": oneValue(func(l *Login, val string) error {
		if !userIDPattern.MatchString(val) {
			return fmt.Errorf("expected_user_id %q: want Restream's numeric user id (GET /v2/user/profile, field id)", val)
		}
		l.ExpectedUserID = val
		return nil
	}),
	"allow_unauthenticated": flag(func(l *Login) { l.AllowUnauthenticated = true }),
	"allow_account_change":  flag(func(l *Login) { l.AllowAccountChange = true }),
})

// Interface guards
var _ caddyfile.Unmarshaler = (*Login)(nil)
