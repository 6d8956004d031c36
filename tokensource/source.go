package tokensource

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"
)

// Defaults for Config fields left zero.
const (
	DefaultRefreshAhead = 5 * time.Minute
	DefaultTimeout      = 10 * time.Second
	// ReauthPollInterval is how often an account that needs a human re-reads
	// storage, where another instance or a new seed may have installed a chain.
	ReauthPollInterval = 30 * time.Second
	// ForcedRefreshInterval rate-limits refreshes forced by upstream 401s, so an
	// upstream that rejects tokens for other reasons cannot rotate the chain on
	// every request.
	ForcedRefreshInterval = 5 * time.Second
	minBackoff            = time.Second
	maxBackoff            = time.Minute
)

// Clock is the time source; tests substitute a fake one.
type Clock interface {
	Now() time.Time
	// At fires at the given time (at once if it has passed). Taking an
	// absolute time, not a duration, keeps a wake-up from drifting when the
	// clock moves between reading it and arming the timer.
	At(t time.Time) <-chan time.Time
	// AfterFunc calls f at the given time (at once, or soon, if it has passed).
	AfterFunc(t time.Time, f func())
}

type realClock struct{}

func (realClock) Now() time.Time                  { return time.Now() }
func (realClock) At(t time.Time) <-chan time.Time { return time.After(time.Until(t)) }
func (realClock) AfterFunc(t time.Time, f func()) { time.AfterFunc(time.Until(t), f) }

// Config configures a Source. Account, ClientID, ClientSecret, TokenURL and
// Storage are required.
type Config struct {
	// Account names the chain; storage keys live under restream_auth/<Account>/.
	Account      string
	ClientID     string
	ClientSecret string
	TokenURL     string
	AuthStyle    AuthStyle
	// Seed is a refresh token to start a chain from. It is exchanged once; its
	// fingerprint is then remembered in storage and the stored chain is used.
	Seed string
	// RefreshAhead is how long before expiry the pair is renewed; it is capped
	// at half the token's lifetime.
	RefreshAhead time.Duration
	// Timeout bounds one token endpoint call.
	Timeout    time.Duration
	Storage    Storage
	HTTPClient *http.Client
	Logger     *zap.Logger
	Clock      Clock
	// Owner names this process in leases; random if empty.
	Owner string
	// Observer receives events for metrics; optional.
	Observer Observer
	// Keyring, if set, encrypts the stored record at rest.
	Keyring *Keyring
}

// Status is a point-in-time view of a Source for status pages and probes.
// It holds no secret.
type Status struct {
	Account       string
	State         string // ok, refreshing, backoff, reauth_required, no_chain
	Generation    uint64
	AccessExpiry  time.Time
	RefreshExpiry time.Time
	LastRefresh   time.Time
	LastResult    string
	LastError     string
	NextRefresh   time.Time
}

// Source keeps the newest token of one account. It is safe for concurrent use.
type Source struct {
	cfg    Config
	x      *exchanger
	log    *zap.Logger
	clock  Clock
	seedFP string
	keys   storageKeys

	cur       atomic.Pointer[Token] // hot path: the newest published token
	sf        singleflight.Group
	forced    atomic.Pointer[Token] // the newest token an upstream rejected with 401
	obs       Observer
	changed   chan struct{} // wakes the refresher after an attempt
	done      chan struct{}
	stopOnce  sync.Once
	startOnce sync.Once
	wg        sync.WaitGroup

	mu          sync.Mutex // guards the fields below; never taken on the hot path
	lastErr     *Error
	nextAttempt time.Time // no new attempt before this (backoff or re-auth poll)
	failures    int
	deadRT      string // fingerprint of a refresh token the endpoint rejected as invalid_grant
	lastForced  time.Time
	closed      bool           // no attempt starts after Close
	attempts    sync.WaitGroup // attempts in flight, awaited by Close
	lastRecheck time.Time
	refreshing  bool
	lastRefresh time.Time
	lastResult  string
	pending     *pendingWrite // a pair persisted only in memory, retried by the refresher
}

type pendingWrite struct {
	rec  *Record
	base uint64
}

