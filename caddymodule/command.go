package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/caddyserver/certmagic"
	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// The restream-auth CLI works on the token chains where a config keeps them
// (the restream_auth app's Redis, or Caddy storage), without a running
// Caddy: `status` reports what is stored (command_status.go), `seed`
// installs a new chain from a refresh token read on stdin
// (command_seed.go), `encrypt` seals a stored record with the configured
// encryption_key (command_encrypt.go). Running instances that share the
// storage adopt a seeded or sealed chain by themselves. What the commands
// print from storage or Redis goes through cliClean first
// (command_sanitize.go). This file registers the command and loads the
// config they share.

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "restream-auth",
		Usage: "status|seed|encrypt --config <file> [--adapter <name>]",
		Short: "Shows, seeds or encrypts the restream_auth token chains in the configured storage or Redis",
		Long: `
Works on the Restream token chains that the restream_auth handlers of a
config keep in Redis (the global restream_auth option's redis URL) or else
in Caddy's storage. The config (--config, adapted with --adapter or by file
name, like caddy run) names the place (the redis URL, or the global
"storage" option; Caddy's default data directory when both are absent) and
the accounts (every restream_auth handler, subroutes included). No running
Caddy is needed, and no token or password is ever printed.

  caddy restream-auth status --config Caddyfile [--json]
  caddy restream-auth seed --config Caddyfile [--account <name>] < refresh_token.txt
  caddy restream-auth encrypt --config Caddyfile [--account <name>]
`,
		CobraFunc: func(cmd *cobra.Command) {
			cmd.AddCommand(cliStatusCobra(), cliSeedCobra(), cliEncryptCobra())
		},
	})
}

// cliConfigFlags adds the flags with which every subcommand finds its
// config, named as caddy run names them.
func cliConfigFlags(c *cobra.Command) {
	c.Flags().StringP("config", "c", "", "Configuration file (Caddyfile or JSON)")
	c.Flags().StringP("adapter", "a", "", "Name of config adapter")
}

// cliAccountFlag is the account a subcommand's --account flag names: the
// default account when it is empty, as in a handler without one.
func cliAccountFlag(fl caddycmd.Flags) string {
	if account := fl.String("account"); account != "" {
		return account
	}
	return DefaultAccount
}

// cliConfig is what the commands need from a config.
type cliConfig struct {
	storage certmagic.Storage
	// app says where accounts live: its Redis, or storage.
	app      *App
	accounts map[string][]*Handler // restream_auth handlers by account, in config order
	cancel   context.CancelFunc    // releases the storage module
}

// names returns the accounts, sorted.
func (c *cliConfig) names() []string {
	out := make([]string, 0, len(c.accounts))
	for a := range c.accounts {
		out = append(out, a)
	}
	slices.Sort(out)
	return out
}

// loadCLIConfig loads and adapts a config, loads its storage module (or the
// default storage) and finds its restream_auth handlers.
func loadCLIConfig(configFile, adapter string) (*cliConfig, error) {
	cfgJSON, file, _, err := caddycmd.LoadConfig(configFile, adapter)
	if err != nil {
		return nil, err
	}
	if len(cfgJSON) == 0 {
		return nil, errors.New("no config: use --config <file>")
	}
	var cfg caddy.Config
	if err := json.Unmarshal(cfgJSON, &cfg); err != nil {
		return nil, fmt.Errorf("decoding config %s: %v", file, err)
	}
	app, err := appFromConfig(&cfg)
	if err != nil {
		return nil, fmt.Errorf("config %s: %v", file, err)
	}
	var raws []json.RawMessage
	cliFindHandlers(cfgJSON, &raws)
	if len(raws) == 0 {
		return nil, fmt.Errorf("config %s has no restream_auth handler", file)
	}
	out := &cliConfig{app: app, accounts: make(map[string][]*Handler)}
	for _, raw := range raws {
		h := new(Handler)
		if err := json.Unmarshal(raw, h); err != nil {
			return nil, fmt.Errorf("config %s: decoding a restream_auth handler: %v", file, err)
		}
		if h.Account == "" {
			h.Account = DefaultAccount
		}
		if err := checkAccountName(h.Account); err != nil {
			return nil, fmt.Errorf("config %s: %v", file, err)
		}
		out.accounts[h.Account] = append(out.accounts[h.Account], h)
	}

	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	if cfg.StorageRaw != nil {
		val, err := ctx.LoadModule(&cfg, "StorageRaw")
		if err != nil {
			cancel()
			return nil, fmt.Errorf("loading the config's storage module: %v", err)
		}
		if out.storage, err = val.(caddy.StorageConverter).CertMagicStorage(); err != nil {
			cancel()
			return nil, fmt.Errorf("creating the config's storage: %v", err)
		}
	} else {
		out.storage = caddy.DefaultStorage
	}
	out.cancel = cancel
	return out, nil
}

