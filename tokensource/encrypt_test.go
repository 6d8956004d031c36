package tokensource

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"strings"
	"testing"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
)

func randomKey(t *testing.T) []byte {
	t.Helper()
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	return k
}

func keyring(t *testing.T, keys ...[]byte) *Keyring {
	t.Helper()
	kr, err := NewKeyring(keys[0], keys[1:]...)
	if err != nil {
		t.Fatal(err)
	}
	return kr
}

// Encrypted at rest: the stored bytes hold no token, a restart (a new
// Source) with the key reads the chain, the wrong key or no key is a clear
// error that never resends a token, and rotation to a new key works with the
// old one as encryption_key_previous.
func TestEncryptedRecordAcrossRestartAndKeyRotation(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	oldKey, newKey := randomKey(t), randomKey(t)
	seed := env.fake.Seed()
	cfg := env.config(seed, "a")
	cfg.Keyring = keyring(t, oldKey)
	a := env.source(t, cfg)
	first := mustToken(t, a)

	raw, err := env.st.Load(context.Background(), RecordKey(testAccount))
	if err != nil {
		t.Fatal(err)
	}
	for _, tok := range env.fake.IssuedTokens() {
		if bytes.Contains(raw, []byte(tok)) {
			t.Fatalf("stored record holds a token in the clear: %s", raw)
		}
	}
	if !bytes.Contains(raw, []byte(`"encryption":"aes-256-gcm"`)) {
		t.Fatalf("not an encrypted envelope: %s", raw)
	}

	// Restart with the same key: adopts, no refresh.
	a.Close() // one refresher per key configuration below
	restarted := env.source(t, cfg)
	again := mustToken(t, restarted)
	if again.AccessToken != first.AccessToken {
		t.Fatal("restart did not adopt the encrypted chain")
	}
	restarted.Close()
	env.wantCalls(t, 1)

	// Wrong key, and no key: clear errors naming the key, no endpoint call.
	for name, kr := range map[string]*Keyring{"wrong key": keyring(t, randomKey(t)), "no key": nil} {
		c := env.config(seed, "b")
		c.Keyring = kr
		bad := env.source(t, c)
		_, err := bad.Token(context.Background())
		if err == nil || !strings.Contains(err.Error(), RecordKey(testAccount)) {
			t.Fatalf("%s: %v", name, err)
		}
		bad.Close()
		if _, lerr := LoadRecordKeyring(context.Background(), env.st, testAccount, kr); !errors.Is(lerr, ErrUnreadableRecord) {
			t.Fatalf("%s: LoadRecordKeyring error %v", name, lerr)
		}
	}
	env.wantCalls(t, 1)

	// The record is bound to its account.
	if _, err := LoadRecordKeyring(context.Background(), renamed{env.st, "other"}, "other", keyring(t, oldKey)); !errors.Is(err, ErrUnreadableRecord) {
		t.Fatalf("record decrypted under another account: %v", err)
	}

	// Key rotation: new key first, old key for reading.
	c := env.config(seed, "c")
	c.Keyring = keyring(t, newKey, oldKey)
	rot := env.source(t, c)
	if tok := mustToken(t, rot); tok.AccessToken != first.AccessToken {
		t.Fatal("previous key could not read the chain")
	}
	env.clk.Advance(60 * 60e9) // an hour: the next refresh writes with the new key
	mustToken(t, rot)
	if _, err := LoadRecordKeyring(context.Background(), env.st, testAccount, keyring(t, newKey)); err != nil {
		t.Fatalf("after rotation the record is not readable with the new key alone: %v", err)
	}
	env.wantCalls(t, 2)
}

// renamed serves one account's record under another account's key.
type renamed struct {
	Storage
	account string
}

func (r renamed) Load(ctx context.Context, key string) ([]byte, error) {
	return r.Storage.Load(ctx, strings.Replace(key, r.account, testAccount, 1))
}

func TestParseKey(t *testing.T) {
	good := base64.StdEncoding.EncodeToString(make([]byte, 32))
	if _, err := ParseKey(good + "\n"); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"", "not base64!", base64.StdEncoding.EncodeToString(make([]byte, 16))} {
		if _, err := ParseKey(bad); err == nil {
			t.Errorf("ParseKey(%q) accepted", bad)
		}
	}
}
