// Package tokensource keeps a valid Restream access token for one account.
//
// Restream rotates on every refresh: the moment a new pair is issued the old
// access AND refresh token die. A Source therefore refreshes at most once at a
// time per process (single-flight), coordinates with other processes through a
// lease in shared storage, and persists every new pair before anything uses
// it. The request hot path is a single atomic pointer load.
//
// What is where:
//
//   - token.go: Token (what requests use), Record (what is stored), User,
//     Fingerprint.
//   - source.go: Source, its Config, New, Token, TokenNewerThan, Refresh,
//     Status, and the refresher goroutine that runs the rounds.
//   - protocol.go: the refresh protocol, one round at a time, with its
//     invariants I1–I8 in the top comment.
//   - store.go: the Store interface (record, lease, mark), the Store on
//     Caddy storage (NewStorageStore), LoadRecord and the storage keys. The
//     Store on Redis is the redisstore package.
//   - install.go: starting a new chain: ExchangeCode, InstallPair,
//     InstallSeed, and Binding.
//   - encrypt.go: encryption of records at rest (Keyring, EncodeRecord,
//     DecodeRecord, InspectRecord).
//   - profile.go: the Restream user a chain acts as (ReadUser), recorded
//     with the chain.
//   - exchange.go and endpoint.go: the token-endpoint client: requests,
//     client authentication, answers and their errors (Error, ErrorKind).
//   - clock.go: the Clock the protocol reads time from; observer.go: the
//     Observer that metrics hang on.
//
// The package has no Caddy imports; the Caddy glue lives in caddymodule.
package tokensource

import (
	"crypto/sha256"
	"encoding/hex"
	"slices"
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
	// DeadTokens holds fingerprints of refresh tokens the endpoint rejected
	// (invalid_grant), so no restart, reload or other instance resends one
	// (I6). A record may hold only this history and no pair.
	DeadTokens []string `json:"dead_tokens,omitempty"`
	// Cause says why this generation was issued: refresh, rejected (an
	// upstream 401), operator, seed or install. The 401 rate limit reads it.
	Cause string `json:"cause,omitempty"`
	// User is the Restream account the chain acts as, read from the profile
	// endpoint with the chain's first access token. Nil while unknown. It is
	// carried from generation to generation: a chain never changes account.
	User *User `json:"user,omitempty"`
}

// User identifies a Restream account. It is not secret: status pages, the
// CLI and the admin API show it so operators can see which account a chain
// acts as.
type User struct {
	// ID is Restream's numeric user id, kept as its decimal string.
	ID       string `json:"id"`
	Username string `json:"username,omitempty"`
}

// Causes of a generation.
const (
	CauseRefresh  = "refresh"
	CauseRejected = "rejected"
	CauseOperator = "operator"
	CauseSeed     = "seed"
	CauseInstall  = "install"
)

// recordVersion is the current Record format.
const recordVersion = 1

// maxConsumedSeeds bounds the seed and dead-token histories kept in a record.
const maxConsumedSeeds = 16

// HasPair reports whether the record holds a token pair (not only history).
func (r *Record) HasPair() bool {
	return r != nil && r.AccessToken != "" && r.RefreshToken != "" && !r.Expiry.IsZero()
}

// version is the record's compare-and-set version; the zero Version for nil.
func (r *Record) version() Version {
	if r == nil {
		return Version{}
	}
	return Version{Generation: r.Generation, Chain: r.Chain}
}

// spent reports whether a refresh token's fingerprint is known to be used
// up: exchanged as a seed, or rejected by the endpoint.
func (r *Record) spent(fp string) bool {
	return r != nil && (slices.Contains(r.ConsumedSeeds, fp) || slices.Contains(r.DeadTokens, fp))
}

// dead reports whether the record's own refresh token was rejected.
func (r *Record) dead() bool {
	return r.HasPair() && slices.Contains(r.DeadTokens, Fingerprint(r.RefreshToken))
}

// appendBounded appends fp to list unless present, keeping the newest max.
func appendBounded(list []string, fp string) []string {
	if fp == "" || slices.Contains(list, fp) {
		return list
	}
	list = append(slices.Clone(list), fp)
	if n := len(list); n > maxConsumedSeeds {
		list = list[n-maxConsumedSeeds:]
	}
	return list
}

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

// Fingerprint returns the hex SHA-256 of a secret, safe to store and log.
func Fingerprint(secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(sum[:])
}
