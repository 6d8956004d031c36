package tokensource

// What the package's tests share: the hermetic test env (a fake clock, the
// strict fake Restream on it, a spied file_system storage in a temp dir),
// and small waits and assertions. The fake clock itself is in clock_test.go.

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
)

const testAccount = "acct"

// testEnv is one hermetic world: a fake clock, the strict fake Restream
// server running on it, and a file_system storage in a temp dir.
type testEnv struct {
	clk  *fakeClock
	fake *fakerestream.Server
	st   *spyStorage
}

// newTestEnv builds a testEnv whose fake Restream runs on its clock
// (unless opts sets one) and accepts the test client's credentials.
func newTestEnv(t *testing.T, opts fakerestream.Options) *testEnv {
	t.Helper()
	clk := newFakeClock()
	if opts.Now == nil {
		opts.Now = clk.Now
	}
	opts.ClientID, opts.ClientSecret = testClientID, testClientSecret
	fake := fakerestream.New(opts)
	t.Cleanup(fake.Close)
	return &testEnv{clk: clk, fake: fake, st: &spyStorage{FileStorage: &certmagic.FileStorage{Path: t.TempDir()}}}
}

// config is a Source configuration for the env's account, fake and storage.
func (e *testEnv) config(seed, owner string) Config {
	return Config{
		Account:      testAccount,
		ClientID:     testClientID,
		ClientSecret: testClientSecret,
		TokenURL:     e.fake.TokenURL(),
		AuthStyle:    AuthBasic,
		Seed:         seed,
		Timeout:      5 * time.Second,
		Storage:      e.st,
		Clock:        e.clk,
		Owner:        owner,
	}
}

// source builds a Source that is closed when the test ends.
func (e *testEnv) source(t *testing.T, cfg Config) *Source {
	t.Helper()
	s, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(s.Close)
	return s
}

// seededSource is a Source of owner configured with a fresh seed from the
// fake: its first round starts a new chain.
func (e *testEnv) seededSource(t *testing.T, owner string) *Source {
	t.Helper()
	return e.source(t, e.config(e.fake.Seed(), owner))
}

// record is the account's stored record (nil if none).
func (e *testEnv) record(t *testing.T) *Record {
	t.Helper()
	rec, err := LoadRecord(context.Background(), e.st, testAccount)
	if err != nil {
		t.Fatalf("LoadRecord: %v", err)
	}
	return rec
}

// wantCalls asserts the refresh call count, and that the fake never saw a
// reused refresh token or bad client credentials.
func (e *testEnv) wantCalls(t *testing.T, refreshCalls int64) {
	t.Helper()
	st := e.fake.Stats()
	if st.RefreshCalls != refreshCalls {
		t.Fatalf("token endpoint got %d refresh calls, want %d (stats %+v)", st.RefreshCalls, refreshCalls, st)
	}
	if st.InvalidGrant != 0 || st.InvalidClient != 0 {
		t.Fatalf("token endpoint saw a reused or wrong credential: %+v", st)
	}
}

