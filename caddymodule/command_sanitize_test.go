package caddymodule_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"regexp"
	"strings"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/caddymodule"
	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

func TestCLIClean(t *testing.T) {
	for in, want := range map[string]string{
		"":                                "",
		"plain text, ünïcödé 日本 ok":       "plain text, ünïcödé 日本 ok",
		"\x1b[2J\x1b[H":                   `\x1b[2J\x1b[H`,
		"a\r\nFORGED":                     `a\r\nFORGED`,
		"tab\there":                       `tab\there`,
		"del\x7f":                         `del\x7f`,
		"c1\u009b31m":                     `c1\u009b31m`,
		"raw c1 byte \x9b":                `raw c1 byte \x9b`,
		"bidi \u202egnp.exe":              `bidi \u202egnp.exe`,
		"isolate \u2066x\u2069":           `isolate \u2066x\u2069`,
		"line sep \u2028 para \u2029":     `line sep \u2028 para \u2029`,
		"bell \a and nul \x00":            `bell \a and nul \x00`,
		"osc \x1b]0;title\x07":            `osc \x1b]0;title\a`,
		"zero width \u200b joiner \u200d": `zero width \u200b joiner \u200d`,
	} {
		got := caddymodule.CLIClean(in)
		if got != want {
			t.Errorf("cliClean(%q) = %q, want %q", in, got, want)
		}
		if bad := strings.IndexFunc(got, func(r rune) bool { return !unicode.IsGraphic(r) }); bad >= 0 || !utf8.ValidString(got) {
			t.Errorf("cliClean(%q) = %q still holds a control character", in, got)
		}
	}
	base := fmt.Errorf("loading x: %w", fs.ErrPermission)
	err := caddymodule.CLICleanError(fmt.Errorf("owner \x1b[2J: %w", base))
	if err.Error() != `owner \x1b[2J: loading x: permission denied` || !errors.Is(err, fs.ErrPermission) {
		t.Errorf("cliCleanError: %q, errors.Is %v", err, errors.Is(err, fs.ErrPermission))
	}
}

// hostile holds what a planted record and lease carry: ANSI escapes (clear
// screen, cursor home, title, colour), newline injection, a C1 control, a
// bidi override.
var hostile = struct{ chain, userID, username, scope, owner, markedBy string }{
	chain:    "\x1b[2J\x1b[Hc0ffee",
	userID:   "1\r\nFORGED: user line",
	username: "eve\u202egnp.exe\u009b31m",
	scope:    "stream.read\x1b]0;pwned\x07",
	owner:    "inst\nFORGED: lease line",
	markedBy: "\x1b[31mred\x1b[0m",
}

