package faultstorage

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.uber.org/zap"
)

// Storage operations, as named in rules and in the journal.
const (
	OpLoad   = "load"
	OpStore  = "store"
	OpLock   = "lock" // Lock and TryLock
	OpUnlock = "unlock"
	OpDelete = "delete"
	OpExists = "exists"
	OpList   = "list"
	OpStat   = "stat"
	OpAny    = "*" // in a rule: every operation
)

// Actions of a rule.
const (
	// ActionFail returns an error (an *InjectedError, matching ErrInjected)
	// instead of doing the operation. Exists reports false.
	ActionFail = "fail"
	// ActionDelay waits Rule.Delay, then does the operation. If the
	// operation's context ends first, it returns the context's error
	// without doing the operation.
	ActionDelay = "delay"
	// ActionHang blocks until the operation's context ends, then returns
	// its error without doing the operation. With a context that never
	// ends it blocks forever.
	ActionHang = "hang"
)

// Control is the content of the control file:
//
//	{"rules":[
//	  {"op":"store","key_suffix":"token.json","action":"fail","count":1},
//	  {"op":"lock","key_suffix":"/lease","action":"hang"},
//	  {"op":"load","key_suffix":"lease.json","action":"delay","delay":"3s"}
//	]}
//
// An operation gets the first rule, in order, that matches it and is not
// used up; no rule, no fault.
type Control struct {
	Rules []Rule `json:"rules"`
}

// Rule is one fault rule.
type Rule struct {
	// Op is the operation: load, store, lock (Lock and TryLock), unlock,
	// delete, exists, list, stat, or "*" for all.
	Op string `json:"op"`
	// KeySuffix matches keys (lock names for lock and unlock, the path for
	// list) ending in it; "" matches every key.
	KeySuffix string `json:"key_suffix,omitempty"`
	// Action is fail, delay or hang.
	Action string `json:"action"`
	// Delay is how long a delay rule waits ("3s", "250ms").
	Delay Duration `json:"delay,omitempty"`
	// Error, for a fail rule, is "" (an error matching ErrInjected) or
	// "not_exist" (one matching both ErrInjected and fs.ErrNotExist, as
	// for a missing key).
	Error string `json:"error,omitempty"`
	// Count, if positive, limits the rule to its first Count matches,
	// counted across all processes using the control file; 0 is unlimited.
	Count int `json:"count,omitempty"`
	// Fired is how many times a counted rule has been applied. The storage
	// maintains it by rewriting the control file; write 0 (or leave it out).
	Fired int `json:"fired,omitempty"`
}

// Duration is a time.Duration written as a string ("3s") in JSON; a number
// is read as nanoseconds.
type Duration time.Duration

// MarshalJSON writes d as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON reads a duration string or a number of nanoseconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		var n int64
		if err := json.Unmarshal(b, &n); err != nil {
			return fmt.Errorf("duration: want a string like \"3s\": %s", b)
		}
		*d = Duration(n)
		return nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

func (r Rule) validate() error {
	switch r.Op {
	case OpLoad, OpStore, OpLock, OpUnlock, OpDelete, OpExists, OpList, OpStat, OpAny:
	default:
		return fmt.Errorf("unknown op %q", r.Op)
	}
	switch r.Action {
	case ActionFail, ActionHang:
	case ActionDelay:
		if r.Delay <= 0 {
			return errors.New("a delay rule needs a positive delay")
		}
	default:
		return fmt.Errorf("unknown action %q (want fail, delay or hang)", r.Action)
	}
	switch r.Error {
	case "":
	case "not_exist":
		if r.Action != ActionFail {
			return errors.New(`"error" applies to fail rules only`)
		}
	default:
		return fmt.Errorf("unknown error %q (want not_exist or nothing)", r.Error)
	}
	if r.Count < 0 || r.Fired < 0 {
		return errors.New("negative count or fired")
	}
	return nil
}

func (r Rule) matches(op, key string) bool {
	return (r.Op == OpAny || r.Op == op) && strings.HasSuffix(key, r.KeySuffix)
}

func (r Rule) usedUp() bool { return r.Count > 0 && r.Fired >= r.Count }

// find returns the index of the rule for the operation, or -1.
func (c *Control) find(op, key string) int {
	for i, r := range c.Rules {
		if r.matches(op, key) && !r.usedUp() {
			return i
		}
	}
	return -1
}

// ReadControl reads a control file. A missing or empty file is no rules.
func ReadControl(path string) (Control, error) {
	var c Control
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return c, nil
	}
	if err != nil {
		return c, err
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return c, nil
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return c, fmt.Errorf("control file %s: %w", path, err)
	}
	for i, r := range c.Rules {
		if err := r.validate(); err != nil {
			return c, fmt.Errorf("control file %s: rule %d: %w", path, i, err)
		}
	}
	return c, nil
}

// WriteControl replaces the control file atomically, under the same lock the
// storage takes to count rule use, so no count update is lost. Rules are
// checked first.
func WriteControl(path string, c Control) error {
	for i, r := range c.Rules {
		if err := r.validate(); err != nil {
			return fmt.Errorf("rule %d: %w", i, err)
		}
	}
	unlock, err := lockControl(path)
	if err != nil {
		return err
	}
	defer unlock()
	return writeControlLocked(path, c)
}

