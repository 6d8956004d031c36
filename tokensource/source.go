package tokensource

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Defaults and bounds of the protocol.
const (
	DefaultRefreshAhead = 5 * time.Minute
	DefaultTimeout      = 10 * time.Second
	// ReauthPollInterval is how often an account that needs a human re-reads
	// storage, where another instance or a new seed may have installed a chain.
	ReauthPollInterval = 30 * time.Second
	// ForcedRefreshInterval rate-limits refreshes forced by upstream 401s: a
	// generation itself issued because of a 401 is not replaced because of
	// another 401 before it is this old, so an upstream that rejects tokens
	// for other reasons cannot rotate the chain on every request.
	ForcedRefreshInterval = 5 * time.Second
	// StorageTimeout bounds one storage operation, its lock wait included.
	StorageTimeout = 10 * time.Second

	minBackoff = time.Second
	maxBackoff = time.Minute
	// Misconfigured client credentials are retried this slowly.
	minMisconfiguredBackoff = time.Minute
	maxMisconfiguredBackoff = 10 * time.Minute
	// leasePoll is how often an instance waiting for another's lease looks again.
	leasePoll = 150 * time.Millisecond
	// leaseSlack is the margin kept between a holder's last step and its
	// lease's end.
	leaseSlack = 5 * time.Second
	// recheckInterval bounds how often requests make an instance in backoff
	// or re-authorization re-read storage.
	recheckInterval = time.Second
)

// Config configures a Source. Account, ClientID, ClientSecret, TokenURL and
// Storage (or Store) are required.
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
	// Timeout bounds one token endpoint call, and a request's wait for a token.
	Timeout time.Duration
	// Storage is a Caddy storage; the account's record and lease live in it.
	Storage Storage
	// Store, if set, is used instead of Storage (a backend that implements
	// the protocol's operations natively).
	Store      Store
	HTTPClient *http.Client
	Logger     *zap.Logger
	Clock      Clock
	// Owner names this process in leases; random if empty.
	Owner string
	// Observer receives events for metrics; optional.
	Observer Observer
	// Keyring, if set, encrypts the stored record at rest.
	Keyring *Keyring
	// ProfileURL is Restream's profile endpoint (see ProfileURLFor). When
	// set, a chain whose user is unknown records it: a seed's after its
	// first exchange, any other after its next stored generation, read with
	// that generation's access token once it is stored. Empty: users are
	// not read.
	ProfileURL string
}

// Status is a point-in-time view of a Source for status pages and probes.
// It holds no secret.
type Status struct {
	Account    string
	State      State
	Generation uint64
	// AccessExpiry is when the served access token expires.
	AccessExpiry time.Time
	// RefreshExpiry is when the chain's refresh token expires; zero if the
	// endpoint did not say.
	RefreshExpiry time.Time
	LastRefresh   time.Time
	LastResult    RefreshResult
	LastError     string
	NextRefresh   time.Time
	// Persisted is false while the served pair lives only in memory.
	Persisted bool
	// User is the Restream account the chain acts as; nil while unknown.
	User *User
}

// Source keeps the newest token of one account. It is safe for concurrent
// use. One goroutine, the refresher, runs the whole protocol (protocol.go);
// requests only read the published token, or wait for the refresher's next
// round.
type Source struct {
	cfg   Config
	x     *exchanger
	log   *zap.Logger
	clock Clock
	store Store
	obs   Observer

	seedFingerprint string // Fingerprint(cfg.Seed); "" without a seed

	cur      atomic.Pointer[Token]     // hot path: the newest published token
	rejected atomic.Pointer[rejection] // the newest 401's mark, cleared by the round that decides on it
	operator atomic.Bool               // an operator asked for a refresh
	rounds   atomic.Pointer[round]     // the refresher's current round, closed when it ends
	begun    atomic.Uint64             // rounds the refresher has begun
	ended    atomic.Uint64             // the number (counted by begun) of the newest round that ended
	kick     chan struct{}             // wakes the refresher
	done     chan struct{}             // closed by Close
	stopOnce sync.Once
	started  atomic.Bool
	wg       sync.WaitGroup
	// closeBy is the deadline of the work left at Close (I7).
	closeBy  atomic.Pointer[time.Time]
	closeCtx context.Context
	cancel   context.CancelFunc

	// Owned by the refresher goroutine alone.
	act actorState
	// jitter draws backoff jitter; onPanic sees recovered panics. The
	// simulation replaces both.
	jitter  func() float64
	onPanic func(any)

	mu          sync.Mutex // guards the fields below; never taken on the hot path
	lastErr     *Error
	limited     *Token    // a rejected token the 401 rate limit declined to replace
	nextAttempt time.Time // no token call before this (backoff or re-auth poll)
	failures    int
	refreshing  bool
	lastRefresh time.Time
	lastResult  RefreshResult
	lastLoad    time.Time
	memoryOnly  bool        // the served pair is not in storage (I2)
	user        *User       // the Restream user of the served generation, nil while unknown
	userWarned  string      // the chain whose unknown user was last logged
	stopStale   func() bool // cancels the current token's stale timer
	stopCancel  func() bool // cancels the Close deadline's timer
}

