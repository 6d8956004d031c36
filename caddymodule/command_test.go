package caddymodule_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// Tests of `caddy restream-auth status|seed`, run from the built binary.

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

func TestCommandSeedInstallsChains(t *testing.T) {
	t.Parallel()
	fake := newFake(t, fakerestream.Options{})
	storage := t.TempDir()
	env := newCmdEnv(t)
	cfgPath := writeCmdConfig(t, cmdCaddyfile(t, storage, fake, cmdAccount{}))

	// A fresh seed starts generation 1.
	seed1 := fake.Seed()
	res := runCmd(t, env, seed1+"\n", "restream-auth", "seed", "--config", cfgPath, "--adapter", "caddyfile")
	t.Logf("seed:\n%s", res)
	if res.code != 0 {
		t.Fatalf("seed: %s", res)
	}
	rec := loadCmdRecord(t, storage, "default")
	if rec == nil || rec.Generation != 1 || !slices.Contains(rec.ConsumedSeeds, tokensource.Fingerprint(seed1)) {
		t.Fatalf("stored record after the first seed: %+v", rec)
	}
	if !strings.Contains(res.stdout, "generation      1") || !strings.Contains(res.stdout, rec.Chain) {
		t.Errorf("stdout does not report generation 1 and chain %s:\n%s", rec.Chain, res.stdout)
	}
	if st := fake.Stats(); st.RefreshCalls != 1 || st.InvalidGrant != 0 {
		t.Errorf("fake saw %d refresh calls, %d invalid_grant; want 1, 0", st.RefreshCalls, st.InvalidGrant)
	}
	if !fake.ValidAccessToken(rec.AccessToken) {
		t.Error("the stored access token is not valid at the fake")
	}
	noRestreamAuthUnder(t, env.home)

	// Another seed starts a new chain as the next generation.
	seed2 := fake.Seed()
	res = runCmd(t, env, seed2, "restream-auth", "seed", "--config", cfgPath)
	if res.code != 0 {
		t.Fatalf("second seed: %s", res)
	}
	rec2 := loadCmdRecord(t, storage, "default")
	if rec2.Generation != 2 || rec2.Chain == rec.Chain ||
		!slices.Contains(rec2.ConsumedSeeds, tokensource.Fingerprint(seed1)) ||
		!slices.Contains(rec2.ConsumedSeeds, tokensource.Fingerprint(seed2)) {
		t.Fatalf("stored record after the second seed: generation %d chain %s (first chain %s), %d consumed seeds",
			rec2.Generation, rec2.Chain, rec.Chain, len(rec2.ConsumedSeeds))
	}

	// A spent seed: invalid_grant, and storage is untouched.
	before := recordBytes(t, storage, "default")
	res = runCmd(t, env, seed1+"\n", "restream-auth", "seed", "--config", cfgPath)
	t.Logf("seed with a spent token:\n%s", res)
	if res.code != 1 || !strings.Contains(res.errText(), "invalid_grant") || !strings.Contains(res.errText(), "nothing was stored") {
		t.Fatalf("seed with a spent token: want exit 1 and an invalid_grant message: %s", res)
	}
	if after := recordBytes(t, storage, "default"); !bytes.Equal(before, after) {
		t.Error("a refused seed changed the stored record")
	}
	if st := fake.Stats(); st.RefreshCalls != 3 || st.InvalidGrant != 1 {
		t.Errorf("fake saw %d refresh calls, %d invalid_grant; want 3, 1", st.RefreshCalls, st.InvalidGrant)
	}
	noRestreamAuthUnder(t, env.home)
	mustContainNone(t, "seed output", res.stdout+res.stderr, fake.IssuedTokens()...)
}

