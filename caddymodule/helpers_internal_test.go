package caddymodule

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// newReplayHandler is a restream_auth handler with replays on, a started
// source holding a valid token from the fake, and its logs observed.
func newReplayHandler(t *testing.T, maxBody, maxTotal int64) (*Handler, *observer.ObservedLogs) {
	t.Helper()
	fake := fakerestream.New(fakerestream.Options{Logf: func(string, ...any) {}})
	t.Cleanup(fake.Close)
	src, err := tokensource.New(tokensource.Config{
		Account: "replay", ClientID: "test-client", ClientSecret: "test-secret",
		TokenURL: fake.TokenURL(), Seed: fake.Seed(),
		Storage: &certmagic.FileStorage{Path: t.TempDir()},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(src.Close)
	if _, err := src.Token(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := registerMetrics(nil, "replay"); err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	h := &Handler{Account: "replay", src: src, replay: true, MaxReplayBody: maxBody, MaxReplayTotal: maxTotal, logger: zap.New(core)}
	if err := h.provisionReplay(nil); err != nil {
		t.Fatal(err)
	}
	return h, logs
}

func bodyRequest(body io.ReadCloser, length int64) *http.Request {
	r := httptest.NewRequest(http.MethodPost, "http://sidecar/v2/user/channel/1", nil)
	r.Body, r.ContentLength = body, length
	return r
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

// waitHeld waits until the bytes held for replays are want; the handler
// under test runs in another goroutine and offers no signal for it.
func waitHeld(t *testing.T, want int64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for replayBytes.held.Load() != want {
		if time.Now().After(deadline) {
			t.Fatalf("bytes held for replays: %d, want %d", replayBytes.held.Load(), want)
		}
		time.Sleep(time.Millisecond)
	}
}

var okNext = caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
	w.WriteHeader(http.StatusOK)
	return nil
})
