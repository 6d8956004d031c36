package caddymodule

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

// The restream-auth command finds the config's backend without running it.
func TestAppFromConfig(t *testing.T) {
	for _, tc := range []struct {
		apps   string
		redis  bool
		reason string
	}{
		{`{}`, false, ""},
		{`{"restream_auth":{}}`, false, ""},
		{`{"restream_auth":{"redis":{"url":"redis://127.0.0.1:6379/1","key_prefix":"x/","min_replicas":1}}}`, true, ""},
		{`{"restream_auth":{"redis":{"url":"http://127.0.0.1:6379"}}}`, false, "scheme must be redis or rediss"},
		{`{"restream_auth":{"redis":7}}`, false, "decoding the restream_auth app"},
	} {
		var cfg caddy.Config
		if err := json.Unmarshal([]byte(`{"apps":`+tc.apps+`}`), &cfg); err != nil {
			t.Fatal(err)
		}
		a, err := appFromConfig(&cfg)
		if tc.reason != "" {
			if err == nil || !strings.Contains(err.Error(), tc.reason) {
				t.Errorf("%s: %v, want %q", tc.apps, err, tc.reason)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", tc.apps, err)
		}
		b := a.backendFor("acct", nil, &certmagic.FileStorage{Path: t.TempDir()}, zap.NewNop())
		if got := b.redis != nil; got != tc.redis {
			t.Errorf("%s: on Redis %v, want %v (%s)", tc.apps, got, tc.redis, b.identity)
		}
		if tc.redis && b.identity.String() != "redis 127.0.0.1:6379 db 1, keys x/{acct}/, min_replicas 1" {
			t.Errorf("identity %q", b.identity)
		}
	}
}