func TestCommandStatus(t *testing.T) {
	t.Parallel()
	fake := newFake(t, fakerestream.Options{})
	storage := t.TempDir()
	env := newCmdEnv(t)
	caddyfileText := cmdCaddyfile(t, storage, fake, cmdAccount{}, cmdAccount{Name: "other", Subroute: true})
	cfgPath := writeCmdConfig(t, caddyfileText)
	// The same config as JSON.
	jsonPath := filepath.Join(t.TempDir(), "caddy.json")
	if err := os.WriteFile(jsonPath, adapt(t, caddyfileText), 0o600); err != nil {
		t.Fatal(err)
	}

	if res := runCmd(t, env, fake.Seed(), "restream-auth", "seed", "--config", cfgPath); res.code != 0 {
		t.Fatalf("seed: %s", res)
	}
	rec := loadCmdRecord(t, storage, "default")

	res := runCmd(t, env, "", "restream-auth", "status", "--config", cfgPath)
	t.Logf("status:\n%s", res)
	if res.code != 1 {
		t.Errorf("status with an account without chain: exit %d, want 1", res.code)
	}
	for _, want := range []string{
		`account "default": ok`, `account "other": no_chain`, "generation", rec.Chain,
		rec.Expiry.UTC().Format(time.RFC3339), "consumed seeds", "restream_auth/other/token.json",
		"FileStorage:" + storage,
	} {
		if !strings.Contains(res.stdout, want) {
			t.Errorf("status output lacks %q", want)
		}
	}
	if !strings.Contains(res.errText(), "other: no_chain") {
		t.Errorf("status error does not name the account without chain:\n%s", res.stderr)
	}
	mustContainNone(t, "status output", res.stdout+res.stderr, fake.IssuedTokens()...)

	// A live lease held by someone, marking the stored refresh token (a
	// refresh in flight), and --json from the JSON config.
	storedFP := tokensource.Fingerprint(rec.RefreshToken)
	lease := fmt.Sprintf(`{"owner":"instance-42","nonce":"n1","seq":3,"ttl_ms":60000,"mark":%q,"marked_by":"instance-42","expires_at":%q}`,
		storedFP, time.Now().Add(time.Minute).UTC().Format(time.RFC3339Nano))
	if err := (&certmagic.FileStorage{Path: storage}).Store(context.Background(), tokensource.KeyPrefix("default")+"/lease.json", []byte(lease)); err != nil {
		t.Fatal(err)
	}
	res = runCmd(t, env, "", "restream-auth", "status", "--config", jsonPath, "--json")
	t.Logf("status --json:\n%s", res)
	if res.code != 1 {
		t.Errorf("status --json: exit %d, want 1\n%s", res.code, res)
	}
	mustContainNone(t, "status --json output", res.stdout+res.stderr, fake.IssuedTokens()...)
	var st struct {
		Storage  string `json:"storage"`
		Accounts []struct {
			Account         string    `json:"account"`
			State           string    `json:"state"`
			Generation      uint64    `json:"generation"`
			Chain           string    `json:"chain"`
			AccessExpiresAt time.Time `json:"access_expires_at"`
			AccessExpiresIn *int64    `json:"access_expires_in_seconds"`
			ConsumedSeeds   int       `json:"consumed_seeds"`
			Lease           *struct {
				Owner            string    `json:"owner"`
				ExpiresAt        time.Time `json:"expires_at"`
				TTLMillis        int64     `json:"ttl_ms"`
				Expired          bool      `json:"expired"`
				Marked           bool      `json:"marked"`
				MarkedBy         string    `json:"marked_by"`
				MarksStoredToken bool      `json:"marks_stored_token"`
			} `json:"lease"`
		} `json:"accounts"`
	}
	if err := json.Unmarshal([]byte(res.stdout), &st); err != nil {
		t.Fatalf("status --json is not JSON: %v\n%s", err, res)
	}
	if len(st.Accounts) != 2 {
		t.Fatalf("status --json: %d accounts, want 2:\n%s", len(st.Accounts), res.stdout)
	}
	d, o := st.Accounts[0], st.Accounts[1]
	if d.Account != "default" || d.State != "ok" || d.Generation != 1 || d.Chain != rec.Chain ||
		!d.AccessExpiresAt.Equal(rec.Expiry) || d.AccessExpiresIn == nil || *d.AccessExpiresIn <= 0 || d.ConsumedSeeds != 1 {
		t.Errorf("status --json, account default: %+v", d)
	}
	if l := d.Lease; l == nil || l.Owner != "instance-42" || l.Expired || l.TTLMillis != 60000 || time.Until(l.ExpiresAt) <= 0 ||
		!l.Marked || l.MarkedBy != "instance-42" || !l.MarksStoredToken {
		t.Errorf("status --json does not show the live lease and its mark: %+v", d.Lease)
	}
	if strings.Contains(res.stdout, storedFP) {
		t.Errorf("status --json prints the mark's fingerprint")
	}

	// The same lease as text: holder, expiry and mark.
	res = runCmd(t, env, "", "restream-auth", "status", "--config", cfgPath)
	for _, want := range []string{"held by instance-42 until", "marked", "the stored refresh token, by instance-42", `account "default": ok`} {
		if !strings.Contains(res.stdout, want) {
			t.Errorf("status with a live marked lease lacks %q:\n%s", want, res.stdout)
		}
	}

	// A lease whose holder's timestamp has passed is still shown (others
	// judge it by observation, not by that timestamp).
	lease = fmt.Sprintf(`{"owner":"instance-43","nonce":"n2","ttl_ms":30000,"expires_at":%q}`, time.Now().Add(-time.Minute).UTC().Format(time.RFC3339Nano))
	if err := (&certmagic.FileStorage{Path: storage}).Store(context.Background(), tokensource.LeaseKey("default"), []byte(lease)); err != nil {
		t.Fatal(err)
	}
	res = runCmd(t, env, "", "restream-auth", "status", "--config", cfgPath)
	if !strings.Contains(res.stdout, "held by instance-43, expired") || !strings.Contains(res.stdout, "unchanged for its TTL, 30s") ||
		strings.Contains(res.stdout, "marked") {
		t.Errorf("status with a lease expired by its timestamp:\n%s", res.stdout)
	}

	// A released lease that still marks the stored refresh token: its
	// sender stopped before storing the answer; the token is in doubt.
	lease = fmt.Sprintf(`{"owner":"","mark":%q,"marked_by":"instance-44"}`, storedFP)
	if err := (&certmagic.FileStorage{Path: storage}).Store(context.Background(), tokensource.LeaseKey("default"), []byte(lease)); err != nil {
		t.Fatal(err)
	}
	res = runCmd(t, env, "", "restream-auth", "status", "--config", cfgPath)
	if res.code != 1 || !strings.Contains(res.stdout, `account "default": in_doubt`) || !regexp.MustCompile(`lease\s+free`).MatchString(res.stdout) ||
		!strings.Contains(res.stdout, "the stored refresh token, by instance-44") {
		t.Errorf("status with the stored token marked in a released lease: %s", res)
	}
	// A mark of an earlier token (the lease was released after a rotation
	// the marker did store) is harmless.
	lease = fmt.Sprintf(`{"mark":%q,"marked_by":"instance-45"}`, tokensource.Fingerprint("rt_an_earlier_token"))
	if err := (&certmagic.FileStorage{Path: storage}).Store(context.Background(), tokensource.LeaseKey("default"), []byte(lease)); err != nil {
		t.Fatal(err)
	}
	res = runCmd(t, env, "", "restream-auth", "status", "--config", cfgPath, "--json")
	if !strings.Contains(res.stdout, `"state": "ok"`) || !strings.Contains(res.stdout, `"marked_by": "instance-45"`) || strings.Contains(res.stdout, `"marks_stored_token"`) {
		t.Errorf("status --json with an earlier token marked: %s", res)
	}
	if o.Account != "other" || o.State != "no_chain" || o.Lease != nil {
		t.Errorf("status --json, account other: %+v", o)
	}

	// A record that cannot be read is named.
	if err := os.MkdirAll(filepath.Join(storage, "restream_auth", "other"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(storage, "restream_auth", "other", "token.json"), []byte("{garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	res = runCmd(t, env, "", "restream-auth", "status", "--config", cfgPath)
	if res.code != 1 || !strings.Contains(res.stdout, `account "other": unreadable: corrupt stored record restream_auth/other/token.json`) {
		t.Errorf("status with a corrupt record: %s", res)
	}
	// It is never overwritten, not even by the seed command, which says so
	// before reading (let alone spending) the token.
	calls := fake.Stats().RefreshCalls
	otherSeed := fake.Seed()
	res = runCmd(t, env, otherSeed, "restream-auth", "seed", "--config", cfgPath, "--account", "other")
	if res.code != 1 || !strings.Contains(res.errText(), "corrupt stored record restream_auth/other/token.json") ||
		!strings.Contains(res.errText(), "fix it") || !strings.Contains(res.errText(), "delete it") ||
		strings.Count(res.errText(), `account "other"`) != 1 {
		t.Errorf("seed over a corrupt record: %s", res)
	}
	if got := recordBytes(t, storage, "other"); string(got) != "{garbage" || fake.Stats().RefreshCalls != calls {
		t.Errorf("seed over a corrupt record changed it (%q) or spent the token (%d token calls)", got, fake.Stats().RefreshCalls-calls)
	}
	// Deleted by the operator, the account can be seeded (with the very
	// same token: it was not spent).
	if err := os.Remove(filepath.Join(storage, "restream_auth", "other", "token.json")); err != nil {
		t.Fatal(err)
	}

	// Every account with a chain: exit 0.
	if res := runCmd(t, env, otherSeed, "restream-auth", "seed", "--config", cfgPath, "--account", "other"); res.code != 0 {
		t.Fatalf("seed other: %s", res)
	}
	res = runCmd(t, env, "", "restream-auth", "status", "--config", cfgPath)
	if res.code != 0 || !strings.Contains(res.stdout, `account "other": ok`) {
		t.Errorf("status with both accounts seeded: %s", res)
	}
	mustContainNone(t, "status output", res.stdout+res.stderr, fake.IssuedTokens()...)
	noRestreamAuthUnder(t, env.home)

	// A record holding only history (the fingerprint of a rejected seed) has
	// no chain; one whose refresh token was rejected needs a new seed.
	for _, tc := range []struct {
		rec   tokensource.Record
		state string
	}{
		{tokensource.Record{Version: 1, DeadTokens: []string{tokensource.Fingerprint("rt_rejected")}}, "no_chain"},
		{tokensource.Record{Version: 1, Generation: 4, Chain: "deadbeef", AccessToken: "at_dead", RefreshToken: "rt_dead", TokenType: "Bearer",
			Expiry: time.Now().Add(time.Hour), IssuedAt: time.Now(), DeadTokens: []string{tokensource.Fingerprint("rt_dead")}}, "reauth_required"},
	} {
		b, _ := json.Marshal(tc.rec)
		if err := (&certmagic.FileStorage{Path: storage}).Store(context.Background(), tokensource.RecordKey("other"), b); err != nil {
			t.Fatal(err)
		}
		res = runCmd(t, env, "", "restream-auth", "status", "--config", cfgPath)
		if res.code != 1 || !strings.Contains(res.stdout, `account "other": `+tc.state) || !strings.Contains(res.stdout, "rejected tokens") {
			t.Errorf("status with a record %+v: want exit 1 and %s: %s", tc.rec.DeadTokens, tc.state, res)
		}
		mustContainNone(t, "status output", res.stdout+res.stderr, "at_dead", "rt_dead", "rt_rejected")
	}

	// Expiry as storage sees it: an expired access token still has a chain,
	// an expired refresh token has none.
	for _, tc := range []struct {
		access, refresh time.Duration
		state           string
		code            int
	}{
		{-time.Minute, time.Hour, "access_expired", 0},
		{-2 * time.Hour, -time.Hour, "refresh_expired", 1},
	} {
		now := time.Now()
		rec := tokensource.Record{Version: 1, Generation: 7, Chain: "c0ffee", AccessToken: "at_stale", RefreshToken: "rt_stale",
			TokenType: "Bearer", Expiry: now.Add(tc.access), RefreshExpiry: now.Add(tc.refresh), IssuedAt: now.Add(-3 * time.Hour)}
		b, _ := json.Marshal(rec)
		if err := (&certmagic.FileStorage{Path: storage}).Store(context.Background(), tokensource.RecordKey("other"), b); err != nil {
			t.Fatal(err)
		}
		res = runCmd(t, env, "", "restream-auth", "status", "--config", cfgPath)
		if res.code != tc.code || !strings.Contains(res.stdout, `account "other": `+tc.state) {
			t.Errorf("status with a record expiring in %s / %s: want exit %d and %s: %s", tc.access, tc.refresh, tc.code, tc.state, res)
		}
		mustContainNone(t, "status output", res.stdout+res.stderr, "at_stale", "rt_stale")
	}
}

func TestCommandSeedRefusals(t *testing.T) {
	t.Parallel()
	fake := newFake(t, fakerestream.Options{})
	storage := t.TempDir()
	env := newCmdEnv(t)
	cfgPath := writeCmdConfig(t, cmdCaddyfile(t, storage, fake, cmdAccount{}, cmdAccount{Name: "other"}))
	seed := fake.Seed()
	for _, tc := range []struct {
		name, stdin string
		args        []string
		want        string
	}{
		{"unknown account", seed, []string{"--account", "nope"}, `account "nope" is not configured: the config's restream_auth accounts are "default", "other"`},
		{"empty stdin", " \n\t\n", nil, "no refresh token on stdin"},
		{"two lines", seed + "\n" + seed + "\n", nil, "more than one line"},
		{"inner space", "rt_a rt_b", nil, "contains spaces"},
		{"config on stdin", seed, []string{"--config", "-"}, "--config -"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"restream-auth", "seed", "--config", cfgPath}, tc.args...)
			res := runCmd(t, env, tc.stdin, args...)
			if res.code != 1 || !strings.Contains(res.errText(), tc.want) {
				t.Errorf("want exit 1 and %q: %s", tc.want, res)
			}
			mustContainNone(t, "output", res.stdout+res.stderr, seed)
		})
	}
	if st := fake.Stats(); st.RefreshCalls != 0 {
		t.Errorf("refused seeds reached the token endpoint %d times", st.RefreshCalls)
	}
	if b := recordBytes(t, storage, "default"); b != nil {
		t.Errorf("a refused seed stored a record: %d bytes", len(b))
	}
	// The seed is still good.
	if res := runCmd(t, env, seed, "restream-auth", "seed", "--config", cfgPath); res.code != 0 {
		t.Fatalf("seed after the refusals: %s", res)
	}
}