// backend is where account lives in this config, as a running instance
// finds it: the restream_auth app's Redis, or storage behind the lock guard.
func (c *cliConfig) backend(account string, kr *tokensource.Keyring, logger *zap.Logger) sourceBackend {
	return c.app.backendFor(account, kr, guardStorage(c.storage, logger), logger)
}

// place names where the config keeps its accounts, never with credentials.
func (c *cliConfig) place() string {
	r := c.app.redis
	if r == nil {
		return storageIdentity(c.storage)
	}
	s := fmt.Sprintf("redis %s db %d, key prefix %s", r.opts.Addr, r.opts.DB, r.keyPrefix)
	if r.minReplicas > 0 {
		s += fmt.Sprintf(", min_replicas %d", r.minReplicas)
	}
	return s
}

// cliFindHandlers collects every JSON object with "handler": "restream_auth",
// wherever it sits (routes, subroutes, error routes, other apps' routes).
func cliFindHandlers(raw json.RawMessage, out *[]json.RawMessage) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 {
		return
	}
	switch raw[0] {
	case '{':
		var obj map[string]json.RawMessage
		if json.Unmarshal(raw, &obj) != nil {
			return
		}
		var name string
		if h, ok := obj["handler"]; ok && json.Unmarshal(h, &name) == nil && name == "restream_auth" {
			*out = append(*out, raw)
		}
		keys := make([]string, 0, len(obj))
		for k := range obj {
			keys = append(keys, k)
		}
		slices.Sort(keys) // a stable order for "first handler" below
		for _, k := range keys {
			cliFindHandlers(obj[k], out)
		}
	case '[':
		var arr []json.RawMessage
		if json.Unmarshal(raw, &arr) != nil {
			return
		}
		for _, v := range arr {
			cliFindHandlers(v, out)
		}
	}
}

// handlerFor returns the account's handler settings. Handlers of one account
// must agree on everything the token exchange uses.
func (c *cliConfig) handlerFor(account string) (*Handler, error) {
	hs := c.accounts[account]
	if len(hs) == 0 {
		return nil, fmt.Errorf("account %q is not configured: the config's restream_auth accounts are %s",
			account, strings.Join(cliQuoteAll(c.names()), ", "))
	}
	first := hs[0]
	for _, h := range hs[1:] {
		if h.ClientID != first.ClientID || h.ClientSecret != first.ClientSecret || h.RefreshToken != first.RefreshToken ||
			h.TokenURL != first.TokenURL || h.ClientAuth != first.ClientAuth || h.Timeout != first.Timeout {
			return nil, fmt.Errorf("account %q has %d restream_auth handlers whose client_id, client_secret, refresh_token, token_url, client_auth or timeout differ; make them agree", account, len(hs))
		}
	}
	return first, nil
}

func cliQuoteAll(ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = fmt.Sprintf("%q", s)
	}
	return out
}

func cliPlaceholderError(err error) error {
	return fmt.Errorf("%v (placeholders are resolved in this command's environment: run it with the environment Caddy runs with)", err)
}

func cliTime(t, now time.Time) string {
	if t.IsZero() {
		return "unknown"
	}
	return t.UTC().Format(time.RFC3339) + " (" + cliRelative(t, now) + ")"
}

// cliRelative says "in 59m58s" or "3m2s ago".
func cliRelative(t, now time.Time) string {
	d := t.Sub(now).Round(time.Second)
	if d >= 0 {
		return "in " + cliDuration(d)
	}
	return cliDuration(-d) + " ago"
}

func cliDuration(d time.Duration) string {
	const day = 24 * time.Hour
	if d >= 2*day {
		return fmt.Sprintf("%dd%dh", d/day, (d%day)/time.Hour)
	}
	return d.String()
}
