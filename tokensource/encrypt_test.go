package tokensource

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

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

// plainChain starts a chain without a key and returns the plain stored bytes.
func plainChain(t *testing.T, env *testEnv) []byte {
	t.Helper()
	src := env.seededSource(t, "plain")
	mustToken(t, src)
	src.Close()
	raw, err := env.st.Load(context.Background(), RecordKey(testAccount))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(raw, []byte(`"encryption"`)) {
		t.Fatalf("not a plain record: %s", raw)
	}
	return raw
}

// With encryption_key set, a plain record, whoever wrote it, is never used
// and never replaced: the instance answers with an error that names the
// storage key, the key id and the command that seals it, and calls nothing.
func TestPlainRecordRefusedWithKey(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	key := randomKey(t)
	kr := keyring(t, key)
	raw := plainChain(t, env)

	// A configured seed not yet exchanged must not replace it either.
	cfg := env.config(env.fake.Seed(), "keyed")
	cfg.Keyring = kr
	src := env.source(t, cfg)
	_, err := src.Token(context.Background())
	if err == nil {
		t.Fatal("a plain record was adopted with encryption_key set")
	}
	for _, want := range []string{RecordKey(testAccount), "key id " + kr.KeyID(), "caddy restream-auth encrypt --config <file> --account " + testAccount} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q: %v", want, err)
		}
	}
	if strings.Contains(err.Error(), base64.StdEncoding.EncodeToString(key)) {
		t.Error("the error holds the key")
	}
	src.Close()
	_, lerr := LoadRecordKeyring(context.Background(), env.st, testAccount, kr)
	if !errors.Is(lerr, ErrUnencryptedRecord) || !errors.Is(lerr, ErrUnreadableRecord) {
		t.Fatalf("LoadRecordKeyring: %v; want ErrUnencryptedRecord, an ErrUnreadableRecord", lerr)
	}
	if after, _ := env.st.Load(context.Background(), RecordKey(testAccount)); !bytes.Equal(after, raw) {
		t.Error("the plain record was overwritten")
	}
	env.wantCalls(t, 1) // the first seed only

	// Whatever JSON it is: garbage is still corrupt, not "unencrypted".
	if _, err := DecodeRecord([]byte("{garbage"), RecordKey(testAccount), testAccount, kr); !errors.Is(err, ErrCorruptRecord) {
		t.Errorf("garbage with a key: %v", err)
	}
	// Without a key the same record is fine (encryption is optional).
	if rec, err := LoadRecord(context.Background(), env.st, testAccount); err != nil || !rec.HasPair() {
		t.Errorf("plain record without a key: %v", err)
	}
}