func TestCommandSeedResolvesEnvPlaceholder(t *testing.T) {
	t.Parallel()
	fake := newFake(t, fakerestream.Options{})
	storage := t.TempDir()
	cfgPath := writeCmdConfig(t, cmdCaddyfile(t, storage, fake, cmdAccount{ClientSecret: "{env.RESTREAM_TEST_SECRET}"}))
	seed := fake.Seed()

	// Unset: a clear error, before the token endpoint is called.
	res := runCmd(t, newCmdEnv(t), seed, "restream-auth", "seed", "--config", cfgPath)
	if res.code != 1 || !strings.Contains(res.errText(), "client_secret") || !strings.Contains(res.errText(), "{env.RESTREAM_TEST_SECRET}") {
		t.Fatalf("seed without RESTREAM_TEST_SECRET: want exit 1 naming client_secret and the placeholder: %s", res)
	}
	if st := fake.Stats(); st.RefreshCalls != 0 {
		t.Fatalf("an unresolved secret reached the token endpoint %d times", st.RefreshCalls)
	}

	// Set: resolved from the environment.
	res = runCmd(t, newCmdEnv(t, "RESTREAM_TEST_SECRET=test-secret"), seed, "restream-auth", "seed", "--config", cfgPath)
	if res.code != 0 {
		t.Fatalf("seed with RESTREAM_TEST_SECRET: %s", res)
	}
	if rec := loadCmdRecord(t, storage, "default"); rec == nil || rec.Generation != 1 {
		t.Fatalf("stored record: %+v", rec)
	}
	mustContainNone(t, "seed output", res.stdout+res.stderr, "test-secret")
}

