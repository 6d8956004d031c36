package caddymodule_test

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// Tests of `caddy restream-auth encrypt`, run from the built binary.

// newTestKey makes a random encryption key: its bytes, the base64 text a
// config gives it as, and its keyring.
func newTestKey(t *testing.T) (key []byte, configText string, kr *tokensource.Keyring) {
	t.Helper()
	key = make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		t.Fatal(err)
	}
	kr, err := tokensource.NewKeyring(key)
	if err != nil {
		t.Fatal(err)
	}
	return key, base64.StdEncoding.EncodeToString(key), kr
}

// An operator turns encryption on over a plain chain: a running instance
// with the key refuses the plain record (503, no refresh, record untouched),
// status names the key and the command, `encrypt` seals the record in
// place, the instance adopts it without a refresh, and the file no longer
// holds a token in the clear. Running encrypt again changes nothing.
func TestCommandEncryptSealsPlainRecord(t *testing.T) {
	t.Parallel()
	fake := newFake(t, fakerestream.Options{})
	storage := t.TempDir()
	env := newCmdEnv(t)
	_, keyB64, kr := newTestKey(t)

	plain := siteConfig{Port: freePort(t), StorageDir: storage, Fake: fake}
	plainPath := writeCmdConfig(t, plain.Caddyfile())
	if res := runCmd(t, env, fake.Seed(), "restream-auth", "seed", "--config", plainPath); res.code != 0 {
		t.Fatalf("seed: %s", res)
	}
	seeded := loadCmdRecord(t, storage, "default")
	rawPlain := recordBytes(t, storage, "default")

	keyed := siteConfig{Port: freePort(t), StorageDir: storage, Fake: fake, Extra: "encryption_key " + keyB64}
	keyedPath := writeCmdConfig(t, keyed.Caddyfile())
	p := startProcess(t, keyed.Caddyfile())
	base := "http://127.0.0.1:" + itoa(keyed.Port)
	waitReady(t, base+"/v2/user/profile", p)
	status, body, _ := do(t, http.MethodGet, base+"/v2/user/profile", nil, nil)
	if status != http.StatusServiceUnavailable {
		t.Fatalf("a plain record with encryption_key set: %d %s", status, body)
	}

	res := runCmd(t, env, "", "restream-auth", "status", "--config", keyedPath)
	t.Logf("status before encrypt:\n%s", res)
	for _, want := range []string{`account "default": unreadable: unencrypted stored record restream_auth/default/token.json`,
		"key id " + kr.KeyID(), "caddy restream-auth encrypt --config <file> --account default"} {
		if !strings.Contains(res.stdout, want) {
			t.Errorf("status with a plain record and a key lacks %q", want)
		}
	}
	if res.code != 1 {
		t.Errorf("status: exit %d, want 1", res.code)
	}
	if !bytes.Equal(recordBytes(t, storage, "default"), rawPlain) {
		t.Fatal("the plain record was changed before encrypt")
	}

	// Without a key in the config, encrypt refuses.
	res = runCmd(t, env, "", "restream-auth", "encrypt", "--config", plainPath)
	if res.code != 1 || !strings.Contains(res.errText(), `account "default" has no encryption_key`) {
		t.Errorf("encrypt without a key: %s", res)
	}

	started := time.Now()
	res = runCmd(t, env, "", "restream-auth", "encrypt", "--config", keyedPath)
	sealedAt := time.Now()
	t.Logf("encrypt (%s):\n%s", sealedAt.Sub(started).Round(time.Millisecond), res)
	if res.code != 0 || !strings.Contains(res.stdout, "sealed the record at restream_auth/default/token.json with key "+kr.KeyID()+" (it was not encrypted): generation 1, chain "+seeded.Chain) {
		t.Fatalf("encrypt: %s", res)
	}
	raw := recordBytes(t, storage, "default")
	mustContainNone(t, "the sealed record", string(raw), fake.IssuedTokens()...)
	if !bytes.Contains(raw, []byte(`"aad":"account+key"`)) {
		t.Errorf("not a current envelope: %s", raw)
	}
	rec, err := tokensource.LoadRecordKeyring(context.Background(), &certmagic.FileStorage{Path: storage}, "default", kr)
	if err != nil || rec.Generation != seeded.Generation || rec.Chain != seeded.Chain || rec.RefreshToken != seeded.RefreshToken {
		t.Fatalf("the sealed record: %v", err)
	}

	// The running instance adopts it by itself, without a refresh.
	waitFor(t, 15*time.Second, "the instance to serve the sealed chain", func() bool {
		status, _, _ := do(t, http.MethodGet, base+"/v2/user/profile", nil, nil)
		return status == http.StatusOK
	})
	t.Logf("the instance serves %s after encrypt returned", time.Since(sealedAt).Round(time.Millisecond))
	if st := fake.Stats(); st.RefreshCalls != 1 || st.InvalidGrant != 0 {
		t.Errorf("fake saw %d refresh calls and %d invalid_grant; want 1 (the seed) and 0", st.RefreshCalls, st.InvalidGrant)
	}

	// Idempotent.
	before := recordBytes(t, storage, "default")
	res = runCmd(t, env, "", "restream-auth", "encrypt", "--config", keyedPath, "--account", "default")
	if res.code != 0 || !strings.Contains(res.stdout, "already encrypted with the current key "+kr.KeyID()) {
		t.Errorf("encrypt again: %s", res)
	}
	if !bytes.Equal(recordBytes(t, storage, "default"), before) {
		t.Error("encrypt rewrote a record already sealed with the current key")
	}
	res = runCmd(t, env, "", "restream-auth", "status", "--config", keyedPath)
	if res.code != 0 || !strings.Contains(res.stdout, `account "default": ok`) {
		t.Errorf("status after encrypt: %s", res)
	}
	mustContainNone(t, "command output", res.stdout+res.stderr, append(fake.IssuedTokens(), keyB64)...)
	mustContainNone(t, "caddy output", p.Output(), append(fake.IssuedTokens(), keyB64)...)
}