// sealLegacy seals rec as versions before the storage key was bound did:
// the account alone as associated data, no "aad" field.
func sealLegacy(t *testing.T, kr *Keyring, account string, rec *Record) []byte {
	t.Helper()
	plain, _ := json.Marshal(rec)
	k := kr.keys[0]
	nonce := make([]byte, k.aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(map[string]any{"encryption": "aes-256-gcm", "key_id": k.id, "nonce": nonce,
		"ciphertext": k.aead.Seal(nil, nonce, plain, []byte(account))})
	return b
}

func testRecord() *Record {
	now := time.Now()
	return &Record{Version: 1, Generation: 5, Chain: "c4a1", AccessToken: "at_secret", RefreshToken: "rt_secret",
		TokenType: "Bearer", Expiry: now.Add(time.Hour), IssuedAt: now}
}

// A sealed record is bound to its account and its storage key: moved or
// copied anywhere else it is refused, by instances and by the migration
// alike, with an error that says so. A legacy envelope (account only) is
// refused outside the migration, which reads it.
func TestSealedRecordBoundToAccountAndKey(t *testing.T) {
	t.Parallel()
	oldKey := randomKey(t)
	kr := keyring(t, oldKey)
	key := RecordKey(testAccount)
	rec := testRecord()
	mustSeal := func(key, account string, kr *Keyring) []byte {
		b, err := EncodeRecord(rec, key, account, kr)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	good := mustSeal(key, testAccount, kr)
	if got, err := DecodeRecord(good, key, testAccount, kr); err != nil || got.RefreshToken != rec.RefreshToken {
		t.Fatalf("own record: %v", err)
	}
	if !bytes.Contains(good, []byte(`"aad":"account+key"`)) {
		t.Errorf("the envelope does not say what its associated data covers: %s", good)
	}
	stripped := bytes.Replace(good, []byte(`"aad":"account+key",`), nil, 1)
	legacy := sealLegacy(t, kr, testAccount, rec)
	otherKey := keyring(t, randomKey(t))

	for _, tc := range []struct {
		name    string
		b       []byte
		want    string
		migrate bool // the migration refuses it too
		target  error
	}{
		{"another storage key", mustSeal("prod/"+key, testAccount, kr), "sealed for another account or storage key", true, ErrUnreadableRecord},
		{"another account", mustSeal(RecordKey("other"), "other", kr), "sealed for another account or storage key", true, ErrUnreadableRecord},
		{"another account, same key", mustSeal(key, "other", kr), "sealed for another account or storage key", true, ErrUnreadableRecord},
		{"another encryption key", mustSeal(key, testAccount, otherKey), "which is neither encryption_key nor encryption_key_previous", true, ErrUnreadableRecord},
		{"aad field stripped", stripped, "sealed for another account or storage key", true, ErrUnreadableRecord},
		{"legacy of another account", sealLegacy(t, kr, "other", rec), "sealed for another account or storage key", true, ErrUnreadableRecord},
		{"legacy envelope", legacy, "caddy restream-auth encrypt --config <file> --account " + testAccount, false, ErrLegacyRecord},
		{"legacy claiming to be current", bytes.Replace(legacy, []byte(`{`), []byte(`{"aad":"account+key",`), 1), "sealed for another account or storage key", true, ErrUnreadableRecord},
		{"unknown aad", bytes.Replace(good, []byte(`"aad":"account+key"`), []byte(`"aad":"none"`), 1), `unsupported associated data "none"`, true, ErrCorruptRecord},
		{"escape in key_id", bytes.Replace(good, []byte(`"key_id":"`+kr.KeyID()+`"`), []byte(`"key_id":"\u001b[2J"`), 1), `key_id "\x1b[2J" is not a key id`, true, ErrCorruptRecord},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := DecodeRecord(tc.b, key, testAccount, kr)
			if !errors.Is(err, tc.target) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), key) {
				t.Fatalf("DecodeRecord: %v; want %v naming %s and %q", err, tc.target, key, tc.want)
			}
			if strings.Contains(err.Error(), "\x1b") {
				t.Errorf("the error holds a raw escape: %q", err)
			}
			_, merr := DecodeRecord(tc.b, key, testAccount, kr.ForMigration())
			if tc.migrate != (merr != nil) {
				t.Fatalf("migration keyring: %v; want refused = %v", merr, tc.migrate)
			}
		})
	}
	// The legacy envelope reads for the migration, which reseals it bound.
	got, err := DecodeRecord(legacy, key, testAccount, kr.ForMigration())
	if err != nil || got.RefreshToken != rec.RefreshToken {
		t.Fatalf("migration keyring on a legacy envelope: %v", err)
	}
	if s, err := InspectRecord(legacy, key); err != nil || !s.Encrypted || !s.Legacy || s.Current(kr) {
		t.Errorf("InspectRecord(legacy) = %+v, %v", s, err)
	}
	// Sealed with what is now encryption_key_previous: readable, not current.
	rotated := keyring(t, randomKey(t), oldKey)
	if s, err := InspectRecord(good, key); err != nil || !s.Current(kr) || s.Current(rotated) {
		t.Errorf("InspectRecord(current) = %+v, %v", s, err)
	}
	if _, err := DecodeRecord(good, key, testAccount, rotated); err != nil {
		t.Errorf("a record sealed with encryption_key_previous: %v", err)
	}
}

// The migration through the Store: under the lease, a plain record is read
// with the migration keyring and written back sealed with base = its
// version; a Source with the key then adopts it without a refresh, and the
// storage no longer holds a token in the clear.
func TestMigrationSealsPlainRecordInPlace(t *testing.T) {
	t.Parallel()
	env := newTestEnv(t, fakerestream.Options{})
	kr := keyring(t, randomKey(t))
	plainChain(t, env)
	before := env.record(t)

	ctx := context.Background()
	store := NewStorageStore(env.st, testAccount, kr.ForMigration(), env.clk, nil)
	l, err := store.TakeLease(ctx, "migration", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := store.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := store.CompareAndStore(ctx, rec, Version{Generation: rec.Generation, Chain: rec.Chain}); err != nil {
		t.Fatal(err)
	}
	if err := store.ReleaseLease(ctx, l); err != nil {
		t.Fatal(err)
	}
	raw, _ := env.st.Load(ctx, RecordKey(testAccount))
	for _, tok := range env.fake.IssuedTokens() {
		if bytes.Contains(raw, []byte(tok)) {
			t.Fatalf("the sealed record holds a token in the clear: %s", raw)
		}
	}
	if s, err := InspectRecord(raw, RecordKey(testAccount)); err != nil || !s.Current(kr) {
		t.Fatalf("after the migration: %+v, %v", s, err)
	}

	cfg := env.config("", "keyed")
	cfg.Keyring = kr
	src := env.source(t, cfg)
	if tok := mustToken(t, src); tok.AccessToken != before.AccessToken || tok.Generation != before.Generation {
		t.Fatal("the sealed record was not adopted")
	}
	env.wantCalls(t, 1)
}

// BenchmarkDecodeRecord: what reading the stored record costs, plain and
// sealed (the refresher reads it once per round, never on the hot path).
func BenchmarkDecodeRecord(b *testing.B) {
	kr, _ := NewKeyring(make([]byte, 32))
	key := RecordKey(testAccount)
	plain, _ := EncodeRecord(testRecord(), key, testAccount, nil)
	sealed, _ := EncodeRecord(testRecord(), key, testAccount, kr)
	for name, tc := range map[string]struct {
		b  []byte
		kr *Keyring
	}{"plain": {plain, nil}, "sealed": {sealed, kr}} {
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				if _, err := DecodeRecord(tc.b, key, testAccount, tc.kr); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
