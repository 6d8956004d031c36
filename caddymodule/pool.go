package caddymodule

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"

	"github.com/caddyserver/caddy/v2"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// sources holds one token source per account configuration, shared by every
// handler that uses it. It is package-level because Caddy's reload runs the
// old and new config side by side: sharing the source across them keeps one
// refresher per account, where two would race to rotate the same chain.
var sources = caddy.NewUsagePool()

// pooledSource lets the usage pool close a source when its last user goes.
type pooledSource struct {
	*tokensource.Source
	release func() // gives back what the source's backend holds (a Redis client)
	cfg     tokensource.Config
}

// newPooledSource builds the source of cfg on backend. Modules that keep a
// source of their own (restream_auth_login) build it here too, and
// Destruct it when they are cleaned up.
func newPooledSource(cfg tokensource.Config, backend sourceBackend) (pooledSource, error) {
	release, err := backend.open(&cfg)
	if err != nil {
		return pooledSource{}, err
	}
	src, err := tokensource.New(cfg)
	if err != nil {
		release()
		return pooledSource{}, err
	}
	return pooledSource{src, release, cfg}, nil
}

// loadRecord reads the account's stored record from the source's backend,
// Redis or Caddy storage, without the source.
func (p pooledSource) loadRecord(ctx context.Context) (*tokensource.Record, error) {
	if p.cfg.Store != nil {
		return p.cfg.Store.Load(ctx)
	}
	return tokensource.LoadRecordKeyring(ctx, p.cfg.Storage, p.cfg.Account, p.cfg.Keyring)
}

// Destruct stops the source's refresher, then releases its backend.
func (p pooledSource) Destruct() error {
	p.Close()
	if p.release != nil {
		p.release()
	}
	return nil
}

// poolKey identifies a source by everything that changes its behaviour; a
// secret enters only as part of a hash.
func poolKey(cfg tokensource.Config, storage any) string {
	h := sha256.New()
	fmt.Fprintf(h, "%q|%q|%q|%d|%d|%d|%s|%s", cfg.ClientID, cfg.ClientSecret, cfg.TokenURL, cfg.AuthStyle,
		cfg.RefreshAhead, cfg.Timeout, tokensource.Fingerprint(cfg.Seed), storageIdentity(storage))
	if cfg.Keyring != nil {
		fmt.Fprintf(h, "|%s", cfg.Keyring.KeyIDs())
	}
	return cfg.Account + "|" + hex.EncodeToString(h.Sum(nil))
}

// tokenTransport is the token endpoint's transport: no proxy surprises
// beyond the environment's, and bounded waits everywhere.
func tokenTransport() http.RoundTripper {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.ResponseHeaderTimeout = 0 // the per-call timeout covers it
	t.MaxIdleConnsPerHost = 2
	return t
}
