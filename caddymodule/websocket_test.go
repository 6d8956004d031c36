package caddymodule_test

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream/wstest"

	"github.com/coder/websocket"

	"github.com/restream-sidecar/caddy-restream-auth/caddymodule"
	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
)

// wsSite is a sidecar laid out like caddyfile.example: one restream_auth
// snippet imported by every route, so all routes share one token source;
// the websocket route adds query_param accessToken.
//
//	/chat/ws  -> rewritten to /ws, token in ?accessToken=, to the fake websocket
//	/q/...    -> prefix stripped, token in ?accessToken= too, to the fake API
//	anything else -> to the fake API with the Authorization header only
type wsSite struct {
	Port       int
	StorageDir string
	Fake       *fakerestream.Server
	WS         *fakerestream.WSServer
	Seed       string
	Extra      string // more restream_auth subdirectives, one per line
}

func (c wsSite) Caddyfile() string {
	var extra strings.Builder
	for line := range strings.SplitSeq(c.Extra, "\n") {
		if line = strings.TrimSpace(line); line != "" {
			extra.WriteString("\t\t" + line + "\n")
		}
	}
	return fmt.Sprintf(`{
	admin off
	storage file_system %[1]s
	auto_https off
	persist_config off
}

(restream) {
	restream_auth {
		client_id test-client
		client_secret test-secret
		refresh_token %[2]s
		token_url %[3]s
%[4]s		{block}
	}
}

http://127.0.0.1:%[5]d {
	handle /chat/ws {
		rewrite * /ws
		import restream {
			query_param accessToken
		}
		reverse_proxy %[6]s
	}
	handle_path /q/* {
		import restream {
			query_param accessToken
		}
		reverse_proxy %[7]s
	}
	handle {
		import restream
		reverse_proxy %[7]s
	}
}
`, c.StorageDir, c.Seed, c.Fake.TokenURL(), extra.String(), c.Port, c.WS.URL(), c.Fake.URL())
}

// startWSSite starts the fake, its websocket endpoint and Caddy in front of
// them; everything is stopped at the end of the test.
func startWSSite(t *testing.T, opts fakerestream.Options, extra string) (wsSite, string) {
	t.Helper()
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	fake := fakerestream.New(opts)
	t.Cleanup(fake.Close)
	ws := fakerestream.NewWebsocket(fake)
	t.Cleanup(ws.Close)
	site := wsSite{Port: testproc.Port(t), StorageDir: t.TempDir(), Fake: fake, WS: ws, Seed: fake.Seed(), Extra: extra}
	runInProcess(t, site.Caddyfile())
	return site, "127.0.0.1:" + itoa(site.Port)
}

func wsTestCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// wsDial opens a websocket through the sidecar, reads the hello and returns
// the connection with its connectionIdentifier. The connection is closed at
// the end of the test (before Caddy stops).
func wsDial(t *testing.T, ctx context.Context, u string) (*websocket.Conn, string) {
	t.Helper()
	// No retry: a handshake that races a rotation is replayed by the
	// sidecar, so a client never sees that race.
	c := wstest.Dial(t, ctx, u)
	hello := wstest.ReadAction(t, ctx, c)
	var info struct {
		ConnectionIdentifier string `json:"connectionIdentifier"`
	}
	if hello.Action != "connection_info" || json.Unmarshal(hello.Payload, &info) != nil || info.ConnectionIdentifier == "" {
		t.Fatalf("hello: %s %s", hello.Action, hello.Payload)
	}
	return c, info.ConnectionIdentifier
}

// wsTokenOf returns the token that the fake saw on the connection whose hello
// said id ("fake-ws-<n>").
func wsTokenOf(t *testing.T, ws *fakerestream.WSServer, id string) string {
	t.Helper()
	var n int
	if _, err := fmt.Sscanf(id, "fake-ws-%d", &n); err != nil {
		t.Fatalf("connection id %q: %v", id, err)
	}
	toks := ws.Tokens()
	if n < 1 || n > len(toks) {
		t.Fatalf("connection %s not recorded (%d recorded)", id, len(toks))
	}
	return toks[n-1]
}