// New validates cfg and returns a Source. It touches neither the network nor
// storage: call Start to begin (Caddy's validate provisions modules too).
func New(cfg Config) (*Source, error) {
	switch {
	case cfg.Account == "":
		return nil, errors.New("account is required")
	case cfg.ClientID == "":
		return nil, errors.New("client_id is required")
	case cfg.ClientSecret == "":
		return nil, errors.New("client_secret is required")
	case cfg.TokenURL == "":
		return nil, errors.New("token_url is required")
	case cfg.Storage == nil:
		return nil, errors.New("storage is required")
	}
	if cfg.RefreshAhead <= 0 {
		cfg.RefreshAhead = DefaultRefreshAhead
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = &http.Client{}
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.Clock == nil {
		cfg.Clock = realClock{}
	}
	if cfg.Observer == nil {
		cfg.Observer = nopObserver{}
	}
	if cfg.Owner == "" {
		var b [8]byte
		_, _ = crand.Read(b[:])
		cfg.Owner = hex.EncodeToString(b[:])
	}
	s := &Source{
		cfg:     cfg,
		log:     cfg.Logger.With(zap.String("account", cfg.Account)),
		clock:   cfg.Clock,
		obs:     cfg.Observer,
		keys:    keysFor(cfg.Account),
		changed: make(chan struct{}, 1),
		done:    make(chan struct{}),
		x: &exchanger{
			client:       cfg.HTTPClient,
			tokenURL:     cfg.TokenURL,
			clientID:     cfg.ClientID,
			clientSecret: cfg.ClientSecret,
			style:        cfg.AuthStyle,
			timeout:      cfg.Timeout,
			now:          cfg.Clock.Now,
		},
	}
	if cfg.Seed != "" {
		s.seedFP = Fingerprint(cfg.Seed)
	}
	return s, nil
}

// Account returns the account name.
func (s *Source) Account() string { return s.cfg.Account }

// Start launches the background refresher: it loads the stored chain (or
// exchanges a new seed) and renews the pair RefreshAhead before expiry.
// Calling it again does nothing.
func (s *Source) Start() {
	s.startOnce.Do(func() {
		s.wg.Add(1)
		go s.run()
	})
}

// Close stops the refresher. A refresh already in flight finishes on its own
// (bounded by the timeouts): its refresh token may be spent, so its result
// must still be persisted.
func (s *Source) Close() {
	s.stopOnce.Do(func() { close(s.done) })
	s.wg.Wait()
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.attempts.Wait() // an in-flight refresh's pair must reach storage
	s.cfg.HTTPClient.CloseIdleConnections()
}

// startAttempt joins the refresh in flight or starts one, unless the
// Source is closed; the channel delivers its result.
func (s *Source) startAttempt() <-chan singleflight.Result {
	return s.sf.DoChan("refresh", func() (any, error) {
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return nil, &Error{Kind: Transient, Msg: s.named("token source is shutting down")}
		}
		s.attempts.Add(1) // under mu, so never concurrent with Close's Wait at zero
		s.mu.Unlock()
		defer s.attempts.Done()
		return nil, s.attempt()
	})
}

// Current returns the newest published token, valid or not, or nil.
func (s *Source) Current() *Token { return s.cur.Load() }

// Token returns a valid token. While the newest token is valid this is one
// atomic load; otherwise it waits, bounded by ctx, for the single in-flight
// refresh. When no refresh can run now (backoff, re-authorization needed) it
// returns an *Error at once.
func (s *Source) Token(ctx context.Context) (*Token, error) {
	// No clock read here: a timer marks each token stale when its time is
	// up (reading the clock costs more than the rest of this path).
	if t := s.cur.Load(); t != nil && !t.stale.Load() {
		return t, nil
	}
	return s.refreshAndWait(ctx)
}

// TokenNewerThan is for a request whose token got a 401: if a newer token
// already exists it is returned without refreshing (refreshed is false);
// otherwise one refresh is forced (shared with every other caller) unless a
// forced refresh ran less than ForcedRefreshInterval ago. ok is false when no
// newer valid token could be had.
func (s *Source) TokenNewerThan(ctx context.Context, rejected *Token) (t *Token, refreshed, ok bool, err error) {
	if t := s.cur.Load(); t.ValidAt(s.clock.Now()) && t.Supersedes(rejected) {
		return t, false, true, nil
	}
	s.markRejected(rejected)
	t, err = s.refreshAndWait(ctx)
	if err != nil {
		return nil, true, false, err
	}
	return t, true, t.Supersedes(rejected), nil
}

