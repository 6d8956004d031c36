package caddymodule

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
)

func TestTokenProxyCaddyfile(t *testing.T) {
	checkCaddyfileCases(t, []caddyfileCase[TokenProxy]{
		{
			name: "every subdirective",
			input: `restream_token_proxy {
	client_id     {env.RESTREAM_CLIENT_ID}
	client_secret {file./run/secrets/restream_secret}
	token_url     https://api.restream.io/oauth/token
	revoke_url    https://api.restream.io/oauth/revoke
	client_auth   body
	timeout       15s
	max_concurrent 8
	redirect_uris https://app.example/callback com.example.app:/oauth2redirect
	redirect_uris http://127.0.0.1:8765/cb
}`,
			want: TokenProxy{
				ClientID:      "{env.RESTREAM_CLIENT_ID}",
				ClientSecret:  "{file./run/secrets/restream_secret}",
				TokenURL:      "https://api.restream.io/oauth/token",
				RevokeURL:     "https://api.restream.io/oauth/revoke",
				ClientAuth:    "body",
				Timeout:       caddy.Duration(15 * time.Second),
				MaxConcurrent: 8,
				RedirectURIs:  []string{"https://app.example/callback", "com.example.app:/oauth2redirect", "http://127.0.0.1:8765/cb"},
			},
		},
		{
			name:  "minimal",
			input: "restream_token_proxy {\n\tclient_id id\n\tclient_secret secret\n}",
			want:  TokenProxy{ClientID: "id", ClientSecret: "secret"},
		},
		{
			name: "loopback http, basic, day unit",
			input: `restream_token_proxy {
	client_id id
	client_secret secret
	client_auth basic
	token_url http://127.0.0.1:8080/oauth/token
	revoke_url http://[::1]:8080/oauth/revoke
	timeout 1d
}`,
			want: TokenProxy{ClientID: "id", ClientSecret: "secret", ClientAuth: "basic",
				TokenURL: "http://127.0.0.1:8080/oauth/token", RevokeURL: "http://[::1]:8080/oauth/revoke",
				Timeout: caddy.Duration(24 * time.Hour)},
		},
		{
			name:  "localhost",
			input: "restream_token_proxy {\n\tclient_id id\n\tclient_secret secret\n\ttoken_url http://localhost:9/t\n}",
			want:  TokenProxy{ClientID: "id", ClientSecret: "secret", TokenURL: "http://localhost:9/t"},
		},
	})
}

func TestTokenProxyCaddyfileErrors(t *testing.T) {
	// block wraps lines into a valid block; the first of them is on line 4.
	block := func(lines ...string) string {
		return "restream_token_proxy {\n\tclient_id id\n\tclient_secret secret\n\t" + strings.Join(lines, "\n\t") + "\n}"
	}
	checkCaddyfileErrors[TokenProxy](t, []caddyfileErrorCase{
		{"unknown subdirective", block("refresh_token rt"), `unknown subdirective "refresh_token"`, 4},
		{"unknown subdirective without value", block("timeout 1s", "replay_401"), `unknown subdirective "replay_401"`, 5},
		{"missing value", block("timeout 1s", "token_url"), "token_url: expected one value", 5},
		{"missing value at the end", block("client_auth"), "client_auth: expected one value", 4},
		{"extra value", block("client_auth basic body"), "client_auth: expected one value, got more", 4},
		{"empty value", block(`revoke_url ""`), "revoke_url: empty value", 4},
		{"bad mode", block("client_auth digest"), `client_auth "digest": want basic or body`, 4},
		{"bad duration", block("timeout soon"), `timeout "soon": `, 4},
		{"duration without unit", block("timeout 10"), `timeout "10": `, 4},
		{"zero duration", block("timeout 0s"), `timeout "0s": must be positive`, 4},
		{"negative duration", block("timeout -5s"), `timeout "-5s": must be positive`, 4},
		{"token_url http non-loopback", block("token_url http://api.restream.io/oauth/token"),
			`token_url "http://api.restream.io/oauth/token": plain http is allowed only for loopback hosts`, 4},
		{"revoke_url http non-loopback", block("timeout 1s", "revoke_url http://10.0.0.1/oauth/revoke"),
			`revoke_url "http://10.0.0.1/oauth/revoke": plain http is allowed only for loopback hosts`, 5},
		{"revoke_url loopback-looking name", block("revoke_url http://localhost.example.com/r"), "plain http is allowed only for loopback hosts", 4},
		{"token_url relative", block("token_url /oauth/token"), "is not an absolute URL", 4},
		{"revoke_url bad scheme", block("revoke_url ftp://api.restream.io/oauth/revoke"), "scheme must be https", 4},
		{"token_url credentials", block("token_url https://u:p@api.restream.io/oauth/token"), "token_url must not contain credentials", 4},
		{"missing client_id", "restream_token_proxy {\n\tclient_secret s\n\ttimeout 1s\n}", "client_id is required", 4},
		{"missing client_secret", "restream_token_proxy {\n\tclient_id id\n}", "client_secret is required", 3},
		{"no block", "restream_token_proxy", "client_id is required", 1},
		{"an argument", "restream_token_proxy acct {\n\tclient_id id\n\tclient_secret s\n}", `takes no arguments (unexpected "acct")`, 1},
		{"max_concurrent zero", block("max_concurrent 0"), `max_concurrent "0": must be a positive integer`, 4},
		{"max_concurrent negative", block("timeout 1s", "max_concurrent -3"), `max_concurrent "-3": must be a positive integer`, 5},
		{"max_concurrent not a number", block("max_concurrent many"), `max_concurrent "many": must be a positive integer`, 4},
		{"max_concurrent too large", block("max_concurrent 99999999999999999999"), "must be a positive integer", 4},
		{"max_concurrent two values", block("max_concurrent 1 2"), "max_concurrent: expected one value, got more", 4},
		{"max_concurrent without value", block("max_concurrent"), "max_concurrent: expected one value", 4},
		{"redirect_uris without value", block("timeout 1s", "redirect_uris"), "redirect_uris: expected at least one URI", 5},
		{"redirect_uris relative", block("redirect_uris /callback"), `redirect_uris "/callback": not an absolute URI`, 4},
		{"redirect_uris empty", block(`redirect_uris ""`), `redirect_uris "": not an absolute URI`, 4},
		{"redirect_uris fragment", block("redirect_uris https://a.example/cb https://a.example/cb#x"), `redirect_uris "https://a.example/cb#x": must not contain a fragment`, 4},
		{"redirect_uris empty fragment", block("redirect_uris https://a.example/cb#"), "must not contain a fragment", 4},
		{"redirect_uris https without host", block("redirect_uris https:/cb"), "an https URI needs a host", 4},
		{"redirect_uris space", block(`redirect_uris "https://a.example/c b"`), "must not contain spaces or control characters", 4},
		{"redirect_uris listed twice", block("redirect_uris https://a.example/cb", "redirect_uris https://b.example/cb https://a.example/cb"), `redirect_uris "https://a.example/cb" is listed twice`, 5},
		{"redirect_uris block", block("redirect_uris {", "}"), "redirect_uris: expected at least one URI", 4},
		{"redirect_uris then a block", block("redirect_uris https://a.example/cb {", "}"), `unknown subdirective "{"`, 4},
	})
}

