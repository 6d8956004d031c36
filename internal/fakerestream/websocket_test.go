package fakerestream

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream/wstest"

	"github.com/coder/websocket"
)

// The helpers here are independent of helpers_test.go's.

// newWSPair starts a Server and a WSServer that checks tokens against it,
// and returns them with the access token of a fresh pair.
func newWSPair(t *testing.T) (*Server, *WSServer, string) {
	t.Helper()
	s := New(Options{Logf: t.Logf})
	t.Cleanup(s.Close)
	at, _ := s.SeedPair()
	return s, newWS(t, s), at
}

func newWS(t *testing.T, tokens TokenChecker) *WSServer {
	t.Helper()
	ws := NewWebsocket(tokens)
	t.Cleanup(ws.Close)
	return ws
}

// wsURL is the ws:// address of the endpoint with the given raw query.
func wsURL(ws *WSServer, rawQuery string) string {
	u := "ws://" + strings.TrimPrefix(ws.URL(), "http://") + "/ws"
	if rawQuery != "" {
		u += "?" + rawQuery
	}
	return u
}

func wsCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestWebsocketRefusesBadTokens(t *testing.T) {
	_, ws, at := newWSPair(t)
	ctx := wsCtx(t)
	for _, q := range []string{
		"",
		"accessToken=",
		"accessToken=at_bogus",
		"accessToken=" + url.QueryEscape(at) + "&accessToken=at_bogus", // a client's token left beside the right one
		"access_token=" + url.QueryEscape(at),                          // the only name Restream takes is accessToken
	} {
		c, resp, err := websocket.Dial(ctx, wsURL(ws, q), nil)
		if err == nil {
			_ = c.CloseNow()
			t.Fatalf("query %q: upgraded, want 401", q)
		}
		if resp == nil || resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("query %q: %v (response %v), want 401", q, err, resp)
		}
	}
	if got := ws.Refused(); got != 5 {
		t.Fatalf("Refused() = %d, want 5", got)
	}
	if got := ws.Tokens(); len(got) != 0 {
		t.Fatalf("Tokens() = %d entries, want none", len(got))
	}

	// A plain request with a valid token is not an upgrade: 426, no connection.
	resp, err := http.Get(ws.URL() + "/ws?accessToken=" + url.QueryEscape(at))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUpgradeRequired {
		t.Fatalf("plain GET: %d, want 426", resp.StatusCode)
	}
}

func TestWebsocketHelloEchoTokens(t *testing.T) {
	_, ws, at := newWSPair(t)
	ctx := wsCtx(t)

	c := wstest.Dial(t, ctx, wsURL(ws, "x=1&accessToken="+url.QueryEscape(at)))
	hello := wstest.ReadAction(t, ctx, c)
	var info struct {
		ConnectionIdentifier string `json:"connectionIdentifier"`
		Status               string `json:"status"`
	}
	if hello.Action != "connection_info" || json.Unmarshal(hello.Payload, &info) != nil ||
		info.ConnectionIdentifier != "fake-ws-1" || info.Status != "connected" {
		t.Fatalf("hello: %s %s", hello.Action, hello.Payload)
	}
	wstest.Echo(t, ctx, c, "hello")
	wstest.Echo(t, ctx, c, `{"json":"as text"}`)
	if got := ws.Tokens(); len(got) != 1 || got[0] != at {
		t.Fatalf("Tokens() does not hold exactly the token presented (%d entries)", len(got))
	}
	if ws.OpenConns() != 1 {
		t.Fatalf("OpenConns() = %d, want 1", ws.OpenConns())
	}
	if err := c.Close(websocket.StatusNormalClosure, ""); err != nil {
		t.Fatalf("close: %v", err)
	}
	for deadline := time.Now().Add(5 * time.Second); ws.OpenConns() != 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the server kept the closed connection")
		}
	}
}

// The token is checked at the handshake only: an open connection outlives
// its token (revoked here; rotation kills it the same way), a new one with the same token is refused.
func TestWebsocketOpenConnOutlivesToken(t *testing.T) {
	s, ws, at := newWSPair(t)
	ctx := wsCtx(t)

	c := wstest.Dial(t, ctx, wsURL(ws, "accessToken="+url.QueryEscape(at)))
	wstest.ReadAction(t, ctx, c)
	s.RevokeAccessTokens()
	if s.ValidAccessToken(at) {
		t.Fatal("access token still valid after revocation")
	}
	wstest.Echo(t, ctx, c, "still here")
	if _, resp, err := websocket.Dial(ctx, wsURL(ws, "accessToken="+url.QueryEscape(at)), nil); err == nil || resp == nil || resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("new connection with the rotated token: %v, want 401", err)
	}
}

func TestWebsocketCloseConnections(t *testing.T) {
	_, ws, at := newWSPair(t)
	ctx := wsCtx(t)
	u := wsURL(ws, "accessToken="+url.QueryEscape(at))

	c := wstest.Dial(t, ctx, u)
	wstest.ReadAction(t, ctx, c)
	readErr := make(chan error, 1)
	go func() {
		_, _, err := c.Read(ctx)
		readErr <- err
	}()
	ws.CloseConnections()
	if err := <-readErr; websocket.CloseStatus(err) != websocket.StatusGoingAway {
		t.Fatalf("read after CloseConnections: %v, want close status 1001", err)
	}
	c2 := wstest.Dial(t, ctx, u)
	wstest.ReadAction(t, ctx, c2)
	wstest.Echo(t, ctx, c2, "after")
}

func TestWebsocketCloseNoLeak(t *testing.T) {
	s := New(Options{})
	t.Cleanup(s.Close)
	at, _ := s.SeedPair()
	before := runtime.NumGoroutine()

	ws := NewWebsocket(s)
	ctx := wsCtx(t)
	u := wsURL(ws, "accessToken="+url.QueryEscape(at))
	var clients []*websocket.Conn
	for range 5 {
		c, _, err := websocket.Dial(ctx, u, nil)
		if err != nil {
			t.Fatal(err)
		}
		wstest.ReadAction(t, ctx, c)
		clients = append(clients, c)
	}
	// A refused handshake and an idle keep-alive connection, too.
	if _, _, err := websocket.Dial(ctx, wsURL(ws, ""), nil); err == nil {
		t.Fatal("dial without token succeeded")
	}
	done := make(chan struct{})
	go func() { ws.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return")
	}
	if ws.OpenConns() != 0 {
		t.Fatalf("OpenConns() = %d after Close", ws.OpenConns())
	}
	for _, c := range clients {
		if _, _, err := c.Read(ctx); err == nil {
			t.Fatal("client read succeeded after Close")
		}
		_ = c.CloseNow()
	}
	http.DefaultClient.CloseIdleConnections()
	const slack = 2
	deadline := time.Now().Add(5 * time.Second)
	now := runtime.NumGoroutine()
	for ; now > before+slack && time.Now().Before(deadline); now = runtime.NumGoroutine() {
		time.Sleep(20 * time.Millisecond)
	}
	if now > before+slack {
		buf := make([]byte, 1<<20)
		t.Fatalf("goroutines: %d before, %d after Close\n%s", before, now, buf[:runtime.Stack(buf, true)])
	}
}
