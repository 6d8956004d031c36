package faultstorage

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/certmagic"

	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
)

// newStorage is a fault storage in a fresh temporary directory.
func newStorage(t *testing.T) *Storage {
	t.Helper()
	dir := t.TempDir()
	s := &Storage{
		Root:    filepath.Join(dir, "storage"),
		Control: filepath.Join(dir, "faults.json"),
		Journal: filepath.Join(dir, "journal.jsonl"),
	}
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	return s
}

func setRules(t *testing.T, s *Storage, rules ...Rule) {
	t.Helper()
	if err := SetRules(s.Control, rules...); err != nil {
		t.Fatal(err)
	}
}

func journal(t *testing.T, s *Storage) []JournalEntry {
	t.Helper()
	j, err := ReadJournal(s.Journal)
	if err != nil {
		t.Fatal(err)
	}
	return j
}

var allOps = []string{OpLoad, OpStore, OpLock, OpUnlock, OpDelete, OpExists, OpList, OpStat}

// call runs op on key through s and returns its error; a false Exists is
// errExistsFalse. Lock is followed by an Unlock straight on the file_system,
// and unlock is preceded by a Lock there, so that calls are independent.
func call(ctx context.Context, s *Storage, op, key string) error {
	fsys := s.fs()
	switch op {
	case OpLoad:
		_, err := s.Load(ctx, key)
		return err
	case OpStore:
		return s.Store(ctx, key, []byte("stored by "+op))
	case OpLock:
		if err := s.Lock(ctx, key); err != nil {
			return err
		}
		return fsys.Unlock(ctx, key)
	case OpUnlock:
		if err := fsys.Lock(ctx, key); err != nil {
			return err
		}
		err := s.Unlock(ctx, key)
		if err != nil {
			_ = fsys.Unlock(ctx, key)
		}
		return err
	case OpDelete:
		return s.Delete(ctx, key)
	case OpExists:
		if !s.Exists(ctx, key) {
			return errExistsFalse
		}
		return nil
	case OpList:
		_, err := s.List(ctx, key, true)
		return err
	case OpStat:
		_, err := s.Stat(ctx, key)
		return err
	}
	panic("unknown op " + op)
}

var errExistsFalse = errors.New("Exists reported false")

// seed stores the keys the op tests use, straight on the file_system.
func seed(t *testing.T, s *Storage, keys ...string) {
	t.Helper()
	for _, k := range keys {
		if err := s.fs().Store(context.Background(), k, []byte("seeded "+k)); err != nil {
			t.Fatal(err)
		}
	}
}

func TestPassthroughWithoutControlFile(t *testing.T) {
	s := newStorage(t)
	ctx := context.Background()
	if err := s.Store(ctx, "a/b/c.json", []byte("v1")); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(s.Root, "a", "b", "c.json")); err != nil || string(b) != "v1" {
		t.Fatalf("file under root: %q, %v", b, err)
	}
	if b, err := s.Load(ctx, "a/b/c.json"); err != nil || string(b) != "v1" {
		t.Fatalf("Load: %q, %v", b, err)
	}
	if !s.Exists(ctx, "a/b/c.json") || s.Exists(ctx, "a/nope") {
		t.Fatal("Exists is wrong")
	}
	if ki, err := s.Stat(ctx, "a/b/c.json"); err != nil || ki.Size != 2 || !ki.IsTerminal {
		t.Fatalf("Stat: %+v, %v", ki, err)
	}
	if keys, err := s.List(ctx, "a", true); err != nil || !contains(keys, "a/b/c.json") {
		t.Fatalf("List: %v, %v", keys, err)
	}
	if err := s.Lock(ctx, "l"); err != nil {
		t.Fatal(err)
	}
	if err := s.Unlock(ctx, "l"); err != nil {
		t.Fatal(err)
	}
	if ok, err := s.TryLock(ctx, "l"); !ok || err != nil {
		t.Fatalf("TryLock of a free lock: %v, %v", ok, err)
	}
	if err := s.Unlock(ctx, "l"); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, "a/b/c.json"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load(ctx, "a/b/c.json"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load after Delete: %v", err)
	}
	if _, err := os.Stat(s.Journal); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("journal written without faults: %v", err)
	}
}

