package caddymodule_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// Tests of `caddy restream-auth status`, run from the built binary.

// TestCommandStatus walks one storage through the states the status
// command reports, step by step: each step starts from what the one before
// left.
func TestCommandStatus(t *testing.T) {
	t.Parallel()
	r := newStatusRun(t)
	r.textNamesEveryAccount()
	r.showsLiveMarkedLease()
	r.showsLeaseExpiredByItsTimestamp()
	r.releasedMarkOfStoredTokenIsInDoubt()
	r.unreadableRecordIsNeverOverwritten()
	r.rejectedTokensNeedNewSeed()
	r.expiryAsStorageSeesIt()
}

// statusRun is TestCommandStatus's world: a config with two accounts,
// default (seeded by the command) and other (a subroute's, no chain), in
// one file storage.
type statusRun struct {
	t        *testing.T
	fake     *fakerestream.Server
	env      cmdEnv
	storage  string
	cfgPath  string // the config as a Caddyfile
	jsonPath string // the same config as JSON
	rec      *tokensource.Record
}

func newStatusRun(t *testing.T) *statusRun {
	r := &statusRun{t: t, fake: newFake(t, fakerestream.Options{}), storage: t.TempDir(), env: newCmdEnv(t)}
	caddyfileText := cmdCaddyfile(t, r.storage, r.fake, cmdAccount{}, cmdAccount{Name: "other", Subroute: true})
	r.cfgPath = writeCmdConfig(t, caddyfileText)
	r.jsonPath = filepath.Join(t.TempDir(), "caddy.json")
	if err := os.WriteFile(r.jsonPath, adapt(t, caddyfileText), 0o600); err != nil {
		t.Fatal(err)
	}
	if res := runCmd(t, r.env, r.fake.Seed(), "restream-auth", "seed", "--config", r.cfgPath); res.code != 0 {
		t.Fatalf("seed: %s", res)
	}
	r.rec = loadCmdRecord(t, r.storage, "default")
	return r
}

// status runs the status command on the Caddyfile config.
func (r *statusRun) status(args ...string) cmdResult {
	return runCmd(r.t, r.env, "", append([]string{"restream-auth", "status", "--config", r.cfgPath}, args...)...)
}

func (r *statusRun) store(key string, value []byte) {
	r.t.Helper()
	if err := (&certmagic.FileStorage{Path: r.storage}).Store(context.Background(), key, value); err != nil {
		r.t.Fatal(err)
	}
}

func (r *statusRun) textNamesEveryAccount() {
	t, rec := r.t, r.rec
	res := r.status()
	t.Logf("status:\n%s", res)
	if res.code != 1 {
		t.Errorf("status with an account without chain: exit %d, want 1", res.code)
	}
	for _, want := range []string{
		`account "default": ok`, `account "other": no_chain`, "generation", rec.Chain,
		rec.Expiry.UTC().Format(time.RFC3339), "consumed seeds", "restream_auth/other/token.json",
		"FileStorage:" + r.storage,
	} {
		if !strings.Contains(res.stdout, want) {
			t.Errorf("status output lacks %q", want)
		}
	}
	if !strings.Contains(res.errText(), "other: no_chain") {
		t.Errorf("status error does not name the account without chain:\n%s", res.stderr)
	}
	mustContainNone(t, "status output", res.stdout+res.stderr, r.fake.IssuedTokens()...)
}

// A live lease held by someone, marking the stored refresh token (a
// refresh in flight), and --json from the JSON config.
func (r *statusRun) showsLiveMarkedLease() {
	t, rec := r.t, r.rec
	storedFP := tokensource.Fingerprint(rec.RefreshToken)
	lease := fmt.Sprintf(`{"owner":"instance-42","nonce":"n1","seq":3,"ttl_ms":60000,"mark":%q,"marked_by":"instance-42","expires_at":%q}`,
		storedFP, time.Now().Add(time.Minute).UTC().Format(time.RFC3339Nano))
	r.store(tokensource.KeyPrefix("default")+"/lease.json", []byte(lease))
	res := runCmd(t, r.env, "", "restream-auth", "status", "--config", r.jsonPath, "--json")
	t.Logf("status --json:\n%s", res)
	if res.code != 1 {
		t.Errorf("status --json: exit %d, want 1\n%s", res.code, res)
	}
	mustContainNone(t, "status --json output", res.stdout+res.stderr, r.fake.IssuedTokens()...)
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
	if o.Account != "other" || o.State != "no_chain" || o.Lease != nil {
		t.Errorf("status --json, account other: %+v", o)
	}

	// The same lease as text: holder, expiry and mark.
	res = r.status()
	for _, want := range []string{"held by instance-42 until", "marked", "the stored refresh token, by instance-42", `account "default": ok`} {
		if !strings.Contains(res.stdout, want) {
			t.Errorf("status with a live marked lease lacks %q:\n%s", want, res.stdout)
		}
	}
}