// A websocket client connects through the sidecar with a bogus accessToken
// or none at all: the upgrade succeeds, the hello arrives, messages
// round-trip, and the upstream sees the current valid token, the same one
// the REST route uses (one token source for the account).
func TestWebsocketThroughSidecar(t *testing.T) {
	site, addr := startWSSite(t, fakerestream.Options{}, "")
	ctx := wsTestCtx(t)

	c1, id1 := wsDial(t, ctx, "ws://"+addr+"/chat/ws?accessToken=client-supplied-bogus")
	wstest.Echo(t, ctx, c1, "hello through caddy")
	wstest.Echo(t, ctx, c1, `{"a":[1,2,3]}`)
	tok := wsTokenOf(t, site.WS, id1)
	if tok == "client-supplied-bogus" || !strings.HasPrefix(tok, "at_") || !site.Fake.ValidAccessToken(tok) {
		t.Fatalf("the websocket upstream saw %.9q…, want a valid fake access token", tok)
	}

	// No accessToken at all, and other parameters kept.
	c2, id2 := wsDial(t, ctx, "ws://"+addr+"/chat/ws?x=1")
	wstest.Echo(t, ctx, c2, "second")
	if got := wsTokenOf(t, site.WS, id2); got != tok {
		t.Fatal("second connection got a different token although none rotated")
	}
	wstest.Echo(t, ctx, c1, "first still open")

	// The REST route shares the token source: same token, one exchange.
	status, body, _ := do(t, http.MethodGet, "http://"+addr+"/v2/user/profile", nil, nil)
	if status != http.StatusOK {
		t.Fatalf("REST: %d %s", status, body)
	}
	if e := decodeEcho(t, body); e.Authorization != "Bearer "+tok || e.AccessTokenQuery != "" {
		t.Fatalf("REST route: Authorization is not the websocket's token, or accessToken was added (%q)", e.Query)
	}

	// A plain request through a query_param route: token in the header and
	// in the one accessToken parameter, the client's value replaced.
	status, body, _ = do(t, http.MethodGet, "http://"+addr+"/q/v2/user/profile?a=1&accessToken=client-supplied-bogus&b=2", nil, nil)
	if status != http.StatusOK {
		t.Fatalf("plain request through the query_param route: %d %s", status, body)
	}
	e := decodeEcho(t, body)
	if e.Authorization != "Bearer "+tok || e.AccessTokenQuery != tok || e.Path != "/v2/user/profile" ||
		strings.Contains(e.Query, "bogus") || strings.Count(e.Query, "accessToken=") != 1 ||
		!strings.HasPrefix(e.Query, "a=1&b=2&") {
		t.Fatalf("plain request through the query_param route arrived as path %q, query with %d accessToken(s), bogus kept: %v",
			e.Path, strings.Count(e.Query, "accessToken="), strings.Contains(e.Query, "bogus"))
	}

	// A plain (non-upgrade) request on the websocket route itself reaches
	// the upstream with a valid token: the fake checks the token first (401
	// otherwise), then answers 426 because it is not an upgrade.
	status, body, _ = do(t, http.MethodGet, "http://"+addr+"/chat/ws?accessToken=client-supplied-bogus", nil, nil)
	if status != http.StatusUpgradeRequired {
		t.Fatalf("plain GET on the websocket route: %d %s, want 426 from the upstream", status, body)
	}

	if st := site.Fake.Stats(); st.RefreshCalls != 1 || st.InvalidGrant != 0 {
		t.Fatalf("want exactly one token exchange (the seed) shared by all routes, got %d refreshes, %d invalid_grant",
			st.RefreshCalls, st.InvalidGrant)
	}
	if n := site.WS.Refused(); n != 0 {
		t.Fatalf("the websocket upstream refused %d handshakes", n)
	}
}

// Tokens rotate (2 s tokens, renewed 1 s ahead) while a websocket is open.
// The sidecar cannot change the token of an open connection: the fake, like
// Restream as far as is known, checks it only at the handshake, so the open
// connection keeps working on a token that is long dead, and a new
// connection gets the current token. A client that is dropped by the real
// service at expiry reconnects and so gets the current token.
func TestWebsocketRotationOpenAndNewConnections(t *testing.T) {
	skipIfShort(t, "waits for rotations of 2-second tokens")
	site, addr := startWSSite(t, fakerestream.Options{AccessTTL: 2 * time.Second}, "refresh_ahead 1s")
	ctx := wsTestCtx(t)
	u := "ws://" + addr + "/chat/ws"

	old, oldID := wsDial(t, ctx, u)
	oldTok := wsTokenOf(t, site.WS, oldID)
	wstest.Echo(t, ctx, old, "before rotation")

	deadline := time.Now().Add(15 * time.Second)
	for site.Fake.ValidAccessToken(oldTok) {
		if time.Now().After(deadline) {
			t.Fatal("the token of the open connection never rotated")
		}
		time.Sleep(50 * time.Millisecond)
	}
	wstest.Echo(t, ctx, old, "after rotation: the open connection is not kicked")

	// The handshake succeeding proves the token was valid at that moment;
	// with 2 s tokens it may have rotated again by the time we look.
	fresh, freshID := wsDial(t, ctx, u+"?accessToken=client-supplied-bogus")
	if freshTok := wsTokenOf(t, site.WS, freshID); freshTok == oldTok {
		t.Fatal("a new connection after rotation got the old token")
	}
	wstest.Echo(t, ctx, fresh, "new connection")
	wstest.Echo(t, ctx, old, "old connection, still")

	st := site.Fake.Stats()
	// The fake may have refused a handshake that raced the rotation (the
	// sidecar then replayed it); the clients saw none.
	t.Logf("rotations: %d, invalid_grant: %d, handshakes refused upstream and replayed: %d", st.RefreshOK, st.InvalidGrant, site.WS.Refused())
	if st.InvalidGrant != 0 {
		t.Fatal("want no invalid_grant")
	}
	if site.WS.OpenConns() != 2 {
		t.Fatalf("open websocket connections at the fake: %d, want 2", site.WS.OpenConns())
	}
}