// TryLock passes through too: a held lock is not taken.
func TestPassthroughTryLockOfHeldLock(t *testing.T) {
	if testing.Short() {
		t.Skip("certmagic's file storage waits 2 s before it gives up on a held lock")
	}
	s := newStorage(t)
	ctx := context.Background()
	if err := s.Lock(ctx, "l"); err != nil {
		t.Fatal(err)
	}
	if ok, err := s.TryLock(ctx, "l"); ok || err != nil {
		t.Fatalf("TryLock of a held lock: %v, %v", ok, err)
	}
	if err := s.Unlock(ctx, "l"); err != nil {
		t.Fatal(err)
	}
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

func TestFailEachOp(t *testing.T) {
	for _, op := range allOps {
		t.Run(op, func(t *testing.T) {
			s := newStorage(t)
			ctx := context.Background()
			seed(t, s, "acme/b/target", "acme/b/other")
			setRules(t, s, Rule{Op: op, KeySuffix: "b/target", Action: ActionFail})

			err := call(ctx, s, op, "acme/b/target")
			if op == OpExists {
				if err != errExistsFalse {
					t.Fatalf("Exists of an existing key under a fail rule: %v", err)
				}
			} else if !errors.Is(err, ErrInjected) || !strings.Contains(err.Error(), "injected fault") {
				t.Fatalf("%s on the matching key: %v, want an injected fault", op, err)
			}
			if errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("plain fail matches fs.ErrNotExist: %v", err)
			}
			// The operation did not happen.
			switch op {
			case OpStore:
				if b, _ := s.fs().Load(ctx, "acme/b/target"); string(b) != "seeded acme/b/target" {
					t.Fatalf("failed Store wrote %q", b)
				}
			case OpDelete:
				if !s.fs().Exists(ctx, "acme/b/target") {
					t.Fatal("failed Delete deleted")
				}
			case OpLock:
				if ok, err := s.fs().TryLock(ctx, "acme/b/target"); !ok || err != nil {
					t.Fatalf("failed Lock left the lock held: %v %v", ok, err)
				}
			}

			// Other keys and other operations are untouched.
			other := "acme/b/other"
			if op == OpList {
				other = "acme"
			}
			if err := call(ctx, s, op, other); err != nil {
				t.Fatalf("%s on a key that does not match: %v", op, err)
			}
			otherOp := OpLoad
			if op == OpLoad {
				otherOp = OpStat
			}
			if err := call(ctx, s, otherOp, "acme/b/target"); err != nil {
				t.Fatalf("%s under a %s rule: %v", otherOp, op, err)
			}

			j := journal(t, s)
			if len(j) != 1 {
				t.Fatalf("journal: %+v, want one entry", j)
			}
			e := j[0]
			if e.Op != op || e.Key != "acme/b/target" || e.Action != ActionFail || e.PID != os.Getpid() || e.Rule != 0 || e.Time.IsZero() {
				t.Fatalf("journal entry %+v", e)
			}
		})
	}
}

func TestWildcardOpAndEmptySuffix(t *testing.T) {
	s := newStorage(t)
	ctx := context.Background()
	seed(t, s, "k/one", "k/two")
	setRules(t, s, Rule{Op: OpAny, Action: ActionFail})
	for _, op := range allOps {
		key := "k/one"
		if op == OpList {
			key = "k"
		}
		if err := call(ctx, s, op, key); err == nil {
			t.Errorf("%s passed under {op:*, key_suffix:\"\"}", op)
		}
	}
	if got := len(journal(t, s)); got != len(allOps) {
		t.Fatalf("journal has %d entries, want %d", got, len(allOps))
	}

	setRules(t, s, Rule{Op: OpAny, KeySuffix: "two", Action: ActionFail})
	if err := call(ctx, s, OpLoad, "k/one"); err != nil {
		t.Fatal(err)
	}
	if err := call(ctx, s, OpStat, "k/two"); !errors.Is(err, ErrInjected) {
		t.Fatalf("stat k/two under {op:*, key_suffix:two}: %v", err)
	}
}

