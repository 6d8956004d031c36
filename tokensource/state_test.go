package tokensource_test

import (
	"context"
	"go/ast"
	"go/parser"
	"go/token"
	"regexp"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// resultsThatAreNotAttempts are the declared results RefreshResults leaves
// out, as its doc says. A new RefreshResult constant must go into one list
// or the other.
var resultsThatAreNotAttempts = []tokensource.RefreshResult{
	tokensource.ResultInstalled, tokensource.ResultUnauthorizedClient,
	tokensource.ResultNoChain, tokensource.ResultRateLimited, tokensource.ResultInDoubt,
}

func declaredResults() []tokensource.RefreshResult {
	return append(tokensource.RefreshResults(), resultsThatAreNotAttempts...)
}

// Every constant of state.go is in its type's list, and every listed name
// is a constant of that type: a word added to one place and not the other
// (no metric series, or a word the CLI prints that no list declares)
// fails here.
func TestStateListsHoldEveryConstant(t *testing.T) {
	f, err := parser.ParseFile(token.NewFileSet(), "state.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	consts := map[string][]string{} // type name -> constant names
	listed := map[string][]string{} // list function -> names in its literal
	for _, d := range f.Decls {
		switch d := d.(type) {
		case *ast.GenDecl:
			if d.Tok != token.CONST {
				continue
			}
			for _, spec := range d.Specs {
				vs := spec.(*ast.ValueSpec)
				typ := ""
				if id, ok := vs.Type.(*ast.Ident); ok {
					typ = id.Name
				} else if call, ok := vs.Values[0].(*ast.CallExpr); ok {
					typ = call.Fun.(*ast.Ident).Name // a conversion: RecordState(StateOK)
				}
				for _, n := range vs.Names {
					consts[typ] = append(consts[typ], n.Name)
				}
			}
		case *ast.FuncDecl:
			ast.Inspect(d, func(n ast.Node) bool {
				if lit, ok := n.(*ast.CompositeLit); ok {
					for _, el := range lit.Elts {
						listed[d.Name.Name] = append(listed[d.Name.Name], el.(*ast.Ident).Name)
					}
				}
				return true
			})
		}
	}
	var notAttempts []string
	for _, r := range resultsThatAreNotAttempts {
		notAttempts = append(notAttempts, constName(t, consts["RefreshResult"], r))
	}
	for _, c := range []struct {
		typ, list string
		extra     []string
	}{
		{"State", "States", nil},
		{"RecordState", "RecordStates", nil},
		{"RefreshResult", "RefreshResults", notAttempts},
	} {
		want := slices.Sorted(slices.Values(consts[c.typ]))
		got := slices.Sorted(slices.Values(append(slices.Clone(listed[c.list]), c.extra...)))
		if len(want) == 0 || !slices.Equal(got, want) {
			t.Errorf("%s() (and the test's exclusions) list %v; the %s constants are %v", c.list, got, c.typ, want)
		}
	}
}

// constName finds the constant whose value is r, by the naming rule
// ResultXxx for the word xxx.
func constName(t *testing.T, names []string, r tokensource.RefreshResult) string {
	t.Helper()
	want := "Result" + camel(string(r))
	if !slices.Contains(names, want) {
		t.Fatalf("no constant %s for %q among %v", want, r, names)
	}
	return want
}

func camel(word string) string {
	out := []byte{}
	up := true
	for i := 0; i < len(word); i++ {
		switch c := word[i]; {
		case c == '_':
			up = true
		case up:
			out = append(out, c-'a'+'A')
			up = false
		default:
			out = append(out, c)
		}
	}
	return string(out)
}

// The words are distinct within each list, plain lowercase words (they are
// metric labels and JSON values), and a stored record's state is the live
// state's word wherever they mean the same.
func TestStateWords(t *testing.T) {
	word := regexp.MustCompile(`^[a-z]+(_[a-z]+)*$`)
	check := func(list string, words []string) {
		seen := map[string]bool{}
		for _, w := range words {
			if !word.MatchString(w) || seen[w] {
				t.Errorf("%s: %q is not a distinct lowercase word", list, w)
			}
			seen[w] = true
		}
	}
	check("States", toStrings(tokensource.States()))
	check("RecordStates", toStrings(tokensource.RecordStates()))
	check("declared results", toStrings(declaredResults()))
	for _, same := range []struct {
		record tokensource.RecordState
		live   string
	}{
		{tokensource.RecordOK, string(tokensource.StateOK)},
		{tokensource.RecordReauthRequired, string(tokensource.StateReauthRequired)},
		{tokensource.RecordNoChain, string(tokensource.StateNoChain)},
		{tokensource.RecordInDoubt, string(tokensource.ResultInDoubt)},
	} {
		if string(same.record) != same.live {
			t.Errorf("record state %q, live word %q", same.record, same.live)
		}
	}
	for _, s := range tokensource.RecordStates() {
		want := s == tokensource.RecordOK || s == tokensource.RecordAccessExpired
		if s.HasChain() != want {
			t.Errorf("%s.HasChain() = %v", s, !want)
		}
	}
}

func toStrings[W ~string](list []W) []string {
	out := make([]string, len(list))
	for i, w := range list {
		out[i] = string(w)
	}
	return out
}

// Record.StateAt judges a stored record from its content, in the order the
// status command documents: no pair, rejected, refresh expired, access
// expired, ok.
func TestStateAtOfStoredRecord(t *testing.T) {
	now := time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)
	pair := func(edit func(*tokensource.Record)) *tokensource.Record {
		rec := &tokensource.Record{AccessToken: "at", RefreshToken: "rt", Generation: 3, Chain: "c",
			Expiry: now.Add(time.Hour), RefreshExpiry: now.Add(24 * time.Hour)}
		if edit != nil {
			edit(rec)
		}
		return rec
	}
	dead := []string{tokensource.Fingerprint("rt")}
	for _, c := range []struct {
		name string
		rec  *tokensource.Record
		want tokensource.RecordState
	}{
		{"nothing stored", nil, tokensource.RecordNoChain},
		{"history only", &tokensource.Record{ConsumedSeeds: []string{"fp"}, DeadTokens: []string{"fp2"}}, tokensource.RecordNoChain},
		{"valid", pair(nil), tokensource.RecordOK},
		{"refresh expiry unknown", pair(func(r *tokensource.Record) { r.RefreshExpiry = time.Time{} }), tokensource.RecordOK},
		{"access expired", pair(func(r *tokensource.Record) { r.Expiry = now }), tokensource.RecordAccessExpired},
		{"refresh expired", pair(func(r *tokensource.Record) { r.Expiry, r.RefreshExpiry = now.Add(-time.Hour), now }), tokensource.RecordRefreshExpired},
		{"rejected", pair(func(r *tokensource.Record) { r.DeadTokens = dead }), tokensource.RecordReauthRequired},
		{"rejected and expired", pair(func(r *tokensource.Record) { r.DeadTokens, r.RefreshExpiry = dead, now }), tokensource.RecordReauthRequired},
		{"another token rejected", pair(func(r *tokensource.Record) { r.DeadTokens = []string{"other"} }), tokensource.RecordOK},
	} {
		if got := c.rec.StateAt(now); got != c.want {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}

// wordsObserver fails the test on any state or result a Source reports
// that is not declared.
type wordsObserver struct {
	t       *testing.T
	mu      sync.Mutex
	states  map[tokensource.State]bool
	results map[tokensource.RefreshResult]bool
}

func (o *wordsObserver) Refreshed(account string, r tokensource.RefreshResult, _ time.Duration) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.results[r] = true
	if !slices.Contains(declaredResults(), r) {
		o.t.Errorf("%s: undeclared result %q", account, r)
	}
}
func (o *wordsObserver) LockWaited(string, time.Duration)     {}
func (o *wordsObserver) Published(string, *tokensource.Token) {}
func (o *wordsObserver) PersistFailed(string)                 {}
func (o *wordsObserver) StateChanged(account string, s tokensource.State) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.states[s] = true
	if !slices.Contains(tokensource.States(), s) {
		o.t.Errorf("%s: undeclared state %q", account, s)
	}
}

// A Source reports only declared words, to its observer and in its
// Status, through the outcomes an operator sees most: no chain, a working
// seed, a dead seed, refused client credentials and a failing endpoint.
func TestObserverSeesDeclaredStates(t *testing.T) {
	fake := fakerestream.New(fakerestream.Options{})
	t.Cleanup(fake.Close)
	obs := &wordsObserver{t: t, states: map[tokensource.State]bool{}, results: map[tokensource.RefreshResult]bool{}}
	run := func(account, seed, secret string, want tokensource.State) {
		t.Helper()
		src, err := tokensource.New(tokensource.Config{Account: account, ClientID: "test-client", ClientSecret: secret,
			TokenURL: fake.TokenURL(), Seed: seed, Timeout: 5 * time.Second, Observer: obs,
			Storage: &certmagic.FileStorage{Path: t.TempDir()}})
		if err != nil {
			t.Fatal(err)
		}
		defer src.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, _ = src.Token(ctx)
		st := src.Status()
		if st.State != want || !slices.Contains(tokensource.States(), st.State) {
			t.Errorf("%s: state %q (%s), want %q", account, st.State, st.LastError, want)
		}
		if st.LastResult != "" && !slices.Contains(declaredResults(), st.LastResult) {
			t.Errorf("%s: undeclared last result %q", account, st.LastResult)
		}
	}
	run("none", "", "test-secret", tokensource.StateNoChain)
	run("seeded", fake.Seed(), "test-secret", tokensource.StateOK)
	run("dead", "rt_never_issued", "test-secret", tokensource.StateReauthRequired)
	run("refused", fake.Seed(), "wrong-secret", tokensource.StateMisconfigured)
	fake.SetDown(500)
	run("failing", fake.Seed(), "test-secret", tokensource.StateBackoff)
	for _, r := range []tokensource.RefreshResult{tokensource.ResultOK, tokensource.ResultInvalidGrant, tokensource.ResultTransient} {
		if !obs.results[r] {
			t.Errorf("the observer never saw %q (saw %v)", r, obs.results)
		}
	}
}