// Rejected is for a 401 that cannot be replayed (a websocket handshake, a
// streamed body): if t is still the newest token, one refresh starts in the
// background (rate-limited like every 401-forced refresh), so the client's
// retry finds a new token. It does not wait.
func (s *Source) Rejected(t *Token) {
	if s.cur.Load() != t || s.backoffError() != nil {
		return
	}
	s.markRejected(t)
	s.startAttempt()
}

func (s *Source) markRejected(rejected *Token) {
	for {
		old := s.forced.Load()
		if (old != nil && !rejected.Supersedes(old)) || s.forced.CompareAndSwap(old, rejected) {
			return
		}
	}
}

// Refresh forces one refresh under the full protocol (lease, re-read, persist
// before use), skipping the rate limit on 401-forced refreshes. It is for
// operators; the backoff after failures still applies.
func (s *Source) Refresh(ctx context.Context) error {
	if t := s.cur.Load(); t != nil {
		s.forced.Store(t)
	}
	s.mu.Lock()
	s.lastForced = time.Time{}
	s.mu.Unlock()
	_, err := s.refreshAndWait(ctx)
	return err
}

// CanServe reports whether requests can get a token now: a valid token and a
// chain that is not known to be dead.
func (s *Source) CanServe() bool {
	if !s.cur.Load().ValidAt(s.clock.Now()) {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastErr == nil || s.lastErr.Kind != Terminal
}

func (s *Source) refreshAndWait(ctx context.Context) (*Token, error) {
	if err := s.backoffError(); err != nil {
		if err.Kind == Transient || !s.recheckStorage() {
			return nil, err
		}
		if t := s.cur.Load(); t.ValidAt(s.clock.Now()) {
			return t, nil
		}
		return nil, err
	}
	ch := s.startAttempt()
	select {
	case r := <-ch:
		if t := s.cur.Load(); t.ValidAt(s.clock.Now()) {
			return t, nil
		}
		if r.Err != nil {
			return nil, r.Err
		}
		return nil, &Error{Kind: Transient, Msg: s.named("no valid token after refresh")}
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// backoffError returns the last failure while no new attempt may start.
func (s *Source) backoffError() *Error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lastErr != nil && s.clock.Now().Before(s.nextAttempt) {
		return s.lastErr
	}
	return nil
}

// RetryAfter is how long a client should wait before trying again when no
// valid token is available.
func (s *Source) RetryAfter() time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.nextAttempt.Sub(s.clock.Now())
	if d < time.Second {
		d = time.Second
	}
	return d
}

// Status returns a snapshot for status pages and health probes.
func (s *Source) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Status{Account: s.cfg.Account, LastRefresh: s.lastRefresh, LastResult: s.lastResult}
	if t := s.cur.Load(); t != nil {
		st.Generation, st.AccessExpiry, st.RefreshExpiry = t.Generation, t.Expiry, t.RefreshExpiry
		st.NextRefresh = s.refreshAt(t)
	}
	if s.lastErr != nil {
		st.LastError = s.lastErr.Msg
		st.NextRefresh = s.nextAttempt
	}
	st.State = s.stateLocked()
	return st
}

func (s *Source) stateLocked() string {
	switch {
	case s.refreshing:
		return StateRefreshing
	case s.lastErr != nil && s.lastErr.Kind == Terminal:
		return StateReauthRequired
	case s.lastErr != nil && s.lastErr.Kind == NoChain, s.lastErr == nil && s.cur.Load() == nil:
		return StateNoChain
	case s.lastErr != nil:
		return StateBackoff
	}
	return StateOK
}

// refreshAt is when t should be renewed: RefreshAhead before expiry, but never
// earlier than half-way through its lifetime.
func (s *Source) refreshAt(t *Token) time.Time {
	ahead := min(s.cfg.RefreshAhead, t.Expiry.Sub(t.IssuedAt)/2)
	return t.Expiry.Add(-ahead)
}

