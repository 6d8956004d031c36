// Package wstest is the client side of the fake Restream's websocket
// protocol (internal/fakerestream), for the tests of the fake and of the
// sidecar: each helper fails the test on anything unexpected. It is apart
// from the fake so that binaries with the demo do not link package testing.
package wstest

import (
	"context"
	"encoding/json"
	"net/url"
	"testing"

	"github.com/coder/websocket"
)

// Action is one message of the protocol: {"action": …, "payload": …}.
type Action struct {
	Action  string          `json:"action"`
	Payload json.RawMessage `json:"payload"`
}

// Dial opens a websocket to u (its query, which carries the access
// token, is never printed) and closes it when the test ends.
func Dial(t testing.TB, ctx context.Context, u string) *websocket.Conn {
	t.Helper()
	c, resp, err := websocket.Dial(ctx, u, nil)
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		shown := u
		if parsed, perr := url.Parse(u); perr == nil {
			parsed.RawQuery = ""
			shown = parsed.String() + "?…"
		}
		t.Fatalf("dial %s: status %d: %v", shown, status, err)
	}
	t.Cleanup(func() { _ = c.CloseNow() })
	return c
}

// ReadAction reads one message, which must be JSON text.
func ReadAction(t testing.TB, ctx context.Context, c *websocket.Conn) Action {
	t.Helper()
	typ, b, err := c.Read(ctx)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	var a Action
	if typ != websocket.MessageText || json.Unmarshal(b, &a) != nil {
		t.Fatalf("not a JSON text message: %v %q", typ, b)
	}
	return a
}

// Echo sends msg and requires the fake's echo of it.
func Echo(t testing.TB, ctx context.Context, c *websocket.Conn, msg string) {
	t.Helper()
	if err := c.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	a := ReadAction(t, ctx, c)
	var got string
	if a.Action != "echo" || json.Unmarshal(a.Payload, &got) != nil || got != msg {
		t.Fatalf("got %s %s, want the echo of %q", a.Action, a.Payload, msg)
	}
}
