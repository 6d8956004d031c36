package caddymodule

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// Every state `caddy restream-auth status` can print, in text and JSON, is
// a declared tokensource.RecordState, and each one is reachable: the table
// walks every way the command judges a stored record, and its help text
// explains every word.
func TestCLIStatusStatesAreDeclared(t *testing.T) {
	now := time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)
	pair := func(edit func(*tokensource.Record)) *tokensource.Record {
		rec := &tokensource.Record{AccessToken: "at", RefreshToken: "rt", Generation: 2, Chain: "c",
			Expiry: now.Add(time.Hour), RefreshExpiry: now.Add(24 * time.Hour)}
		if edit != nil {
			edit(rec)
		}
		return rec
	}
	marked := func(owner string) *cliLease {
		return &cliLease{Owner: owner, Marked: true, mark: tokensource.Fingerprint("rt")}
	}
	cases := []struct {
		name string
		got  cliStored
		want tokensource.RecordState
	}{
		{"nothing stored", cliStored{}, tokensource.RecordNoChain},
		{"history only", cliStored{rec: &tokensource.Record{ConsumedSeeds: []string{"fp"}}}, tokensource.RecordNoChain},
		{"unreadable", cliStored{err: errors.New("restream_auth/a/token.json: not valid JSON")}, tokensource.RecordUnreadable},
		{"valid", cliStored{rec: pair(nil)}, tokensource.RecordOK},
		{"access expired", cliStored{rec: pair(func(r *tokensource.Record) { r.Expiry = now })}, tokensource.RecordAccessExpired},
		{"refresh expired", cliStored{rec: pair(func(r *tokensource.Record) { r.Expiry, r.RefreshExpiry = now, now })}, tokensource.RecordRefreshExpired},
		{"rejected", cliStored{rec: pair(func(r *tokensource.Record) { r.DeadTokens = []string{tokensource.Fingerprint("rt")} })}, tokensource.RecordReauthRequired},
		{"marked in a released lease", cliStored{rec: pair(nil), lease: marked("")}, tokensource.RecordInDoubt},
		{"marked under a held lease", cliStored{rec: pair(nil), lease: marked("instance-a")}, tokensource.RecordOK},
	}
	help := cliStatusCobra().Long
	seen := map[tokensource.RecordState]bool{}
	for _, c := range cases {
		a := cliAccountFrom("acct", c.got, now)
		if a.State != c.want {
			t.Errorf("%s: state %q, want %q", c.name, a.State, c.want)
		}
		if !slices.Contains(tokensource.RecordStates(), a.State) {
			t.Errorf("%s: undeclared state %q", c.name, a.State)
		}
		seen[a.State] = true
		st := cliStatus{CheckedAt: now, Storage: "test", Accounts: []cliAccountStatus{a}}
		var text bytes.Buffer
		if err := cliWriteStatus(&text, st); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(text.String(), fmt.Sprintf("account %q: %s\n", "acct", a.State)) &&
			!strings.Contains(text.String(), fmt.Sprintf("account %q: %s: ", "acct", a.State)) {
			t.Errorf("%s: the text output does not say %q:\n%s", c.name, a.State, text.String())
		}
		b, err := json.Marshal(st)
		if err != nil || !bytes.Contains(b, []byte(`"state":"`+string(a.State)+`"`)) {
			t.Errorf("%s: the JSON output does not say %q: %s %v", c.name, a.State, b, err)
		}
	}
	for _, s := range tokensource.RecordStates() {
		if !seen[s] {
			t.Errorf("no case reaches %q", s)
		}
		if !strings.Contains(help, "\n  "+string(s)+" ") {
			t.Errorf("the status help does not explain %q", s)
		}
	}
}

// The admin API prints a running source's state and last result as the
// declared words, unchanged.
func TestAdminStatusStatesAreDeclared(t *testing.T) {
	for _, s := range tokensource.States() {
		b, err := json.Marshal(statusJSON(tokensource.Status{Account: "a", State: s, LastResult: tokensource.ResultOK}))
		if err != nil || !bytes.Contains(b, []byte(`"state":"`+string(s)+`"`)) || !bytes.Contains(b, []byte(`"last_result":"ok"`)) {
			t.Errorf("%s: %s %v", s, b, err)
		}
	}
}