func TestFailNotExist(t *testing.T) {
	s := newStorage(t)
	seed(t, s, "x/token.json")
	setRules(t, s, Rule{Op: OpLoad, KeySuffix: "token.json", Action: ActionFail, Error: "not_exist"})
	_, err := s.Load(context.Background(), "x/token.json")
	if !errors.Is(err, fs.ErrNotExist) || !errors.Is(err, ErrInjected) {
		t.Fatalf("Load: %v, want an injected fault matching fs.ErrNotExist", err)
	}
	var ie *InjectedError
	if !errors.As(err, &ie) || ie.Op != OpLoad || ie.Key != "x/token.json" {
		t.Fatalf("error %#v", err)
	}
}

func TestDelay(t *testing.T) {
	s := newStorage(t)
	seed(t, s, "d/lease.json")
	const delay = 150 * time.Millisecond
	setRules(t, s, Rule{Op: OpLoad, KeySuffix: "lease.json", Action: ActionDelay, Delay: Duration(delay)})
	start := time.Now()
	b, err := s.Load(context.Background(), "d/lease.json")
	if took := time.Since(start); took < delay {
		t.Fatalf("delayed Load took %s, want at least %s", took, delay)
	}
	if err != nil || string(b) != "seeded d/lease.json" {
		t.Fatalf("delayed Load: %q, %v", b, err)
	}
	if j := journal(t, s); len(j) != 1 || j[0].Action != ActionDelay || j[0].Delay != "150ms" {
		t.Fatalf("journal %+v", j)
	}

	// The context ends during the delay: its error, and no operation.
	setRules(t, s, Rule{Op: OpStore, Action: ActionDelay, Delay: Duration(time.Hour)})
	ctx, cancel := context.WithCancel(context.Background())
	s.observe = func(JournalEntry) { cancel() }
	err = s.Store(ctx, "d/lease.json", []byte("new"))
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Store cancelled during its delay: %v", err)
	}
	if b, _ := s.fs().Load(context.Background(), "d/lease.json"); string(b) != "seeded d/lease.json" {
		t.Fatalf("cancelled Store wrote %q", b)
	}
}

func TestHang(t *testing.T) {
	for _, op := range []string{OpLock, OpExists, OpLoad} {
		t.Run(op, func(t *testing.T) {
			s := newStorage(t)
			seed(t, s, "h/lease")
			setRules(t, s, Rule{Op: op, KeySuffix: "/lease", Action: ActionHang})
			hanging := make(chan JournalEntry, 1)
			s.observe = func(e JournalEntry) { hanging <- e }
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := make(chan error, 1)
			go func() { done <- call(ctx, s, op, "h/lease") }()

			e := <-hanging
			if e.Action != ActionHang || e.Op != op {
				t.Fatalf("journal entry %+v", e)
			}
			select {
			case err := <-done:
				t.Fatalf("%s returned while its context was live: %v", op, err)
			default:
			}
			cancel()
			err := <-done
			if op == OpExists {
				if err != errExistsFalse {
					t.Fatalf("hung Exists: %v, want false", err)
				}
			} else if !errors.Is(err, context.Canceled) {
				t.Fatalf("hung %s returned %v, want context.Canceled", op, err)
			}
			if op == OpLock {
				if ok, err := s.fs().TryLock(context.Background(), "h/lease"); !ok || err != nil {
					t.Fatalf("hung Lock took the lock: %v %v", ok, err)
				}
			}
		})
	}
}

func TestCount(t *testing.T) {
	s := newStorage(t)
	ctx := context.Background()
	setRules(t, s,
		Rule{Op: OpStore, KeySuffix: "token.json", Action: ActionFail, Count: 2},
		Rule{Op: OpStore, KeySuffix: "token.json", Action: ActionDelay, Delay: Duration(time.Millisecond), Count: 1},
	)
	for i := range 2 {
		if err := s.Store(ctx, "a/token.json", []byte("x")); !errors.Is(err, ErrInjected) {
			t.Fatalf("store %d: %v, want the counted fault", i, err)
		}
	}
	// The first rule is used up: the next matching rule applies, once.
	if err := s.Store(ctx, "a/token.json", []byte("x")); err != nil {
		t.Fatalf("store 3 (delayed): %v", err)
	}
	if err := s.Store(ctx, "a/token.json", []byte("y")); err != nil {
		t.Fatalf("store 4 (no rule left): %v", err)
	}
	c, err := ReadControl(s.Control)
	if err != nil {
		t.Fatal(err)
	}
	if c.Rules[0].Fired != 2 || c.Rules[1].Fired != 1 || c.Rules[0].Count != 2 {
		t.Fatalf("control after use: %+v", c)
	}
	j := journal(t, s)
	if len(j) != 3 || j[0].Rule != 0 || j[1].Rule != 0 || j[2].Rule != 1 || j[2].Action != ActionDelay {
		t.Fatalf("journal %+v", j)
	}

	// Rewriting the control file re-arms it.
	setRules(t, s, Rule{Op: OpStore, Action: ActionFail, Count: 1})
	if err := s.Store(ctx, "a/token.json", []byte("z")); !errors.Is(err, ErrInjected) {
		t.Fatalf("store after re-arming: %v", err)
	}
}

