package caddymodule

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

func TestCaddyfileFullBlock(t *testing.T) {
	checkCaddyfileCases(t, []caddyfileCase[Handler]{
		{
			name: "every subdirective",
			input: `restream_auth main-acct {
	client_id my-client
	client_secret {file./run/secrets/restream_secret}
	refresh_token {env.RESTREAM_SEED}
	token_url https://api.restream.io/oauth/token
	client_auth body
	refresh_ahead 2m
	replay_401 off
	max_replay_body 512KiB
	max_replay_total 64MiB
	query_param accessToken
	timeout 15s
}`,
			want: Handler{
				Account:        "main-acct",
				ClientID:       "my-client",
				ClientSecret:   "{file./run/secrets/restream_secret}",
				RefreshToken:   "{env.RESTREAM_SEED}",
				TokenURL:       "https://api.restream.io/oauth/token",
				ClientAuth:     "body",
				RefreshAhead:   caddy.Duration(2 * time.Minute),
				Replay401:      ptr(false),
				MaxReplayBody:  512 << 10,
				MaxReplayTotal: 64 << 20,
				QueryParam:     "accessToken",
				Timeout:        caddy.Duration(15 * time.Second),
			},
		},
		{
			// The two sizes are checked together at the end of the block,
			// so their order does not matter.
			name: "replay sizes below the defaults, total first",
			input: `restream_auth {
	client_id id
	client_secret secret
	max_replay_total 512KiB
	max_replay_body 256KiB
}`,
			want: Handler{ClientID: "id", ClientSecret: "secret", MaxReplayTotal: 512 << 10, MaxReplayBody: 256 << 10},
		},
		{
			name: "replay total equal to the body, above the default total",
			input: `restream_auth {
	client_id id
	client_secret secret
	max_replay_body 1GiB
	max_replay_total 1GiB
}`,
			want: Handler{ClientID: "id", ClientSecret: "secret", MaxReplayTotal: 1 << 30, MaxReplayBody: 1 << 30},
		},
		{
			name: "minimal, no account",
			input: `restream_auth {
	client_id id
	client_secret secret
}`,
			want: Handler{ClientID: "id", ClientSecret: "secret"},
		},
		{
			name: "alternative spellings and units",
			input: `restream_auth acct_2.x-y {
	client_id id
	client_secret secret
	client_auth basic
	replay_401 on
	refresh_ahead 1d
	max_replay_body 1MB
	max_replay_total 64MB
	timeout 500ms
	token_url http://127.0.0.1:8080/oauth/token
}`,
			want: Handler{
				Account: "acct_2.x-y", ClientID: "id", ClientSecret: "secret", ClientAuth: "basic",
				Replay401: ptr(true), RefreshAhead: caddy.Duration(24 * time.Hour), MaxReplayBody: 1000 * 1000,
				MaxReplayTotal: 64 * 1000 * 1000,
				Timeout:        caddy.Duration(500 * time.Millisecond), TokenURL: "http://127.0.0.1:8080/oauth/token",
			},
		},
		{
			name: "loopback http token_url forms",
			input: `restream_auth {
	client_id id
	client_secret secret
	token_url http://[::1]:9/oauth/token
}`,
			want: Handler{ClientID: "id", ClientSecret: "secret", TokenURL: "http://[::1]:9/oauth/token"},
		},
	})
}

