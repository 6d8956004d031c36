package caddymodule

import (
	"fmt"
	"slices"
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
	account, err := parseAccountArg(d)
	if err != nil {
		return err
	}
	h.Account = account
	client := clientConfig{&h.ClientID, &h.ClientSecret, &h.TokenURL, &h.ClientAuth}
	known := append(slices.Clone(clientOptions), "refresh_token", "refresh_ahead", "timeout", "replay_401",
		"max_replay_body", "query_param", "encryption_key", "encryption_key_previous")
	err = eachOption(d, known, func(sub, val string) error {
		if ok, err := client.set(sub, val); ok {
			return err
		}
		switch sub {
		case "refresh_token":
			h.RefreshToken = val
		case "refresh_ahead", "timeout":
			dur, err := parsePositiveDuration(sub, val)
			if err != nil {
				return err
			}
			if sub == "timeout" {
				h.Timeout = dur
			} else {
				h.RefreshAhead = dur
			}
		case "replay_401":
			on, err := parseOnOff(val)
			if err != nil {
				return fmt.Errorf("replay_401 %q: want on or off", val)
			}
			h.Replay401 = &on
		case "max_replay_body":
			size, err := humanize.ParseBytes(val)
			switch {
			case err != nil:
				return fmt.Errorf("max_replay_body %q: not a size (e.g. 512KiB, 1MiB): %v", val, err)
			case size > 1<<30:
				return fmt.Errorf("max_replay_body %q: at most 1GiB", val)
			case size == 0:
				return fmt.Errorf("max_replay_body %q: must be positive (use replay_401 off to disable replays)", val)
			}
			h.MaxReplayBody = int64(size)
		case "query_param":
			h.QueryParam = val
		case "encryption_key":
			h.EncryptionKey = val
		case "encryption_key_previous":
			h.EncryptionKeyPrevious = val
		}
		return nil
	})
	if err != nil {
		return err
	}
	return requireCredentials(d, "restream_auth", h.ClientID, h.ClientSecret)
}

// parsePositiveDuration parses a Caddy duration that must be above zero.
func parsePositiveDuration(sub, val string) (caddy.Duration, error) {
	dur, err := caddy.ParseDuration(val)
	if err != nil {
		return 0, fmt.Errorf("%s %q: %v", sub, val, err)
	}
	if dur <= 0 {
		return 0, fmt.Errorf("%s %q: must be positive", sub, val)
	}
	return caddy.Duration(dur), nil
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
