package redisstore_test

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/restream-sidecar/caddy-restream-auth/internal/redistest"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource/redisstore"
)

// holdNextScript holds the reply of the next record read (the one script
// called with the record, lease and mark keys) once armed, until released:
// a read that ran in Redis but has not returned to the store yet.
type holdNextScript struct {
	armed    atomic.Bool
	entered  chan struct{}
	released chan struct{}
}

func (h *holdNextScript) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *holdNextScript) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}
func (h *holdNextScript) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if err == nil && isRecordRead(cmd) && h.armed.CompareAndSwap(true, false) {
			close(h.entered)
			<-h.released
		}
		return err
	}
}

func isRecordRead(cmd redis.Cmder) bool {
	args := cmd.Args()
	if (cmd.Name() != "evalsha" && cmd.Name() != "eval") || len(args) < 6 {
		return false
	}
	return fmt.Sprint(args[3]) == recordKey() && fmt.Sprint(args[4]) == leaseKey() && strings.HasSuffix(fmt.Sprint(args[5]), "/mark")
}

// A read that ran before the store's own write of a newer generation, and
// returns after it (the background watch reading while the refresher
// writes), must not make the store forget the newer generation: after a
// data loss the store would write the older, spent pair back, and another
// instance would refresh from it (TestLostRedisDataLosesNoChain's
// invalid_grant under load).
func TestStaleReadDoesNotReplaceNewerKnownRecord(t *testing.T) {
	srv := redistest.Start(t, redistest.Options{})
	opt, err := redisstore.ParseURL(srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	client := redisstore.NewClient(opt)
	t.Cleanup(func() { _ = client.Close() })
	hold := &holdNextScript{entered: make(chan struct{}), released: make(chan struct{})}
	client.AddHook(hold)
	s, err := redisstore.New(client, account, redisstore.Options{WatchInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	ctx := ctxT(t)

	g1, g2 := pair("c", 1), pair("c", 2)
	mustStore(t, s, g1, tokensource.Version{})
	lease, err := s.TakeLease(ctx, "refresher", time.Minute)
	if err != nil {
		t.Fatal(err)
	}

	hold.armed.Store(true)
	staleRead := make(chan *tokensource.Record)
	go func() {
		rec, _ := s.Load(ctx) // runs in Redis now, returns after the write below
		staleRead <- rec
	}()
	<-hold.entered
	mustStore(t, s, g2, version(g1))
	close(hold.released)
	if rec := <-staleRead; rec == nil || rec.Generation != 1 {
		t.Fatalf("the held read returned %+v, want generation 1", rec)
	}
	if err := s.ReleaseLease(ctx, lease); err != nil {
		t.Fatal(err)
	}

	srv.MustDo("FLUSHALL") // Redis loses its data
	if got := mustLoad(t, s); got.Generation != 2 {
		t.Fatalf("after the data loss the store wrote back generation %d, want its own newer 2", got.Generation)
	}
}