func (s *Source) run() {
	defer s.wg.Done()
	for {
		if wake := s.nextWake(); s.clock.Now().Before(wake) {
			select {
			case <-s.done:
				return
			case <-s.changed:
				continue
			case <-s.clock.At(wake):
			}
		}
		select {
		case <-s.done:
			return
		default:
		}
		if s.flushPending() {
			continue
		}
		<-s.startAttempt()
	}
}

// nextWake is when the refresher should act next.
func (s *Source) nextWake() time.Time {
	s.mu.Lock()
	next, pending := s.nextAttempt, s.pending != nil
	s.mu.Unlock()
	if !next.IsZero() {
		return next
	}
	t := s.cur.Load()
	if t == nil || pending {
		return s.clock.Now()
	}
	return s.refreshAt(t)
}

func (s *Source) notify() {
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

// attempt runs one refresh under the protocol: adopt a usable stored pair if
// there is one; otherwise take the account's lease, re-read, call the token
// endpoint, persist the new pair, and only then publish it. It is detached
// from every caller's context: once a refresh token is sent it may be spent.
func (s *Source) attempt() (err error) {
	s.mu.Lock()
	if s.lastErr != nil && s.clock.Now().Before(s.nextAttempt) {
		// A caller checked the backoff just before an attempt failed.
		e := s.lastErr
		s.mu.Unlock()
		return e
	}
	s.refreshing = true
	s.mu.Unlock()
	started := s.clock.Now()
	result := "ok"
	defer func() {
		s.finish(started, result, err)
		s.notify()
	}()

	ctx, cancel := context.WithTimeout(context.Background(), s.attemptTimeout())
	defer cancel()
	forced := s.forced.Load()

	// A pair held only in memory is the live one: the stored pair's refresh
	// token is spent. It must reach storage before any refresh starts, or the
	// refresh would read the stored pair and resend its dead refresh token.
	if err := s.persistPending(ctx); err != nil {
		result = "transient"
		return &Error{Kind: Transient, Msg: fmt.Sprintf("the newest token pair is not in storage yet, so no refresh can start: %v", err)}
	}

	rec, err := s.loadRecord(ctx)
	if err != nil && !errors.Is(err, ErrCorruptRecord) {
		// Storage is failing: acting on a guess could resend a spent token.
		result = "transient"
		return &Error{Kind: Transient, Msg: err.Error()}
	}
	if err != nil {
		s.log.Error("stored token record is unusable", zap.Error(err))
		rec = nil // a configured seed can still start a chain
	}
	if s.adoptable(rec, forced) {
		s.publish(rec, "adopted")
		result = "adopted"
		return nil
	}
	if e := s.deadChain(rec); e != nil {
		result = e.Code
		return e
	}

	lease, rec, err := s.acquireLease(ctx, func(r *Record) bool { return s.adoptable(r, forced) })
	if err != nil {
		result = "transient"
		return err
	}
	if lease == nil { // another instance refreshed while we waited
		s.publish(rec, "adopted")
		result = "adopted"
		return nil
	}
	// Release in the background: the storage lock may take a poll interval
	// (a second for file_system) to get, and waiters should have the new
	// token now. Close still waits for it (attempts counts it).
	defer func() {
		s.attempts.Add(1) // inside an attempt: the count is above zero
		go func() {
			defer s.attempts.Done()
			s.releaseLease(lease)
		}()
	}()

	newSeed := s.seedPending(rec)
	if !newSeed && s.adoptable(rec, forced) {
		s.publish(rec, "adopted")
		result = "adopted"
		return nil
	}
	if e := s.deadChain(rec); e != nil {
		result = e.Code
		return e
	}
	if !newSeed && rec == nil {
		result = "no_chain"
		msg := "no token chain yet: authorize the account in the browser (restream_auth_login), " +
			"install a refresh token with `caddy restream-auth seed`, or configure refresh_token"
		if _, lerr := s.loadRecord(ctx); lerr != nil {
			// A record exists but cannot be used: say which and why.
			msg = fmt.Sprintf("%v; fix or delete it, or configure refresh_token with a fresh refresh token", lerr)
		}
		return &Error{Kind: NoChain, Code: "no_chain", Msg: msg}
	}
	if !newSeed && forced != nil && !rec.token().Supersedes(forced) && !s.dueAt(rec, started) {
		// An upstream 401 asks for a new token, but only so often.
		s.mu.Lock()
		limited := started.Sub(s.lastForced) < ForcedRefreshInterval
		if !limited {
			s.lastForced = started
		}
		s.mu.Unlock()
		if limited {
			result = "rate_limited"
			s.publish(rec, "adopted")
			return nil
		}
	}

	rt, base := s.cfg.Seed, uint64(0)
	var seeds []string
	if rec != nil {
		base, seeds = rec.Generation, rec.ConsumedSeeds
	}
	if !newSeed {
		rt = rec.RefreshToken
	}
	next, err := s.x.exchange(ctx, rt)
	if err != nil {
		var e *Error
		errors.As(err, &e)
		if e.Kind == Terminal {
			// Someone may have rotated the chain under a lost lease; prefer theirs.
			if again, lerr := s.loadRecord(ctx); lerr == nil && again != nil && again.token().Supersedes(rec.token()) && again.token().ValidAt(s.clock.Now()) {
				s.publish(again, "adopted")
				result = "adopted"
				return nil
			}
			s.mu.Lock()
			s.deadRT = Fingerprint(rt)
			s.mu.Unlock()
			e.Msg += "; the refresh token chain is dead, re-authorize and configure a new refresh_token seed"
			result = e.Code
		} else {
			result = "transient"
		}
		return e
	}
	next.Generation = base + 1
	next.ConsumedSeeds = seeds
	next.Chain = rec.chainOrEmpty()
	if newSeed {
		next.Chain = newChainID()
		next.ConsumedSeeds = append(append([]string(nil), seeds...), s.seedFP)
		if n := len(next.ConsumedSeeds); n > maxConsumedSeeds {
			next.ConsumedSeeds = next.ConsumedSeeds[n-maxConsumedSeeds:]
		}
	}
	if err := s.persist(ctx, next, base, lease); err != nil {
		// The old pair is dead already: serving the new one from memory beats
		// serving nothing. The refresher keeps retrying the write.
		s.log.Error("persisting the new token pair failed; serving it from memory and retrying",
			zap.Uint64("generation", next.Generation), zap.Error(err))
		s.obs.PersistFailed(s.cfg.Account)
		s.mu.Lock()
		s.pending = &pendingWrite{rec: next, base: base}
		s.mu.Unlock()
	}
	s.publish(next, "refreshed")
	s.log.Info("refreshed token pair",
		zap.Uint64("generation", next.Generation),
		zap.Time("access_expires_at", next.Expiry),
		zap.Time("refresh_expires_at", next.RefreshExpiry),
		zap.Bool("new_seed", newSeed),
		zap.Duration("took", s.clock.Now().Sub(started)))
	return nil
}

func (s *Source) attemptTimeout() time.Duration {
	return s.leaseTTL() + s.cfg.Timeout + 2*lockWait
}

func (s *Source) dueAt(rec *Record, now time.Time) bool {
	return !now.Before(s.refreshAt(rec.token()))
}

// adoptable reports whether a stored record can be used as is: valid, not yet
// due for renewal, newer than what an upstream rejected, and not older than
// what this process already has.
func (s *Source) adoptable(rec *Record, forced *Token) bool {
	if rec == nil {
		return false
	}
	if s.seedPending(rec) || s.isDeadRT(rec.RefreshToken) {
		return false
	}
	now := s.clock.Now()
	t := rec.token()
	if (forced != nil && !t.Supersedes(forced)) || s.dueAt(rec, now) || !t.ValidAt(now) {
		return false
	}
	cur := s.cur.Load()
	return cur == nil || t.Chain != cur.Chain || t.Generation >= cur.Generation
}

// seedPending reports whether the configured seed still has to be
// exchanged: not consumed by the stored chain, and not known to be dead.
func (s *Source) seedPending(rec *Record) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.seedPendingLocked(rec)
}

