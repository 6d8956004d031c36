package caddymodule

import (
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("restream_auth", parseCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("restream_auth", httpcaddyfile.Before, "reverse_proxy")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Handler)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens:
//
//	restream_auth [<account>] {
//	    client_id       <id>
//	    client_secret   <secret>
//	    refresh_token   <token>
//	    token_url       <url>
//	    client_auth     basic|body
//	    refresh_ahead   <duration>
//	    replay_401      on|off
//	    max_replay_body <size>
//	    query_param     <name>
//	    timeout         <duration>
//	    encryption_key  <base64>
//	    encryption_key_previous <base64>
//	}
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // directive name
	if d.NextArg() {
		h.Account = d.Val()
		if !accountPattern.MatchString(h.Account) {
			return d.Errf("account %q: use 1-64 letters, digits, '.', '_' or '-'", h.Account)
		}
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		sub := d.Val()
		var val string
		if !d.Args(&val) {
			return d.Errf("%s: expected one value", sub)
		}
		if d.NextArg() {
			return d.Errf("%s: expected one value, got more", sub)
		}
		switch sub {
		case "client_id":
			h.ClientID = val
		case "client_secret":
			h.ClientSecret = val
		case "refresh_token":
			h.RefreshToken = val
		case "token_url":
			if err := checkEndpointURL("token_url", val); err != nil {
				return d.Err(err.Error())
			}
			h.TokenURL = val
		case "client_auth":
			if _, err := parseClientAuth(val); err != nil {
				return d.Err(err.Error())
			}
			h.ClientAuth = val
		case "refresh_ahead", "timeout":
			dur, err := caddy.ParseDuration(val)
			if err != nil {
				return d.Errf("%s %q: %v", sub, val, err)
			}
			if dur <= 0 {
				return d.Errf("%s %q: must be positive", sub, val)
			}
			if sub == "timeout" {
				h.Timeout = caddy.Duration(dur)
			} else {
				h.RefreshAhead = caddy.Duration(dur)
			}
		case "replay_401":
			on, err := parseOnOff(val)
			if err != nil {
				return d.Errf("replay_401 %q: want on or off", val)
			}
			h.Replay401 = &on
		case "max_replay_body":
			size, err := humanize.ParseBytes(val)
			if err != nil {
				return d.Errf("max_replay_body %q: not a size (e.g. 512KiB, 1MiB): %v", val, err)
			}
			if size > 1<<30 {
				return d.Errf("max_replay_body %q: at most 1GiB", val)
			}
			h.MaxReplayBody = int64(size)
			if h.MaxReplayBody == 0 {
				return d.Errf("max_replay_body %q: must be positive (use replay_401 off to disable replays)", val)
			}
		case "query_param":
			h.QueryParam = val
		case "encryption_key":
			h.EncryptionKey = val
		case "encryption_key_previous":
			h.EncryptionKeyPrevious = val
		default:
			return d.Errf("unknown subdirective %q", sub)
		}
	}
	switch {
	case h.ClientID == "":
		return d.Err("restream_auth: client_id is required")
	case h.ClientSecret == "":
		return d.Err("restream_auth: client_secret is required")
	}
	return nil
}

func parseOnOff(v string) (bool, error) {
	switch v {
	case "on", "true":
		return true, nil
	case "off", "false":
		return false, nil
	}
	return strconv.ParseBool("invalid")
}

// Interface guards
var _ caddyfile.Unmarshaler = (*Handler)(nil)
