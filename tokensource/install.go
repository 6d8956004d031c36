package tokensource

import (
	"context"
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

// InstallPair stores a pair just obtained from the token endpoint as a new
// chain and publishes it.
func (s *Source) InstallPair(ctx context.Context, rec *Record) (*Token, error) {
	return s.install(ctx, func(context.Context) (*Record, error) { return rec, nil }, "")
}

// InstallSeed exchanges a refresh token obtained elsewhere and stores the new
// pair as a new chain. The refresh token is spent by the exchange.
func (s *Source) InstallSeed(ctx context.Context, refreshToken string) (*Token, error) {
	return s.install(ctx, func(ctx context.Context) (*Record, error) { return s.x.exchange(ctx, refreshToken) }, Fingerprint(refreshToken))
}

func (s *Source) install(ctx context.Context, obtain func(context.Context) (*Record, error), seedFP string) (*Token, error) {
	// Detached, like a refresh: a spent token's answer must be stored.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.attemptTimeout())
	defer cancel()
	lease, stored, err := s.acquireLease(ctx, nil)
	if err != nil {
		return nil, err
	}
	defer s.releaseLease(lease)
	rec, err := obtain(ctx)
	if err != nil {
		return nil, err
	}
	next := *rec
	next.Version = recordVersion
	next.Chain = newChainID()
	var base uint64
	if stored != nil {
		base = stored.Generation
		next.ConsumedSeeds = append([]string(nil), stored.ConsumedSeeds...)
	}
	next.Generation = base + 1
	// The configured seed must not start yet another chain over this one.
	for _, fp := range []string{seedFP, s.seedFP} {
		if fp != "" && !next.seedConsumed(fp) {
			next.ConsumedSeeds = append(next.ConsumedSeeds, fp)
		}
	}
	if n := len(next.ConsumedSeeds); n > maxConsumedSeeds {
		next.ConsumedSeeds = next.ConsumedSeeds[n-maxConsumedSeeds:]
	}
	if err := s.persist(ctx, &next, base, lease); err != nil {
		return nil, fmt.Errorf("storing the new chain: %w", err)
	}
	s.publish(&next, "installed")
	s.mu.Lock()
	s.lastErr, s.failures, s.nextAttempt, s.deadRT = nil, 0, time.Time{}, ""
	s.lastRefresh, s.lastResult = s.clock.Now(), "installed"
	state := s.stateLocked()
	s.mu.Unlock()
	s.obs.StateChanged(s.cfg.Account, state)
	s.notify()
	s.log.Info("installed a new token chain", zap.Uint64("generation", next.Generation),
		zap.Time("access_expires_at", next.Expiry))
	return s.cur.Load(), nil
}

// recheckInterval bounds how often requests that find the account without a
// usable chain re-read storage, where an onboarding flow, the CLI or another
// instance may have installed one.
const recheckInterval = time.Second

// recheckStorage adopts a usable stored pair while the account is in
// reauth_required or no_chain, without waiting for the next poll.
func (s *Source) recheckStorage() bool {
	now := s.clock.Now()
	s.mu.Lock()
	if now.Sub(s.lastRecheck) < recheckInterval {
		s.mu.Unlock()
		return false
	}
	s.lastRecheck = now
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rec, err := s.loadRecord(ctx)
	if err != nil || !s.adoptable(rec, nil) {
		return false
	}
	s.publish(rec, "adopted")
	s.finish(now, "adopted", nil)
	s.notify()
	return true
}
