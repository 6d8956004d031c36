package caddymodule

import (
	"fmt"
	"strings"
	"testing"

	"go.uber.org/zap/zapcore"
)

func TestLoginPathHelpers(t *testing.T) {
	for in, want := range map[string]string{"/restream/login": "login", "/login": "login", "/restream/callback": "callback",
		"/restream/": "status", "/": "status", "/restream/login/": "", "/restream/callback/": "", "login": "login", "": "",
		"/restream/other": "", "/restream": "", "/restream/login.html": ""} {
		if got := loginRoute(in); got != want {
			t.Errorf("loginRoute(%q) = %q, want %q", in, got, want)
		}
	}
	for code, want := range map[string]string{"access_denied": "access_denied", "server_error": "server_error",
		"<script>": "(unrecognized)", "Bad": "(unrecognized)", strings.Repeat("a", 65): "(unrecognized)"} {
		if got := loginOAuthCode(code); got != want {
			t.Errorf("loginOAuthCode(%q) = %q, want %q", code, got, want)
		}
	}
}

// A literal client secret never reaches a log line that prints the handler
// (`servers { trace }`).
func TestLoginMarshalLogObject(t *testing.T) {
	l := &Login{Account: "a", ClientID: "id", ClientSecret: "cs_literal_in_config_1234", clientSecret: "cs_literal_in_config_1234",
		RedirectURI: "https://s.example.com/callback"}
	enc := zapcore.NewMapObjectEncoder()
	if err := l.MarshalLogObject(enc); err != nil {
		t.Fatal(err)
	}
	out := fmt.Sprint(enc.Fields)
	if strings.Contains(out, "cs_literal_in_config_1234") {
		t.Fatalf("log object contains the client secret: %s", out)
	}
	if enc.Fields["redirect_uri"] != "https://s.example.com/callback" || enc.Fields["account"] != "a" {
		t.Fatalf("log object lacks the useful fields: %s", out)
	}
}