func TestCaddyfileErrors(t *testing.T) {
	// block wraps subdirective lines into a valid block; the first of them
	// is on line 4.
	block := func(lines ...string) string {
		return "restream_auth {\n\tclient_id id\n\tclient_secret secret\n\t" + strings.Join(lines, "\n\t") + "\n}"
	}
	checkCaddyfileErrors[Handler](t, []caddyfileErrorCase{
		{"unknown subdirective", block("client_idd x"), `unknown subdirective "client_idd"`, 4},
		{"missing value", block("timeout 1s", "client_id"), "client_id: expected one value", 5},
		{"missing value before closing brace", block("query_param"), "query_param: expected one value", 4},
		{"extra value", block("refresh_token a b"), "refresh_token: expected one value, got more", 4},
		{"bad duration", block("refresh_ahead soon"), `refresh_ahead "soon": `, 4},
		{"duration without unit", block("timeout 10"), `timeout "10": `, 4},
		{"zero duration", block("timeout 0s"), `timeout "0s": must be positive`, 4},
		{"negative duration", block("refresh_ahead -1m"), `refresh_ahead "-1m": must be positive`, 4},
		{"bad size", block("max_replay_body lots"), `max_replay_body "lots": not a size`, 4},
		{"zero size", block("max_replay_body 0"), `max_replay_body "0": must be positive`, 4},
		{"negative size", block("max_replay_body -1KiB"), `max_replay_body "-1KiB": not a size`, 4},
		{"size too large", block("max_replay_body 2GiB"), `max_replay_body "2GiB": at most 1GiB`, 4},
		{"bad total size", block("max_replay_total lots"), `max_replay_total "lots": not a size`, 4},
		{"zero total size", block("max_replay_total 0"), `max_replay_total "0": must be positive`, 4},
		{"negative total size", block("max_replay_total -64MiB"), `max_replay_total "-64MiB": not a size`, 4},
		{"total size too large", block("max_replay_total 2TiB"), `max_replay_total "2TiB": at most 1TiB`, 4},
		{"total below the body", block("max_replay_body 2MiB", "timeout 1s", "max_replay_total 1MiB"),
			"max_replay_total (1.0 MiB) is below max_replay_body (2.0 MiB)", 6},
		{"total below the body, body last", block("max_replay_total 1MiB", "max_replay_body 2MiB", "timeout 1s"),
			"max_replay_total (1.0 MiB) is below max_replay_body (2.0 MiB)", 5},
		{"total below the default body", block("max_replay_total 512KiB"),
			"max_replay_total (512 KiB) is below max_replay_body (1.0 MiB): no body that large could be kept", 4},
		{"body above the default total", block("max_replay_body 128MiB"),
			"max_replay_total (64 MiB) is below max_replay_body (128 MiB): no body that large could be kept; raise max_replay_total", 4},
		{"bad client_auth", block("client_auth header"), `client_auth "header": want basic or body`, 4},
		{"bad replay_401", block("replay_401 maybe"), `replay_401 "maybe": want on or off`, 4},
		{"token_url http non-loopback", block("token_url http://api.restream.io/oauth/token"),
			`token_url "http://api.restream.io/oauth/token": plain http is allowed only for loopback hosts`, 4},
		{"token_url http loopback-looking name", block("token_url http://localhost.example.com/oauth/token"),
			"plain http is allowed only for loopback hosts", 4},
		{"token_url not absolute", block("token_url /oauth/token"), `token_url "/oauth/token" is not an absolute URL`, 4},
		{"token_url placeholder", block("token_url {env.TOKEN_URL}"), `token_url "{env.TOKEN_URL}" is not an absolute URL`, 4},
		{"token_url bad scheme", block("token_url ftp://api.restream.io/oauth/token"), "scheme must be https", 4},
		{"token_url credentials", block("token_url https://u:p@api.restream.io/oauth/token"), "token_url must not contain credentials", 4},
		{"missing client_id", "restream_auth {\n\tclient_secret s\n\ttimeout 1s\n}", "client_id is required", 4},
		{"empty client_id", "restream_auth {\n\tclient_id \"\"\n\tclient_secret s\n}", "client_id: empty value", 2},
		{"missing client_secret", "restream_auth {\n\tclient_id id\n}", "client_secret is required", 3},
		{"no block at all", "restream_auth acct", "client_id is required", 1},
		{"bad account name", "restream_auth ../etc {\n\tclient_id id\n\tclient_secret s\n}", `account "../etc": use 1-64 letters`, 1},
		{"account too long", "restream_auth " + strings.Repeat("a", 65) + " {\n\tclient_id id\n\tclient_secret s\n}", "use 1-64 letters", 1},
		{"two account args", "restream_auth one two {\n\tclient_id id\n\tclient_secret s\n}", "wrong argument count or unexpected line ending after 'two'", 1},
	})
}

