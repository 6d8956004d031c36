package caddymodule

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/restream-sidecar/caddy-restream-auth/internal/redistest"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

func testRecord(gen uint64) *tokensource.Record {
	now := time.Now()
	return &tokensource.Record{Version: 1, Generation: gen, Chain: "c", AccessToken: fmt.Sprint("at", gen),
		RefreshToken: fmt.Sprint("rt", gen), TokenType: "Bearer", Expiry: now.Add(time.Hour), IssuedAt: now}
}

// A module's own source reads and writes where the config's restream_auth
// sources do: Redis when the app has it, Caddy storage otherwise.
func TestBackendForModules(t *testing.T) {
	const pw = "backend-secret-pw-4b"
	srv := redistest.Start(t, redistest.Options{Password: pw})
	storage := &certmagic.FileStorage{Path: t.TempDir()}
	cfg := tokensource.Config{Account: "acct", ClientID: "id", ClientSecret: "secret", TokenURL: "http://127.0.0.1:9/oauth/token"}
	ctx := context.Background()

	for _, app := range []*App{{}, {Redis: &RedisConfig{URL: srv.URL()}}} {
		if app.Redis != nil {
			var err error
			if app.redis, err = app.Redis.resolve(); err != nil {
				t.Fatal(err)
			}
		}
		p, err := newPooledSource(cfg, app.backendFor("acct", nil, storage, zap.NewNop()))
		if err != nil {
			t.Fatal(err)
		}
		store := p.cfg.Store
		if store == nil {
			store = tokensource.NewStorageStore(storage, "acct", nil, nil, nil)
		}
		if err := store.CompareAndStore(ctx, testRecord(1), tokensource.Version{}); err != nil {
			t.Fatal(err)
		}
		rec, err := p.loadRecord(ctx)
		if err != nil || rec == nil || rec.RefreshToken != "rt1" {
			t.Fatalf("redis %v: loadRecord %+v %v", app.Redis != nil, rec, err)
		}
		where := fmt.Sprint(p.Binding().Storage)
		if app.Redis != nil {
			if !strings.Contains(where, "redis "+srv.Addr()+" db 0, keys restream_auth/{acct}/") || strings.Contains(where, pw) {
				t.Fatalf("a source on Redis is bound to %q", where)
			}
			if srv.MustDo("EXISTS", "restream_auth/{acct}/record") != int64(1) {
				t.Fatal("the record is not in Redis")
			}
		}
		if err := p.Destruct(); err != nil {
			t.Fatal(err)
		}
		if n := len(RedisClientsInPool()); n != 0 {
			t.Fatalf("%d Redis clients left after the last source", n)
		}
	}
}