// Restream revokes the access token server-side. An open websocket is not
// affected. A new handshake meets the upstream's 401 before any upgrade; the
// sidecar refreshes once and replays it, so the client's first dial works.
func TestWebsocketAfterRevocation(t *testing.T) {
	site, addr := startWSSite(t, fakerestream.Options{}, "")
	ctx := wsTestCtx(t)
	u := "ws://" + addr + "/chat/ws"

	open, openID := wsDial(t, ctx, u)
	tok := wsTokenOf(t, site.WS, openID)
	site.Fake.RevokeAccessTokens()
	wstest.Echo(t, ctx, open, "revoked but open")

	replayed, replayedID := wsDial(t, ctx, u)
	if got := wsTokenOf(t, site.WS, replayedID); got == tok || !site.Fake.ValidAccessToken(got) {
		t.Fatal("the replayed handshake did not carry the refreshed token")
	}
	wstest.Echo(t, ctx, replayed, "replayed handshake")
	if refused := site.WS.Refused(); refused != 1 {
		t.Fatalf("handshakes refused upstream: %d, want 1 (the one the sidecar replayed)", refused)
	}
	if calls := site.Fake.Stats().RefreshCalls; calls != 2 {
		t.Fatalf("refresh calls %d, want 2 (seed + one after the refused handshake)", calls)
	}

	status, body, _ := do(t, http.MethodGet, "http://"+addr+"/v2/user/profile", nil, nil)
	if status != http.StatusOK {
		t.Fatalf("REST after revocation: %d %s (want the 401 replayed with a refreshed token)", status, body)
	}
	fresh, freshID := wsDial(t, ctx, u)
	if got := wsTokenOf(t, site.WS, freshID); got == tok || !site.Fake.ValidAccessToken(got) {
		t.Fatal("the new connection did not get the refreshed token")
	}
	wstest.Echo(t, ctx, fresh, "after refresh")
	wstest.Echo(t, ctx, open, "the revoked connection still works")
	if st := site.Fake.Stats(); st.InvalidGrant != 0 {
		t.Fatalf("invalid_grant: %d", st.InvalidGrant)
	}
}

// caddyfile.example: every restream_auth handler (REST, chat and streaming
// routes) has the same account and settings, so they share one token
// source; only the websocket routes add query_param accessToken.
func TestWebsocketExampleRoutesShareSettings(t *testing.T) {
	text, err := os.ReadFile("../caddyfile.example")
	if err != nil {
		t.Fatal(err)
	}
	var cfg any
	if err := json.Unmarshal(adapt(t, string(text)), &cfg); err != nil {
		t.Fatal(err)
	}
	var handlers []map[string]any
	dials := map[string]bool{}
	caddymodule.WalkJSON(cfg, func(m map[string]any) {
		if m["handler"] == "restream_auth" {
			handlers = append(handlers, m)
		}
		if d, ok := m["dial"].(string); ok {
			dials[d] = true
		}
	})
	if len(handlers) != 3 {
		t.Fatalf("found %d restream_auth handlers, want 3 (REST, chat, streaming)", len(handlers))
	}
	var withParam int
	var first string
	for i, h := range handlers {
		switch h["query_param"] {
		case "accessToken":
			withParam++
		case nil:
		default:
			t.Errorf("handler %d: query_param %v", i, h["query_param"])
		}
		rest := maps.Clone(h)
		delete(rest, "query_param")
		b, _ := json.Marshal(rest) // map keys are sorted
		if i == 0 {
			first = string(b)
		} else if string(b) != first {
			t.Errorf("handler %d differs beyond query_param:\n%s\n%s", i, first, b)
		}
	}
	if withParam != 2 {
		t.Errorf("%d handlers set query_param accessToken, want 2 (chat, streaming)", withParam)
	}
	for _, host := range []string{"chat.api.restream.io:443", "streaming.api.restream.io:443", "api.restream.io:443"} {
		if !dials[host] {
			t.Errorf("no upstream %s", host)
		}
	}
}
