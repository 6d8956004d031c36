package caddymodule

import (
	"context"
	"errors"
	"fmt"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource/redisstore"
)

// redisClients holds one Redis client per resolved URL, shared by every
// source that uses it. It is package-level because Caddy's reload runs the
// old and new config side by side: a source shared across them (see
// sources) keeps using the client it was built with, and a reload that
// keeps the URL must not open a second pool of connections to the same
// server. A client closes when its last source goes.
var redisClients = caddy.NewUsagePool()

type pooledClient struct{ *redis.Client }

// Destruct closes the client.
func (c pooledClient) Destruct() error { return c.Close() }

// sourceBackend is where a token source keeps its account's record and
// lease: Caddy storage, or the restream_auth app's Redis.
type sourceBackend struct {
	// identity names the backend in the source pool key and in messages;
	// never a credential.
	identity fmt.Stringer
	redis    *redisSettings // nil for Caddy storage
	storage  certmagic.Storage
	account  string
	keyring  *tokensource.Keyring
	logger   *zap.Logger
}

// storeFor returns the backend of account in this config: the restream_auth
// app's Redis if it has one, else storage (Caddy storage behind its lock
// guard). Every module that builds a token source calls it, so that all of
// an account's sources in a process share one backend; it touches neither
// Redis nor storage.
func storeFor(ctx caddy.Context, account string, kr *tokensource.Keyring, storage certmagic.Storage, logger *zap.Logger) (sourceBackend, error) {
	app, err := ctx.App("restream_auth")
	if err != nil {
		return sourceBackend{}, err
	}
	return app.(*App).backendFor(account, kr, storage, logger), nil
}

// backendFor is storeFor for an app already loaded (the CLI decodes its own).
func (a *App) backendFor(account string, kr *tokensource.Keyring, storage certmagic.Storage, logger *zap.Logger) sourceBackend {
	b := sourceBackend{redis: a.redis, storage: storage, account: account, keyring: kr, logger: logger}
	if a.redis == nil {
		b.identity = storageName{storage}
	} else {
		b.identity = redisName{a.redis, account}
	}
	return b
}

// poolIdentity names the backend in the source pool key: identity, plus,
// for Redis, a hash of the resolved URL, so that a reload that changes the
// URL's credentials builds a new source with a new client.
func (b sourceBackend) poolIdentity() fmt.Stringer {
	if b.redis == nil {
		return b.identity
	}
	return poolName(b.identity.String() + " " + b.redis.clientKey)
}

type poolName string

func (p poolName) String() string { return string(p) }

// open makes cfg use the backend: its Storage, or a Redis store over the
// shared client, which imports the account from Caddy storage once. release
// gives the client back when the source is done with it.
func (b sourceBackend) open(cfg *tokensource.Config) (release func(), err error) {
	if b.redis == nil {
		cfg.Storage = b.storage
		return func() {}, nil
	}
	val, _, err := redisClients.LoadOrNew(b.redis.clientKey, func() (caddy.Destructor, error) {
		return pooledClient{redisstore.NewClient(b.redis.opts)}, nil
	})
	if err != nil {
		return nil, err
	}
	store, err := redisstore.New(val.(pooledClient).Client, b.account, redisstore.Options{
		KeyPrefix:   b.redis.keyPrefix,
		MinReplicas: b.redis.minReplicas,
		Keyring:     b.keyring,
		Clock:       cfg.Clock,
		Logger:      b.logger.Named("redis"),
		ImportFrom:  b.storage,
	})
	if err != nil {
		_, _ = redisClients.Delete(b.redis.clientKey)
		return nil, err
	}
	cfg.Store = store
	// Binding compares where sources keep their chains by cfg.Storage; a
	// store that is not Caddy storage is named there by redisName.
	cfg.Storage = redisName{b.redis, b.account}
	return func() {
		store.Close()
		_, _ = redisClients.Delete(b.redis.clientKey)
	}, nil
}

// storageName names Caddy storage as storageIdentity does.
type storageName struct{ certmagic.Storage }

func (s storageName) String() string { return storageIdentity(s.Storage) }

// redisName names an account's place in Redis without its credentials:
// address, database, keys and min_replicas.
type redisName struct {
	s       *redisSettings
	account string
}

func (r redisName) String() string {
	s := fmt.Sprintf("redis %s db %d, keys %s{%s}/", r.s.opts.Addr, r.s.opts.DB, r.s.keyPrefix, r.account)
	if r.s.minReplicas > 0 {
		s += fmt.Sprintf(", min_replicas %d", r.s.minReplicas)
	}
	return s
}

// errInRedis answers any use of redisName as Caddy storage: a source with
// a Store never uses its Storage.
var errInRedis = errors.New("restream_auth keeps this account in Redis, not in Caddy storage")

// redisName stands in Config.Storage for a source on Redis (see open).
func (redisName) Lock(context.Context, string) error           { return errInRedis }
func (redisName) Unlock(context.Context, string) error         { return errInRedis }
func (redisName) Store(context.Context, string, []byte) error  { return errInRedis }
func (redisName) Load(context.Context, string) ([]byte, error) { return nil, errInRedis }

// Interface guards
var (
	_ caddy.Destructor    = pooledClient{}
	_ tokensource.Storage = redisName{}
)
