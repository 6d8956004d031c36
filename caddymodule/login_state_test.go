package caddymodule

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

func testLoginState(t *testing.T, secret, account string) *Login {
	t.Helper()
	return testLoginStateFor(t, secret, account, "https://s.example.com/restream/callback")
}

func testLoginStateFor(t *testing.T, secret, account, redirectURI string) *Login {
	t.Helper()
	key, err := loginStateKey(secret, "id", account)
	if err != nil {
		t.Fatal(err)
	}
	return &Login{Account: account, RedirectURI: redirectURI, stateKey: key}
}

// The state cookie: only a cookie signed with the same key, for the same
// account and redirect_uri, before its expiry, gives back its state.
func TestLoginStateCookie(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	l := testLoginState(t, "secret-1", "default")
	const state = "c3RhdGUtZm9yLXRlc3RzLW9ubHktMDEyMzQ1Njc4OWFi"
	exp := now.Add(loginStateTTL).Unix()
	v := l.signState(state, exp)

	if got, gotExp, err := l.verifyState(v, now); err != nil || got != state || gotExp.Unix() != exp {
		t.Fatalf("valid cookie: %q, %v, %v", got, gotExp, err)
	}
	// Another instance with the same client secret accepts it (load balancers).
	if got, _, err := testLoginState(t, "secret-1", "default").verifyState(v, now.Add(9*time.Minute)); err != nil || got != state {
		t.Fatalf("same secret, other instance: %q, %v", got, err)
	}
	if _, _, err := l.verifyState(v, now.Add(loginStateTTL)); err != errStateExpired {
		t.Errorf("expired cookie: %v", err)
	}
	for name, bad := range map[string]string{
		"other secret":    testLoginState(t, "secret-2", "default").signState(state, exp),
		"other account":   testLoginState(t, "secret-1", "other").signState(state, exp),
		"other redirect":  testLoginStateFor(t, "secret-1", "default", "https://other.example.com/restream/callback").signState(state, exp),
		"later expiry":    strings.Replace(v, fmt.Sprint(exp), fmt.Sprint(exp+3600), 1),
		"other state":     strings.Replace(v, state, state[:len(state)-1]+"x", 1),
		"truncated MAC":   v[:len(v)-2],
		"not base64 MAC":  v[:len(v)-2] + "!!",
		"no version":      strings.TrimPrefix(v, "v2."),
		"other version":   "v1" + strings.TrimPrefix(v, "v2"),
		"empty state":     l.signState("", exp),
		"empty":           "",
		"extra part":      v + ".x",
		"non-numeric exp": strings.Replace(v, fmt.Sprint(exp), "soon", 1),
	} {
		if got, _, err := l.verifyState(bad, now); err == nil {
			t.Errorf("%s: accepted, state %q", name, got)
		}
	}
}

// A state is spent once, until it expires; expired ones are forgotten.
func TestStateLedger(t *testing.T) {
	l := &stateLedger{spent: make(map[string]time.Time)}
	now := time.Unix(1_800_000_000, 0)
	exp := now.Add(loginStateTTL)
	if !l.spend("a\x00s1", exp, now) || l.spend("a\x00s1", exp, now.Add(time.Minute)) {
		t.Fatal("a state was spent twice")
	}
	if !l.spend("b\x00s1", exp, now) {
		t.Fatal("the same state of another account is another state")
	}
	l.spend("a\x00s2", exp, exp.Add(time.Second))
	if len(l.spent) != 1 {
		t.Fatalf("expired states are kept: %d", len(l.spent))
	}
}
