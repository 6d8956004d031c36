package caddymodule

import (
	"cmp"
	"fmt"

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
	block := &handlerBlock{Handler: h}
	if err := handlerOptions.parseBlock(d, block); err != nil {
		return err
	}
	if block.replayLine != 0 {
		body, total := cmp.Or(h.MaxReplayBody, DefaultMaxReplayBody), cmp.Or(h.MaxReplayTotal, DefaultMaxReplayTotal)
		if err := checkReplayLimits(body, total); err != nil {
			return errAtLine(d, block.replayLine, err)
		}
	}
	return requireCredentials(d, "restream_auth", h.ClientID, h.ClientSecret)
}

// handlerBlock is a Handler being parsed, with what the checks of the whole
// block need.
type handlerBlock struct {
	*Handler
	replayLine int // of the later of max_replay_body and max_replay_total
}

// handlerOptions are restream_auth's subdirectives.
var handlerOptions = clientOptions(func(b *handlerBlock) clientConfig {
	return clientConfig{&b.ClientID, &b.ClientSecret, &b.TokenURL, &b.ClientAuth}
}).with(optionTable[*handlerBlock]{
	"refresh_token": oneValue(func(b *handlerBlock, val string) error {
		b.RefreshToken = val
		return nil
	}),
	"refresh_ahead": oneValue(func(b *handlerBlock, val string) (err error) {
		b.RefreshAhead, err = parsePositiveDuration("refresh_ahead", val)
		return err
	}),
	"timeout": oneValue(func(b *handlerBlock, val string) (err error) {
		b.Timeout, err = parsePositiveDuration("timeout", val)
		return err
	}),
	"replay_401": oneValue(func(b *handlerBlock, val string) error {
		on, err := parseOnOff(val)
		if err != nil {
			return fmt.Errorf("replay_401 %q: want on or off", val)
		}
		b.Replay401 = &on
		return nil
	}),
	"max_replay_body": func(b *handlerBlock, d *caddyfile.Dispenser) error {
		b.replayLine = d.Line()
		return oneValue(func(b *handlerBlock, val string) (err error) {
			b.MaxReplayBody, err = parseSize("max_replay_body", val, maxReplayBodyLimit, "1GiB")
			return err
		})(b, d)
	},
	"max_replay_total": func(b *handlerBlock, d *caddyfile.Dispenser) error {
		b.replayLine = d.Line()
		return oneValue(func(b *handlerBlock, val string) (err error) {
			b.MaxReplayTotal, err = parseSize("max_replay_total", val, maxReplayTotalLimit, "1TiB")
			return err
		})(b, d)
	},
	"query_param": oneValue(func(b *handlerBlock, val string) error {
		b.QueryParam = val
		return nil
	}),
	"encryption_key": oneValue(func(b *handlerBlock, val string) error {
		b.EncryptionKey = val
		return nil
	}),
	"encryption_key_previous": oneValue(func(b *handlerBlock, val string) error {
		b.EncryptionKeyPrevious = val
		return nil
	}),
})

// Interface guards
var _ caddyfile.Unmarshaler = (*Handler)(nil)
