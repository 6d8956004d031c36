package caddymodule_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
)

// unsetVar is never set in the environment of the commands run here.
const unsetVar = "UNSET_VAR_XYZ"

// runCaddy runs the built binary with args in a hermetic environment (HOME
// and XDG dirs in dir) and returns its combined output and exit code.
func runCaddy(t *testing.T, dir string, args ...string) (string, int) {
	t.Helper()
	bin, err := caddyBinary()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Dir = dir
	env := []string{"HOME=" + dir, "XDG_DATA_HOME=" + dir, "XDG_CONFIG_HOME=" + dir}
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case unsetVar, "HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME":
			continue
		}
		env = append(env, kv)
	}
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	var exitErr *exec.ExitError
	switch {
	case err == nil:
		return string(out), 0
	case errors.As(err, &exitErr):
		return string(out), exitErr.ExitCode()
	}
	t.Fatalf("running %s %v: %v\n%s", bin, args, err, out)
	return "", -1
}

func writeFile(t *testing.T, path, text string) string {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// validateCaddyfile is a sidecar Caddyfile whose line 9 is extra.
func validateCaddyfile(storage, tokenURL, upstream, extra string) string {
	return fmt.Sprintf(`{
	admin off
	storage file_system %s
}
http://127.0.0.1:9 {
	restream_auth {
		client_id test-client
		client_secret test-secret
		%s
		token_url %s
	}
	reverse_proxy %s
}
`, storage, extra, tokenURL, upstream)
}

// Both commands that check a Caddyfile, as an operator would run them.
func checkCommands(cfgPath string) map[string][]string {
	return map[string][]string{
		"validate":         {"validate", "--config", cfgPath, "--adapter", "caddyfile"},
		"adapt --validate": {"adapt", "--config", cfgPath, "--validate"},
	}
}

func TestValidateBadCaddyfileLine(t *testing.T) {
	skipIfShort(t, "runs the caddy binary twelve times")
	for _, tc := range []struct {
		name, line, reason string
	}{
		{"bad duration", "timeout soon", "time: invalid duration"},
		{"unknown subdirective", "frobnicate on", "unknown subdirective"},
		{"http token_url", "token_url http://example.com/oauth/token", "plain http is allowed only for loopback hosts"},
		{"bad client_auth", "client_auth header", "want basic or body"},
		{"extra value", "query_param a b", "query_param: expected one value, got more"},
		{"replay total below the body", "max_replay_total 512KiB", "max_replay_total (512 KiB) is below max_replay_body (1.0 MiB)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			cfgPath := writeFile(t, filepath.Join(dir, "Caddyfile"),
				validateCaddyfile(filepath.Join(dir, "storage"), "http://127.0.0.1:9/oauth/token", "127.0.0.1:9", tc.line))
			for name, args := range checkCommands(cfgPath) {
				out, code := runCaddy(t, dir, args...)
				if code == 0 {
					t.Errorf("caddy %s accepted a bad line %q:\n%s", name, tc.line, out)
					continue
				}
				// Caddy prints "…: <reason>, at <file>:<line>".
				if at := cfgPath + ":9"; !strings.Contains(out, at) || !strings.Contains(out, tc.reason) {
					t.Errorf("caddy %s output lacks %q or the reason %q:\n%s", name, at, tc.reason, out)
				}
			}
		})
	}
}

func TestValidateNeverCallsTokenEndpoint(t *testing.T) {
	fake := fakerestream.New(fakerestream.Options{Logf: t.Logf})
	t.Cleanup(fake.Close)
	dir := t.TempDir()
	storage := filepath.Join(dir, "storage")
	cfgPath := writeFile(t, filepath.Join(dir, "Caddyfile"),
		validateCaddyfile(storage, fake.TokenURL(), strings.TrimPrefix(fake.URL(), "http://"), "refresh_token "+fake.Seed()))

	for name, args := range checkCommands(cfgPath) {
		out, code := runCaddy(t, dir, args...)
		if code != 0 {
			t.Fatalf("caddy %s failed (exit %d):\n%s", name, code, out)
		}
		if name == "validate" && !strings.Contains(out, "Valid configuration") {
			t.Errorf("caddy validate did not say the config is valid:\n%s", out)
		}
	}
	if st := fake.Stats(); st != (fakerestream.Stats{}) {
		t.Fatalf("provisioning touched the fake: %+v", st)
	}
	// Nor was anything of the account written to storage.
	if _, err := os.Stat(filepath.Join(storage, "restream_auth")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("validate wrote restream_auth data to storage (stat: %v)", err)
	}
}

