package caddymodule

import (
	"context"
	"strconv"
	"strings"
	"testing"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/redistest"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// BenchmarkHotPathBackend is BenchmarkHotPath's restream_auth case with the
// account on Caddy file_system storage and on Redis (the restream_auth app's
// redis option), its source built by newPooledSource as Provision builds it.
// A request reads the published token and never touches the store, so the
// two must match.
//
//	go test -run '^$' -bench HotPathBackend -benchmem -count 10 ./caddymodule/ | tee hotpath.txt
//	go run golang.org/x/perf/cmd/benchstat@latest -col /backend hotpath.txt
func BenchmarkHotPathBackend(b *testing.B) {
	for _, backend := range []string{"file_system", "redis"} {
		b.Run("backend="+backend, func(b *testing.B) {
			app := &App{}
			var srv *redistest.Server
			if backend == "redis" {
				srv = redistest.Start(b, redistest.Options{})
				settings, err := (&RedisConfig{URL: srv.URL()}).resolve()
				if err != nil {
					b.Fatal(err)
				}
				app.redis = settings
			}
			h := benchBackendHandler(b, app)
			if srv == nil {
				benchServe(b, h)
				return
			}
			// Redis sees the store's background watch (one read a second)
			// and nothing from requests.
			before := redisCommands(b, srv)
			benchServe(b, h)
			b.StopTimer()
			b.ReportMetric(float64(redisCommands(b, srv)-before)/float64(b.N), "redis-cmds/op")
		})
	}
}

// redisCommands is how many commands srv has processed, counting the INFO
// that asks.
func redisCommands(b *testing.B, srv *redistest.Server) int64 {
	b.Helper()
	info, _ := srv.MustDo("INFO", "stats").(string)
	for _, line := range strings.Split(info, "\r\n") {
		if v, ok := strings.CutPrefix(line, "total_commands_processed:"); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				b.Fatal(err)
			}
			return n
		}
	}
	b.Fatalf("no total_commands_processed in INFO stats")
	return 0
}

// benchBackendHandler is benchHandler with its source on app's backend.
func benchBackendHandler(b *testing.B, app *App) *Handler {
	b.Helper()
	fake := fakerestream.New(fakerestream.Options{Logf: func(string, ...any) {}})
	b.Cleanup(fake.Close)
	storage := &certmagic.FileStorage{Path: b.TempDir()}
	p, err := newPooledSource(tokensource.Config{
		Account: "bench", ClientID: "test-client", ClientSecret: "test-secret",
		TokenURL: fake.TokenURL(), Seed: fake.Seed(),
	}, app.backendFor("bench", nil, guardStorage(storage, zap.NewNop()), zap.NewNop()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = p.Destruct() })
	if _, err := p.Token(context.Background()); err != nil {
		b.Fatal(err)
	}
	if p.cfg.Store == nil != (app.redis == nil) {
		b.Fatalf("the source's store is not the app's backend (Store set: %v)", p.cfg.Store != nil)
	}
	return &Handler{Account: "bench", src: p.Source, replay: true, MaxReplayBody: DefaultMaxReplayBody,
		MaxReplayTotal: DefaultMaxReplayTotal, logger: zap.NewNop()}
}
