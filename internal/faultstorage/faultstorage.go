// Package faultstorage is a Caddy storage module for tests only: it wraps
// Caddy's file_system storage and fails, delays or hangs chosen storage
// operations on command, so that integration tests can inject storage faults
// into Caddy, in this process or in a separately built binary (see
// cmd/caddy-faults).
//
// The module, caddy.storage.restream_test_faults, is configured with the
// file_system root it wraps, a control file and an optional journal:
//
//	{
//		storage restream_test_faults {
//			root    /tmp/x/storage
//			control /tmp/x/faults.json
//			journal /tmp/x/faults.jsonl
//		}
//	}
//
// The control file holds the fault rules (see [Control] and [Rule]). It is
// read again on every storage operation, so a test changes the faults of a
// running Caddy by rewriting it, best with [WriteControl]; a missing or empty
// control file means no faults. The journal gets one JSON line
// ([JournalEntry]) for every fault injected, in any process, so a test can
// check that a fault actually fired ([ReadJournal]).
//
// Production code must never import this package.
package faultstorage

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(Storage{})
}

// Storage is file_system storage with injectable faults. It is its own
// certmagic.Storage: every operation first consults the control file, then
// (unless a rule says otherwise) delegates to certmagic.FileStorage at Root.
type Storage struct {
	// Root is the directory of the file_system storage that is wrapped.
	Root string `json:"root,omitempty"`

	// Control is the path of the JSON control file holding the fault
	// rules. It need not exist: a missing file means no faults.
	Control string `json:"control,omitempty"`

	// Journal, if set, is a file that gets one JSON line appended for
	// every injected fault.
	Journal string `json:"journal,omitempty"`

	logger *zap.Logger
	// observe, if set (by this package's tests), sees every injected fault
	// just before it takes effect.
	observe func(JournalEntry)
}

// CaddyModule returns the Caddy module information.
func (Storage) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "caddy.storage.restream_test_faults",
		New: func() caddy.Module { return new(Storage) },
	}
}

// Provision sets up the module.
func (s *Storage) Provision(ctx caddy.Context) error {
	s.logger = ctx.Logger()
	s.clean()
	return nil
}

func (s *Storage) clean() {
	if s.Root != "" {
		s.Root = filepath.Clean(s.Root)
	}
	if s.Control != "" {
		s.Control = filepath.Clean(s.Control)
	}
	if s.Journal != "" {
		s.Journal = filepath.Clean(s.Journal)
	}
}

// Validate checks the configuration.
func (s *Storage) Validate() error {
	if s.Root == "" {
		return errors.New("restream_test_faults: root is required")
	}
	if s.Control == "" {
		return errors.New("restream_test_faults: control is required")
	}
	return nil
}

// CertMagicStorage returns the storage itself.
func (s *Storage) CertMagicStorage() (certmagic.Storage, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	return s, nil
}

// String identifies the storage by its root, control file and journal;
// restream_auth keys its token sources by it.
func (s *Storage) String() string {
	return "FaultStorage:" + s.Root + "?control=" + s.Control + "&journal=" + s.Journal
}

// UnmarshalCaddyfile sets up the module from Caddyfile tokens:
//
//	storage restream_test_faults [<root>] {
//		root    <dir>
//		control <file>
//		journal <file>
//	}
func (s *Storage) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the module name
	if d.NextArg() {
		s.Root = d.Val()
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		var dst *string
		switch d.Val() {
		case "root":
			dst = &s.Root
		case "control":
			dst = &s.Control
		case "journal":
			dst = &s.Journal
		default:
			return d.Errf("unrecognized subdirective %q", d.Val())
		}
		name := d.Val()
		if *dst != "" {
			return d.Errf("%s already set", name)
		}
		if !d.NextArg() {
			return d.ArgErr()
		}
		*dst = d.Val()
		if d.NextArg() {
			return d.ArgErr()
		}
	}
	if s.Root == "" {
		return d.Err("missing root")
	}
	if s.Control == "" {
		return d.Err("missing control")
	}
	return nil
}

