package caddymodule

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"unicode"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/dustin/go-humanize"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// Options shared by the directives: the Caddyfile option table that parses
// a directive's block, the subdirectives common to every directive that
// talks to the token endpoint, and their resolution at provisioning
// (placeholders, defaults, checks).

// optionParser parses one subdirective into target; d is at the
// subdirective's name. Its errors are Caddyfile errors (d.Err), at the
// subdirective's line.
type optionParser[T any] func(target T, d *caddyfile.Dispenser) error

// optionTable is a directive's subdirectives by name. The one table drives
// the parsing of the block and names the known subdirectives when one is
// not, so the list in the error cannot drift from what is parsed.
type optionTable[T any] map[string]optionParser[T]

// parseBlock parses a directive's block into target, one subdirective at a
// time (a repeated one wins, as in Caddy's own directives).
func (t optionTable[T]) parseBlock(d *caddyfile.Dispenser, target T) error {
	for d.NextBlock(0) {
		name := d.Val()
		parse, ok := t[name]
		if !ok {
			return d.Errf("unknown subdirective %q (known: %s)", name, strings.Join(t.names(), ", "))
		}
		if err := parse(target, d); err != nil {
			return err
		}
	}
	return nil
}

// names lists the table's subdirectives, sorted.
func (t optionTable[T]) names() []string {
	return slices.Sorted(maps.Keys(t))
}

// with returns a table holding t's subdirectives and more's. A name in both
// is a programming error, reported when the package initializes.
func (t optionTable[T]) with(more optionTable[T]) optionTable[T] {
	all := maps.Clone(t)
	for name, parse := range more {
		if _, dup := all[name]; dup {
			panic("caddymodule: subdirective " + name + " is in two option tables")
		}
		all[name] = parse
	}
	return all
}

// oneValue is the parser of a subdirective that takes exactly one non-empty
// value; set checks and stores it.
func oneValue[T any](set func(target T, val string) error) optionParser[T] {
	return func(target T, d *caddyfile.Dispenser) error {
		name := d.Val()
		var val string
		if !d.Args(&val) {
			return d.Errf("%s: expected one value", name)
		}
		if d.NextArg() {
			return d.Errf("%s: expected one value, got more", name)
		}
		if val == "" {
			return d.Errf("%s: empty value", name)
		}
		if err := set(target, val); err != nil {
			return d.Err(err.Error())
		}
		return nil
	}
}

// flag is the parser of a subdirective that takes no value; set records it.
func flag[T any](set func(target T)) optionParser[T] {
	return func(target T, d *caddyfile.Dispenser) error {
		name := d.Val()
		if d.NextArg() {
			return d.Errf("%s takes no value", name)
		}
		set(target)
		return nil
	}
}

// clientConfig points at the client options of a directive's struct.
type clientConfig struct {
	ClientID, ClientSecret, TokenURL, ClientAuth *string
}

// clientOptions are the subdirectives of every directive that talks to the
// token endpoint; fields gives the struct fields of target they set.
func clientOptions[T any](fields func(target T) clientConfig) optionTable[T] {
	return optionTable[T]{
		"client_id": oneValue(func(target T, val string) error {
			*fields(target).ClientID = val
			return nil
		}),
		"client_secret": oneValue(func(target T, val string) error {
			*fields(target).ClientSecret = val
			return nil
		}),
		"token_url": oneValue(func(target T, val string) error {
			if err := checkEndpointURL("token_url", val); err != nil {
				return err
			}
			*fields(target).TokenURL = val
			return nil
		}),
		"client_auth": oneValue(func(target T, val string) error {
			if _, err := parseClientAuth(val); err != nil {
				return err
			}
			*fields(target).ClientAuth = val
			return nil
		}),
	}
}

// parseAccountArg reads a directive's name and its optional <account>
// argument ("" when absent).
func parseAccountArg(d *caddyfile.Dispenser) (string, error) {
	d.Next() // directive name
	var account string
	if d.NextArg() {
		account = d.Val()
		if err := checkAccountName(account); err != nil {
			return "", d.Err(err.Error())
		}
	}
	if d.NextArg() {
		return "", d.ArgErr()
	}
	return account, nil
}

// requireCredentials reports a missing client_id or client_secret at the
// end of a directive's block.
func requireCredentials(d *caddyfile.Dispenser, directive, clientID, clientSecret string) error {
	switch {
	case clientID == "":
		return d.Errf("%s: client_id is required", directive)
	case clientSecret == "":
		return d.Errf("%s: client_secret is required", directive)
	}
	return nil
}

// accountPattern is an account name: it becomes part of storage and Redis
// keys, metric labels and cookie names.
var accountPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// checkAccountName refuses a name accountPattern does not allow.
func checkAccountName(account string) error {
	if !accountPattern.MatchString(account) {
		return fmt.Errorf("account %q: use 1-64 letters, digits, '.', '_' or '-'", account)
	}
	return nil
}

// clientSettings are the resolved options every directive that talks to
// the token endpoint has.
type clientSettings struct {
	id, secret string
	style      tokensource.AuthStyle
}

