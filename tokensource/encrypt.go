package tokensource

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// Keyring encrypts stored records at rest with AES-256-GCM, so a shared
// storage backend (a volume, Redis, a bucket) never holds a usable refresh
// token in the clear. The account name is the associated data: a record
// copied to another account's key does not decrypt. Records are written with
// the first key; the others are accepted for reading, for key rotation.
type Keyring struct {
	keys []keyEntry
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
	Nonce      []byte `json:"nonce"`
	Ciphertext []byte `json:"ciphertext"`
}

const envelopeAlg = "aes-256-gcm"

func (kr *Keyring) seal(account string, plain []byte) ([]byte, error) {
	k := kr.keys[0]
	nonce := make([]byte, k.aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	return json.Marshal(envelope{Encryption: envelopeAlg, KeyID: k.id, Nonce: nonce,
		Ciphertext: k.aead.Seal(nil, nonce, plain, []byte(account))})
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
	if env.Encryption != envelopeAlg {
		return nil, fmt.Errorf("unsupported encryption %q", env.Encryption)
	}
	return &env, nil
}

func (kr *Keyring) open(account string, env *envelope) ([]byte, error) {
	for _, k := range kr.keys {
		if k.id != env.KeyID {
			continue
		}
		if len(env.Nonce) != k.aead.NonceSize() {
			return nil, errors.New("bad nonce")
		}
		plain, err := k.aead.Open(nil, env.Nonce, env.Ciphertext, []byte(account))
		if err != nil {
			return nil, errors.New("decryption failed: the record is corrupted or belongs to another account")
		}
		return plain, nil
	}
	return nil, fmt.Errorf("encrypted with key %s, which is neither encryption_key nor encryption_key_previous", env.KeyID)
}

// EncodeRecord is the stored form of rec under key: JSON, sealed when kr is
// not nil. Store implementations other than the Caddy-storage one (Redis)
// use it and DecodeRecord so every backend stores records the same way.
func EncodeRecord(rec *Record, key, account string, kr *Keyring) ([]byte, error) {
	return encodeRecord(rec, account, kr)
}

// DecodeRecord parses the stored form of a record read from key. It never
// panics, whatever b holds; a record it cannot trust is an ErrCorruptRecord.
func DecodeRecord(b []byte, key, account string, kr *Keyring) (*Record, error) {
	return decodeRecord(b, key, account, kr)
}

// encodeRecord marshals rec, sealed when kr is not nil.
func encodeRecord(rec *Record, account string, kr *Keyring) ([]byte, error) {
	b, err := json.Marshal(rec)
	if err != nil || kr == nil {
		return b, err
	}
	return kr.seal(account, b)
}

// decodeRecordBytes returns the plain JSON of a stored record. A plain record
// is accepted with a keyring (it is re-written encrypted at the next
// rotation); an encrypted one without a keyring is an error.
func decodeRecordBytes(b []byte, key, account string, kr *Keyring) ([]byte, error) {
	env, err := openEnvelope(b)
	if errors.Is(err, errNotSealed) {
		return b, nil
	}
	if err != nil {
		return nil, fmt.Errorf("%w %s: %v", ErrCorruptRecord, key, err)
	}
	if kr == nil {
		return nil, fmt.Errorf("%w %s: it is encrypted (key %s); configure encryption_key", ErrUnreadableRecord, key, env.KeyID)
	}
	plain, err := kr.open(account, env)
	if err != nil {
		return nil, fmt.Errorf("%w %s: %v", ErrUnreadableRecord, key, err)
	}
	return plain, nil
}