func (s *Storage) fs() *certmagic.FileStorage { return &certmagic.FileStorage{Path: s.Root} }

// Lock obtains the lock name (op "lock").
func (s *Storage) Lock(ctx context.Context, name string) error {
	if err := s.inject(ctx, OpLock, name); err != nil {
		return err
	}
	return s.fs().Lock(ctx, name)
}

// TryLock tries once to obtain the lock name; faults are those of op "lock".
func (s *Storage) TryLock(ctx context.Context, name string) (bool, error) {
	if err := s.inject(ctx, OpLock, name); err != nil {
		return false, err
	}
	return s.fs().TryLock(ctx, name)
}

// Unlock releases the lock name (op "unlock").
func (s *Storage) Unlock(ctx context.Context, name string) error {
	if err := s.inject(ctx, OpUnlock, name); err != nil {
		return err
	}
	return s.fs().Unlock(ctx, name)
}

// Store writes value at key (op "store").
func (s *Storage) Store(ctx context.Context, key string, value []byte) error {
	if err := s.inject(ctx, OpStore, key); err != nil {
		return err
	}
	return s.fs().Store(ctx, key, value)
}

// Load reads the value at key (op "load").
func (s *Storage) Load(ctx context.Context, key string) ([]byte, error) {
	if err := s.inject(ctx, OpLoad, key); err != nil {
		return nil, err
	}
	return s.fs().Load(ctx, key)
}

// Delete deletes key (op "delete").
func (s *Storage) Delete(ctx context.Context, key string) error {
	if err := s.inject(ctx, OpDelete, key); err != nil {
		return err
	}
	return s.fs().Delete(ctx, key)
}

// Exists reports whether key exists (op "exists"); a fault makes it false.
func (s *Storage) Exists(ctx context.Context, key string) bool {
	if err := s.inject(ctx, OpExists, key); err != nil {
		return false
	}
	return s.fs().Exists(ctx, key)
}

// List lists the keys under path (op "list", matched on path).
func (s *Storage) List(ctx context.Context, path string, recursive bool) ([]string, error) {
	if err := s.inject(ctx, OpList, path); err != nil {
		return nil, err
	}
	return s.fs().List(ctx, path, recursive)
}

// Stat describes key (op "stat").
func (s *Storage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	if err := s.inject(ctx, OpStat, key); err != nil {
		return certmagic.KeyInfo{}, err
	}
	return s.fs().Stat(ctx, key)
}

// ErrInjected is matched (errors.Is) by every error a "fail" rule returns.
var ErrInjected = errors.New("injected fault")

// InjectedError is the error of a "fail" rule.
type InjectedError struct {
	Op, Key string
	// NotExist makes the error also match fs.ErrNotExist (rule "error":
	// "not_exist"), as a missing key does.
	NotExist bool
}

func (e *InjectedError) Error() string {
	msg := fmt.Sprintf("faultstorage: injected fault: %s %s", e.Op, e.Key)
	if e.NotExist {
		msg += ": " + fs.ErrNotExist.Error()
	}
	return msg
}

// Is matches ErrInjected, and fs.ErrNotExist if NotExist is set.
func (e *InjectedError) Is(target error) bool {
	return target == ErrInjected || (e.NotExist && target == fs.ErrNotExist)
}

// Interface guards
var (
	_ caddy.Provisioner      = (*Storage)(nil)
	_ caddy.Validator        = (*Storage)(nil)
	_ caddy.StorageConverter = (*Storage)(nil)
	_ caddyfile.Unmarshaler  = (*Storage)(nil)
	_ certmagic.Storage      = (*Storage)(nil)
	_ certmagic.TryLocker    = (*Storage)(nil)
	_ fmt.Stringer           = (*Storage)(nil)
)
