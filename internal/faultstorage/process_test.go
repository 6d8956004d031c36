package faultstorage

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
)

// builds holds the Caddy binaries the tests build, once per test binary.
var builds testproc.Builds

func TestMain(m *testing.M) { os.Exit(builds.Run(m)) }

// TestRealProcess builds cmd/caddy-faults, adapts and validates a Caddyfile
// using the module, then runs it in front of a fake Restream and makes a
// refresh (forced through the admin API) hit an injected fault in that
// process.
func TestRealProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs a Caddy binary")
	}
	dir := t.TempDir()
	bin := builds.MustBinary(t, "./cmd/caddy-faults")
	env := append(os.Environ(), "HOME="+dir, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	storageDir, control, jpath := filepath.Join(dir, "storage"), filepath.Join(dir, "faults.json"), filepath.Join(dir, "journal.jsonl")
	storageBlock := fmt.Sprintf("\tstorage restream_test_faults {\n\t\troot %s\n\t\tcontrol %s\n\t\tjournal %s\n\t}\n", storageDir, control, jpath)

	// adapt and validate.
	simple := filepath.Join(dir, "Caddyfile.simple")
	writeFile(t, simple, "{\n\tadmin off\n"+storageBlock+"}\n\nhttp://127.0.0.1:"+fmt.Sprint(testproc.Port(t))+" {\n\trespond ok\n}\n")
	cmd := exec.Command(bin, "adapt", "--config", simple, "--adapter", "caddyfile")
	cmd.Env = env
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("caddy-faults adapt: %v\n%s", err, stderr.String())
	}
	var adapted struct {
		Storage map[string]string `json:"storage"`
	}
	if err := json.Unmarshal(out, &adapted); err != nil {
		t.Fatalf("adapt output: %v\n%s", err, out)
	}
	if s := adapted.Storage; s["module"] != "restream_test_faults" || s["root"] != storageDir || s["control"] != control || s["journal"] != jpath {
		t.Fatalf("adapted storage %v", s)
	}
	cmd = exec.Command(bin, "validate", "--config", simple, "--adapter", "caddyfile")
	cmd.Env = env
	if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "Valid configuration") {
		t.Fatalf("caddy-faults validate: %v\n%s", err, out)
	}
	bad := filepath.Join(dir, "Caddyfile.bad")
	writeFile(t, bad, "{\n\tstorage restream_test_faults {\n\t\troot "+storageDir+"\n\t}\n}\n")
	cmd = exec.Command(bin, "adapt", "--config", bad, "--adapter", "caddyfile")
	cmd.Env = env
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "missing control") {
		t.Fatalf("adapting a block without control: %v\n%s", err, out)
	}

	// run, in front of the fake.
	fake := fakerestream.New(fakerestream.Options{Logf: t.Logf})
	t.Cleanup(fake.Close)
	port, adminPort := testproc.Port(t), testproc.Port(t)
	runCfg := filepath.Join(dir, "Caddyfile")
	writeFile(t, runCfg, fmt.Sprintf(`{
	admin 127.0.0.1:%d
%s	auto_https off
	persist_config off
}

http://127.0.0.1:%d {
	restream_auth {
		client_id test-client
		client_secret test-secret
		refresh_token %s
		token_url %s
	}
	reverse_proxy %s
}
`, adminPort, storageBlock, port, fake.Seed(), fake.TokenURL(), fake.URL()))
	cmd = exec.Command(bin, "run", "--config", runCfg, "--adapter", "caddyfile")
	cmd.Env = env
	var proc *testproc.Process
	t.Cleanup(func() { // runs after proc is stopped, so the output is complete
		if t.Failed() && proc != nil {
			t.Logf("caddy-faults output:\n%s", proc.Output())
		}
	})
	proc = testproc.Start(t, "caddy-faults", cmd)

	// The first request gets a token: the record went through the wrapped
	// storage. (Polling: the other process gives no signal when it is up.)
	site := fmt.Sprintf("http://127.0.0.1:%d/v2/user/profile", port)
	deadline := time.Now().Add(30 * time.Second)
	for {
		status, body, err := get(site)
		if err == nil {
			if status != http.StatusOK {
				t.Fatalf("GET %s: %d %s", site, status, body)
			}
			break
		}
		select {
		case <-proc.Exited():
			t.Fatalf("caddy-faults exited early:\n%s", proc.Output())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("caddy-faults never came up: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if b, err := os.ReadFile(filepath.Join(storageDir, "restream_auth", "default", "token.json")); err != nil || len(b) == 0 {
		t.Fatalf("token record under the wrapped root: %v", err)
	}
	if j, err := ReadJournal(jpath); err != nil || len(j) != 0 {
		t.Fatalf("journal before any rule: %+v, %v", j, err)
	}

	// Arm a fault, force a refresh: the refresh reads the record first, and
	// the read fails in the Caddy process. The admin call returns after the
	// refresh attempt, so the journal is complete by then.
	if err := SetRules(control, Rule{Op: OpAny, KeySuffix: "/token.json", Action: ActionFail, Count: 1}); err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodPost, fmt.Sprintf("http://127.0.0.1:%d/restream_auth/default/refresh", adminPort), nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	t.Logf("forced refresh under the fault: %d %s", resp.StatusCode, bytes.TrimSpace(body))

	j, err := ReadJournal(jpath)
	if err != nil {
		t.Fatal(err)
	}
	if len(j) != 1 {
		t.Fatalf("journal %+v, want one injected fault", j)
	}
	if e := j[0]; e.PID != proc.PID() || e.Key != "restream_auth/default/token.json" || e.Action != ActionFail {
		t.Fatalf("journal entry %+v, want a fail on restream_auth/default/token.json by pid %d", e, proc.PID())
	}
	c, err := ReadControl(control)
	if err != nil || c.Rules[0].Fired != 1 {
		t.Fatalf("control after the fault: %+v, %v", c, err)
	}
	// Requests still get the token held in memory.
	if status, body, err := get(site); err != nil || status != http.StatusOK {
		t.Fatalf("GET after the fault: %d %s %v", status, body, err)
	}
}

func get(url string) (int, []byte, error) {
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}