// sealLegacyEnvelope writes rec as versions before the storage key was
// bound sealed it: the account alone as associated data, no "aad".
func sealLegacyEnvelope(t *testing.T, key []byte, account string, rec *tokensource.Record) []byte {
	t.Helper()
	block, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	aead, _ := cipher.NewGCM(block)
	nonce := make([]byte, aead.NonceSize())
	_, _ = rand.Read(nonce)
	plain, _ := json.Marshal(rec)
	sum := sha256.Sum256(append([]byte("restream_auth key id\x00"), key...))
	b, _ := json.Marshal(map[string]any{"encryption": "aes-256-gcm", "key_id": hex.EncodeToString(sum[:4]), "nonce": nonce,
		"ciphertext": aead.Seal(nil, nonce, plain, []byte(account))})
	return b
}

// A legacy envelope sealed with what is now encryption_key_previous is
// refused by status until encrypt reseals it with the current key; records
// sealed for another account or with an unknown key are refused by encrypt
// and left as they are.
func TestCommandEncryptLegacyAndRefusals(t *testing.T) {
	t.Parallel()
	fake := newFake(t, fakerestream.Options{})
	storage := t.TempDir()
	st := &certmagic.FileStorage{Path: storage}
	env := newCmdEnv(t)
	oldKey, oldB64, oldKR := newTestKey(t)
	_, newB64, newKR := newTestKey(t)
	extra := "encryption_key " + newB64 + "\nencryption_key_previous " + oldB64
	cfgPath := writeCmdConfig(t, cmdCaddyfile(t, storage, fake, cmdAccount{Extra: extra}, cmdAccount{Name: "other", Extra: extra}))

	now := time.Now()
	rec := &tokensource.Record{Version: 1, Generation: 3, Chain: "0ld5ea1", AccessToken: "at_legacy", RefreshToken: "rt_legacy",
		TokenType: "Bearer", Expiry: now.Add(time.Hour), IssuedAt: now, User: &tokensource.User{ID: "77", Username: "legacy-user"}}
	if err := st.Store(context.Background(), tokensource.RecordKey("default"), sealLegacyEnvelope(t, oldKey, "default", rec)); err != nil {
		t.Fatal(err)
	}
	res := runCmd(t, env, "", "restream-auth", "status", "--config", cfgPath)
	if res.code != 1 || !strings.Contains(res.stdout, `account "default": unreadable: legacy encrypted stored record restream_auth/default/token.json`) ||
		!strings.Contains(res.stdout, "caddy restream-auth encrypt --config <file> --account default") {
		t.Errorf("status with a legacy envelope: %s", res)
	}
	// A lease its holder stopped renewing (1s TTL) marks a token: encrypt
	// waits until it has seen it unchanged for its TTL, and keeps the mark.
	gone, _ := json.Marshal(map[string]any{"owner": "instance-gone", "nonce": "n", "ttl_ms": 1000, "mark": "fp-of-a-sent-token",
		"marked_by": "instance-gone", "expires_at": now.Add(time.Second).UTC()})
	if err := st.Store(context.Background(), tokensource.LeaseKey("default"), gone); err != nil {
		t.Fatal(err)
	}
	res = runCmd(t, env, "", "restream-auth", "encrypt", "--config", cfgPath)
	t.Logf("encrypt a legacy envelope:\n%s", res)
	if !strings.Contains(res.stderr, "waiting for the refresh lease") {
		t.Errorf("encrypt did not wait for the held lease: %s", res)
	}
	var lease struct {
		Owner    string `json:"owner"`
		Mark     string `json:"mark"`
		MarkedBy string `json:"marked_by"`
	}
	if b, err := st.Load(context.Background(), tokensource.LeaseKey("default")); err != nil || json.Unmarshal(b, &lease) != nil ||
		lease.Owner != "" || lease.Mark != "fp-of-a-sent-token" || lease.MarkedBy != "instance-gone" {
		t.Errorf("the lease after encrypt: %+v (%v); want released, with the mark kept", lease, err)
	}
	if res.code != 0 || !strings.Contains(res.stdout, "with key "+newKR.KeyID()+" (it was encrypted with key "+oldKR.KeyID()+" in a legacy envelope") ||
		!strings.Contains(res.stdout, "user legacy-user (id 77)") {
		t.Fatalf("encrypt a legacy envelope: %s", res)
	}
	got, err := tokensource.LoadRecordKeyring(context.Background(), st, "default", newKR)
	if err != nil || got.RefreshToken != rec.RefreshToken || got.Generation != rec.Generation {
		t.Fatalf("after encrypt, the current key alone does not read the record: %v", err)
	}
	res = runCmd(t, env, "", "restream-auth", "status", "--config", cfgPath)
	if !strings.Contains(res.stdout, `account "default": ok`) {
		t.Errorf("status after resealing: %s", res)
	}

	// Planted or copied: never laundered by encrypt.
	otherAccount, _ := tokensource.EncodeRecord(rec, tokensource.RecordKey("default"), "default", newKR)
	unknownKey, _ := tokensource.EncodeRecord(rec, tokensource.RecordKey("other"), "other", func() *tokensource.Keyring { _, _, k := newTestKey(t); return k }())
	for _, tc := range []struct {
		name string
		b    []byte
		want string
	}{
		{"sealed for another account", otherAccount, "sealed for another account or storage key"},
		{"sealed with a key not configured", unknownKey, "which is neither encryption_key nor encryption_key_previous"},
		{"sealed for another account, legacy", sealLegacyEnvelope(t, oldKey, "default", rec), "sealed for another account or storage key"},
	} {
		if err := st.Store(context.Background(), tokensource.RecordKey("other"), tc.b); err != nil {
			t.Fatal(err)
		}
		res := runCmd(t, env, "", "restream-auth", "encrypt", "--config", cfgPath, "--account", "other")
		if res.code != 1 || !strings.Contains(res.errText(), tc.want) || !strings.Contains(res.errText(), "nothing was changed") {
			t.Errorf("%s: want exit 1 and %q: %s", tc.name, tc.want, res)
		}
		if !bytes.Equal(recordBytes(t, storage, "other"), tc.b) {
			t.Errorf("%s: encrypt changed the record", tc.name)
		}
		mustContainNone(t, "encrypt output", res.stdout+res.stderr, "at_legacy", "rt_legacy", oldB64, newB64)
	}
	// Nothing stored: nothing to do.
	if err := os.Remove(filepath.Join(storage, filepath.FromSlash(tokensource.RecordKey("other")))); err != nil {
		t.Fatal(err)
	}
	res = runCmd(t, env, "", "restream-auth", "encrypt", "--config", cfgPath, "--account", "other")
	if res.code != 0 || !strings.Contains(res.stdout, "nothing stored at restream_auth/other/token.json") {
		t.Errorf("encrypt with nothing stored: %s", res)
	}
	res = runCmd(t, env, "", "restream-auth", "encrypt", "--config", cfgPath, "--account", "nope")
	if res.code != 1 || !strings.Contains(res.errText(), `account "nope" is not configured`) {
		t.Errorf("encrypt of an unknown account: %s", res)
	}
}
