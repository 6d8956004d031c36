package caddymodule_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// A seed configured as restream_auth's refresh_token records its user after
// its first exchange: the pair is stored first, then the user is written
// into the same generation. The admin API shows the user, never a token,
// and later generations keep it.
func TestAdminShowsSeedsRestreamUser(t *testing.T) {
	fake := newFake(t, fakerestream.Options{User: fakerestream.User{ID: 4242, Username: "alice"}, Logf: func(string, ...any) {}})
	cfg := siteConfig{Port: freePort(t), AdminPort: freePort(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed()}
	runInProcess(t, cfg.Caddyfile())
	site := fmt.Sprintf("http://127.0.0.1:%d/v2/platform/all", cfg.Port)
	if status, body, _ := do(t, http.MethodGet, site, nil, nil); status != http.StatusOK {
		t.Fatalf("proxied request: %d %s", status, body)
	}
	admin := fmt.Sprintf("http://127.0.0.1:%d/restream_auth/", cfg.AdminPort)
	var raw string
	// The user is written by the refresher after the request got its token.
	waitFor(t, 10*time.Second, "the admin API to show the seed's user", func() bool {
		resp, err := noKeepAlive.Get(admin)
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		raw = string(b)
		return strings.Contains(raw, `"user":{"id":"4242","username":"alice"}`)
	})
	var out struct {
		Accounts []struct {
			Generation uint64 `json:"generation"`
		} `json:"accounts"`
	}
	if err := json.Unmarshal([]byte(raw), &out); err != nil || len(out.Accounts) != 1 || out.Accounts[0].Generation != 1 {
		t.Fatalf("admin status: %s", raw)
	}
	mustContainNone(t, "admin status", raw, fake.IssuedTokens()...)
	rec := loadCmdRecord(t, cfg.StorageDir, "default")
	if rec.User == nil || rec.User.ID != "4242" || rec.Generation != 1 {
		t.Fatalf("stored record: generation %d, user %+v", rec.Generation, rec.User)
	}

	// A forced rotation keeps the user without asking again.
	resp, err := noKeepAlive.Post(strings.TrimSuffix(admin, "/")+"/default/refresh", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), `"generation":2`) || !strings.Contains(string(b), `"user":{"id":"4242","username":"alice"}`) {
		t.Fatalf("forced refresh: %d %s", resp.StatusCode, b)
	}
	if rec := loadCmdRecord(t, cfg.StorageDir, "default"); rec.User == nil || rec.User.ID != "4242" || rec.Generation != 2 {
		t.Fatalf("second generation: %+v", rec.User)
	}
	if n := fake.Stats().ProfileCalls; n != 1 {
		t.Fatalf("%d profile reads, want 1", n)
	}
}

// A running instance (the admin API) and `caddy restream-auth status` (the
// stored record) say the same word for the same state: ok while the chain
// works, and, once the grant is revoked and a refresh refused,
// reauth_required, tokensource's one declared word for it.
func TestAdminAndCLIStatusSayTheSameState(t *testing.T) {
	fake := newFake(t, fakerestream.Options{Logf: quiet})
	cfg := siteConfig{Port: freePort(t), AdminPort: freePort(t), StorageDir: t.TempDir(), Fake: fake, Seed: fake.Seed()}
	runInProcess(t, cfg.Caddyfile())
	cfgPath := writeCmdConfig(t, cfg.Caddyfile())
	admin := fmt.Sprintf("http://127.0.0.1:%d", cfg.AdminPort)
	cliState := func() string {
		t.Helper()
		res := runCmd(t, newCmdEnv(t), "", "restream-auth", "status", "--json", "--config", cfgPath)
		var out struct {
			Accounts []struct{ Account, State string }
		}
		if err := json.Unmarshal([]byte(res.stdout), &out); err != nil || len(out.Accounts) != 1 || out.Accounts[0].Account != "default" {
			t.Fatalf("status --json: %v\n%s", err, res)
		}
		return out.Accounts[0].State
	}
	if status, body, _ := do(t, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/v2/platform/all", cfg.Port), nil, nil); status != http.StatusOK {
		t.Fatalf("proxied request: %d %s", status, body)
	}
	if live, stored := adminStatus(t, admin)["default"].State, cliState(); live != string(tokensource.StateOK) || stored != live {
		t.Fatalf("a working chain: admin API %q, status command %q; want both %q", live, stored, tokensource.StateOK)
	}

	revokeGrant(t, fake, loadCmdRecord(t, cfg.StorageDir, "default").RefreshToken)
	if status, body, _ := do(t, http.MethodPost, admin+"/restream_auth/default/refresh", nil, nil); status != http.StatusBadGateway {
		t.Fatalf("forced refresh of a revoked chain: %d %s", status, body)
	}
	live, stored := adminStatus(t, admin)["default"].State, cliState()
	if live != string(tokensource.StateReauthRequired) || stored != string(tokensource.RecordReauthRequired) || stored != live {
		t.Fatalf("a revoked chain: admin API %q, status command %q; want both %q", live, stored, tokensource.StateReauthRequired)
	}
}