// round is one wake-up for waiters: done is closed when the refresher ends a
// round or publishes a token.
type round struct {
	done chan struct{}
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
	case CheckClientSecret(cfg.ClientSecret) != nil:
		return nil, CheckClientSecret(cfg.ClientSecret)
	case cfg.TokenURL == "":
		return nil, errors.New("token_url is required")
	case cfg.Storage == nil && cfg.Store == nil:
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
		cfg.Owner = randomID()
	}
	log := cfg.Logger.With(zap.String("account", cfg.Account))
	store := cfg.Store
	if store == nil {
		store = NewStorageStore(cfg.Storage, cfg.Account, cfg.Keyring, cfg.Clock, log)
	}
	s := &Source{
		cfg:    cfg,
		log:    log,
		clock:  cfg.Clock,
		store:  store,
		obs:    cfg.Observer,
		kick:   make(chan struct{}, 1),
		jitter: rand.Float64,
		done:   make(chan struct{}),
		x: &exchanger{
			client:       noRedirects(cfg.HTTPClient),
			tokenURL:     cfg.TokenURL,
			clientID:     cfg.ClientID,
			clientSecret: cfg.ClientSecret,
			style:        cfg.AuthStyle,
			timeout:      cfg.Timeout,
			clock:        cfg.Clock,
		},
	}
	s.closeCtx, s.cancel = context.WithCancel(context.Background())
	s.rounds.Store(&round{done: make(chan struct{})})
	if cfg.Seed != "" {
		s.seedFingerprint = Fingerprint(cfg.Seed)
	}
	return s, nil
}

// noRedirects returns a copy of c that never follows a redirect: a token
// request carries the client credentials, and a 3xx is an unusable answer.
func noRedirects(c *http.Client) *http.Client {
	cc := *c
	cc.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return &cc
}

// Account returns the account name.
func (s *Source) Account() string { return s.cfg.Account }

// Start launches the refresher. Calling it again, or after Close, does
// nothing.
func (s *Source) Start() {
	if s.closing() || s.started.Swap(true) {
		return // a closed Source stays closed
	}
	s.wg.Add(1)
	go s.run()
}

// Close stops the refresher and returns within Timeout + 1s (I7). Work in
// flight gets until then: a refresh token already sent may be spent, so its
// answer is still stored if storage allows. No goroutine or timer of the
// Source outlives Close.
func (s *Source) Close() {
	s.beginClose()
	s.wg.Wait()
	s.finishClose()
	s.x.client.CloseIdleConnections()
}

// beginClose tells the refresher to stop and sets the deadline of the work
// left; it does not wait.
func (s *Source) beginClose() {
	s.stopOnce.Do(func() {
		by := s.clock.Now().Add(s.cfg.Timeout + 900*time.Millisecond)
		s.closeBy.Store(&by)
		close(s.done)
		s.mu.Lock()
		s.stopCancel = s.clock.AfterFunc(by, s.cancel)
		s.mu.Unlock()
	})
}

// finishClose runs once the refresher has stopped: no timer outlives Close.
func (s *Source) finishClose() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, stop := range []func() bool{s.stopStale, s.stopCancel} {
		if stop != nil {
			stop()
		}
	}
	s.stopStale, s.stopCancel = nil, nil
	s.cancel()
}

func (s *Source) closing() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// Current returns the newest published token, valid or not, or nil.
func (s *Source) Current() *Token { return s.cur.Load() }