func TestValidateProvisionErrors(t *testing.T) {
	skipIfShort(t, "runs the caddy binary twenty times")
	fake := fakerestream.New(fakerestream.Options{Logf: t.Logf})
	t.Cleanup(fake.Close)
	upstream := strings.TrimPrefix(fake.URL(), "http://")

	// A seed file someone appended a second token to, and one with a stray
	// word: sent as is, each would be an invalid_grant at Restream.
	twoTokens := writeFile(t, filepath.Join(t.TempDir(), "seed"), "rt_first\nrt_second\n")
	strayWord := writeFile(t, filepath.Join(t.TempDir(), "seed"), "refresh_token: rt_first\n")

	// Caddyfiles that adapt fine but fail at provisioning.
	for _, tc := range []struct {
		name, extra, reason string
	}{
		{"client_secret from an unset env var", "client_secret {env." + unsetVar + "}",
			"client_secret: evaluated placeholder {env." + unsetVar + "} is empty"},
		{"refresh_token from a missing file", "refresh_token {file./nonexistent/restream/seed}",
			"refresh_token: evaluated placeholder {file./nonexistent/restream/seed} is empty"},
		{"refresh_token file with two tokens", "refresh_token {file." + twoTokens + "}",
			"refresh_token holds more than one line: expected one refresh token"},
		{"refresh_token file with a stray word", "refresh_token {file." + strayWord + "}",
			"refresh_token contains spaces or control characters"},
		{"client_secret too short to redact", "client_secret abc",
			"client_secret is 3 bytes, shorter than the 4 a secret must have to be kept out of logs"},
		{"client_id from an unknown placeholder", "client_id {restream.no_such_thing}",
			"client_id: unrecognized placeholder {restream.no_such_thing}"},
		{"encryption key not base64", "encryption_key not-base64!",
			"encryption_key: encryption key is not standard base64"},
		{"encryption key too short", "encryption_key AAAAAAAAAAAAAAAAAAAAAA==",
			"encryption_key: encryption key has 16 bytes, want 32 (AES-256)"},
		{"previous key without a key", "encryption_key_previous AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
			"encryption_key_previous needs encryption_key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			cfgPath := writeFile(t, filepath.Join(dir, "Caddyfile"),
				validateCaddyfile(filepath.Join(dir, "storage"), fake.TokenURL(), upstream, tc.extra))
			for name, args := range checkCommands(cfgPath) {
				out, code := runCaddy(t, dir, args...)
				if code == 0 {
					t.Errorf("caddy %s accepted %q:\n%s", name, tc.extra, out)
					continue
				}
				if !strings.Contains(out, "provision http.handlers.restream_auth: "+tc.reason) {
					t.Errorf("caddy %s output lacks the reason %q:\n%s", name, tc.reason, out)
				}
			}
		})
	}

	// JSON configs reach Provision without the Caddyfile's checks.
	base := string(adapt(t, validateCaddyfile(t.TempDir(), fake.TokenURL(), upstream, "timeout 10s")))
	for _, tc := range []struct {
		name, from, to, reason string
	}{
		{"http token_url to a remote host", `"token_url":"` + fake.TokenURL() + `"`, `"token_url":"http://example.com"`,
			`token_url \"http://example.com\": plain http is allowed only for loopback hosts; use https`},
		{"bad account", `"handler":"restream_auth"`, `"handler":"restream_auth","account":"../etc"`,
			`account \"../etc\": use 1-64 letters`},
		{"bad client_auth", `"handler":"restream_auth"`, `"handler":"restream_auth","client_auth":"header"`,
			`client_auth \"header\": want basic or body`},
		{"negative timeout", `"timeout":10000000000`, `"timeout":-1`,
			"refresh_ahead, timeout and max_replay_body must not be negative"},
		{"negative max_replay_total", `"handler":"restream_auth"`, `"handler":"restream_auth","max_replay_total":-1`,
			"max_replay_total must not be negative"},
		{"max_replay_total below max_replay_body", `"handler":"restream_auth"`, `"handler":"restream_auth","max_replay_total":1024`,
			"max_replay_total (1.0 KiB) is below max_replay_body (1.0 MiB): no body that large could be kept"},
		{"max_replay_body over 1GiB", `"handler":"restream_auth"`, `"handler":"restream_auth","max_replay_body":2147483648,"max_replay_total":4294967296`,
			"max_replay_body 2147483648: at most 1GiB"},
		{"max_replay_total over 1TiB", `"handler":"restream_auth"`, `"handler":"restream_auth","max_replay_total":2199023255552`,
			"max_replay_total 2199023255552: at most 1TiB"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if !strings.Contains(base, tc.from) {
				t.Fatalf("adapted config lacks %s:\n%s", tc.from, base)
			}
			dir := t.TempDir()
			cfg := strings.Replace(base, tc.from, tc.to, 1)
			cfgPath := writeFile(t, filepath.Join(dir, "caddy.json"), cfg)
			out, code := runCaddy(t, dir, "validate", "--config", cfgPath)
			if code == 0 {
				t.Fatalf("caddy validate accepted %s:\n%s", tc.to, out)
			}
			if !strings.Contains(out, "provision http.handlers.restream_auth: "+tc.reason) {
				t.Errorf("caddy validate output lacks the reason %q:\n%s", tc.reason, out)
			}
		})
	}
	if st := fake.Stats(); st != (fakerestream.Stats{}) {
		t.Fatalf("failed provisioning touched the fake: %+v", st)
	}
}

