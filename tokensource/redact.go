package tokensource

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"slices"
	"unicode/utf16"
	"unicode/utf8"
)

// RedactedMark replaces a secret in text that is logged, shown or relayed.
const RedactedMark = "[REDACTED]"

// minSecretLen is the shortest secret a Redactor looks for: a shorter one
// would match ordinary text all over (a client id "id"), and no credential
// Restream issues is that short.
const minSecretLen = 4

// CheckClientSecret refuses a client secret too short to be redacted: a
// Redactor could not tell it from ordinary text, so it would reach logs and
// error bodies. The error never quotes the value.
func CheckClientSecret(secret string) error {
	if len(secret) < minSecretLen {
		return fmt.Errorf("client_secret is %d bytes, shorter than the %d a secret must have to be kept out of logs; Restream's are far longer: check the value", len(secret), minSecretLen)
	}
	return nil
}

// Redactor finds secrets in text that came from, or goes to, an endpoint:
// error descriptions, relayed answers, headers. It finds them in the forms
// an endpoint that echoes its request would show them: as sent (a form
// field, the Basic credentials' base64), through JSON string escapes and URL
// percent-encoding (either case, '+' for space), in any mix. Plain
// replacement would miss an echo of a secret with a '/' or '+' in it, sent
// percent-encoded, and every echo of the Basic credentials.
type Redactor struct {
	needles [][]byte
	// starts marks the bytes an echo can begin with: a needle's first
	// byte, '%', '\\' and '+'.
	starts [256]bool
}

// NewRedactor returns a Redactor of the client secret, also inside the
// Basic credentials of clientID, and of other secrets (tokens, codes).
// Secrets shorter than 4 bytes are not looked for.
func NewRedactor(clientID, clientSecret string, secrets ...string) *Redactor {
	var needles [][]byte
	add := func(n []byte) {
		if len(n) >= minSecretLen && !slices.ContainsFunc(needles, func(x []byte) bool { return bytes.Equal(x, n) }) {
			needles = append(needles, n)
		}
	}
	for _, s := range append([]string{clientSecret}, secrets...) {
		add([]byte(s))
	}
	if len(clientSecret) >= minSecretLen {
		basic := []byte(clientID + ":" + clientSecret)
		// Unpadded: an echo may drop or encode the padding, and the prefix
		// alone already carries the secret.
		for _, enc := range []*base64.Encoding{base64.RawStdEncoding, base64.RawURLEncoding} {
			add([]byte(enc.EncodeToString(basic)))
		}
	}
	r := &Redactor{needles: needles}
	if len(needles) == 0 {
		return r
	}
	for _, n := range needles {
		r.starts[n[0]] = true
	}
	for _, c := range []byte{'%', '\\', '+'} {
		r.starts[c] = true
	}
	return r
}

// Redact returns b with every echo of a secret replaced by RedactedMark,
// and how many it replaced. With jsonText, b is JSON text and its string
// escapes are decoded; otherwise a backslash is just a backslash. b itself
// is not modified; without an echo it is returned as is.
func (r *Redactor) Redact(b []byte, jsonText bool) ([]byte, int) {
	var out []byte
	found, copied := 0, 0
	for i := 0; i < len(b); {
		if !r.starts[b[i]] {
			i++
			continue
		}
		end := -1
		for _, n := range r.needles {
			end = max(end, matchEncoded(b, i, n, jsonText))
		}
		if end <= i {
			i++
			continue
		}
		if out == nil {
			out = make([]byte, 0, len(b))
		}
		out = append(append(out, b[copied:i]...), RedactedMark...)
		found++
		copied, i = end, end
	}
	if found == 0 {
		return b, 0
	}
	return append(out, b[copied:]...), found
}

// RedactString returns plain text (an error message, a header) with every
// echo of a secret replaced by RedactedMark.
func (r *Redactor) RedactString(text string) string {
	out, n := r.Redact([]byte(text), false)
	if n == 0 {
		return text
	}
	return string(out)
}

// Contains reports whether plain text (a header) holds an echo of a secret.
func (r *Redactor) Contains(text string) bool {
	_, n := r.Redact([]byte(text), false)
	return n > 0
}

