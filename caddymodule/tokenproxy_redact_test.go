package caddymodule

import (
	"encoding/base64"
	"encoding/json"
	"net/url"
	"strings"
	"testing"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// echoForms are the ways an endpoint echoing its request could show the
// secret: every one must be redacted.
func echoForms(id, secret string) map[string]string {
	jsonEsc := func(s string) string {
		b, _ := json.Marshal(s)
		return string(b[1 : len(b)-1])
	}
	basic := base64.StdEncoding.EncodeToString([]byte(id + ":" + secret))
	var uEsc strings.Builder // every character as \uXXXX, upper-case hex
	for _, r := range secret {
		if r > 0xffff {
			hi, lo := utf16.EncodeRune(r)
			uEsc.WriteString(`\u` + strings.ToUpper(hex4(hi)) + `\u` + strings.ToUpper(hex4(lo)))
			continue
		}
		uEsc.WriteString(`\u` + strings.ToUpper(hex4(r)))
	}
	return map[string]string{
		"raw":                  secret,
		"json":                 jsonEsc(secret),
		"json all \\u":         uEsc.String(),
		"query escaped":        url.QueryEscape(secret),
		"path escaped":         url.PathEscape(secret),
		"lower-case percent":   lowerPercentEscapes(url.QueryEscape(secret)),
		"query escaped, json":  jsonEsc(url.QueryEscape(secret)),
		"basic":                basic,
		"basic header":         "Basic " + basic,
		"basic url-safe":       base64.URLEncoding.EncodeToString([]byte(id + ":" + secret)),
		"basic unpadded":       strings.TrimRight(basic, "="),
		"basic query escaped":  url.QueryEscape(basic),
		"form field":           url.Values{"client_secret": {secret}}.Encode(),
		"form field, json":     jsonEsc(url.Values{"client_id": {id}, "client_secret": {secret}}.Encode()),
		"percent sign escaped": strings.ReplaceAll(url.PathEscape(secret), "%", `\u0025`),
	}
}

func hex4(r rune) string {
	const digits = "0123456789abcdef"
	return string([]byte{digits[r>>12&15], digits[r>>8&15], digits[r>>4&15], digits[r&15]})
}

// lowerPercentEscapes lower-cases the hex digits of %XX escapes.
func lowerPercentEscapes(s string) string {
	b := []byte(s)
	for i := 0; i+2 < len(b); i++ {
		if b[i] == '%' {
			b[i+1], b[i+2] = lowerHexDigit(b[i+1]), lowerHexDigit(b[i+2])
		}
	}
	return string(b)
}

func lowerHexDigit(c byte) byte {
	if 'A' <= c && c <= 'F' {
		return c + 'a' - 'A'
	}
	return c
}

func TestSecretRedactorEchoForms(t *testing.T) {
	for _, secret := range []string{
		"test-secret",
		`s3cr3t/+&="é x\y<z>`,
		"cs_live_0123456789abcdefABCDEF",
		"päss wörd 😀 %41",
	} {
		r := tokensource.NewRedactor("app-client", secret)
		for name, form := range echoForms("app-client", secret) {
			body := `{"error":"invalid_client","error_description":"got ` + form + ` from you","n":1}`
			got, n := r.Redact([]byte(body), true)
			if n == 0 || strings.Contains(string(got), form) {
				t.Errorf("secret %q, %s %q: not redacted: %s", secret, name, form, got)
				continue
			}
			if !strings.HasPrefix(string(got), `{"error":"invalid_client","error_description":"got `) ||
				!strings.HasSuffix(string(got), ` from you","n":1}`) || !strings.Contains(string(got), tokensource.RedactedMark) {
				t.Errorf("secret %q, %s: more than the secret changed: %s", secret, name, got)
			}
			if !json.Valid(got) {
				t.Errorf("secret %q, %s: redaction broke the JSON: %s", secret, name, got)
			}
		}
	}
}

func TestSecretRedactorLeavesOtherTextAlone(t *testing.T) {
	r := tokensource.NewRedactor("app-client", "test-secret")
	for _, body := range []string{
		``,
		`{"access_token":"at_1","refresh_token":"rt_1","expires_in":3600}`,
		`{"error":"invalid_grant","error_description":"test-secre and est-secret and test_secret"}`,
		`{"d":"test%2Dsecre","e":"\u0074est-secre"}`,
		`%%%%\\\\\u+++`,
	} {
		got, n := r.Redact([]byte(body), true)
		if n != 0 || string(got) != body {
			t.Errorf("redact(%q) = %q, %d; want it unchanged", body, got, n)
		}
	}
	// Several echoes, adjacent ones included.
	got, n := r.Redact([]byte(`test-secrettest%2Dsecret x test-secret`), true)
	if want := tokensource.RedactedMark + tokensource.RedactedMark + " x " + tokensource.RedactedMark; n != 3 || string(got) != want {
		t.Errorf("got %q (%d), want %q", got, n, want)
	}
	if !r.Contains("Basic " + base64.StdEncoding.EncodeToString([]byte("app-client:test-secret"))) {
		t.Error("containsSecret misses the Basic credentials")
	}
}

// FuzzSecretRedactor: whatever the text and the secret, no echo form of the
// secret survives: in plain text (a header) as written, in JSON text in any
// string, decoded and URL-decoded too. Text without the secret comes out
// unchanged.
func FuzzSecretRedactor(f *testing.F) {
	for _, seed := range []struct{ body, secret string }{
		{`{"error":"x","error_description":"test-secret"}`, "test-secret"},
		{`test%2dsecret+and+test-secret`, "test-secret"},
		{`{"e":"\u0073\u0065cret \/ \\ \"q\""}`, `secret / \ "q"`},
		{`%25%25%25`, "%%%%%%%%"},
		{`dGVzdDpzZWNyZXQ=`, "secret"},
		{`aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa`, "aaaaaaaa"},
		{`{"a":["x\\y\u0025z","aWQ6c2VjcmV0"]}`, `x\y%z`},
		{`"%73%65cr\u0065t+x"`, "secret x"},
	} {
		f.Add(seed.body, seed.secret)
	}
	f.Fuzz(func(t *testing.T, body, secret string) {
		// Secrets sharing characters with the mark could be re-formed
		// around it; real secrets are long, and valid UTF-8 (JSON encoders
		// replace invalid bytes).
		if len(secret) < 4 || !utf8.ValidString(secret) || strings.ContainsAny(secret, "[]REDACT") {
			return
		}
		r := tokensource.NewRedactor("id", secret)
		got, n := r.Redact([]byte(body), false)
		if n == 0 && string(got) != body {
			t.Fatalf("no echo found but the text changed: %q -> %q", body, got)
		}
		forms := echoForms("id", secret)
		for _, name := range []string{"raw", "query escaped", "path escaped", "lower-case percent", "basic unpadded"} {
			if form := forms[name]; strings.Contains(string(got), form) {
				t.Fatalf("plain text: %s form %q survives in %q (from %q)", name, form, got, body)
			}
		}

		if !json.Valid([]byte(body)) {
			return
		}
		got, n = r.Redact([]byte(body), true)
		if n == 0 && string(got) != body {
			t.Fatalf("no echo found but the JSON changed: %q -> %q", body, got)
		}
		if !json.Valid(got) {
			return // the proxy relays no such answer
		}
		var v any
		_ = json.Unmarshal(got, &v)
		for _, s := range jsonStrings(v, nil) {
			unescaped, err := url.QueryUnescape(s)
			if err != nil {
				unescaped = ""
			}
			basic := strings.TrimRight(forms["basic"], "=")
			for _, text := range []string{s, unescaped} {
				if strings.Contains(text, secret) || strings.Contains(text, basic) {
					t.Fatalf("JSON: the secret survives in the string %q of %s (from %s)", text, got, body)
				}
			}
		}
	})
}

// jsonStrings lists the strings of a decoded JSON value, keys included.
func jsonStrings(v any, acc []string) []string {
	switch v := v.(type) {
	case string:
		acc = append(acc, v)
	case []any:
		for _, x := range v {
			acc = jsonStrings(x, acc)
		}
	case map[string]any:
		for k, x := range v {
			acc = jsonStrings(x, append(acc, k))
		}
	}
	return acc
}

// BenchmarkSecretRedactor: the cost the redaction adds to a relayed answer,
// a typical token answer (no echo) and an error echoing the secret.
func BenchmarkSecretRedactor(b *testing.B) {
	r := tokensource.NewRedactor("app-client", "cs_3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c")
	for _, bc := range []struct{ name, body string }{
		{"token_answer", `{"access_token":"at_` + strings.Repeat("a1", 20) + `","expires":1796000000,"expires_in":3600,"refresh_token":"rt_` +
			strings.Repeat("b2", 20) + `","scope":"profile.default.read channels.read chat.default.read stream.default.read","token_type":"Bearer",` +
			`"accessTokenExpiresAt":"2026-12-01T00:00:00.000Z","refreshTokenExpiresAt":"2027-12-01T00:00:00.000Z","scopeJson":["profile.default.read","channels.read"]}`},
		{"echoed_error", `{"error":"invalid_client","error_description":"bad secret cs_3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c in Basic YXBwLWNsaWVudDpjc18zZjlhOGI3YzZkNWU0ZjNhMmIxYzBkOWU4ZjdhNmI1Yw=="}`},
	} {
		b.Run(bc.name, func(b *testing.B) {
			body := []byte(bc.body)
			b.SetBytes(int64(len(body)))
			for b.Loop() {
				r.Redact(body, true)
			}
		})
	}
}
