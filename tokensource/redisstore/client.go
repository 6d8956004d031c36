package redisstore

import (
	"errors"
	"fmt"
	"net/url"
	"strings"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
)

// ParseURL parses a redis:// or rediss:// URL,
// redis://[user:password@]host[:port][/db][?option=value…], into client
// options (options as go-redis reads them). No error it returns repeats
// the URL's user or password.
func ParseURL(raw string) (*redis.Options, error) {
	u, err := url.Parse(raw)
	if err != nil {
		reason := err
		var ue *url.Error
		if errors.As(err, &ue) {
			reason = ue.Err // without the URL itself
		}
		return nil, fmt.Errorf("redis url %s is not a valid URL: %s", RedactURL(raw), scrub(reason.Error(), raw))
	}
	switch {
	case u.Scheme != "redis" && u.Scheme != "rediss":
		return nil, fmt.Errorf("redis url %s: scheme must be redis or rediss", RedactURL(raw))
	case u.Hostname() == "":
		return nil, fmt.Errorf("redis url %s: no host", RedactURL(raw))
	case u.Fragment != "":
		return nil, fmt.Errorf("redis url %s: must not have a #fragment", RedactURL(raw))
	}
	opt, err := redis.ParseURL(raw)
	if err != nil {
		return nil, fmt.Errorf("redis url %s: %s", RedactURL(raw), scrub(strings.TrimPrefix(err.Error(), "redis: "), raw))
	}
	return opt, nil
}

// NewClient returns a client for opt, set up for short bounded calls: the
// context given to each call bounds its network I/O, and no feature that
// needs more than plain RESP2 commands and scripts is turned on, so any
// Redis from 6.2 on (or a compatible server) serves it.
func NewClient(opt *redis.Options) *redis.Client {
	o := *opt
	o.ContextTimeoutEnabled = true
	o.Protocol = 2
	o.DisableIdentity = true
	o.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}
	if o.PoolSize == 0 {
		o.PoolSize = 4 // a refresher per account and an occasional install
	}
	return redis.NewClient(&o)
}

// RedactURL is raw with its password (or lone user, which some servers
// take as the password) replaced by xxxxx, for logs and errors.
func RedactURL(raw string) string {
	if u, err := url.Parse(raw); err == nil {
		if u.User == nil {
			return raw
		}
		if _, ok := u.User.Password(); ok {
			return u.Redacted()
		}
		u.User = url.User("xxxxx")
		return u.String()
	}
	if ui := userinfo(raw); ui != "" {
		return strings.Replace(raw, ui+"@", "xxxxx@", 1)
	}
	return raw
}

// userinfo is the part of raw between "//" and the last "@" of its
// authority, found without a URL parser (raw may not parse).
func userinfo(raw string) string {
	_, rest, ok := strings.Cut(raw, "//")
	if !ok {
		return ""
	}
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		rest = rest[:i]
	}
	i := strings.LastIndex(rest, "@")
	if i < 0 {
		return ""
	}
	return rest[:i]
}

// scrub removes raw's userinfo, and each part of it, from msg.
func scrub(msg, raw string) string {
	ui := userinfo(raw)
	if ui == "" {
		return msg
	}
	secrets := []string{ui}
	user, pass, _ := strings.Cut(ui, ":")
	for _, s := range []string{user, pass} {
		secrets = append(secrets, s)
		if d, err := url.PathUnescape(s); err == nil {
			secrets = append(secrets, d)
		}
	}
	for _, s := range secrets {
		if len(s) >= 3 { // a one- or two-letter user would blank out half the message
			msg = strings.ReplaceAll(msg, s, "xxxxx")
		}
	}
	return msg
}