// revoke kills a pair at the fake, as a user revoking access would.
func (e *testEnv) revoke(t *testing.T, token string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, e.fake.URL()+"/oauth/revoke", strings.NewReader(url.Values{"token": {token}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(testClientID, testClientSecret)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("revoke: %d", res.StatusCode)
	}
}

// spyStorage is the real file_system storage with optional hooks to watch
// (or break) individual operations.
type spyStorage struct {
	*certmagic.FileStorage
	onStore  atomic.Pointer[func(key string, value []byte) error]
	onLoad   atomic.Pointer[func(key string)]
	failLoad atomic.Pointer[func(key string) error]
	onLock   atomic.Pointer[func(name string)]
}

func (s *spyStorage) Lock(ctx context.Context, name string) error {
	if h := s.onLock.Load(); h != nil {
		(*h)(name)
	}
	return s.FileStorage.Lock(ctx, name)
}

func (s *spyStorage) Store(ctx context.Context, key string, value []byte) error {
	if h := s.onStore.Load(); h != nil {
		if err := (*h)(key, value); err != nil {
			return err
		}
	}
	return s.FileStorage.Store(ctx, key, value)
}

func (s *spyStorage) Load(ctx context.Context, key string) ([]byte, error) {
	if h := s.onLoad.Load(); h != nil {
		(*h)(key)
	}
	if h := s.failLoad.Load(); h != nil {
		if err := (*h)(key); err != nil {
			return nil, err
		}
	}
	return s.FileStorage.Load(ctx, key)
}

func (s *spyStorage) setOnStore(f func(key string, value []byte) error) { s.onStore.Store(&f) }
func (s *spyStorage) setOnLoad(f func(key string))                      { s.onLoad.Store(&f) }
func (s *spyStorage) setOnLock(f func(name string))                     { s.onLock.Store(&f) }
func (s *spyStorage) setFailLoad(f func(key string) error)              { s.failLoad.Store(&f) }

// gateTransport holds each token request until the test lets it through.
type gateTransport struct {
	entered chan struct{}
	release chan struct{}
}

func (g *gateTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	g.entered <- struct{}{}
	<-g.release
	return http.DefaultTransport.RoundTrip(r)
}

// eventually polls cond, for conditions reached in another goroutine that
// signals nothing; it fails the test after a real-time bound.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// mustToken is s.Token, failing the test on an error.
func mustToken(t *testing.T, s *Source) *Token {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tok, err := s.Token(ctx)
	if err != nil {
		t.Fatalf("Token: %v", err)
	}
	return tok
}

// wantGeneration fails the test unless tok is of generation gen.
func wantGeneration(t *testing.T, tok *Token, gen uint64) {
	t.Helper()
	if tok == nil || tok.Generation != gen {
		var got any = "nil"
		if tok != nil {
			got = tok.Generation
		}
		t.Fatalf("token generation %v, want %d", got, gen)
	}
}

// rejectedGeneration is the token of generation gen on s's current chain,
// as a request that got a 401 with it names it.
func rejectedGeneration(s *Source, gen uint64) *Token {
	t := &Token{Generation: gen}
	if cur := s.Current(); cur != nil {
		t.Chain = cur.Chain
	}
	return t
}

// tokenNewerThan is TokenNewerThan in the shape these tests were written
// for: newer reports a newer token; the rate-limited case is (current,
// false, nil).
func tokenNewerThan(ctx context.Context, s *Source, rejected *Token) (tok *Token, newer bool, err error) {
	tok, _, err = s.TokenNewerThan(ctx, rejected)
	if errors.Is(err, ErrRejectedAgain) {
		return s.Current(), false, nil
	}
	return tok, err == nil, err
}

// concurrently runs call(0) … call(n-1) in n goroutines released at the
// same moment, and returns when all have returned.
func concurrently(n int, call func(i int)) {
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			call(i)
		}()
	}
	close(start)
	wg.Wait()
}

// waitLeaseReleased waits until the stored lease has no owner: the round
// that held it (what) has given it back.
func (e *testEnv) waitLeaseReleased(t *testing.T, what string) {
	t.Helper()
	eventually(t, what, func() bool {
		l := e.lease()
		return l != nil && l.Owner == ""
	})
}

// lease is the account's stored lease, nil if there is none or it does not
// read.
func (e *testEnv) lease() *leaseRecord {
	var l leaseRecord
	raw, err := e.st.FileStorage.Load(context.Background(), LeaseKey(testAccount))
	if err != nil || json.Unmarshal(raw, &l) != nil {
		return nil
	}
	return &l
}

// observedLogger is a logger whose entries at level and above the test
// reads back.
func observedLogger(level zapcore.Level, opts ...zap.Option) (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(level)
	return zap.New(core, opts...), logs
}

// waitSignal receives from ch, failing the test after a real-time bound.
func waitSignal[T any](t *testing.T, what string, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}
