package caddymodule

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// upstreamAttempt is what the upstream saw of one attempt of a request.
type upstreamAttempt struct {
	authorization string
	body          []byte
}

// scriptedUpstream answers each attempt with the next status of answers
// (the last one again once they run out), with a body of bodySize bytes,
// and keeps what each attempt carried. Every answer sets X-Attempt, so a
// replayed response shows whether the first attempt's headers leaked into
// it.
type scriptedUpstream struct {
	answers  []int
	bodySize int
	attempts []upstreamAttempt
}

var _ caddyhttp.Handler = (*scriptedUpstream)(nil)

func (u *scriptedUpstream) ServeHTTP(w http.ResponseWriter, r *http.Request) error {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		return err
	}
	u.attempts = append(u.attempts, upstreamAttempt{authorization: r.Header.Get("Authorization"), body: body})
	status := u.answers[min(len(u.attempts), len(u.answers))-1]
	w.Header().Add("X-Attempt", strconv.Itoa(len(u.attempts)))
	w.WriteHeader(status)
	_, err = w.Write(bytes.Repeat([]byte("a"), u.bodySize))
	return err
}

// What the handler does with an upstream's answer, on a recorder: a 401 to
// a request it could keep is replayed once, with a newer token, the same
// body and the first attempt's response headers dropped; a request it could
// not keep (a body over max_replay_body, CONNECT), a 401 too large to hold,
// replay_401 off, and any answer but 401 reach the client after one attempt.
func TestReplayDecisions(t *testing.T) {
	const maxBody = 1 << 10
	for _, tc := range []struct {
		name         string
		method       string
		body         int   // request body bytes
		chunked      bool  // sent without a Content-Length
		limit        int64 // max_replay_body, if not maxBody
		upgrade      bool
		replayOff    bool
		answers      []int
		answerSize   int // upstream response body bytes
		wantStatus   int
		wantAttempts int
	}{
		{name: "GET, 401 then 200", method: http.MethodGet, answers: []int{401, 200}, wantStatus: 200, wantAttempts: 2},
		{name: "POST at max_replay_body", method: http.MethodPost, body: maxBody, answers: []int{401, 200}, wantStatus: 200, wantAttempts: 2},
		{name: "POST over max_replay_body", method: http.MethodPost, body: maxBody + 1, answers: []int{401, 200}, wantStatus: 401, wantAttempts: 1},
		{name: "chunked POST at max_replay_body", method: http.MethodPost, body: maxBody, chunked: true, answers: []int{401, 200}, wantStatus: 200, wantAttempts: 2},
		{name: "chunked POST over max_replay_body", method: http.MethodPost, body: maxBody + 1, chunked: true, answers: []int{401, 200}, wantStatus: 401, wantAttempts: 1},
		{name: "empty chunked POST", method: http.MethodPost, chunked: true, answers: []int{401, 200}, wantStatus: 200, wantAttempts: 2},
		{name: "chunked POST of several chunks", method: http.MethodPost, body: 3*replayChunk + 5, chunked: true, limit: 4 * replayChunk, answers: []int{401, 200}, wantStatus: 200, wantAttempts: 2},
		{name: "chunked POST over max_replay_body after several chunks", method: http.MethodPost, body: 3*replayChunk + 5, chunked: true, limit: 2*replayChunk + 7, answers: []int{401, 200}, wantStatus: 401, wantAttempts: 1},
		{name: "401 twice: the second passes through", method: http.MethodPut, body: 10, answers: []int{401, 401}, wantStatus: 401, wantAttempts: 2},
		{name: "a 401 too large to hold", method: http.MethodGet, answers: []int{401, 200}, answerSize: maxBuffered401 + 1, wantStatus: 401, wantAttempts: 1},
		{name: "a small 401 body is held", method: http.MethodGet, answers: []int{401, 200}, answerSize: maxBuffered401, wantStatus: 200, wantAttempts: 2},
		{name: "403 is not about the token", method: http.MethodGet, answers: []int{403}, wantStatus: 403, wantAttempts: 1},
		{name: "200", method: http.MethodPost, body: 10, answers: []int{200}, wantStatus: 200, wantAttempts: 1},
		{name: "websocket handshake without a body", method: http.MethodGet, upgrade: true, answers: []int{401, 200}, wantStatus: 200, wantAttempts: 2},
		{name: "CONNECT", method: http.MethodConnect, answers: []int{401, 200}, wantStatus: 401, wantAttempts: 1},
		{name: "replay_401 off", method: http.MethodGet, replayOff: true, answers: []int{401, 200}, wantStatus: 401, wantAttempts: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// A handler of its own: a 401 forces a refresh, and a second
			// one within seconds is refused (tokensource's rate limit).
			limit := int64(maxBody)
			if tc.limit != 0 {
				limit = tc.limit
			}
			h, _ := newReplayHandler(t, limit, 1<<30)
			h.replay = !tc.replayOff
			sent := pattern(tc.body, 'r')
			r := httptest.NewRequest(tc.method, "http://sidecar/v2/user/channel/1", bytes.NewReader(sent))
			if tc.chunked {
				r.Body = io.NopCloser(struct{ io.Reader }{bytes.NewReader(sent)}) // hides the length
				r.ContentLength, r.TransferEncoding = -1, []string{"chunked"}
			}
			if tc.upgrade {
				r.Header.Set("Connection", "Upgrade")
				r.Header.Set("Upgrade", "websocket")
			}
			r.Header.Set("Authorization", "Bearer client-supplied")
			upstream := &scriptedUpstream{answers: tc.answers, bodySize: tc.answerSize}
			w := httptest.NewRecorder()
			if err := h.ServeHTTP(w, r, upstream); err != nil {
				t.Fatal(err)
			}

			if w.Code != tc.wantStatus || len(upstream.attempts) != tc.wantAttempts {
				t.Fatalf("client got %d after %d attempts, want %d after %d", w.Code, len(upstream.attempts), tc.wantStatus, tc.wantAttempts)
			}
			if got := w.Header().Values("X-Attempt"); len(got) != 1 || got[0] != strconv.Itoa(tc.wantAttempts) {
				t.Errorf("the client's response carries X-Attempt %q, want only the last attempt's", got)
			}
			if w.Body.Len() != tc.answerSize {
				t.Errorf("the client got %d body bytes, want the last answer's %d", w.Body.Len(), tc.answerSize)
			}
			for i, a := range upstream.attempts {
				if !bytes.Equal(a.body, sent) {
					t.Errorf("attempt %d: the upstream got %d body bytes, not the %d sent", i+1, len(a.body), len(sent))
				}
				if !strings.HasPrefix(a.authorization, "Bearer at_") {
					t.Errorf("attempt %d: Authorization %.12q…, want the sidecar's token", i+1, a.authorization)
				}
			}
			if len(upstream.attempts) == 2 && upstream.attempts[0].authorization == upstream.attempts[1].authorization {
				t.Error("the replay carried the token the upstream had just rejected")
			}
		})
	}
}
