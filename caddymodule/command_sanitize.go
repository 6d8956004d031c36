package caddymodule

import (
	"fmt"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
)

// cliClean makes text that comes from storage safe to print. Anyone who can
// write to the storage chooses it (lease owners, chain ids, the user, error
// texts), so every rune that is not graphic (C0 and C1 controls, DEL, bidi
// overrides and other format characters, line and paragraph separators) and
// every byte that is not UTF-8 is printed as a Go escape (\x1b, \n, \u202e,
// \x9b): a value cannot clear the screen, move the cursor, forge a line or
// reorder the text around it. Plain text passes unchanged.
func cliClean(s string) string {
	if utf8.ValidString(s) && !strings.ContainsFunc(s, cliUnsafeRune) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case cliUnsafeRune(r):
			q := strconv.QuoteRuneToASCII(r)
			b.WriteString(q[1 : len(q)-1])
		default:
			b.WriteString(s[i : i+size])
		}
		i += size
	}
	return b.String()
}

func cliUnsafeRune(r rune) bool { return !unicode.IsGraphic(r) }

// cliCleanError is err with its text made safe to print (see cliClean);
// errors.Is still sees the original.
func cliCleanError(err error) error {
	if err == nil {
		return nil
	}
	if msg := cliClean(err.Error()); msg != err.Error() {
		return &cleanError{msg: msg, err: err}
	}
	return err
}

type cleanError struct {
	msg string
	err error
}

func (e *cleanError) Error() string { return e.msg }
func (e *cleanError) Unwrap() error { return e.err }

// cliCleanStatus makes every text of a status safe to print, in the text
// and in the JSON output alike (JSON escapes C0 controls, but not DEL, C1
// controls or bidi overrides).
func cliCleanStatus(st *cliStatus) {
	st.Storage = cliClean(st.Storage)
	for i := range st.Accounts {
		a := &st.Accounts[i]
		// a.State is a declared word (tokensource.RecordStates), never
		// storage content.
		for _, p := range []*string{&a.Account, &a.Error, &a.Key, &a.Chain, &a.LeaseError} {
			*p = cliClean(*p)
		}
		for j := range a.Scope {
			a.Scope[j] = cliClean(a.Scope[j])
		}
		if u := a.User; u != nil {
			u.ID, u.Username = cliClean(u.ID), cliClean(u.Username)
		}
		if l := a.Lease; l != nil {
			l.Owner, l.MarkedBy = cliClean(l.Owner), cliClean(l.MarkedBy)
		}
	}
}

// cliCommand wraps a command so that no error it returns prints raw
// storage content.
func cliCommand(f caddycmd.CommandFunc) caddycmd.CommandFunc {
	return func(fl caddycmd.Flags) (int, error) {
		code, err := f(fl)
		return code, cliCleanError(err)
	}
}
