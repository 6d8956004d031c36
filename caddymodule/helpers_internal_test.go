package caddymodule

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
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

// caddyfileCase is a directive's Caddyfile block and the value it must
// parse into.
type caddyfileCase[T any] struct {
	name, input string
	want        T
}

// checkCaddyfileCases parses each case's block into a new T and compares
// it with the case's want.
func checkCaddyfileCases[T any, P interface {
	*T
	caddyfile.Unmarshaler
}](t *testing.T, cases []caddyfileCase[T]) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var got T
			if err := P(&got).UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input)); err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got\n%+v\nwant\n%+v", got, tc.want)
			}
		})
	}
}

// caddyfileErrorCase is a Caddyfile block a directive's parser must refuse.
type caddyfileErrorCase struct {
	name, input string
	reason      string // substring of the error
	line        int    // the error ends with ", at Testfile:<line>"
}

// checkCaddyfileErrors parses each case's block into a new T and wants an
// error that gives the reason and ends with the line.
func checkCaddyfileErrors[T any, P interface {
	*T
	caddyfile.Unmarshaler
}](t *testing.T, cases []caddyfileErrorCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var parsed T
			err := P(&parsed).UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
			if err == nil {
				t.Fatalf("no error for\n%s", tc.input)
			}
			msg := err.Error()
			if !strings.Contains(msg, tc.reason) {
				t.Errorf("error %q does not give the reason %q", msg, tc.reason)
			}
			if at := fmt.Sprintf(", at Testfile:%d", tc.line); !strings.HasSuffix(msg, at) {
				t.Errorf("error %q does not end with the line %q", msg, at)
			}
		})
	}
}

// walkJSON calls visit for every object in a decoded JSON value, each
// before the objects inside it.
func walkJSON(v any, visit func(map[string]any)) {
	switch v := v.(type) {
	case map[string]any:
		visit(v)
		for _, c := range v {
			walkJSON(c, visit)
		}
	case []any:
		for _, c := range v {
			walkJSON(c, visit)
		}
	}
}
