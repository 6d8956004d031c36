package caddymodule_test

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/coder/websocket"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
)

// queryLogSite is a sidecar with query_param accessToken and DEBUG logging
// to a file, plus an access log: /ws goes to the fake websocket, anything
// else to the fake API.
func queryLogSite(port int, storageDir, debugLog, accessLog string, fake *fakerestream.Server, ws *fakerestream.WSServer) string {
	return fmt.Sprintf(`{
	admin off
	storage file_system %s
	auto_https off
	persist_config off
	log {
		output file %s
		level DEBUG
	}
}

http://127.0.0.1:%d {
	log {
		output file %s
	}
	restream_auth {
		client_id test-client
		client_secret test-secret
		refresh_token %s
		token_url %s
		query_param accessToken
	}
	reverse_proxy /ws %s
	reverse_proxy %s
}
`, storageDir, debugLog, port, accessLog, fake.Seed(), fake.TokenURL(), ws.URL(), fake.URL())
}

// With query_param the token reaches the upstream in the query, for a plain
// request and for a websocket upgrade, yet no token appears in Caddy's DEBUG
// log (reverse_proxy's "upstream roundtrip" logs r.RequestURI as "uri") or
// in the access log: both show the URI as the client sent it.
func TestQueryParamTokenNotInDebugLogs(t *testing.T) {
	fake := newFake(t, fakerestream.Options{})
	ws := fakerestream.NewWebsocket(fake)
	t.Cleanup(ws.Close)
	dir := t.TempDir()
	debugLog, accessLog := filepath.Join(dir, "debug.log"), filepath.Join(dir, "access.log")
	port := freePort(t)
	runInProcess(t, queryLogSite(port, filepath.Join(dir, "storage"), debugLog, accessLog, fake, ws))
	addr := "127.0.0.1:" + itoa(port)
	const bogus = "client-supplied-bogus"

	// (1) A plain GET: the upstream sees the token in the header and in the
	// one accessToken parameter.
	status, body, _ := do(t, http.MethodGet, "http://"+addr+"/v2/user/profile?a=1&accessToken="+bogus, nil, nil)
	if status != http.StatusOK {
		t.Fatalf("plain GET: %d %s", status, body)
	}
	e := decodeEcho(t, body)
	if !fake.ValidAccessToken(e.AccessTokenQ) || e.Authorization != "Bearer "+e.AccessTokenQ || e.Query != "a=1&accessToken="+e.AccessTokenQ {
		t.Fatalf("plain GET: upstream saw accessToken %.9q…, Authorization %.16q…, %d accessToken parameter(s)",
			e.AccessTokenQ, e.Authorization, strings.Count(e.Query, "accessToken="))
	}

	// (2) A websocket upgrade: the fake accepts the handshake only with a
	// valid token in the query.
	ctx := wsTestCtx(t)
	c, id := wsDial(t, ctx, "ws://"+addr+"/ws?x=1&accessToken="+bogus)
	wsEcho(t, ctx, c, "through the sidecar")
	if got := wsTokenOf(t, ws, id); got != e.AccessTokenQ {
		t.Fatalf("the websocket upstream saw %.9q…, want the sidecar's token", got)
	}
	if err := c.Close(websocket.StatusNormalClosure, ""); err != nil {
		t.Fatalf("closing the websocket: %v", err)
	}
	if n := ws.Refused(); n != 0 {
		t.Fatalf("the websocket upstream refused %d handshakes", n)
	}

	// The upgrade is access-logged when its handler returns, after the
	// connection has closed; Caddy offers no signal for that.
	waitFor(t, 10*time.Second, "the access log line of the upgrade", func() bool {
		b, _ := os.ReadFile(accessLog)
		return strings.Count(string(b), `"msg":"handled request"`) >= 2
	})
	if err := caddy.Stop(); err != nil { // flush and close the logs
		t.Fatal(err)
	}

	read := func(name string) string {
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	debug, access := read(debugLog), read(accessLog)
	// The logs do carry the URIs (so a token in one would be seen): both
	// requests' "upstream roundtrip" lines and access log lines, each with
	// the query the client sent.
	for _, uri := range []string{`"uri":"/v2/user/profile?a=1&accessToken=` + bogus + `"`, `"uri":"/ws?x=1&accessToken=` + bogus + `"`} {
		if !hasLineWith(debug, `"msg":"upstream roundtrip"`, uri) {
			t.Errorf("DEBUG log has no upstream roundtrip line with %s", uri)
		}
		if !hasLineWith(access, `"msg":"handled request"`, uri) {
			t.Errorf("access log has no line with %s", uri)
		}
	}
	secrets := append(fake.IssuedTokens(), "test-secret")
	mustContainNone(t, "DEBUG log", debug, secrets...)
	mustContainNone(t, "access log", access, secrets...)
	t.Logf("checked %d bytes of DEBUG log and %d of access log against %d secrets", len(debug), len(access), len(secrets))
}

// hasLineWith tells whether some line of text contains all of subs.
func hasLineWith(text string, subs ...string) bool {
	for line := range strings.SplitSeq(text, "\n") {
		all := true
		for _, s := range subs {
			all = all && strings.Contains(line, s)
		}
		if all {
			return true
		}
	}
	return false
}