// A lease whose holder's timestamp has passed is still shown (others
// judge it by observation, not by that timestamp).
func (r *statusRun) showsLeaseExpiredByItsTimestamp() {
	lease := fmt.Sprintf(`{"owner":"instance-43","nonce":"n2","ttl_ms":30000,"expires_at":%q}`, time.Now().Add(-time.Minute).UTC().Format(time.RFC3339Nano))
	r.store(tokensource.LeaseKey("default"), []byte(lease))
	res := r.status()
	if !strings.Contains(res.stdout, "held by instance-43, expired") || !strings.Contains(res.stdout, "unchanged for its TTL, 30s") ||
		strings.Contains(res.stdout, "marked") {
		r.t.Errorf("status with a lease expired by its timestamp:\n%s", res.stdout)
	}
}

// A released lease that still marks the stored refresh token: its sender
// stopped before storing the answer; the token is in doubt.
func (r *statusRun) releasedMarkOfStoredTokenIsInDoubt() {
	t := r.t
	lease := fmt.Sprintf(`{"owner":"","mark":%q,"marked_by":"instance-44"}`, tokensource.Fingerprint(r.rec.RefreshToken))
	r.store(tokensource.LeaseKey("default"), []byte(lease))
	res := r.status()
	if res.code != 1 || !strings.Contains(res.stdout, `account "default": in_doubt`) || !regexp.MustCompile(`lease\s+free`).MatchString(res.stdout) ||
		!strings.Contains(res.stdout, "the stored refresh token, by instance-44") {
		t.Errorf("status with the stored token marked in a released lease: %s", res)
	}
	// A mark of an earlier token (the lease was released after a rotation
	// the marker did store) is harmless.
	lease = fmt.Sprintf(`{"mark":%q,"marked_by":"instance-45"}`, tokensource.Fingerprint("rt_an_earlier_token"))
	r.store(tokensource.LeaseKey("default"), []byte(lease))
	res = r.status("--json")
	if !strings.Contains(res.stdout, `"state": "ok"`) || !strings.Contains(res.stdout, `"marked_by": "instance-45"`) || strings.Contains(res.stdout, `"marks_stored_token"`) {
		t.Errorf("status --json with an earlier token marked: %s", res)
	}
}

// A record that cannot be read is named, and never overwritten, not even
// by the seed command, which says so before reading (let alone spending)
// the token.
func (r *statusRun) unreadableRecordIsNeverOverwritten() {
	t, fake, storage := r.t, r.fake, r.storage
	if err := os.MkdirAll(filepath.Join(storage, "restream_auth", "other"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(storage, "restream_auth", "other", "token.json"), []byte("{garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	res := r.status()
	if res.code != 1 || !strings.Contains(res.stdout, `account "other": unreadable: corrupt stored record restream_auth/other/token.json`) {
		t.Errorf("status with a corrupt record: %s", res)
	}
	calls := fake.Stats().RefreshCalls
	otherSeed := fake.Seed()
	res = runCmd(t, r.env, otherSeed, "restream-auth", "seed", "--config", r.cfgPath, "--account", "other")
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
	if res := runCmd(t, r.env, otherSeed, "restream-auth", "seed", "--config", r.cfgPath, "--account", "other"); res.code != 0 {
		t.Fatalf("seed other: %s", res)
	}
	res = r.status()
	if res.code != 0 || !strings.Contains(res.stdout, `account "other": ok`) {
		t.Errorf("status with both accounts seeded: %s", res)
	}
	mustContainNone(t, "status output", res.stdout+res.stderr, fake.IssuedTokens()...)
	noRestreamAuthUnder(t, r.env.home)
}

// A record holding only history (the fingerprint of a rejected seed) has
// no chain; one whose refresh token was rejected needs a new seed.
func (r *statusRun) rejectedTokensNeedNewSeed() {
	for _, tc := range []struct {
		rec   tokensource.Record
		state string
	}{
		{tokensource.Record{Version: 1, DeadTokens: []string{tokensource.Fingerprint("rt_rejected")}}, "no_chain"},
		{tokensource.Record{Version: 1, Generation: 4, Chain: "deadbeef", AccessToken: "at_dead", RefreshToken: "rt_dead", TokenType: "Bearer",
			Expiry: time.Now().Add(time.Hour), IssuedAt: time.Now(), DeadTokens: []string{tokensource.Fingerprint("rt_dead")}}, "reauth_required"},
	} {
		b, _ := json.Marshal(tc.rec)
		r.store(tokensource.RecordKey("other"), b)
		res := r.status()
		if res.code != 1 || !strings.Contains(res.stdout, `account "other": `+tc.state) || !strings.Contains(res.stdout, "rejected tokens") {
			r.t.Errorf("status with a record %+v: want exit 1 and %s: %s", tc.rec.DeadTokens, tc.state, res)
		}
		mustContainNone(r.t, "status output", res.stdout+res.stderr, "at_dead", "rt_dead", "rt_rejected")
	}
}

// Expiry as storage sees it: an expired access token still has a chain,
// an expired refresh token has none.
func (r *statusRun) expiryAsStorageSeesIt() {
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
		r.store(tokensource.RecordKey("other"), b)
		res := r.status()
		if res.code != tc.code || !strings.Contains(res.stdout, `account "other": `+tc.state) {
			r.t.Errorf("status with a record expiring in %s / %s: want exit %d and %s: %s", tc.access, tc.refresh, tc.code, tc.state, res)
		}
		mustContainNone(r.t, "status output", res.stdout+res.stderr, "at_stale", "rt_stale")
	}
}
