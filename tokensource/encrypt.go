package tokensource

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// Keyring encrypts stored records at rest with AES-256-GCM, so a shared
// storage backend (a volume, Redis, a bucket) never holds a usable refresh
// token in the clear. The associated data binds a record to its account and
// its storage key: a record copied to another account or another key does
// not decrypt. With a keyring, only records it sealed are used: a plain
// record could have been planted by anyone who can write to the storage.
// Records are written with the first key; the others are accepted for
// reading, for key rotation.
type Keyring struct {
	keys []keyEntry
	// migrate also reads plain records and legacy envelopes; see ForMigration.
	migrate bool
}

type keyEntry struct {
	id   string
	aead cipher.AEAD
}

// ParseKey decodes a key written in standard base64 (32 random bytes, e.g.
// from `head -c 32 /dev/urandom | base64`).
func ParseKey(s string) ([]byte, error) {
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil {
		return nil, errors.New("encryption key is not standard base64")
	}
	if len(b) != 32 {
		return nil, fmt.Errorf("encryption key has %d bytes, want 32 (AES-256)", len(b))
	}
	return b, nil
}

// NewKeyring builds a keyring; the first key encrypts, all keys decrypt.
func NewKeyring(current []byte, previous ...[]byte) (*Keyring, error) {
	kr := new(Keyring)
	for i, k := range append([][]byte{current}, previous...) {
		if len(k) != 32 {
			return nil, fmt.Errorf("encryption key %d has %d bytes, want 32", i, len(k))
		}
		block, err := aes.NewCipher(k)
		if err != nil {
			return nil, err
		}
		aead, err := cipher.NewGCM(block)
		if err != nil {
			return nil, err
		}
		sum := sha256.Sum256(append([]byte("restream_auth key id\x00"), k...))
		kr.keys = append(kr.keys, keyEntry{id: hex.EncodeToString(sum[:4]), aead: aead})
	}
	return kr, nil
}

// ForMigration returns a keyring with the same keys that also reads plain
// records and legacy envelopes, so that `caddy restream-auth encrypt` can
// seal them in place, an operator's explicit decision. Nothing else may use
// it: a running instance never adopts a record it would not have written.
func (kr *Keyring) ForMigration() *Keyring {
	if kr == nil {
		return nil
	}
	return &Keyring{keys: kr.keys, migrate: true}
}

// KeyID names the current key without revealing it.
func (kr *Keyring) KeyID() string { return kr.keys[0].id }

// KeyIDs names all keys, current first.
func (kr *Keyring) KeyIDs() string {
	ids := make([]string, len(kr.keys))
	for i, k := range kr.keys {
		ids[i] = k.id
	}
	return strings.Join(ids, ",")
}

// envelope is the stored form of an encrypted record.
type envelope struct {
	Encryption string `json:"encryption"` // "aes-256-gcm"
	KeyID      string `json:"key_id"`
	// AAD names what the associated data binds the record to: "account+key",
	// its account and its storage key. Envelopes written before it existed
	// have none; they are bound to the account alone (legacy).
	AAD        string `json:"aad,omitempty"`
	Nonce      []byte `json:"nonce"`
	Ciphertext []byte `json:"ciphertext"`
}

const (
	envelopeAlg   = "aes-256-gcm"
	aadAccountKey = "account+key"
)

// Legacy envelopes (no "aad") are refused outside migration, not read and
// resealed at the next write: as long as a reader accepts them, anyone who
// can write to the storage can replace a current envelope with a legacy one
// sealed for the same account name under another storage key (another
// deployment's storage or prefix sharing the key), and the binding to the
// storage key would protect nothing. The cost is one explicit step per
// account after an upgrade, `caddy restream-auth encrypt`, the same one that
// seals a plain record, which checks the legacy envelope against the account
// before resealing it.

// associatedData binds a record to its account and storage key. The length
// prefix keeps one (account, key) pair from posing as another, and the label
// keeps it from matching a legacy envelope's bare account name.
func associatedData(key, account string) []byte {
	b := append([]byte("restream_auth record\x00"), binary.AppendUvarint(nil, uint64(len(account)))...)
	b = append(b, account...)
	return append(b, key...)
}