// Token returns a valid token. While the newest token is valid this is one
// atomic load and a flag check. Otherwise it waits for the refresher's next
// round, at most Timeout (a request must not wait out another instance's
// lease), and returns an *Error if no valid token came of it.
func (s *Source) Token(ctx context.Context) (*Token, error) {
	// No clock read here: a timer marks each token stale when its time is
	// up (reading the clock costs more than the rest of this path).
	if t := s.cur.Load(); t != nil && !t.stale.Load() {
		return t, nil
	}
	return s.await(ctx, func(t *Token) bool { return true })
}

// ErrRejectedAgain means a token that was itself issued because of an
// upstream 401 was rejected again within ForcedRefreshInterval: no refresh
// is made for it, and the upstream's 401 should reach the client.
var ErrRejectedAgain = errors.New("the upstream rejected a token that was just refreshed for the same reason")

// TokenNewerThan is for a request whose token got a 401. It returns a valid
// token that supersedes rejected: one that already exists (refreshed is
// false), or the result of one refresh shared with every other caller. It
// returns ErrRejectedAgain when the 401 rate limit declines to refresh, and
// an *Error when no newer token can be had (the client should get 503).
func (s *Source) TokenNewerThan(ctx context.Context, rejected *Token) (t *Token, refreshed bool, err error) {
	if t := s.cur.Load(); t.ValidAt(s.clock.Now()) && t.Supersedes(rejected) {
		return t, false, nil
	}
	s.markRejected(rejected)
	t, err = s.await(ctx, func(t *Token) bool { return t.Supersedes(rejected) }, rejected)
	return t, err == nil, err
}

// Rejected is for a 401 that cannot be replayed (a websocket handshake, a
// streamed body): if t is still the newest token, the refresher considers a
// refresh (rate-limited like every 401-forced refresh), so the client's
// retry finds a new token. It does not wait.
func (s *Source) Rejected(t *Token) {
	if s.cur.Load() != t {
		return
	}
	s.markRejected(t)
	s.wake()
}

// rejection is one 401's mark on a token. Every 401 leaves a new mark, even
// on a token already marked: the round that decides on a mark clears only
// the mark it read, so a 401 that came after that read is never forgotten.
type rejection struct{ tok *Token }

// markRejected marks rejected unless a newer generation of its chain is
// already marked.
func (s *Source) markRejected(rejected *Token) {
	mark := &rejection{tok: rejected}
	for {
		old := s.rejected.Load()
		if old != nil && old.tok.Chain == rejected.Chain && old.tok.Generation > rejected.Generation {
			return
		}
		if s.rejected.CompareAndSwap(old, mark) {
			return
		}
	}
}

// rejectedToken is the token of the newest 401's mark, nil if none.
func (s *Source) rejectedToken() *Token {
	if mark := s.rejected.Load(); mark != nil {
		return mark.tok
	}
	return nil
}

// Refresh forces one refresh under the full protocol (lease, re-read,
// persist before use), outside the 401 rate limit. It is for operators; the
// backoff after failures still applies.
func (s *Source) Refresh(ctx context.Context) error {
	before := s.cur.Load()
	s.operator.Store(true)
	_, err := s.await(ctx, func(t *Token) bool { return t.Supersedes(before) }, before)
	return err
}

// await waits, round by round, until the published token is valid and
// accepted by want, the refresher reports an error, or the request's wait
// bound (Timeout) passes. rejected, if given, is a token the caller must not
// get back.
func (s *Source) await(ctx context.Context, want func(*Token) bool, rejected ...*Token) (*Token, error) {
	s.Start()
	// Only a round that begins after this point may give the verdict: one
	// already under way read the rejection marks and the clock before the
	// caller set them (a 401 rate-limited by the round before the interval
	// passed must not refuse the forced refresh due after it).
	first := s.begun.Load()
	var deadline <-chan time.Time
	for {
		r := s.rounds.Load()
		if t := s.cur.Load(); t != nil && !t.stale.Load() && t.ValidAt(s.clock.Now()) && want(t) {
			return t, nil
		}
		if s.ended.Load() > first {
			// A round begun since this request asked has ended: its verdict stands.
			s.mu.Lock()
			err, limited := s.lastErr, s.limited
			s.mu.Unlock()
			if err != nil {
				return nil, err
			}
			if len(rejected) > 0 && limited != nil && limited == rejected[0] {
				return nil, ErrRejectedAgain
			}
		}
		if s.closing() {
			return nil, &Error{Kind: Transient, Msg: s.named("token source is shutting down")}
		}
		if deadline == nil {
			// Wake the refresher once; after that it paces its own rounds
			// (a waiter that kicked every round would spin it against
			// storage while another instance holds the lease).
			s.wake()
			deadline = s.clock.At(s.clock.Now().Add(s.cfg.Timeout))
		}
		select {
		case <-r.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-deadline:
			return nil, &Error{Kind: Transient, Msg: s.named(fmt.Sprintf(
				"no valid token within %s (a refresh is under way or another instance holds the refresh lease)", s.cfg.Timeout))}
		}
	}
}