// TestCountRace: goroutines race for a counted rule; exactly count of them
// get the fault.
func TestCountRace(t *testing.T) {
	for _, tc := range []struct{ goroutines, count int }{{2, 1}, {32, 5}} {
		t.Run(fmt.Sprintf("%d-goroutines-count-%d", tc.goroutines, tc.count), func(t *testing.T) {
			s := newStorage(t)
			seed(t, s, "r/token.json")
			setRules(t, s, Rule{Op: OpLoad, KeySuffix: "token.json", Action: ActionFail, Count: tc.count})
			start := make(chan struct{})
			errs := make(chan error, tc.goroutines)
			var wg sync.WaitGroup
			for range tc.goroutines {
				wg.Go(func() {
					<-start
					_, err := s.Load(context.Background(), "r/token.json")
					errs <- err
				})
			}
			close(start)
			wg.Wait()
			close(errs)
			faults := 0
			for err := range errs {
				switch {
				case errors.Is(err, ErrInjected):
					faults++
				case err != nil:
					t.Errorf("unexpected error: %v", err)
				}
			}
			if faults != tc.count {
				t.Fatalf("%d faults, want %d", faults, tc.count)
			}
			if j := journal(t, s); len(j) != tc.count {
				t.Fatalf("journal has %d entries, want %d", len(j), tc.count)
			}
		})
	}
}

// TestCountAcrossProcesses: processes (this test binary, re-run as
// helpers) race for a counted rule through one control file.
func TestCountAcrossProcesses(t *testing.T) {
	s := newStorage(t)
	seed(t, s, "p/token.json")
	const procs, loads, count = 4, 25, 7
	setRules(t, s, Rule{Op: OpLoad, KeySuffix: "token.json", Action: ActionFail, Count: count})
	cfg, _ := json.Marshal(s)
	helpers := make([]*testproc.Process, procs)
	for i := range helpers {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperLoads$", "-test.count=1")
		cmd.Env = append(os.Environ(), "FAULTSTORAGE_HELPER="+string(cfg), "FAULTSTORAGE_HELPER_LOADS="+strconv.Itoa(loads))
		helpers[i] = testproc.Start(t, fmt.Sprintf("helper %d", i), cmd)
	}
	total := 0
	pids := map[int]bool{}
	for i, p := range helpers {
		<-p.Exited()
		if !p.Cmd.ProcessState.Success() {
			t.Fatalf("helper %d: %v\n%s", i, p.Cmd.ProcessState, p.Output())
		}
		var n int
		if _, err := fmt.Sscanf(lastLine(p.Output(), "faults="), "faults=%d", &n); err != nil {
			t.Fatalf("helper %d output: %v\n%s", i, err, p.Output())
		}
		total += n
		pids[p.PID()] = true
	}
	if total != count {
		t.Fatalf("%d faults across %d processes, want %d", total, procs, count)
	}
	j := journal(t, s)
	if len(j) != count {
		t.Fatalf("journal has %d entries, want %d", len(j), count)
	}
	for _, e := range j {
		if !pids[e.PID] {
			t.Fatalf("journal entry from pid %d, not a helper: %+v", e.PID, e)
		}
	}
	if c, err := ReadControl(s.Control); err != nil || c.Rules[0].Fired != count {
		t.Fatalf("control after use: %+v, %v", c, err)
	}
}

