package caddymodule_test

import (
	"encoding/json"
	"strconv"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"

	"github.com/restream-sidecar/caddy-restream-auth/caddymodule"
)

func TestRedisGlobalOptionAdapt(t *testing.T) {
	const secret = "adapt-secret-pw-9f2"
	t.Setenv("RESTREAM_TEST_REDIS_PW", secret)
	cfgJSON := adapt(t, `{
	admin off
	restream_auth {
		redis        redis://app:{env.RESTREAM_TEST_REDIS_PW}@10.0.0.5:6380/3
		key_prefix   sidecar/
		min_replicas 2
	}
}
:8080 {
	restream_auth {
		client_id a
		client_secret b
	}
	reverse_proxy 127.0.0.1:9
}
`)
	if strings.Contains(string(cfgJSON), secret) {
		t.Fatalf("adapt resolved the password placeholder:\n%s", cfgJSON)
	}
	var cfg struct {
		Apps struct {
			RestreamAuth struct {
				Redis caddymodule.RedisConfig `json:"redis"`
			} `json:"restream_auth"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(cfgJSON, &cfg); err != nil {
		t.Fatal(err)
	}
	want := caddymodule.RedisConfig{URL: "redis://app:{env.RESTREAM_TEST_REDIS_PW}@10.0.0.5:6380/3", KeyPrefix: "sidecar/", MinReplicas: 2}
	if got := cfg.Apps.RestreamAuth.Redis; got != want {
		t.Fatalf("restream_auth app %+v, want %+v", got, want)
	}
}

func TestRedisGlobalOptionErrors(t *testing.T) {
	const literal = "literal-secret-pw-77a"
	for _, tc := range []struct {
		name, block, reason string
		line                int
	}{
		{"unknown subdirective", "redis redis://127.0.0.1:6379\nfrobnicate on", "unknown subdirective \"frobnicate\"", 5},
		{"no url", "key_prefix x/", "redis <url> is required", 5},
		{"url without value", "redis", "redis: expected one value", 4},
		{"two urls", "redis redis://a:1 redis://b:2", "expected one value, got more", 4},
		{"bad scheme", "redis http://127.0.0.1:6379", "scheme must be redis or rediss", 4},
		{"bad scheme with placeholder", "redis http://:{env.X}@127.0.0.1:6379", "scheme must be redis or rediss", 4},
		{"bad port, literal password", "redis redis://user:" + literal + "@127.0.0.1:notaport/0", "not a valid URL", 4},
		{"bad database, literal password", "redis redis://user:" + literal + "@127.0.0.1:6379/zero", "invalid database number", 4},
		{"no host", "redis redis://:" + literal + "@/0", "no host", 4},
		{"negative min_replicas", "redis redis://127.0.0.1:6379\nmin_replicas -1", "want a whole number, 0 or more", 5},
		{"word min_replicas", "redis redis://127.0.0.1:6379\nmin_replicas two", "want a whole number, 0 or more", 5},
		{"braces in key_prefix", "redis redis://127.0.0.1:6379\nkey_prefix a{b}/", "without spaces, control characters or braces", 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			text := "{\n\tadmin off\n\trestream_auth {\n" + indentLines(tc.block, "\t\t") + "\n\t}\n}\n:8080 {\n\trespond ok\n}\n"
			_, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(text), map[string]any{"filename": "Caddyfile"})
			if err == nil {
				t.Fatalf("adapt accepted:\n%s", text)
			}
			at := "Caddyfile:" + strconv.Itoa(tc.line)
			if !strings.Contains(err.Error(), tc.reason) || !strings.Contains(err.Error(), at) {
				t.Fatalf("error %q lacks %q or %q", err, tc.reason, at)
			}
			mustContainNone(t, "the error", err.Error(), literal)
		})
	}
	// Given twice.
	text := "{\n\trestream_auth {\n\t\tredis redis://a:1\n\t}\n\trestream_auth {\n\t\tredis redis://b:2\n\t}\n}\n:8080 {\n\trespond ok\n}\n"
	if _, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(text), nil); err == nil || !strings.Contains(err.Error(), "given twice") {
		t.Fatalf("a second restream_auth block: %v", err)
	}
}

func indentLines(block, prefix string) string {
	lines := strings.Split(block, "\n")
	for i := range lines {
		lines[i] = prefix + lines[i]
	}
	return strings.Join(lines, "\n")
}
