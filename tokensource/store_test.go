package tokensource

// The stored record (store.go): a record that cannot be read is reported,
// never overwritten.

import (
	"context"
	"strings"
	"testing"

	"go.uber.org/zap/zapcore"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
)

func TestCorruptStoredRecord(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	key := RecordKey(testAccount)
	for _, tc := range []struct {
		name, body, want string
	}{
		{"garbage", "\x00\x01not json at all", "corrupt"},
		{"truncated", `{"version":1,"generation":4,"access_token":"at_`, "corrupt"},
		{"empty", "", "corrupt"},
		{"future version", `{"version":99,"generation":4,"access_token":"a","refresh_token":"r","access_expires_at":"2030-01-01T00:00:00Z"}`, "version 99"},
		{"incomplete", `{"version":1,"generation":4,"access_token":"a","access_expires_at":"2030-01-01T00:00:00Z"}`, "incomplete"},
		{"wrong types", `{"version":"1","generation":-4}`, "corrupt"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			env := newTestEnv(t, fakerestream.Options{})
			if err := env.st.Store(ctx, key, []byte(tc.body)); err != nil {
				t.Fatal(err)
			}
			rec, err := LoadRecord(ctx, env.st, testAccount)
			if rec != nil || err == nil || !strings.Contains(err.Error(), key) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("LoadRecord = %v, %v; want an error naming %s and saying %q", rec, err, key, tc.want)
			}

			// A Source without a seed reports it (naming the key), no panic, no call.
			logger, logs := observedLogger(zapcore.ErrorLevel)
			cfg := env.config("", "o")
			cfg.Logger = logger
			s := env.source(t, cfg)
			_, err = s.Token(ctx)
			if err == nil || !strings.Contains(err.Error(), key) {
				t.Fatalf("Token on a corrupt record: %v; want an error naming %s", err, key)
			}
			if st := s.Status(); !strings.Contains(st.LastError, key) {
				t.Fatalf("Status.LastError %q does not name %s", st.LastError, key)
			}
			if logs.FilterMessage("stored token record is unusable").Len() == 0 {
				t.Fatal("the corrupt record was not logged")
			}
			env.wantCalls(t, 0)

			// A fresh seed does not overwrite it (I5: it may be a record this
			// configuration cannot read) and is not spent; once the operator
			// deletes the record, the seed starts the chain.
			seed := env.fake.Seed()
			s2 := env.source(t, env.config(seed, "o2"))
			if _, err := s2.Token(ctx); err == nil || !strings.Contains(err.Error(), "fix or delete") {
				t.Fatalf("a seed over a corrupt record: %v", err)
			}
			env.wantCalls(t, 0)
			s2.Close()
			if err := env.st.Delete(ctx, key); err != nil {
				t.Fatal(err)
			}
			s3 := env.source(t, env.config(seed, "o3"))
			wantGeneration(t, mustToken(t, s3), 1)
			env.wantCalls(t, 1)
		})
	}
}