// The directive works outside route blocks, before reverse_proxy, with or
// without a matcher, and its placeholders stay unresolved in the JSON.
func TestTokenProxyCaddyfileAdapt(t *testing.T) {
	t.Setenv("TP_ADAPT_SECRET", "resolved-secret-must-not-appear")
	input := `{
	admin off
}

:8080 {
	reverse_proxy https://api.restream.io
	restream_token_proxy /oauth/* {
		client_id my-client
		client_secret {env.TP_ADAPT_SECRET}
		client_auth body
		timeout 3s
		max_concurrent 8
		redirect_uris https://app.example/callback com.example.app:/oauth2redirect
	}
}

:8081 {
	respond /health 200
	restream_token_proxy {
		client_id my-client
		client_secret {file./run/secrets/restream}
	}
}
`
	out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(input), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatalf("adapting: %v", err)
	}
	for _, w := range warnings {
		t.Errorf("adapt warning: %s", w)
	}
	if strings.Contains(string(out), "resolved-secret-must-not-appear") {
		t.Fatal("the adapted config holds the resolved secret")
	}
	var cfg struct {
		Apps struct {
			HTTP struct {
				Servers map[string]struct {
					Listen []string          `json:"listen"`
					Routes []json.RawMessage `json:"routes"`
				} `json:"servers"`
			} `json:"http"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatal(err)
	}
	// handlerOrder lists the handler names in the order the routes run them.
	handlerOrder := func(routes []json.RawMessage) (names []string, proxies []map[string]any) {
		var walk func(v any)
		walk = func(v any) {
			switch v := v.(type) {
			case map[string]any:
				if h, ok := v["handler"].(string); ok && h != "subroute" {
					names = append(names, h)
					if h == "restream_token_proxy" {
						proxies = append(proxies, v)
					}
				}
				for _, k := range []string{"routes", "handle"} {
					walk(v[k])
				}
			case []any:
				for _, c := range v {
					walk(c)
				}
			}
		}
		for _, r := range routes {
			var v any
			_ = json.Unmarshal(r, &v)
			walk(v)
		}
		return names, proxies
	}
	found := 0
	for _, srv := range cfg.Apps.HTTP.Servers {
		names, proxies := handlerOrder(srv.Routes)
		switch strings.Join(srv.Listen, ",") {
		case ":8080":
			found++
			if !reflect.DeepEqual(names, []string{"restream_token_proxy", "reverse_proxy"}) {
				t.Errorf(":8080 handlers %v, want restream_token_proxy before reverse_proxy", names)
			}
			want := map[string]any{"handler": "restream_token_proxy", "client_id": "my-client",
				"client_secret": "{env.TP_ADAPT_SECRET}", "client_auth": "body", "timeout": float64(3 * time.Second),
				"max_concurrent": float64(8), "redirect_uris": []any{"https://app.example/callback", "com.example.app:/oauth2redirect"}}
			if len(proxies) != 1 || !reflect.DeepEqual(proxies[0], want) {
				t.Errorf(":8080 restream_token_proxy JSON %v, want %v", proxies, want)
			}
		case ":8081":
			found++
			if len(names) != 2 || names[1] != "restream_token_proxy" {
				t.Errorf(":8081 handlers %v, want respond then restream_token_proxy", names)
			}
		}
	}
	if found != 2 {
		t.Fatalf("servers %+v", cfg.Apps.HTTP.Servers)
	}
}