func lastLine(out, prefix string) string {
	lines := strings.Split(out, "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.HasPrefix(lines[i], prefix) {
			return lines[i]
		}
	}
	return ""
}

// TestHelperLoads is the helper process of TestCountAcrossProcesses.
func TestHelperLoads(t *testing.T) {
	cfg := os.Getenv("FAULTSTORAGE_HELPER")
	if cfg == "" {
		t.Skip("helper process only")
	}
	var s Storage
	if err := json.Unmarshal([]byte(cfg), &s); err != nil {
		t.Fatal(err)
	}
	loads, _ := strconv.Atoi(os.Getenv("FAULTSTORAGE_HELPER_LOADS"))
	faults := 0
	for range loads {
		_, err := s.Load(context.Background(), "p/token.json")
		switch {
		case errors.Is(err, ErrInjected):
			faults++
		case err != nil:
			t.Fatal(err)
		}
	}
	fmt.Printf("\nfaults=%d\n", faults)
}

func TestControlFile(t *testing.T) {
	s := newStorage(t)
	ctx := context.Background()
	seed(t, s, "c/k")

	// Missing and empty control files: no faults.
	if err := call(ctx, s, OpLoad, "c/k"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(s.Control, []byte(" \n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := call(ctx, s, OpLoad, "c/k"); err != nil {
		t.Fatal(err)
	}

	// The example of the package documentation.
	example := `{"rules":[{"op":"store","key_suffix":"token.json","action":"fail","count":1},{"op":"lock","key_suffix":"/lease","action":"hang"},{"op":"load","key_suffix":"lease.json","action":"delay","delay":"3s"}]}`
	if err := os.WriteFile(s.Control, []byte(example), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := ReadControl(s.Control)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Rules) != 3 || c.Rules[2].Delay != Duration(3*time.Second) || c.Rules[0].Count != 1 || c.Rules[1].Action != ActionHang {
		t.Fatalf("parsed %+v", c)
	}
	// Written back (after a counted use), durations stay readable strings.
	if err := s.Store(ctx, "c/token.json", nil); !errors.Is(err, ErrInjected) {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(s.Control)
	if !bytes.Contains(b, []byte(`"delay": "3s"`)) || !bytes.Contains(b, []byte(`"fired": 1`)) {
		t.Fatalf("rewritten control file:\n%s", b)
	}

	// Bad control files make operations fail loudly, not as injected faults.
	for name, content := range map[string]string{
		"bad json":      `{"rules":[`,
		"unknown op":    `{"rules":[{"op":"read","action":"fail"}]}`,
		"unknown field": `{"rules":[{"op":"load","key":"x","action":"fail"}]}`,
		"bad action":    `{"rules":[{"op":"load","action":"explode"}]}`,
		"no delay":      `{"rules":[{"op":"load","action":"delay"}]}`,
		"bad duration":  `{"rules":[{"op":"load","action":"delay","delay":"soon"}]}`,
		"error on hang": `{"rules":[{"op":"load","action":"hang","error":"not_exist"}]}`,
	} {
		if err := os.WriteFile(s.Control, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		err := call(ctx, s, OpLoad, "c/k")
		if err == nil || errors.Is(err, ErrInjected) || !strings.Contains(err.Error(), "control file") {
			t.Errorf("%s: Load returned %v, want a control file error", name, err)
		}
	}
	if err := SetRules(s.Control, Rule{Op: "read", Action: ActionFail}); err == nil {
		t.Error("SetRules accepted an unknown op")
	}

	// A number of nanoseconds is a duration too.
	var d Duration
	if err := json.Unmarshal([]byte(`1500000000`), &d); err != nil || d != Duration(1500*time.Millisecond) {
		t.Fatalf("numeric duration: %v, %v", d, err)
	}
}

func TestCaddyfile(t *testing.T) {
	for _, tc := range []struct {
		name, input string
		want        Storage
		wantErr     string
	}{
		{name: "block", input: "restream_test_faults {\n root /s\n control /c.json\n journal /j.jsonl\n}",
			want: Storage{Root: "/s", Control: "/c.json", Journal: "/j.jsonl"}},
		{name: "root as argument", input: "restream_test_faults /s {\n control /c.json\n}",
			want: Storage{Root: "/s", Control: "/c.json"}},
		{name: "no control", input: "restream_test_faults {\n root /s\n}", wantErr: "missing control"},
		{name: "no root", input: "restream_test_faults {\n control /c\n}", wantErr: "missing root"},
		{name: "unknown", input: "restream_test_faults {\n root /s\n control /c\n faults 3\n}", wantErr: `unrecognized subdirective "faults"`},
		{name: "twice", input: "restream_test_faults /s {\n root /t\n control /c\n}", wantErr: "root already set"},
		{name: "no value", input: "restream_test_faults {\n root\n}", wantErr: "wrong argument count"},
		{name: "two values", input: "restream_test_faults {\n root /a /b\n}", wantErr: "wrong argument count"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var s Storage
			err := s.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if s.Root != tc.want.Root || s.Control != tc.want.Control || s.Journal != tc.want.Journal {
				t.Fatalf("got %+v, want %+v", s, tc.want)
			}
		})
	}
}

// TestGlobalStorageOption adapts a Caddyfile using the module in the global
// storage option.
func TestGlobalStorageOption(t *testing.T) {
	dir := t.TempDir()
	cf := fmt.Sprintf("{\n\tstorage restream_test_faults {\n\t\troot %s\n\t\tcontrol %s\n\t\tjournal %s\n\t}\n}\n\n:0 {\n\trespond ok\n}\n",
		filepath.Join(dir, "s"), filepath.Join(dir, "c.json"), filepath.Join(dir, "j.jsonl"))
	out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cf), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Storage map[string]string `json:"storage"`
	}
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"module": "restream_test_faults", "root": filepath.Join(dir, "s"),
		"control": filepath.Join(dir, "c.json"), "journal": filepath.Join(dir, "j.jsonl")}
	for k, v := range want {
		if cfg.Storage[k] != v {
			t.Fatalf("storage %q = %q, want %q\n%s", k, cfg.Storage[k], v, out)
		}
	}
}

