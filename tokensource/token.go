// Package tokensource keeps a valid Restream access token for one account.
//
// Restream rotates on every refresh: the moment a new pair is issued the old
// access AND refresh token die. A Source therefore refreshes at most once at a
// time per process (single-flight), coordinates with other processes through a
// lease in shared storage, and persists every new pair before anything uses
// it. The request hot path is a single atomic pointer load.
//
// The package has no Caddy imports; the Caddy glue lives in caddymodule.
package tokensource

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"sync/atomic"
	"time"
)

// Token is one access token as issued by the token endpoint. Tokens are
// immutable once published; the Source swaps whole *Token values.
type Token struct {
	AccessToken string
	TokenType   string
	Scope       []string
	// Expiry is when Restream stops accepting the access token.
	Expiry time.Time
	// RefreshExpiry is when the refresh token of the same pair expires (zero if unknown).
	RefreshExpiry time.Time
	// IssuedAt is when this process (or another one sharing the storage) got the pair.
	IssuedAt time.Time
	// Generation counts the pairs stored for the account; it grows by one on
	// every rotation and lets a request that met a 401 tell whether a newer
	// token already exists.
	Generation uint64
	// Chain identifies the authorization the pair descends from: a new seed
	// starts a new chain, which replaces the old one whatever the generations.
	Chain string

	// useUntil is Expiry minus a small margin for clock skew and transit time.
	useUntil time.Time
	// authz is the Authorization header value, built once per token.
	authz string
	// stale is set by a timer at useUntil, so the hot path needs no clock.
	stale atomic.Bool
}

// Authorization returns the header value "Bearer <access token>".
func (t *Token) Authorization() string { return t.authz }

// Supersedes reports whether t replaces old: a later pair of the same chain,
// or any pair of another chain.
func (t *Token) Supersedes(old *Token) bool {
	return old == nil || t.Chain != old.Chain || t.Generation > old.Generation
}

// ValidAt reports whether the token can still be sent at now.
func (t *Token) ValidAt(now time.Time) bool {
	return t != nil && now.Before(t.useUntil)
}

// maxExpiryMargin bounds the margin kept before expiry; short-lived tokens (as in
// tests) get a tenth of their lifetime instead.
const maxExpiryMargin = 5 * time.Second

func (t *Token) setUseUntil() {
	margin := t.Expiry.Sub(t.IssuedAt) / 10
	if margin > maxExpiryMargin {
		margin = maxExpiryMargin
	}
	if margin < 0 {
		margin = 0
	}
	t.useUntil = t.Expiry.Add(-margin)
}

// Record is the persisted state of an account's chain. The refresh token is
// only ever in the record (and in flight to the token endpoint), never in a
// *Token handed to callers.
type Record struct {
	Version       int       `json:"version"`
	Generation    uint64    `json:"generation"`
	Chain         string    `json:"chain,omitempty"`
	AccessToken   string    `json:"access_token"`
	RefreshToken  string    `json:"refresh_token"`
	TokenType     string    `json:"token_type"`
	Scope         []string  `json:"scope,omitempty"`
	Expiry        time.Time `json:"access_expires_at"`
	RefreshExpiry time.Time `json:"refresh_expires_at,omitzero"`
	IssuedAt      time.Time `json:"issued_at"`
	// ConsumedSeeds holds SHA-256 fingerprints of configured seeds already
	// exchanged, so a restart with the original configuration does not reuse a
	// spent refresh token.
	ConsumedSeeds []string `json:"consumed_seeds,omitempty"`
}

// recordVersion is the current Record format.
const recordVersion = 1

// maxConsumedSeeds bounds the seed history kept in a record.
const maxConsumedSeeds = 16

func (r *Record) token() *Token {
	t := &Token{
		AccessToken:   r.AccessToken,
		TokenType:     r.TokenType,
		Scope:         r.Scope,
		Expiry:        r.Expiry,
		RefreshExpiry: r.RefreshExpiry,
		IssuedAt:      r.IssuedAt,
		Generation:    r.Generation,
		Chain:         r.Chain,
	}
	t.setUseUntil()
	t.authz = "Bearer " + t.AccessToken
	return t
}

func (r *Record) seedConsumed(fp string) bool {
	for _, s := range r.ConsumedSeeds {
		if s == fp {
			return true
		}
	}
	return false
}

// Fingerprint returns the hex SHA-256 of a secret, safe to store and log.
func Fingerprint(secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(sum[:])
}

// Storage is the part of certmagic.Storage a Source needs. Load must return an
// error wrapping fs.ErrNotExist for a missing key.
type Storage interface {
	Lock(ctx context.Context, name string) error
	Unlock(ctx context.Context, name string) error
	Store(ctx context.Context, key string, value []byte) error
	Load(ctx context.Context, key string) ([]byte, error)
}