// client_secret from {file./path} and refresh_token from {env.X} are
// resolved at provisioning: the adapted config holds only the placeholders,
// yet the sidecar authenticates with the file's content and exchanges the
// seed from the environment.
func TestPlaceholderSecretsResolveAtProvision(t *testing.T) {
	var b [12]byte
	_, _ = rand.Read(b[:])
	secret := "file-secret-" + hex.EncodeToString(b[:])
	fake := fakerestream.New(fakerestream.Options{ClientSecret: secret, Logf: t.Logf})
	t.Cleanup(fake.Close)

	dir := t.TempDir()
	// A trailing newline, as `echo >file` writes it.
	secretFile := writeFile(t, filepath.Join(dir, "client_secret"), secret+"\n")
	seed := fake.Seed() // each call starts a new chain
	t.Setenv("RESTREAM_PLACEHOLDER_TEST_SEED", seed)

	port := testproc.Port(t)
	text := fmt.Sprintf(`{
	admin off
	storage file_system %s
	auto_https off
	persist_config off
}
http://127.0.0.1:%d {
	restream_auth {
		client_id test-client
		client_secret {file.%s}
		refresh_token {env.RESTREAM_PLACEHOLDER_TEST_SEED}
		token_url %s
	}
	reverse_proxy %s
}
`, filepath.Join(dir, "storage"), port, secretFile, fake.TokenURL(), fake.URL())

	cfgJSON := string(adapt(t, text))
	mustContainNone(t, "adapted config", cfgJSON, secret, seed)
	if !strings.Contains(cfgJSON, "{file."+secretFile+"}") || !strings.Contains(cfgJSON, "{env.RESTREAM_PLACEHOLDER_TEST_SEED}") {
		t.Fatalf("adapted config lacks the placeholders:\n%s", cfgJSON)
	}

	runInProcess(t, text)
	status, body, _ := do(t, http.MethodGet, "http://127.0.0.1:"+itoa(port)+"/v2/user/profile", nil, nil)
	if status != http.StatusOK {
		t.Fatalf("status %d: %s", status, body)
	}
	e := decodeEcho(t, body)
	if !fake.ValidAccessToken(strings.TrimPrefix(e.Authorization, "Bearer ")) {
		t.Fatalf("upstream saw Authorization %q, want a valid fake token", e.Authorization)
	}
	if st := fake.Stats(); st.RefreshOK != 1 || st.InvalidClient != 0 || st.InvalidGrant != 0 {
		t.Fatalf("want one successful exchange of the env seed with the file's secret, got %+v", st)
	}
}