// wake asks the refresher for a round now.
func (s *Source) wake() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// CanServe reports whether requests can get a token now: a valid token and a
// chain that is not known to be dead.
func (s *Source) CanServe() bool {
	t := s.cur.Load()
	if t == nil || t.stale.Load() || !t.ValidAt(s.clock.Now()) {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastErr == nil || s.lastErr.Kind != Terminal
}

// RetryAfter is how long a client should wait before trying again when no
// valid token is available.
func (s *Source) RetryAfter() time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return max(s.nextAttempt.Sub(s.clock.Now()), time.Second)
}

// Status returns a snapshot for status pages and health probes.
func (s *Source) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Status{Account: s.cfg.Account, LastRefresh: s.lastRefresh, LastResult: s.lastResult, Persisted: !s.memoryOnly}
	if t := s.cur.Load(); t != nil {
		st.Generation, st.AccessExpiry, st.RefreshExpiry = t.Generation, t.Expiry, t.RefreshExpiry
		st.NextRefresh = s.refreshAt(t)
	}
	if s.lastErr != nil {
		st.LastError = s.lastErr.Msg
		st.NextRefresh = s.nextAttempt
	}
	if s.user != nil {
		u := *s.user
		st.User = &u
	}
	st.State = s.stateLocked()
	return st
}

func (s *Source) stateLocked() State {
	switch {
	case s.refreshing:
		return StateRefreshing
	case s.lastErr != nil && s.lastErr.Kind == Terminal:
		return StateReauthRequired
	case s.lastErr != nil && s.lastErr.Kind == NoChain, s.lastErr == nil && s.cur.Load() == nil:
		return StateNoChain
	case s.lastErr != nil && s.lastErr.Kind == Misconfigured:
		return StateMisconfigured
	case s.memoryOnly:
		return StateDegraded
	case s.lastErr != nil:
		return StateBackoff
	}
	return StateOK
}

// refreshAt is when t should be renewed: RefreshAhead before expiry, but never
// earlier than half-way through its lifetime, and no later than the moment
// it stops being served (its expiry margin).
func (s *Source) refreshAt(t *Token) time.Time {
	ahead := min(s.cfg.RefreshAhead, t.Expiry.Sub(t.IssuedAt)/2)
	at := t.Expiry.Add(-ahead)
	if !t.useUntil.IsZero() && t.useUntil.Before(at) {
		return t.useUntil
	}
	return at
}

// run is the refresher: one round of the protocol, then sleep until the next
// one is due or a request wakes it.
func (s *Source) run() {
	defer s.wg.Done()
	for {
		wake := s.round()
		select {
		case <-s.done:
			s.shutdown()
			return
		case <-s.kick:
		case <-s.clock.At(wake):
		}
	}
}

// round runs one tick and tells waiters it ended. A panic, which no storage
// content or endpoint answer should cause (I8), is logged and retried with
// backoff instead of taking Caddy down.
func (s *Source) round() (wake time.Time) {
	n := s.begun.Add(1)
	defer func() {
		if v := recover(); v != nil {
			s.log.Error("BUG: token refresher panicked; retrying", zap.Any("panic", v))
			s.obs.Refreshed(s.cfg.Account, ResultTransient, 0)
			wake = s.failed(s.clock.Now(), ResultTransient, &Error{Kind: Transient, Msg: "internal error in the token refresher"})
			if s.onPanic != nil {
				s.onPanic(v)
			}
		}
		s.ended.Store(n)
		s.signal()
	}()
	return s.tick(s.closeCtx)
}

