package caddymodule_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// Helpers of the tests of `caddy restream-auth` (command_*_test.go), which
// run the built binary.

// cmdAccount is one restream_auth block of a test Caddyfile.
type cmdAccount struct {
	Name         string // "" for the default account (no argument)
	ClientSecret string // default test-secret
	Subroute     bool   // put the handler inside a handle block (a subroute)
	Extra        string // more restream_auth subdirectives
}

// cmdCaddyfile is a Caddyfile with one site per account in front of fake.
// An empty storageDir leaves Caddy's default storage.
func cmdCaddyfile(t *testing.T, storageDir string, fake *fakerestream.Server, accounts ...cmdAccount) string {
	var b strings.Builder
	b.WriteString("{\n\tadmin off\n\tauto_https off\n\tpersist_config off\n")
	if storageDir != "" {
		fmt.Fprintf(&b, "\tstorage file_system %s\n", storageDir)
	}
	b.WriteString("}\n")
	for _, a := range accounts {
		secret := a.ClientSecret
		if secret == "" {
			secret = "test-secret"
		}
		directive := "restream_auth"
		if a.Name != "" {
			directive += " " + a.Name
		}
		extra := ""
		if a.Extra != "" {
			extra = indent(a.Extra)
		}
		block := fmt.Sprintf("%s {\n\tclient_id test-client\n\tclient_secret %s\n\ttoken_url %s\n%s}\nreverse_proxy %s\n",
			directive, secret, fake.TokenURL(), extra, fake.URL())
		if a.Subroute {
			block = "handle /v2/* {\n" + indent(block) + "}\n"
		}
		fmt.Fprintf(&b, "\nhttp://127.0.0.1:%d {\n%s}\n", freePort(t), indent(block))
	}
	return b.String()
}

func indent(s string) string {
	var b strings.Builder
	for line := range strings.SplitSeq(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString("\t" + line + "\n")
	}
	return b.String()
}

// cmdEnv is a command environment: its own HOME and XDG directories, the
// process's other variables except RESTREAM_TEST_SECRET, and extra.
type cmdEnv struct {
	home  string
	extra []string
}

func newCmdEnv(t *testing.T, extra ...string) cmdEnv {
	return cmdEnv{home: t.TempDir(), extra: extra}
}

func (e cmdEnv) vars() []string {
	env := []string{"HOME=" + e.home, "XDG_DATA_HOME=" + e.home, "XDG_CONFIG_HOME=" + e.home}
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "RESTREAM_TEST_SECRET":
			continue
		}
		env = append(env, kv)
	}
	return append(env, e.extra...)
}

type cmdResult struct {
	stdout, stderr string
	code           int
}

// errText is stderr with the JSON escaping of quotes undone: Caddy logs the
// command's error as JSON when stderr is not a terminal.
func (r cmdResult) errText() string { return strings.ReplaceAll(r.stderr, `\"`, `"`) }

func (r cmdResult) String() string {
	return fmt.Sprintf("exit %d\n--- stdout\n%s--- stderr\n%s", r.code, r.stdout, r.stderr)
}

// runCmd runs the built caddy with args, stdin and env.
func runCmd(t *testing.T, env cmdEnv, stdin string, args ...string) cmdResult {
	t.Helper()
	bin, err := caddyBinary()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Dir = env.home
	cmd.Env = env.vars()
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	res := cmdResult{stdout: stdout.String(), stderr: stderr.String()}
	var exitErr *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exitErr):
		res.code = exitErr.ExitCode()
	default:
		t.Fatalf("running caddy %s: %v", strings.Join(args, " "), err)
	}
	return res
}

func writeCmdConfig(t *testing.T, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "Caddyfile")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func loadCmdRecord(t *testing.T, dir, account string) *tokensource.Record {
	t.Helper()
	rec, err := tokensource.LoadRecord(context.Background(), &certmagic.FileStorage{Path: dir}, account)
	if err != nil {
		t.Fatalf("loading the record of %q from %s: %v", account, dir, err)
	}
	return rec
}

func recordBytes(t *testing.T, dir, account string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(tokensource.RecordKey(account))))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	return b
}

// noRestreamAuthUnder fails if anything named restream_auth exists under dir.
func noRestreamAuthUnder(t *testing.T, dir string) {
	t.Helper()
	_ = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err == nil && d.Name() == "restream_auth" {
			t.Errorf("found %s: the command wrote outside the config's storage", path)
		}
		return nil
	})
}
