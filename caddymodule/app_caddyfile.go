package caddymodule

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource/redisstore"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("restream_auth", parseGlobalOption)
}

// parseGlobalOption makes the restream_auth app from the global option of
// the same name.
func parseGlobalOption(d *caddyfile.Dispenser, existing any) (any, error) {
	if existing != nil {
		return nil, d.Err("restream_auth: the global option is given twice; use one block")
	}
	app := new(App)
	if err := app.UnmarshalCaddyfile(d); err != nil {
		return nil, err
	}
	return httpcaddyfile.App{Name: "restream_auth", Value: caddyconfig.JSON(app, nil)}, nil
}

// UnmarshalCaddyfile sets up the app from the global option:
//
//	{
//	    restream_auth {
//	        redis        <url>
//	        key_prefix   <prefix>
//	        min_replicas <n>
//	    }
//	}
//
// The URL is kept as written: {env.*} and {file.*} placeholders are
// resolved when the config loads, not here, so `caddy adapt` never prints
// what they hold.
func (a *App) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // option name
	if d.NextArg() {
		return d.ArgErr()
	}
	r := new(RedisConfig)
	if err := redisOptions.parseBlock(d, r); err != nil {
		return err
	}
	if r.URL == "" {
		return d.Err("restream_auth: redis <url> is required (it is the only reason to set this option)")
	}
	a.Redis = r
	return nil
}

// redisOptions are the subdirectives of the restream_auth global option.
var redisOptions = optionTable[*RedisConfig]{
	"redis": oneValue(func(r *RedisConfig, val string) error {
		r.URL = val
		return checkRedisURLSyntax(val)
	}),
	"key_prefix": oneValue(func(r *RedisConfig, val string) error {
		r.KeyPrefix = val
		return redisstore.CheckKeyPrefix(val)
	}),
	"min_replicas": oneValue(func(r *RedisConfig, val string) error {
		n, err := strconv.Atoi(val)
		if err != nil || n < 0 {
			return fmt.Errorf("min_replicas %q: want a whole number, 0 or more", val)
		}
		r.MinReplicas = n
		return nil
	}),
}

// checkRedisURLSyntax checks what can be checked before placeholders are
// resolved: all of a literal URL, the scheme of one with placeholders.
func checkRedisURLSyntax(raw string) error {
	if !strings.Contains(raw, "{") {
		_, err := redisstore.ParseURL(raw)
		return err
	}
	if strings.HasPrefix(raw, "{") {
		return nil // the whole URL comes from a placeholder
	}
	if !strings.HasPrefix(raw, "redis://") && !strings.HasPrefix(raw, "rediss://") {
		return fmt.Errorf("redis url %s: scheme must be redis or rediss", redisstore.RedactURL(raw))
	}
	return nil
}

// Interface guards
var _ caddyfile.Unmarshaler = (*App)(nil)