func ptr[T any](v T) *T { return &v }

// Golden files under testdata/adapt: a Caddyfile, a line of dashes, and the
// JSON it must adapt to (as Caddy's own caddyfile_adapt/*.caddyfiletest).
// Set UPDATE_GOLDEN=1 to rewrite the JSON halves.
const goldenSep = "\n----------\n"

func TestAdaptGolden(t *testing.T) {
	// If adapting resolved placeholders, these values would appear in the JSON.
	t.Setenv("RESTREAM_CLIENT_ID", "env-client-id-must-not-appear")
	t.Setenv("RESTREAM_REFRESH_TOKEN", "env-seed-must-not-appear")
	fileSecret, err := os.ReadFile(filepath.Join("testdata", "adapt", "client_secret.txt"))
	if err != nil {
		t.Fatal(err)
	}
	leaks := []string{"env-client-id-must-not-appear", "env-seed-must-not-appear", strings.TrimSpace(string(fileSecret))}

	files, err := filepath.Glob(filepath.Join("testdata", "adapt", "*.caddyfiletest"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no golden files: %v", err)
	}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			raw, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			input, want, ok := strings.Cut(string(raw), goldenSep)
			if !ok {
				t.Fatalf("%s: no %q separator", file, strings.TrimSpace(goldenSep))
			}
			out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(input+"\n"), map[string]any{"filename": "Caddyfile"})
			if err != nil {
				t.Fatalf("adapting: %v", err)
			}
			for _, w := range warnings {
				t.Errorf("adapt warning: %s", w)
			}
			var pretty bytes.Buffer
			if err := json.Indent(&pretty, out, "", "\t"); err != nil {
				t.Fatal(err)
			}
			got := pretty.String() + "\n"
			if os.Getenv("UPDATE_GOLDEN") == "1" {
				if err := os.WriteFile(file, []byte(input+goldenSep+got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			if normalizeJSON(t, got) != normalizeJSON(t, want) {
				t.Errorf("adapted JSON differs from %s\ngot:\n%s", file, got)
			}
			mustNotContain(t, got, leaks...)
			checkRestreamAuthFirst(t, out)
		})
	}
}

func normalizeJSON(t *testing.T, s string) string {
	t.Helper()
	var v any
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatalf("bad JSON: %v\n%s", err, s)
	}
	b, _ := json.MarshalIndent(v, "", "\t")
	return string(b)
}

func mustNotContain(t *testing.T, text string, secrets ...string) {
	t.Helper()
	for _, s := range secrets {
		if s != "" && strings.Contains(text, s) {
			t.Errorf("adapted JSON contains the resolved value %q: secrets were baked into the config", s)
		}
	}
}

// checkRestreamAuthFirst walks every handler list in the config and requires
// restream_auth to come before reverse_proxy wherever both appear, and the
// restream_auth placeholders to stay unresolved.
func checkRestreamAuthFirst(t *testing.T, cfgJSON []byte) {
	t.Helper()
	var cfg any
	if err := json.Unmarshal(cfgJSON, &cfg); err != nil {
		t.Fatal(err)
	}
	var found int
	walkJSON(cfg, func(route map[string]any) {
		handle, ok := route["handle"].([]any)
		if !ok {
			return
		}
		auth, proxy := -1, -1
		for i, h := range handle {
			m, _ := h.(map[string]any)
			switch m["handler"] {
			case "restream_auth":
				found++
				if auth < 0 {
					auth = i
				}
				for _, k := range []string{"client_secret", "refresh_token"} {
					if s, _ := m[k].(string); s != "" && !strings.HasPrefix(s, "{") {
						t.Errorf("restream_auth %s = %q in the adapted config, want an unresolved placeholder", k, s)
					}
				}
			case "reverse_proxy":
				if proxy < 0 {
					proxy = i
				}
			}
		}
		if auth >= 0 && proxy >= 0 && auth > proxy {
			t.Errorf("reverse_proxy (handler %d) runs before restream_auth (handler %d)", proxy, auth)
		}
	})
	if found == 0 {
		t.Errorf("no restream_auth handler in the adapted config")
	}
}