// TestCommandSeedDefaultStorage: without a storage option, the command uses
// Caddy's default storage, in the data directory of its environment.
func TestCommandSeedDefaultStorage(t *testing.T) {
	t.Parallel()
	fake := newFake(t, fakerestream.Options{})
	env := newCmdEnv(t)
	cfgPath := writeCmdConfig(t, cmdCaddyfile(t, "", fake, cmdAccount{Name: "acct"}))
	res := runCmd(t, env, fake.Seed(), "restream-auth", "seed", "--config", cfgPath, "--account", "acct")
	if res.code != 0 {
		t.Fatalf("seed: %s", res)
	}
	dataDir := filepath.Join(env.home, "caddy") // $XDG_DATA_HOME/caddy
	if rec := loadCmdRecord(t, dataDir, "acct"); rec == nil || rec.Generation != 1 {
		t.Fatalf("no generation 1 record in the default storage %s: %+v\n%s", dataDir, rec, res)
	}
	res = runCmd(t, env, "", "restream-auth", "status", "--config", cfgPath)
	if res.code != 0 || !strings.Contains(res.stdout, "FileStorage:"+dataDir) {
		t.Errorf("status on the default storage: %s", res)
	}
}

// TestCommandSeedRunningInstanceAdopts: a running instance without a chain
// answers 503 no_chain, and serves as soon as the command seeds its storage,
// without a restart or reload.
func TestCommandSeedRunningInstanceAdopts(t *testing.T) {
	t.Parallel()
	fake := newFake(t, fakerestream.Options{})
	cfg := siteConfig{Port: freePort(t), StorageDir: t.TempDir(), Fake: fake}
	p := startProcess(t, cfg.Caddyfile())
	base := "http://127.0.0.1:" + itoa(cfg.Port)
	waitReady(t, base+"/v2/user/profile", p)

	waitFor(t, 10*time.Second, "503 no_chain", func() bool {
		status, body, _ := do(t, http.MethodGet, base+"/v2/user/profile", nil, nil)
		return status == http.StatusServiceUnavailable && strings.Contains(string(body), `"error":"no_chain"`)
	})

	res := runCmd(t, newCmdEnv(t), fake.Seed(), "restream-auth", "seed", "--config", writeCmdConfig(t, cfg.Caddyfile()))
	if res.code != 0 {
		t.Fatalf("seed: %s", res)
	}
	seededAt := time.Now()
	waitFor(t, 15*time.Second, "requests to pass after the seed", func() bool {
		status, _, _ := do(t, http.MethodGet, base+"/v2/user/profile", nil, nil)
		return status == http.StatusOK
	})
	t.Logf("requests pass %s after the seed", time.Since(seededAt).Round(time.Millisecond))
	for range 5 {
		status, body, _ := do(t, http.MethodGet, base+"/v2/user/profile", nil, nil)
		if status != http.StatusOK {
			t.Fatalf("after adoption: %d %s", status, body)
		}
		if e := decodeEcho(t, body); !fake.ValidAccessToken(strings.TrimPrefix(e.Authorization, "Bearer ")) {
			t.Fatalf("upstream saw an invalid token")
		}
	}
	// The instance adopted the stored pair: only the command called the endpoint.
	if st := fake.Stats(); st.RefreshCalls != 1 || st.InvalidGrant != 0 {
		t.Errorf("fake saw %d refresh calls and %d invalid_grant; want 1 and 0", st.RefreshCalls, st.InvalidGrant)
	}
	mustContainNone(t, "caddy output", p.Output(), fake.IssuedTokens()...)
}