// signal wakes every waiter: a round ended, or a token was published.
func (s *Source) signal() {
	for {
		r := s.rounds.Load()
		if s.rounds.CompareAndSwap(r, &round{done: make(chan struct{})}) {
			close(r.done)
			return
		}
	}
}

// publish makes t the served token, unless it would step back within its
// chain, and arms the timer that marks it stale.
func (s *Source) publish(rec *Record, how RefreshResult) bool {
	t := rec.token()
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.cur.Load()
	if old != nil && old.Chain == t.Chain && old.Generation > t.Generation {
		return false // never step back within a chain
	}
	if old != nil && old.Chain == t.Chain && old.Generation == t.Generation && old.AccessToken == t.AccessToken {
		return false // already served
	}
	if s.stopStale != nil {
		s.stopStale()
		s.stopStale = nil
	}
	if !t.ValidAt(s.clock.Now()) {
		t.stale.Store(true)
	} else {
		s.stopStale = s.clock.AfterFunc(t.useUntil, func() { t.stale.Store(true) })
	}
	s.cur.Store(t)
	s.user = rec.User
	// Under the same lock as the token, what succeeded would record next: a
	// caller that got this token sees a status that explains it.
	s.lastResult = how
	if how == ResultOK || how == ResultInstalled {
		s.lastRefresh = s.clock.Now()
	}
	s.lastErr, s.failures, s.nextAttempt = nil, 0, time.Time{}
	s.limited = nil // the rate limit's verdict was about an older token
	s.signal()
	s.obs.Published(s.cfg.Account, t)
	s.obs.StateChanged(s.cfg.Account, s.stateLocked())
	if how == ResultAdopted {
		s.log.Debug("adopted stored token pair", zap.Uint64("generation", t.Generation), zap.Time("access_expires_at", t.Expiry))
	}
	return true
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

// succeeded records a round that left the account serving.
func (s *Source) succeeded(result RefreshResult) {
	s.mu.Lock()
	changed := s.lastErr != nil
	s.lastErr, s.failures, s.nextAttempt = nil, 0, time.Time{}
	if result == ResultOK {
		s.lastRefresh = s.clock.Now()
	}
	if result != "" {
		s.lastResult = result
	}
	state := s.stateLocked()
	s.mu.Unlock()
	if changed || result != "" {
		s.obs.StateChanged(s.cfg.Account, state)
	}
}

// failed records a failed round and returns when the next attempt may run.
func (s *Source) failed(now time.Time, result RefreshResult, e *Error) time.Time {
	s.mu.Lock()
	e.Msg = s.named(e.Msg)
	s.lastErr, s.lastResult, s.refreshing = e, result, false
	var d time.Duration
	switch e.Kind {
	case Terminal, NoChain:
		d = ReauthPollInterval
	case Misconfigured:
		s.failures++
		d = min(minMisconfiguredBackoff<<min(s.failures-1, 4), maxMisconfiguredBackoff)
	default:
		s.failures++
		d = backoff(s.failures, s.jitter())
		if e.RetryAfter > d {
			d = min(e.RetryAfter, 10*maxBackoff)
		}
	}
	s.nextAttempt = now.Add(d)
	failures, state, next := s.failures, s.stateLocked(), s.nextAttempt
	s.mu.Unlock()
	switch e.Kind {
	case Terminal:
		s.log.Error("token refresh failed permanently", zap.String("code", e.Code), zap.String("error", e.Msg))
	case NoChain:
		s.log.Warn("no token chain", zap.String("error", e.Msg))
	case Misconfigured:
		s.log.Error("the token endpoint refused the client credentials: check client_id and client_secret; the chain is kept",
			zap.String("code", e.Code), zap.String("error", e.Msg), zap.Duration("retry_in", d))
	default:
		s.log.Warn("token refresh failed; retrying", zap.String("error", e.Msg), zap.Int("status", e.Status),
			zap.Int("failures", failures), zap.Duration("retry_in", d), zap.Bool("unknown_outcome", e.Unknown))
	}
	s.obs.StateChanged(s.cfg.Account, state)
	return next
}

// backoff is 1s doubling to 1m, with ±20% jitter (j in [0, 1)) so replicas
// spread out.
func backoff(failures int, j float64) time.Duration {
	d := minBackoff << min(failures-1, 6)
	d = min(d, maxBackoff)
	return time.Duration(float64(d) * (0.8 + 0.4*j))
}
