package caddymodule

import (
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The state cookie: "v2.<state>.<expiry unix>.<HMAC-SHA256>", the MAC over
// the account, the redirect_uri, the state and the expiry, with a key
// derived from the client secret (see Provision). Binding the redirect_uri
// keeps a state minted by one login (another route or host of the same
// account) from completing another's flow.
var (
	errStateInvalid = errors.New("invalid state cookie")
	errStateExpired = errors.New("state cookie expired")
)

// loginStateKey derives the cookie key from the client secret with HKDF and a
// fixed label: every instance with the same application credentials derives
// the same key, and the key reveals nothing about the secret.
func loginStateKey(clientSecret, clientID, account string) ([]byte, error) {
	return hkdf.Key(sha256.New, []byte(clientSecret), nil, "caddy-restream-auth login state v1|"+clientID+"|"+account, 32)
}

func (l *Login) stateMAC(state string, exp int64) []byte {
	m := hmac.New(sha256.New, l.stateKey)
	fmt.Fprintf(m, "restream_auth_login v2\x00%s\x00%s\x00%s\x00%d", l.Account, l.RedirectURI, state, exp)
	return m.Sum(nil)
}

func (l *Login) signState(state string, exp int64) string {
	return "v2." + state + "." + strconv.FormatInt(exp, 10) + "." + base64.RawURLEncoding.EncodeToString(l.stateMAC(state, exp))
}

// verifyState returns the state a valid, unexpired cookie carries, and its
// expiry.
func (l *Login) verifyState(v string, now time.Time) (state string, expiry time.Time, err error) {
	parts := strings.Split(v, ".")
	if len(parts) != 4 || parts[0] != "v2" || parts[1] == "" {
		return "", time.Time{}, errStateInvalid
	}
	exp, err := strconv.ParseInt(parts[2], 10, 64)
	if err != nil {
		return "", time.Time{}, errStateInvalid
	}
	mac, err := base64.RawURLEncoding.DecodeString(parts[3])
	if err != nil || !hmac.Equal(mac, l.stateMAC(parts[1], exp)) {
		return "", time.Time{}, errStateInvalid
	}
	expiry = time.Unix(exp, 0)
	if !now.Before(expiry) {
		return "", time.Time{}, errStateExpired
	}
	return parts[1], expiry, nil
}

// spentStates remembers every state a callback accepted until it expires, so
// that a state works once, even presented again with its cookie (a copied
// callback URL and cookie, a reload of a finished callback). It is
// package-level so a config reload does not forget it. Only states with a
// valid MAC, minted by an authenticated …/login, are ever added.
var spentStates = &stateLedger{spent: make(map[string]time.Time)}

type stateLedger struct {
	mu    sync.Mutex
	spent map[string]time.Time // key -> when it expires
}

// spend records key until exp and reports whether it was unspent.
func (s *stateLedger) spend(key string, exp, now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, e := range s.spent {
		if !now.Before(e) {
			delete(s.spent, k)
		}
	}
	if _, ok := s.spent[key]; ok {
		return false
	}
	s.spent[key] = exp
	return true
}