// matchEncoded returns the end of the longest text at b[i:] that decodes to
// needle, or -1. A step reads one character, through the JSON layer with
// jsonText (an escape or a UTF-8 sequence), and then, for '%' and '+',
// through the URL layer too. Steps that decode alike but consume different
// lengths (a raw "%" or "%25") are followed side by side; they part at once
// unless the secret is made of '%' and '+'.
func matchEncoded(b []byte, i int, needle []byte, jsonText bool) int {
	type state struct{ pos, k int }
	frontier := []state{{i, 0}}
	best := -1
	for len(frontier) > 0 {
		var next []state
		add := func(st state) {
			if st.k == len(needle) {
				best = max(best, st.pos)
			} else if !slices.Contains(next, st) {
				next = append(next, st)
			}
		}
		for _, st := range frontier {
			r, raw, q := nextEchoChar(b, st.pos, jsonText)
			if q < 0 {
				continue
			}
			want := needle[st.k:]
			// The character itself.
			if bytes.HasPrefix(want, raw) {
				add(state{q, st.k + len(raw)})
			}
			switch r {
			case '%': // %XX, whose digits may be JSON escapes themselves
				h1, _, q1 := nextEchoChar(b, q, jsonText)
				if q1 < 0 {
					break
				}
				h2, _, q2 := nextEchoChar(b, q1, jsonText)
				if v, ok := parseHexByte(h1, h2); q2 >= 0 && ok && want[0] == v {
					add(state{q2, st.k + 1})
				}
			case '+':
				if want[0] == ' ' {
					add(state{q, st.k + 1})
				}
			}
		}
		frontier = next
	}
	return best
}

// nextEchoChar decodes the character at b[i]: with jsonText a JSON string
// escape (surrogate pairs joined), else one UTF-8 sequence (one byte if
// invalid). It returns the rune, its UTF-8 bytes (the raw byte when
// invalid) and where the next character starts, or -1 at the end of b.
func nextEchoChar(b []byte, i int, jsonText bool) (char rune, raw []byte, next int) {
	if i >= len(b) {
		return 0, nil, -1
	}
	if jsonText && b[i] == '\\' && i+1 < len(b) {
		if r, n := decodeJSONEscape(b[i:]); n > 0 {
			return r, utf8.AppendRune(nil, r), i + n
		}
	}
	r, n := utf8.DecodeRune(b[i:])
	return r, b[i : i+n], i + n
}

// decodeJSONEscape decodes the escape at the start of b ("\n", "\u00e9",
// "\ud83d\ude00"), returning the rune and its length, or 0 if b does not
// start with one.
func decodeJSONEscape(b []byte) (rune, int) {
	switch b[1] {
	case '"', '\\', '/':
		return rune(b[1]), 2
	case 'b':
		return '\b', 2
	case 'f':
		return '\f', 2
	case 'n':
		return '\n', 2
	case 'r':
		return '\r', 2
	case 't':
		return '\t', 2
	case 'u':
		r, ok := parseHex4(b[2:])
		if !ok {
			return 0, 0
		}
		if utf16.IsSurrogate(r) && len(b) >= 12 && b[6] == '\\' && b[7] == 'u' {
			if lo, ok := parseHex4(b[8:]); ok {
				if pair := utf16.DecodeRune(r, lo); pair != utf8.RuneError {
					return pair, 12
				}
			}
		}
		return r, 6
	}
	return 0, 0
}

func parseHex4(b []byte) (rune, bool) {
	if len(b) < 4 {
		return 0, false
	}
	var r rune
	for _, c := range b[:4] {
		d, ok := hexDigitValue(rune(c))
		if !ok {
			return 0, false
		}
		r = r<<4 | rune(d)
	}
	return r, true
}

func parseHexByte(hi, lo rune) (byte, bool) {
	h, ok1 := hexDigitValue(hi)
	l, ok2 := hexDigitValue(lo)
	return h<<4 | l, ok1 && ok2
}

func hexDigitValue(c rune) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return byte(c - '0'), true
	case 'a' <= c && c <= 'f':
		return byte(c - 'a' + 10), true
	case 'A' <= c && c <= 'F':
		return byte(c - 'A' + 10), true
	}
	return 0, false
}