// resolveClient resolves client_id and client_secret, defaults and checks
// *tokenURL, and parses client_auth. who names the directive in errors.
func resolveClient(repl *caddy.Replacer, who, id, secret string, tokenURL *string, clientAuth string) (clientSettings, error) {
	var c clientSettings
	var err error
	if c.id, err = resolveSecret(repl, "client_id", id); err != nil {
		return c, err
	}
	if c.secret, err = resolveSecret(repl, "client_secret", secret); err != nil {
		return c, err
	}
	if c.id == "" || c.secret == "" {
		return c, fmt.Errorf("%s: client_id and client_secret are required (they resolved to empty values)", who)
	}
	if err := tokensource.CheckClientSecret(c.secret); err != nil {
		return c, err
	}
	if *tokenURL == "" {
		*tokenURL = DefaultTokenURL
	}
	if err := checkEndpointURL("token_url", *tokenURL); err != nil {
		return c, err
	}
	c.style, err = parseClientAuth(clientAuth)
	return c, err
}

// resolveSecret expands {env.*} and {file.*} placeholders; an unknown
// placeholder is an error rather than silently empty.
func resolveSecret(repl *caddy.Replacer, name, v string) (string, error) {
	out, err := repl.ReplaceOrErr(v, true, true)
	if err != nil {
		return "", fmt.Errorf("%s: %v", name, err)
	}
	return strings.TrimSpace(out), nil
}

// parseRefreshToken trims a refresh token read from where (a {file.*}, an
// environment variable, stdin) and requires exactly one token: a file with
// two lines or stray words would otherwise be sent to the token endpoint.
func parseRefreshToken(where, in string) (string, error) {
	rt := strings.TrimSpace(in)
	switch {
	case rt == "":
		return "", fmt.Errorf("%s is empty", where)
	case strings.ContainsAny(rt, "\r\n"):
		return "", fmt.Errorf("%s holds more than one line: expected one refresh token", where)
	case strings.ContainsFunc(rt, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }):
		return "", fmt.Errorf("%s contains spaces or control characters", where)
	}
	return rt, nil
}

// resolveKeyring builds the at-rest encryption keyring; nil without a key.
func resolveKeyring(repl *caddy.Replacer, current, previous string) (*tokensource.Keyring, error) {
	cur, err := resolveSecret(repl, "encryption_key", current)
	if err != nil {
		return nil, err
	}
	prev, err := resolveSecret(repl, "encryption_key_previous", previous)
	if err != nil {
		return nil, err
	}
	if cur == "" {
		if prev != "" {
			return nil, errors.New("encryption_key_previous needs encryption_key")
		}
		return nil, nil
	}
	key, err := tokensource.ParseKey(cur)
	if err != nil {
		return nil, fmt.Errorf("encryption_key: %v", err)
	}
	var prevKeys [][]byte
	if prev != "" {
		pk, err := tokensource.ParseKey(prev)
		if err != nil {
			return nil, fmt.Errorf("encryption_key_previous: %v", err)
		}
		prevKeys = append(prevKeys, pk)
	}
	return tokensource.NewKeyring(key, prevKeys...)
}

// checkEndpointURL requires https, or http to a loopback host (local fakes).
func checkEndpointURL(name, raw string) error {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return fmt.Errorf("%s %q is not an absolute URL", name, raw)
	}
	if u.User != nil {
		return fmt.Errorf("%s must not contain credentials", name)
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		host := u.Hostname()
		if ip := net.ParseIP(host); host == "localhost" || (ip != nil && ip.IsLoopback()) {
			return nil
		}
		return fmt.Errorf("%s %q: plain http is allowed only for loopback hosts; use https", name, raw)
	}
	return fmt.Errorf("%s %q: scheme must be https", name, raw)
}

func parseClientAuth(v string) (tokensource.AuthStyle, error) {
	switch v {
	case "", "basic":
		return tokensource.AuthBasic, nil
	case "body":
		return tokensource.AuthBody, nil
	}
	return 0, fmt.Errorf("client_auth %q: want basic or body", v)
}

// parseSize parses a human size (512KiB, 1MiB, 64MB) that must be above
// zero and at most limit (limitText).
func parseSize(sub, val string, limit uint64, limitText string) (int64, error) {
	size, err := humanize.ParseBytes(val)
	switch {
	case err != nil:
		return 0, fmt.Errorf("%s %q: not a size (e.g. 512KiB, 1MiB, 64MB): %v", sub, val, err)
	case size > limit:
		return 0, fmt.Errorf("%s %q: at most %s", sub, val, limitText)
	case size == 0:
		return 0, fmt.Errorf("%s %q: must be positive (use replay_401 off to disable replays)", sub, val)
	}
	return int64(size), nil
}

// errAtLine is d.Err for an earlier line of the block: a check that needs
// the whole block blames the line that made it fail.
func errAtLine(d *caddyfile.Dispenser, line int, err error) error {
	return fmt.Errorf("%w, at %s:%d", err, d.File(), line)
}

// parsePositiveDuration parses a Caddy duration that must be above zero.
func parsePositiveDuration(sub, val string) (caddy.Duration, error) {
	dur, err := caddy.ParseDuration(val)
	if err != nil {
		return 0, fmt.Errorf("%s %q: %v", sub, val, err)
	}
	if dur <= 0 {
		return 0, fmt.Errorf("%s %q: must be positive", sub, val)
	}
	return caddy.Duration(dur), nil
}

func parseOnOff(v string) (bool, error) {
	switch v {
	case "on", "true":
		return true, nil
	case "off", "false":
		return false, nil
	}
	return strconv.ParseBool("invalid")
}
