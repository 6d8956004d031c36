package tokensource

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"
)

// Installing a chain: the onboarding flow (authorization code) and operators
// (a refresh token pasted into the CLI) start a new chain for the account.
// Both write under the account's lease, as the next generation, so running
// instances adopt the new chain as they would a rotation.

// ExchangeCode redeems an authorization code from the OAuth callback. The
// returned record is not stored: pass it to InstallPair.
func (s *Source) ExchangeCode(ctx context.Context, code, redirectURI string) (*Record, error) {
	return s.x.exchangeCode(context.WithoutCancel(ctx), code, redirectURI)
}

// InstallCheck vets, under the account's lease, the stored record that a
// new chain is about to replace (nil if there is none). An error refuses the
// install: nothing is written, and the install returns that error.
type InstallCheck func(stored *Record) error

// InstallPair stores a pair just obtained from the token endpoint as a new
// chain and publishes it. rec.User, if set, is stored with it: nothing else
// comes from the chain it replaces. checks run under the lease, so no
// install or rotation can slip in between a check and the write.
func (s *Source) InstallPair(ctx context.Context, rec *Record, checks ...InstallCheck) (*Token, error) {
	return s.install(ctx, func(context.Context) (*Record, error) { return rec, nil }, "", checks)
}

// InstallSeed exchanges a refresh token obtained elsewhere and stores the new
// pair as a new chain. The refresh token is spent by the exchange. With a
// ProfileURL, the chain's user is then read with its first access token and
// recorded (a failure is logged; the next rotation tries again).
func (s *Source) InstallSeed(ctx context.Context, refreshToken string) (*Token, error) {
	return s.install(ctx, func(ctx context.Context) (*Record, error) { return s.x.exchange(ctx, refreshToken) }, Fingerprint(refreshToken), nil)
}

// installWait bounds an install's wait for the lease.
const installWait = 30 * time.Second

// install stores the pair obtain returns as the account's new chain, under
// the lease. spentSeedFingerprint is the fingerprint of the refresh token
// obtain spends ("" for a pair from a code): it joins the consumed seeds so
// that no instance sends it again, and the chain's user is recorded at once.
func (s *Source) install(ctx context.Context, obtain func(context.Context) (*Record, error), spentSeedFingerprint string, checks []InstallCheck) (*Token, error) {
	// Detached, like a refresh: a spent token's answer must be stored.
	ctx, cancel := withTimeout(context.WithoutCancel(ctx), s.clock, installWait+s.cfg.Timeout+2*StorageTimeout)
	defer cancel()
	owner := s.cfg.Owner + "/install"
	lease, err := s.takeLeaseWaiting(ctx, owner)
	if err != nil {
		return nil, err
	}
	defer func() {
		octx, cancel := s.op(ctx)
		defer cancel()
		if err := s.store.ReleaseLease(octx, lease); err != nil {
			s.log.Warn("releasing the refresh lease after an install failed (it lapses on its own)", zap.Error(err))
		}
	}()
	octx, cancelLoad := s.op(ctx)
	stored, err := s.store.Load(octx)
	cancelLoad()
	if err != nil {
		// I4, I5: a record that cannot be read is never replaced blindly.
		return nil, &Error{Kind: Transient, Msg: s.named("reading the stored record before installing: " + err.Error())}
	}
	for _, check := range checks {
		if err := check(stored); err != nil {
			return nil, err
		}
	}
	rec, err := obtain(ctx)
	if err != nil {
		var e *Error
		if errors.As(err, &e) {
			e.Msg = s.named(e.Msg)
		}
		return nil, err
	}
	next := *rec
	next.Version, next.Chain, next.Cause = recordVersion, randomID(), CauseInstall
	next.Generation = stored.version().Generation + 1
	if stored != nil {
		// Only the histories of spent tokens carry over; the chain, and the
		// user it acts as, are the new pair's own.
		next.ConsumedSeeds, next.DeadTokens = stored.ConsumedSeeds, stored.DeadTokens
	}
	// The configured seed must not start yet another chain over this one.
	next.ConsumedSeeds = appendBounded(appendBounded(next.ConsumedSeeds, spentSeedFingerprint), s.seedFingerprint)
	octx, cancelStore := s.op(ctx)
	err = s.store.CompareAndStore(octx, &next, stored.version())
	cancelStore()
	if err != nil {
		return nil, fmt.Errorf("%s", s.named("storing the new chain: "+err.Error()))
	}
	s.publish(&next, ResultInstalled) // also clears the error and backoff, and reports the state
	s.wake()
	s.log.Info("installed a new token chain", zap.Uint64("generation", next.Generation),
		zap.Time("access_expires_at", next.Expiry))
	if spentSeedFingerprint != "" {
		s.recordUser(ctx, &next, lease) // stored first: now its token may be used
	}
	return s.cur.Load(), nil
}

// Binding is what a Source's chain is bound to: the application whose
// credentials refresh it, and where and how it is stored. A chain must be
// installed through a Source with the installer's binding, or it would be
// refreshed with other credentials, or stored where, or as, nobody reads it.
type Binding struct {
	Account  string
	ClientID string
	// SecretFingerprint is the client secret's SHA-256: comparable, and
	// safe to hold where the secret is not.
	SecretFingerprint string
	TokenURL          string
	// Storage holds the record; nil for a Source built on a Store.
	Storage Storage
	// KeyIDs names the at-rest encryption keys, current first; "" without
	// encryption.
	KeyIDs string
}

// Binding returns the Source's binding.
func (s *Source) Binding() Binding {
	b := Binding{Account: s.cfg.Account, ClientID: s.cfg.ClientID, SecretFingerprint: Fingerprint(s.cfg.ClientSecret),
		TokenURL: s.cfg.TokenURL, Storage: s.cfg.Storage}
	if s.cfg.Keyring != nil {
		b.KeyIDs = s.cfg.Keyring.KeyIDs()
	}
	return b
}

// takeLeaseWaiting takes the lease for owner, polling while another holds it.
func (s *Source) takeLeaseWaiting(ctx context.Context, owner string) (*Lease, error) {
	for {
		octx, cancel := s.op(ctx)
		l, err := s.store.TakeLease(octx, owner, s.leaseTTL())
		cancel()
		switch {
		case err == nil:
			return l, nil
		case !errors.Is(err, ErrLeaseHeld):
			return nil, &Error{Kind: Transient, Msg: s.named("taking the refresh lease: " + err.Error())}
		}
		if sleep(ctx, s.clock, leasePoll) != nil {
			return nil, &Error{Kind: Transient, Msg: s.named("timed out waiting for another instance's refresh lease")}
		}
	}
}
