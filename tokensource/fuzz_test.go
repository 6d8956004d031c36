package tokensource

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
)

// FuzzParseTokenResponse: any token-endpoint body is either a usable pair or
// an error that quotes none of it.
func FuzzParseTokenResponse(f *testing.F) {
	for _, seed := range []string{
		`{"access_token":"at_1","refresh_token":"rt_1","expires":1900000000,"expires_in":3600,"token_type":"Bearer","scope":"a b"}`,
		`{"accessToken":"at_1","refreshToken":"rt_1","accessTokenExpiresIn":3600,"accessTokenExpiresAt":"2030-01-01T00:00:00.000Z","refreshTokenExpiresEpoch":1900000000,"scopeJson":["a"],"tokenType":"Bearer"}`,
		`{"access_token":"at_1"}`, `{"error":"invalid_grant","error_description":"x"}`, `{"error":{"name":"invalid_grant","message":"m"}}`,
		`<html>oops</html>`, ``, `null`, `[]`, `{"access_token":1}`, `{"expires_in":"1e400"}`,
	} {
		f.Add([]byte(seed), "application/json")
	}
	now := time.Unix(1_800_000_000, 0)
	f.Fuzz(func(t *testing.T, body []byte, contentType string) {
		rec, err := parseTokenResponse(body, contentType, now)
		if err != nil {
			if rec != nil {
				t.Fatal("record and error")
			}
			if len(body) >= 8 && strings.Contains(err.Error(), string(body)) && !strings.Contains(strings.ToLower(contentType), strings.ToLower(string(body))) {
				t.Fatalf("error quotes the body: %v", err)
			}
			return
		}
		if rec.AccessToken == "" || rec.RefreshToken == "" || !rec.Expiry.After(now) || rec.TokenType != "Bearer" {
			t.Fatalf("unusable record accepted: %+v", rec)
		}
	})
}

// FuzzParseOAuthError: both error shapes and anything else, no panic.
func FuzzParseOAuthError(f *testing.F) {
	for _, seed := range []string{`{"error":"invalid_grant","error_description":"d"}`, `{"error":{"name":"invalid_client","message":"m"}}`, `{"error":7}`, `{}`, `x`} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		code, _, ok := ParseOAuthError(body)
		if ok && code == "" {
			t.Fatal("ok without a code")
		}
	})
}

// FuzzErrorFromResponse: error texts never carry the refresh token or the
// client secret, whatever the endpoint answers.
func FuzzErrorFromResponse(f *testing.F) {
	f.Add(400, []byte(`{"error":"invalid_grant","error_description":"rt_secret_refresh"}`))
	f.Add(401, []byte(`{"error":{"name":"cs_client_secret","message":"rt_secret_refresh"}}`))
	f.Add(502, []byte(`<html>rt_secret_refresh</html>`))
	x := &exchanger{clientID: "client-id", clientSecret: "cs_client_secret", clock: realClock{}}
	f.Fuzz(func(t *testing.T, status int, body []byte) {
		if status < 100 || status > 999 {
			return
		}
		answer := &Answer{Status: status, Header: http.Header{"Content-Type": {"application/json"}}, Body: body}
		e := x.errorFromAnswer(answer, "rt_secret_refresh")
		for _, secret := range []string{"rt_secret_refresh", "cs_client_secret"} {
			if strings.Contains(e.Msg, secret) || strings.Contains(e.Code, secret) {
				t.Fatalf("secret in error: %q / %q", e.Code, e.Msg)
			}
		}
	})
}

// FuzzLoadRecord: any stored bytes load as a valid record (a whole pair, or
// history only), or fail with ErrCorruptRecord / ErrUnreadableRecord; never
// a panic.
func FuzzLoadRecord(f *testing.F) {
	good, _ := json.Marshal(Record{Version: 1, Generation: 3, AccessToken: "at", RefreshToken: "rt", Expiry: time.Unix(1_900_000_000, 0)})
	kr, _ := NewKeyring(make([]byte, 32))
	sealed, _ := encodeRecord(&Record{Version: 1, Generation: 3, AccessToken: "at", RefreshToken: "rt", Expiry: time.Unix(1_900_000_000, 0)}, "fuzz", kr)
	for _, seed := range [][]byte{good, sealed, []byte(`{"encryption":"aes-256-gcm","key_id":"x"}`), []byte(`{"version":2}`), []byte(`{`), nil} {
		f.Add(seed)
	}
	st := &certmagic.FileStorage{Path: f.TempDir()}
	f.Fuzz(func(t *testing.T, b []byte) {
		if err := st.Store(context.Background(), RecordKey("fuzz"), b); err != nil {
			t.Fatal(err)
		}
		for _, k := range []*Keyring{nil, kr} {
			rec, err := LoadRecordKeyring(context.Background(), st, "fuzz", k)
			switch {
			case err == nil && rec != nil:
				// A record holds a whole pair, or only history (dead tokens,
				// consumed seeds: I6) with no tokens and generation 0.
				if !rec.HasPair() && (rec.RefreshToken != "" || rec.AccessToken != "" || rec.Generation > 0) {
					t.Fatalf("incomplete record accepted: %+v", rec)
				}
			case err != nil && !errors.Is(err, ErrCorruptRecord) && !errors.Is(err, ErrUnreadableRecord):
				t.Fatalf("unclassified error: %v", err)
			}
		}
	})
}