// TestInProcessModule provisions the module the way Caddy does and uses it
// as Caddy's certmagic storage.
func TestInProcessModule(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	dir := t.TempDir()
	control, jpath := filepath.Join(dir, "faults.json"), filepath.Join(dir, "journal.jsonl")
	raw, _ := json.Marshal(map[string]string{"root": filepath.Join(dir, "storage") + "/", "control": control, "journal": jpath})

	mod, err := ctx.LoadModuleByID("caddy.storage.restream_test_faults", raw)
	if err != nil {
		t.Fatal(err)
	}
	conv, ok := mod.(caddy.StorageConverter)
	if !ok {
		t.Fatalf("%T is not a StorageConverter", mod)
	}
	st, err := conv.CertMagicStorage()
	if err != nil {
		t.Fatal(err)
	}
	want := "FaultStorage:" + filepath.Join(dir, "storage") + "?control=" + control + "&journal=" + jpath
	if got := st.(fmt.Stringer).String(); got != want {
		t.Fatalf("String() = %q, want %q", got, want)
	}
	if _, ok := st.(certmagic.TryLocker); !ok {
		t.Fatal("not a TryLocker")
	}
	if err := st.Store(ctx, "restream_auth/default/token.json", []byte("{}")); err != nil {
		t.Fatal(err)
	}
	if err := SetRules(control, Rule{Op: OpLoad, KeySuffix: "/token.json", Action: ActionFail, Count: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Load(ctx, "restream_auth/default/token.json"); !errors.Is(err, ErrInjected) {
		t.Fatalf("first Load: %v", err)
	}
	if b, err := st.Load(ctx, "restream_auth/default/token.json"); err != nil || string(b) != "{}" {
		t.Fatalf("second Load: %q, %v", b, err)
	}
	j, err := ReadJournal(jpath)
	if err != nil || len(j) != 1 || j[0].Key != "restream_auth/default/token.json" {
		t.Fatalf("journal %+v, %v", j, err)
	}

	// Validation happens when Caddy loads the module.
	if _, err := ctx.LoadModuleByID("caddy.storage.restream_test_faults", json.RawMessage(`{"root":"/x"}`)); err == nil || !strings.Contains(err.Error(), "control is required") {
		t.Fatalf("loading without control: %v", err)
	}
}
