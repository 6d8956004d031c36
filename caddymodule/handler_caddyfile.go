package caddymodule

import (
	"cmp"
	"fmt"
	"slices"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
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
//	    max_replay_total <size>
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
		"max_replay_body", "max_replay_total", "query_param", "encryption_key", "encryption_key_previous")
	var replayLine int // of the later of max_replay_body and max_replay_total
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
		case "max_replay_body", "max_replay_total":
			limit, limitText := uint64(maxReplayBodyLimit), "1GiB"
			if sub == "max_replay_total" {
				limit, limitText = maxReplayTotalLimit, "1TiB"
			}
			size, err := parseSize(sub, val, limit, limitText)
			if err != nil {
				return err
			}
			if sub == "max_replay_total" {
				h.MaxReplayTotal = size
			} else {
				h.MaxReplayBody = size
			}
			replayLine = d.Line()
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
	if replayLine != 0 {
		body, total := cmp.Or(h.MaxReplayBody, DefaultMaxReplayBody), cmp.Or(h.MaxReplayTotal, DefaultMaxReplayTotal)
		if err := checkReplayLimits(body, total); err != nil {
			return errAtLine(d, replayLine, err)
		}
	}
	return requireCredentials(d, "restream_auth", h.ClientID, h.ClientSecret)
}

// Interface guards
var _ caddyfile.Unmarshaler = (*Handler)(nil)
