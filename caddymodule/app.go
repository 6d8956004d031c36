package caddymodule

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource/redisstore"
)

func init() {
	caddy.RegisterModule(App{})
}

// App starts the token sources of a config, and says where they keep their
// records and leases. It exists so that refreshers start only when a config
// runs: `caddy validate` and `caddy adapt --validate` provision handlers
// too, and provisioning must never touch the token endpoint (nor Redis).
// Handlers load it with ctx.App; without a redis object it needs no
// configuration.
type App struct {
	// Where every account's record and lease are kept, if not in Caddy
	// storage (which keeps certificates): a Redis that replicas share.
	// Default: none, Caddy storage.
	Redis *RedisConfig `json:"redis,omitempty"`

	mu      *sync.Mutex
	sources []*tokensource.Source
	redis   *redisSettings // Redis resolved; nil without it
	logger  *zap.Logger
}

// RedisConfig is where replicas share their accounts. Its URL is kept as
// written, placeholders and all (the config, the admin API and `caddy
// adapt` show it so): give the password with {env.*} or {file.*}.
type RedisConfig struct {
	// The Redis to use: redis://[user:password@]host[:port][/db], or
	// rediss://… for TLS. Required. {env.*} and {file.*} placeholders are
	// resolved at provisioning; the password never appears in logs,
	// errors, status or metrics.
	URL string `json:"url,omitempty"`

	// The start of every key: an account's keys are
	// <key_prefix>{<account>}/record, …/lease and …/mark. No spaces, braces
	// or control characters. Placeholders are not resolved. Default:
	// "restream_auth/".
	KeyPrefix string `json:"key_prefix,omitempty"`

	// How many Redis replicas must acknowledge (WAIT) each new pair, and
	// each lease mark, before it is used; fewer is a failed write. Default:
	// 0, the primary's acknowledgement is enough.
	MinReplicas int `json:"min_replicas,omitempty"`
}

// redisSettings is RedisConfig resolved and checked.
type redisSettings struct {
	opts        *redis.Options
	clientKey   string // the client pool's key: a hash of the resolved URL
	keyPrefix   string
	minReplicas int
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "restream_auth",
		New: func() caddy.Module { return &App{mu: new(sync.Mutex)} },
	}
}

// Provision resolves and checks the Redis settings. It does not contact
// Redis.
func (a *App) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger()
	if a.Redis == nil {
		return nil
	}
	var err error
	a.redis, err = a.Redis.resolve()
	return err
}

// resolve resolves the URL's placeholders and checks every setting. No
// error it returns contains the URL's password.
func (r *RedisConfig) resolve() (*redisSettings, error) {
	if strings.TrimSpace(r.URL) == "" {
		return nil, errors.New("restream_auth redis: url is required")
	}
	raw, err := caddy.NewReplacer().ReplaceOrErr(r.URL, true, true)
	if err != nil {
		return nil, fmt.Errorf("restream_auth redis url %s: %v", redisstore.RedactURL(r.URL), err)
	}
	raw = strings.TrimSpace(raw)
	opts, err := redisstore.ParseURL(raw)
	if err != nil {
		return nil, fmt.Errorf("restream_auth %v", err)
	}
	s := &redisSettings{opts: opts, keyPrefix: r.KeyPrefix, minReplicas: r.MinReplicas}
	if s.keyPrefix == "" {
		s.keyPrefix = redisstore.DefaultKeyPrefix
	}
	if err := redisstore.CheckKeyPrefix(s.keyPrefix); err != nil {
		return nil, fmt.Errorf("restream_auth redis %v", err)
	}
	if s.minReplicas < 0 {
		return nil, fmt.Errorf("restream_auth redis min_replicas %d: must not be negative", s.minReplicas)
	}
	sum := sha256.Sum256([]byte(raw))
	s.clientKey = hex.EncodeToString(sum[:])
	return s, nil
}

// appFromConfig decodes and resolves a config's restream_auth app without
// running it, for the restream-auth command: its backendFor then gives each
// account's backend, and newPooledSource a source on it.
func appFromConfig(cfg *caddy.Config) (*App, error) {
	a := &App{mu: new(sync.Mutex), logger: zap.NewNop()}
	if raw, ok := cfg.AppsRaw["restream_auth"]; ok {
		if err := json.Unmarshal(raw, a); err != nil {
			return nil, fmt.Errorf("decoding the restream_auth app: %v", err)
		}
	}
	if a.Redis == nil {
		return a, nil
	}
	var err error
	a.redis, err = a.Redis.resolve()
	return a, err
}

// add registers a source to be started with the config.
func (a *App) add(src *tokensource.Source) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.sources = append(a.sources, src)
}

// Start starts every registered source; sources shared with a previous
// config (see sources) are already running and are not started twice. A
// source on Redis imports its account's record from Caddy storage in its
// first round, if Redis has none (see redisstore).
func (a *App) Start() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, s := range a.sources {
		s.Start()
	}
	return nil
}

// Stop does nothing: sources outlive configs and stop when the last handler
// that uses them is cleaned up.
func (a *App) Stop() error { return nil }

// MarshalLogObject keeps the Redis URL, which may hold a literal password,
// out of logs that print the app.
func (a *App) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	if a.Redis != nil {
		enc.AddString("redis", redisstore.RedactURL(a.Redis.URL))
	}
	return nil
}

// Interface guards
var (
	_ caddy.App               = (*App)(nil)
	_ caddy.Provisioner       = (*App)(nil)
	_ zapcore.ObjectMarshaler = (*App)(nil)
)