func (kr *Keyring) seal(key, account string, plain []byte) ([]byte, error) {
	k := kr.keys[0]
	nonce := make([]byte, k.aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	return json.Marshal(envelope{Encryption: envelopeAlg, KeyID: k.id, AAD: aadAccountKey, Nonce: nonce,
		Ciphertext: k.aead.Seal(nil, nonce, plain, associatedData(key, account))})
}

// errNotSealed means the stored bytes are a plain record.
var errNotSealed = errors.New("not an encrypted record")

func openEnvelope(b []byte) (*envelope, error) {
	if !bytes.Contains(b, []byte(`"encryption"`)) {
		return nil, errNotSealed // a plain record: skip a second parse
	}
	var env envelope
	if json.Unmarshal(b, &env) != nil || env.Encryption == "" {
		return nil, errNotSealed
	}
	switch {
	case env.Encryption != envelopeAlg:
		return nil, fmt.Errorf("unsupported encryption %q", env.Encryption)
	case env.AAD != "" && env.AAD != aadAccountKey:
		return nil, fmt.Errorf("unsupported associated data %q", env.AAD)
	case !isKeyID(env.KeyID):
		// Checked, as the id is printed in errors: storage content must
		// not reach logs or terminals unescaped.
		return nil, fmt.Errorf("key_id %q is not a key id", env.KeyID)
	}
	return &env, nil
}

// isKeyID reports whether s looks like a KeyID: 8 lowercase hex digits.
func isKeyID(s string) bool {
	if len(s) != 8 {
		return false
	}
	for _, c := range []byte(s) {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

func (kr *Keyring) open(key, account string, env *envelope) ([]byte, error) {
	ad := associatedData(key, account)
	if env.AAD == "" {
		ad = []byte(account) // legacy
	}
	for _, k := range kr.keys {
		if k.id != env.KeyID {
			continue
		}
		if len(env.Nonce) != k.aead.NonceSize() {
			return nil, errors.New("bad nonce")
		}
		plain, err := k.aead.Open(nil, env.Nonce, env.Ciphertext, ad)
		if err != nil {
			return nil, fmt.Errorf("decryption with key %s failed: the record was sealed for another account or storage key "+
				"(copied or planted here), or it is corrupted", k.id)
		}
		return plain, nil
	}
	return nil, fmt.Errorf("encrypted with key %s, which is neither encryption_key nor encryption_key_previous (%s)", env.KeyID, kr.KeyIDs())
}

// Sealing says how a stored record is protected, as its bytes claim; only
// decrypting it proves the claim.
type Sealing struct {
	// Encrypted is false for a plain JSON record.
	Encrypted bool
	// KeyID names the key an encrypted record was sealed with.
	KeyID string
	// Legacy marks an envelope bound to its account alone, not to its
	// storage key (written by an earlier version).
	Legacy bool
}

func (s Sealing) String() string {
	switch {
	case !s.Encrypted:
		return "not encrypted"
	case s.Legacy:
		return "encrypted with key " + s.KeyID + " in a legacy envelope, bound to the account only"
	}
	return "encrypted with key " + s.KeyID
}

// Current reports whether a record sealed so needs no resealing with kr.
func (s Sealing) Current(kr *Keyring) bool {
	return kr != nil && s.Encrypted && !s.Legacy && s.KeyID == kr.KeyID()
}

// InspectRecord tells how the stored bytes b of a record are sealed,
// without decrypting them. An envelope it cannot use is an ErrCorruptRecord.
func InspectRecord(b []byte, key string) (Sealing, error) {
	env, err := openEnvelope(b)
	switch {
	case errors.Is(err, errNotSealed):
		return Sealing{}, nil
	case err != nil:
		return Sealing{}, fmt.Errorf("%w %s: %v", ErrCorruptRecord, key, err)
	}
	return env.sealing(), nil
}

func (env *envelope) sealing() Sealing {
	return Sealing{Encrypted: true, KeyID: env.KeyID, Legacy: env.AAD == ""}
}

// Errors of records a keyring refuses although it can read them. Both are
// an ErrUnreadableRecord, so the protocol, the seed command and the login
// flow treat them as one: the record is neither used nor overwritten.
var (
	// ErrUnencryptedRecord: a plain record where encryption_key is set.
	ErrUnencryptedRecord error = &refusedRecord{"unencrypted stored record"}
	// ErrLegacyRecord: an envelope bound to the account only.
	ErrLegacyRecord error = &refusedRecord{"legacy encrypted stored record"}
)

type refusedRecord struct{ msg string }

func (e *refusedRecord) Error() string { return e.msg }
func (e *refusedRecord) Unwrap() error { return ErrUnreadableRecord }

// MigrateCommand is the command that seals account's stored record with the
// configured encryption_key.
func MigrateCommand(account string) string {
	return "caddy restream-auth encrypt --config <file> --account " + account
}

// EncodeRecord is the stored form of rec under key: JSON, sealed when kr is
// not nil. Store implementations other than the Caddy-storage one (Redis)
// use it and DecodeRecord so every backend stores records the same way.
func EncodeRecord(rec *Record, key, account string, kr *Keyring) ([]byte, error) {
	b, err := json.Marshal(rec)
	if err != nil || kr == nil {
		return b, err
	}
	return kr.seal(key, account, b)
}

// DecodeRecord parses the stored form of a record read from key. It never
// panics, whatever b holds; a record it cannot trust is an ErrCorruptRecord
// or an ErrUnreadableRecord (ErrUnencryptedRecord and ErrLegacyRecord among
// them, when kr is set).
func DecodeRecord(b []byte, key, account string, kr *Keyring) (*Record, error) {
	return decodeRecord(b, key, account, kr)
}

// encodeRecord is the form the storage store writes for account.
func encodeRecord(rec *Record, account string, kr *Keyring) ([]byte, error) {
	return EncodeRecord(rec, RecordKey(account), account, kr)
}

// unsealRecord returns the plain JSON of a stored record and how it was
// sealed. An encrypted record without a keyring is an error; whether a
// keyring accepts a plain or legacy one is decodeRecord's to judge, once it
// knows the JSON is a record.
func unsealRecord(b []byte, key, account string, kr *Keyring) (plain []byte, sealing Sealing, err error) {
	env, err := openEnvelope(b)
	switch {
	case errors.Is(err, errNotSealed):
		return b, Sealing{}, nil
	case err != nil:
		return nil, Sealing{}, fmt.Errorf("%w %s: %v", ErrCorruptRecord, key, err)
	case kr == nil:
		return nil, env.sealing(), fmt.Errorf("%w %s: it is encrypted (key %s); configure encryption_key", ErrUnreadableRecord, key, env.KeyID)
	}
	plain, err = kr.open(key, account, env)
	if err != nil {
		return nil, env.sealing(), fmt.Errorf("%w %s: %v", ErrUnreadableRecord, key, err)
	}
	return plain, env.sealing(), nil
}

// refuseSealing is the error for a readable record that kr does not accept:
// a plain one, or a legacy envelope. nil if kr accepts it.
func refuseSealing(s Sealing, key, account string, kr *Keyring) error {
	switch {
	case kr == nil || kr.migrate || s.Current(kr) || (s.Encrypted && !s.Legacy):
		return nil
	case !s.Encrypted:
		return fmt.Errorf("%w %s: encryption_key (key id %s) is configured, and a record that is not encrypted is never used, "+
			"as anyone who can write to the storage could have planted it; if it is this account's own record from before "+
			"encryption was turned on, seal it in place with `%s`", ErrUnencryptedRecord, key, kr.KeyID(), MigrateCommand(account))
	default:
		return fmt.Errorf("%w %s: %s, written by an earlier version and not bound to its storage key, so it could have been "+
			"copied here from another storage; reseal it in place with `%s` (configured key ids %s)",
			ErrLegacyRecord, key, s, MigrateCommand(account), kr.KeyIDs())
	}
}