func (s *Source) seedPendingLocked(rec *Record) bool {
	return s.seedFP != "" && (rec == nil || !rec.seedConsumed(s.seedFP)) && s.seedFP != s.deadRT
}

func (s *Source) isDeadRT(rt string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.deadRT != "" && Fingerprint(rt) == s.deadRT
}

// deadChain returns the terminal error if the chain that would be refreshed
// is the one the endpoint already rejected, so a dead token is never resent.
func (s *Source) deadChain(rec *Record) *Error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.deadRT == "" {
		return nil
	}
	var rt string
	switch {
	case s.seedPendingLocked(rec):
		rt = s.seedFP
	case rec != nil:
		rt = Fingerprint(rec.RefreshToken)
	default: // only a seed is left, and it is dead
		rt = s.seedFP
	}
	if rt != s.deadRT {
		return nil
	}
	if s.lastErr != nil && s.lastErr.Kind == Terminal {
		return s.lastErr
	}
	return &Error{Kind: Terminal, Code: "invalid_grant", Msg: "the refresh token chain is dead, re-authorize and configure a new refresh_token seed"}
}

func (s *Source) publish(rec *Record, how string) {
	t := rec.token()
	if !t.ValidAt(s.clock.Now()) {
		t.stale.Store(true)
	} else {
		s.clock.AfterFunc(t.useUntil, func() { t.stale.Store(true) })
	}
	for {
		old := s.cur.Load()
		if old != nil && old.Chain == t.Chain && old.Generation > t.Generation {
			return // never step back within a chain
		}
		if s.cur.CompareAndSwap(old, t) {
			break
		}
	}
	s.obs.Published(s.cfg.Account, t)
	if how == "adopted" {
		s.log.Debug("adopted stored token pair", zap.Uint64("generation", t.Generation), zap.Time("access_expires_at", t.Expiry))
	}
}