// Status shows the chain's Restream user ("unknown" when not known, null in
// JSON), its scope, and prints every value read from storage with control
// characters escaped, in text and in JSON: a planted record cannot clear the
// terminal, forge lines or reorder them.
func TestCommandStatusShowsUserAndEscapesStoredText(t *testing.T) {
	t.Parallel()
	fake := newFake(t, fakerestream.Options{})
	storage := t.TempDir()
	st := &certmagic.FileStorage{Path: storage}
	env := newCmdEnv(t)
	cfgPath := writeCmdConfig(t, cmdCaddyfile(t, storage, fake, cmdAccount{}, cmdAccount{Name: "evil"}, cmdAccount{Name: "nouser"}))

	now := time.Now()
	store := func(account string, rec tokensource.Record) {
		rec.Version, rec.AccessToken, rec.RefreshToken, rec.TokenType = 1, "at_"+account, "rt_"+account, "Bearer"
		rec.Expiry, rec.IssuedAt = now.Add(time.Hour), now
		if rec.Generation == 0 {
			rec.Generation = 1
		}
		b, _ := json.Marshal(rec)
		if err := st.Store(context.Background(), tokensource.RecordKey(account), b); err != nil {
			t.Fatal(err)
		}
	}
	store("default", tokensource.Record{Chain: "a11ce", Scope: []string{"stream.read", "chat.read"}, User: &tokensource.User{ID: "4242", Username: "alice"}})
	store("nouser", tokensource.Record{Chain: "b0b"})
	store("evil", tokensource.Record{Chain: hostile.chain, Scope: []string{hostile.scope}, User: &tokensource.User{ID: hostile.userID, Username: hostile.username}})
	lease, _ := json.Marshal(map[string]any{"owner": hostile.owner, "nonce": "n", "ttl_ms": 60000, "mark": tokensource.Fingerprint("rt_evil"),
		"marked_by": hostile.markedBy, "expires_at": now.Add(time.Minute).UTC()})
	if err := st.Store(context.Background(), tokensource.LeaseKey("evil"), lease); err != nil {
		t.Fatal(err)
	}

	res := runCmd(t, env, "", "restream-auth", "status", "--config", cfgPath)
	t.Logf("status:\n%s", res)
	if res.code != 0 {
		t.Errorf("status: exit %d, want 0", res.code)
	}
	out := res.stdout + res.stderr
	noRawControls(t, "status", out)
	for _, line := range strings.Split(res.stdout, "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "FORGED") {
			t.Errorf("a stored value started a line of its own: %q", line)
		}
	}
	for _, want := range []string{
		`user\s+alice \(id 4242\)\n`, `scope\s+stream\.read chat\.read\n`,
		`account "nouser": ok\n(.*\n)*?\s+user\s+unknown\n`,
		regexp.QuoteMeta(`chain            \x1b[2J\x1b[Hc0ffee`),
		regexp.QuoteMeta(`user             eve\u202egnp.exe\u009b31m (id 1\r\nFORGED: user line)`),
		regexp.QuoteMeta(`scope            stream.read\x1b]0;pwned\a`),
		regexp.QuoteMeta(`held by inst\nFORGED: lease line until`),
		regexp.QuoteMeta(`the stored refresh token, by \x1b[31mred\x1b[0m`),
	} {
		if !regexp.MustCompile(want).MatchString(res.stdout) {
			t.Errorf("status output does not match %s", want)
		}
	}
	mustContainNone(t, "status output", out, "at_default", "rt_default", "at_evil", "rt_evil", "at_nouser", "rt_nouser")

	res = runCmd(t, env, "", "restream-auth", "status", "--config", cfgPath, "--json")
	noRawControls(t, "status --json", res.stdout+res.stderr)
	var js struct {
		Accounts []struct {
			Account string          `json:"account"`
			Chain   string          `json:"chain"`
			Scope   []string        `json:"scope"`
			User    json.RawMessage `json:"user"`
			Lease   *struct {
				Owner    string `json:"owner"`
				MarkedBy string `json:"marked_by"`
			} `json:"lease"`
		} `json:"accounts"`
	}
	if err := json.Unmarshal([]byte(res.stdout), &js); err != nil || len(js.Accounts) != 3 {
		t.Fatalf("status --json: %v\n%s", err, res)
	}
	d, e, n := js.Accounts[0], js.Accounts[1], js.Accounts[2]
	var du map[string]string
	if err := json.Unmarshal(d.User, &du); err != nil || len(du) != 2 || du["id"] != "4242" || du["username"] != "alice" ||
		strings.Join(d.Scope, " ") != "stream.read chat.read" {
		t.Errorf("status --json, default: user %s, scope %q", d.User, d.Scope)
	}
	if n.Account != "nouser" || string(n.User) != "null" {
		t.Errorf("status --json, an account whose user is unknown: %s %s", n.Account, n.User)
	}
	var eu struct{ ID, Username string }
	_ = json.Unmarshal(e.User, &eu)
	for _, v := range []string{e.Chain, eu.ID, eu.Username, strings.Join(e.Scope, ""), e.Lease.Owner, e.Lease.MarkedBy} {
		noRawControls(t, "a decoded JSON value", v)
	}
	if e.Chain != `\x1b[2J\x1b[Hc0ffee` || eu.ID != `1\r\nFORGED: user line` || e.Lease.Owner != `inst\nFORGED: lease line` {
		t.Errorf("status --json, evil: chain %q, user id %q, owner %q", e.Chain, eu.ID, e.Lease.Owner)
	}
}

// noRawControls fails if s holds a control, format or separator character
// or a byte that is not UTF-8, other than the newlines and tabs of the
// output's own layout.
func noRawControls(t *testing.T, where, s string) {
	t.Helper()
	if !utf8.ValidString(s) {
		t.Errorf("%s holds bytes that are not UTF-8: %q", where, s)
	}
	if i := strings.IndexFunc(s, func(r rune) bool { return r != '\n' && r != '\t' && !unicode.IsGraphic(r) }); i >= 0 {
		r, _ := utf8.DecodeRuneInString(s[i:])
		t.Errorf("%s holds the raw control character %U: %q", where, r, s[max(0, i-20):min(len(s), i+20)])
	}
}
