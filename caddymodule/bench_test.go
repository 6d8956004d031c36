package caddymodule

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"testing"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// discardWriter is a ResponseWriter that keeps one header map, as a server's
// would, so the benchmarks measure the handlers and not the test scaffolding.
type discardWriter struct{ h http.Header }

func (w *discardWriter) Header() http.Header         { return w.h }
func (w *discardWriter) Write(b []byte) (int, error) { return len(b), nil }
func (w *discardWriter) WriteHeader(int)             {}

// constantHeader is the baseline: what a handler that sets a fixed
// Authorization header costs (the floor restream_auth cannot beat).
type constantHeader struct{ value string }

func (c constantHeader) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	r.Header.Set("Authorization", c.value)
	return next.ServeHTTP(w, r)
}

// benchHandler returns a restream_auth handler with a started source holding
// a valid token from the fake.
func benchHandler(b *testing.B, replay bool) *Handler {
	b.Helper()
	fake := fakerestream.New(fakerestream.Options{Logf: func(string, ...any) {}})
	b.Cleanup(fake.Close)
	src, err := tokensource.New(tokensource.Config{
		Account: "bench", ClientID: "test-client", ClientSecret: "test-secret",
		TokenURL: fake.TokenURL(), Seed: fake.Seed(),
		Storage: &certmagic.FileStorage{Path: b.TempDir()},
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(src.Close)
	if _, err := src.Token(context.Background()); err != nil {
		b.Fatal(err)
	}
	return &Handler{Account: "bench", src: src, replay: replay, MaxReplayBody: DefaultMaxReplayBody,
		MaxReplayTotal: DefaultMaxReplayTotal, logger: zap.NewNop()}
}

func benchServe(b *testing.B, h caddyhttp.MiddlewareHandler) {
	req, _ := http.NewRequest(http.MethodGet, "http://sidecar/v2/user/profile", nil)
	req.Header.Set("Authorization", "Bearer from-client")
	w := &discardWriter{h: http.Header{"Server": {"Caddy"}}}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if err := h.ServeHTTP(w, req, okNext); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkHotPath compares the handler with a valid token against a
// handler that sets a constant header.
//
//	go test -run '^$' -bench HotPath -benchmem ./caddymodule/
func BenchmarkHotPath(b *testing.B) {
	b.Run("constant_header", func(b *testing.B) {
		benchServe(b, constantHeader{"Bearer at_0123456789abcdef0123456789abcdef01234567"})
	})
	b.Run("restream_auth_replay_off", func(b *testing.B) { benchServe(b, benchHandler(b, false)) })
	b.Run("restream_auth", func(b *testing.B) { benchServe(b, benchHandler(b, true)) })
}

// BenchmarkTokenParallel measures token lookup under parallel load.
func BenchmarkTokenParallel(b *testing.B) {
	h := benchHandler(b, true)
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := h.src.Token(ctx); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// rewindBody is a request body the benchmark rewinds between iterations
// without allocating.
type rewindBody struct {
	data []byte
	off  int
}

func (b *rewindBody) Read(p []byte) (int, error) {
	if b.off == len(b.data) {
		return 0, io.EOF
	}
	n := copy(p, b.data[b.off:])
	b.off += n
	return n, nil
}

func (b *rewindBody) Close() error { return nil }

// BenchmarkReplayBody measures a request whose body is kept for a replay
// (the default), by body size.
//
//	go test -run '^$' -bench ReplayBody -benchmem ./caddymodule/
func BenchmarkReplayBody(b *testing.B) {
	for _, size := range []int{1 << 10, 64 << 10} {
		b.Run(fmt.Sprintf("%dKiB", size>>10), func(b *testing.B) {
			h := benchHandler(b, true)
			body := &rewindBody{data: bytes.Repeat([]byte("x"), size)}
			req, _ := http.NewRequest(http.MethodPost, "http://sidecar/v2/user/channel/1", nil)
			req.ContentLength = int64(size)
			w := &discardWriter{h: http.Header{"Server": {"Caddy"}}}
			// next reads and closes the body, as reverse_proxy's transport does.
			next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				if _, err := io.Copy(io.Discard, r.Body); err != nil {
					return err
				}
				if err := r.Body.Close(); err != nil {
					return err
				}
				w.WriteHeader(http.StatusOK)
				return nil
			})
			b.SetBytes(int64(size))
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				body.off = 0
				req.Body = body
				if err := h.ServeHTTP(w, req, next); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