// named prefixes a message with the account, once: every *Error a Source
// hands out names its account, so callers add no context of their own.
func (s *Source) named(msg string) string {
	prefix := fmt.Sprintf("account %q: ", s.cfg.Account)
	if strings.HasPrefix(msg, prefix) {
		return msg
	}
	return prefix + msg
}

// finish records the outcome of an attempt and sets the backoff.
func (s *Source) finish(started time.Time, result string, err error) {
	s.mu.Lock()
	s.finishLocked(started, result, err)
	state := s.stateLocked()
	s.mu.Unlock()
	s.obs.Refreshed(s.cfg.Account, result, s.clock.Now().Sub(started))
	s.obs.StateChanged(s.cfg.Account, state)
}

func (s *Source) finishLocked(started time.Time, result string, err error) {
	s.refreshing = false
	now := s.clock.Now()
	if err == nil {
		s.lastErr, s.failures, s.nextAttempt = nil, 0, time.Time{}
		if result != "adopted" && result != "rate_limited" {
			s.lastRefresh = now
		}
		s.lastResult = result
		return
	}
	var e *Error
	if !errors.As(err, &e) {
		e = &Error{Kind: Transient, Msg: err.Error()}
	}
	e.Msg = s.named(e.Msg)
	s.lastErr, s.lastResult = e, result
	switch e.Kind {
	case Terminal, NoChain:
		s.nextAttempt = now.Add(ReauthPollInterval)
		if e.Kind == Terminal {
			s.log.Error("token refresh failed permanently", zap.String("code", e.Code), zap.String("error", e.Msg))
		} else {
			s.log.Warn("no token chain", zap.String("error", e.Msg))
		}
	default:
		s.failures++
		d := backoff(s.failures)
		if e.RetryAfter > d {
			d = min(e.RetryAfter, 10*maxBackoff)
		}
		s.nextAttempt = now.Add(d)
		s.log.Warn("token refresh failed; retrying", zap.String("error", e.Msg), zap.Int("status", e.Status),
			zap.Int("failures", s.failures), zap.Duration("retry_in", d), zap.Bool("unknown_outcome", e.Unknown),
			zap.Duration("took", now.Sub(started)))
	}
}

// backoff is 1s doubling to 1m, with ±20% jitter so replicas spread out.
func backoff(failures int) time.Duration {
	d := minBackoff << min(failures-1, 6)
	d = min(d, maxBackoff)
	return time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
}

// chainOrEmpty is the record's chain, "" for no record.
func (r *Record) chainOrEmpty() string {
	if r == nil {
		return ""
	}
	return r.Chain
}

func newChainID() string {
	var b [8]byte
	_, _ = crand.Read(b[:])
	return hex.EncodeToString(b[:])
}