// SetRules is WriteControl(path, Control{Rules: rules}).
func SetRules(path string, rules ...Rule) error {
	return WriteControl(path, Control{Rules: rules})
}

// writeControlLocked writes a temporary file next to path and renames it
// over path, so that readers without the lock see the old or the new file,
// never a partial one.
func writeControlLocked(path string, c Control) error {
	if c.Rules == nil {
		c.Rules = []Rule{}
	}
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	_, err = f.Write(append(b, '\n'))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		_ = os.Remove(f.Name())
	}
	return err
}

// lockControl takes the cross-process lock of a control file: an flock on
// "<control>.lock" (an O_EXCL lock file where flock is missing).
func lockControl(path string) (unlock func(), err error) {
	return lockFile(path + ".lock")
}

// take returns the rule that applies to the operation, if any. Unlimited
// rules are found by a plain read of the control file. A counted rule is
// claimed under the control file's lock: the file is read again, the rule
// chosen again, and its fired count raised and written back before the lock
// is released, so across all processes a rule with count N applies exactly N
// times.
func (s *Storage) take(op, key string) (Rule, int, bool, error) {
	c, err := ReadControl(s.Control)
	if err != nil {
		return Rule{}, -1, false, err
	}
	i := c.find(op, key)
	if i < 0 {
		return Rule{}, -1, false, nil
	}
	if c.Rules[i].Count == 0 {
		return c.Rules[i], i, true, nil
	}
	unlock, err := lockControl(s.Control)
	if err != nil {
		return Rule{}, -1, false, err
	}
	defer unlock()
	if c, err = ReadControl(s.Control); err != nil {
		return Rule{}, -1, false, err
	}
	if i = c.find(op, key); i < 0 {
		return Rule{}, -1, false, nil
	}
	if c.Rules[i].Count > 0 {
		c.Rules[i].Fired++
		if err := writeControlLocked(s.Control, c); err != nil {
			return Rule{}, -1, false, fmt.Errorf("counting a use of rule %d: %w", i, err)
		}
	}
	return c.Rules[i], i, true, nil
}

// inject applies the fault rule for the operation, if any. A nil result
// means: go ahead with the operation.
func (s *Storage) inject(ctx context.Context, op, key string) error {
	rule, idx, ok, err := s.take(op, key)
	if err != nil {
		return fmt.Errorf("faultstorage: %s %s: %w", op, key, err)
	}
	if !ok {
		return nil
	}
	e := JournalEntry{Time: time.Now().UTC(), PID: os.Getpid(), Op: op, Key: key, Action: rule.Action, Rule: idx}
	if rule.Action == ActionDelay {
		e.Delay = time.Duration(rule.Delay).String()
	}
	s.record(e)
	switch rule.Action {
	case ActionFail:
		return &InjectedError{Op: op, Key: key, NotExist: rule.Error == "not_exist"}
	case ActionDelay:
		t := time.NewTimer(time.Duration(rule.Delay))
		defer t.Stop()
		select {
		case <-t.C:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	default: // ActionHang
		<-ctx.Done()
		return ctx.Err()
	}
}

// JournalEntry is one line of the journal: one injected fault.
type JournalEntry struct {
	Time   time.Time `json:"time"`
	PID    int       `json:"pid"`    // the process that injected it
	Op     string    `json:"op"`     // the operation (load, store, lock, …)
	Key    string    `json:"key"`    // the key, lock name or list path
	Action string    `json:"action"` // fail, delay or hang
	Rule   int       `json:"rule"`   // the rule's index in the control file
	Delay  string    `json:"delay,omitempty"`
}

// record logs an injected fault and appends it to the journal, before the
// fault takes effect (a hang is journaled when it starts).
func (s *Storage) record(e JournalEntry) {
	logger := s.logger
	if logger == nil {
		logger = zap.NewNop()
	}
	logger.Info("injected storage fault", zap.String("op", e.Op), zap.String("key", e.Key),
		zap.String("action", e.Action), zap.Int("rule", e.Rule), zap.String("delay", e.Delay))
	if s.Journal != "" {
		if err := appendJournal(s.Journal, e); err != nil {
			logger.Error("writing the fault journal", zap.String("journal", s.Journal), zap.Error(err))
		}
	}
	if s.observe != nil {
		s.observe(e)
	}
}

// appendJournal appends one line with a single write to a file opened for
// appending, so lines from several processes do not interleave.
func appendJournal(path string, e JournalEntry) error {
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(append(b, '\n'))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// ReadJournal reads a journal; a missing file is an empty journal.
func ReadJournal(path string) ([]JournalEntry, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []JournalEntry
	for i, line := range bytes.Split(b, []byte("\n")) {
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		var e JournalEntry
		if err := json.Unmarshal(line, &e); err != nil {
			return out, fmt.Errorf("journal %s line %d: %w", path, i+1, err)
		}
		out = append(out, e)
	}
	return out, nil
}
