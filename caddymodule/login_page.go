package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"html/template"
	"net/http"
	"slices"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// The pages: plain HTML, every value escaped by html/template.

type loginPage struct {
	Title      string
	Paragraphs []string
	Code       string   // a Caddyfile snippet, shown preformatted
	After      []string // paragraphs after Code
	Facts      []pageFact
	Detail     string
	Links      []pageLink
}

type pageFact struct{ Name, Value string }

type pageLink struct {
	URL, Text string
	Button    bool
}

var loginTemplate = template.Must(template.New("page").Parse(`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{{.Title}} · restream_auth</title>
<style>body{font-family:system-ui,sans-serif;max-width:42rem;margin:3rem auto;padding:0 1rem;line-height:1.5}dt{font-weight:600}dd{margin:0 0 .5rem 0}code{word-break:break-all}pre{background:#f4f4f4;padding:.75rem;overflow-x:auto}a.button{display:inline-block;padding:.5rem 1rem;border-radius:.375rem;background:#1f6feb;color:#fff;text-decoration:none;font-weight:600}</style>
</head>
<body>
<h1>{{.Title}}</h1>
{{range .Paragraphs}}<p>{{.}}</p>
{{end}}{{with .Code}}<pre>{{.}}</pre>
{{end}}{{range .After}}<p>{{.}}</p>
{{end}}{{with .Facts}}<dl>
{{range .}}<dt>{{.Name}}</dt><dd>{{.Value}}</dd>
{{end}}</dl>
{{end}}{{with .Detail}}<p><small>Detail: <code>{{.}}</code></small></p>
{{end}}{{range .Links}}<p><a href="{{.URL}}"{{if .Button}} class="button"{{end}}>{{.Text}}</a></p>
{{end}}</body>
</html>
`))

func (l *Login) page(w http.ResponseWriter, r *http.Request, status int, p loginPage) error {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	if r.Method == http.MethodHead {
		return nil
	}
	if err := loginTemplate.Execute(w, p); err != nil {
		l.logger.Debug("writing the login page", zap.Error(err))
	}
	return nil
}

// accountView is what <prefix>/ shows of the account: the running
// restream_auth's status, or, when none runs in this config, the stored
// record.
type accountView struct {
	state           tokensource.State // a tokensource.State*, or stateStored, stateUnreadable, stateStorageFailed
	user            *tokensource.User
	generation      uint64
	access, refresh time.Time
	lastError       string
}

// States of a record read from storage, when no restream_auth of the
// account runs here.
const (
	stateStored        = "stored"
	stateUnreadable    = "unreadable"
	stateStorageFailed = "storage_failed"
)

func (l *Login) view(ctx context.Context) accountView {
	if src, live := l.installer(); live {
		st := src.Status()
		return accountView{state: st.State, user: st.User, generation: st.Generation,
			access: st.AccessExpiry, refresh: st.RefreshExpiry, lastError: st.LastError}
	}
	ctx, cancel := context.WithTimeout(ctx, tokensource.StorageTimeout)
	defer cancel()
	rec, err := l.ownPool.loadRecord(ctx)
	switch {
	case errors.Is(err, tokensource.ErrCorruptRecord), errors.Is(err, tokensource.ErrUnreadableRecord):
		return accountView{state: stateUnreadable, lastError: err.Error()}
	case err != nil:
		return accountView{state: stateStorageFailed, lastError: err.Error()}
	case !rec.HasPair():
		return accountView{state: tokensource.StateNoChain}
	}
	v := accountView{state: stateStored, user: rec.User, generation: rec.Generation, access: rec.Expiry, refresh: rec.RefreshExpiry}
	if slices.Contains(rec.DeadTokens, tokensource.Fingerprint(rec.RefreshToken)) {
		v.state = tokensource.StateReauthRequired
	}
	return v
}

// status shows the account's state and what to do about it, with a button
// to connect or re-authorize.
func (l *Login) status(w http.ResponseWriter, r *http.Request) error {
	v := l.view(r.Context())
	now := l.now()
	p := loginPage{Detail: v.lastError}
	connect := pageLink{URL: "./login", Text: "Re-authorize", Button: true}
	who := "its Restream user is not known yet (it is read at the next token rotation)"
	if v.user != nil {
		who = "it acts as Restream user " + userText(v.user)
	}
	switch v.state {
	case tokensource.StateOK, tokensource.StateRefreshing:
		p.Title = "Restream account connected"
		p.Paragraphs = []string{"The sidecar is connected: " + who + ". Tokens are renewed automatically; nothing needs doing."}
	case tokensource.StateBackoff:
		p.Title = "Restream account connected; refreshing fails for now"
		p.Paragraphs = []string{"The sidecar is connected (" + who + "), but the token endpoint failed at the last refresh. " +
			"It retries by itself, and the current access token serves until it expires. The detail below says what failed."}
	case tokensource.StateDegraded:
		p.Title = "Restream account connected; storage is failing"
		p.Paragraphs = []string{"The newest token pair could not be written to storage: it is served from memory and the write is retried. " +
			"Check the storage: if this instance stopped now, the chain could be lost."}
	case tokensource.StateMisconfigured:
		p.Title = "Restream refuses the client credentials"
		p.Paragraphs = []string{"The token endpoint refuses restream_auth's client_id or client_secret. Fix them and reload Caddy; " +
			"the chain is kept. Re-authorizing does not help while the credentials are wrong."}
	case tokensource.StateReauthRequired:
		p.Title = "Re-authorization required"
		p.Paragraphs = []string{"Restream no longer accepts the account's refresh token: the token chain is dead. " +
			"Re-authorize to start a new chain; requests through restream_auth get 503 until then."}
	case tokensource.StateNoChain:
		p.Title = "No Restream account connected"
		p.Paragraphs = []string{"The sidecar has no token chain for this account yet, so requests through restream_auth get 503. " +
			"Connect a Restream account: you sign in at Restream and approve the application."}
		connect.Text = "Connect a Restream account"
	case stateStored:
		p.Title = "Restream account stored"
		p.Paragraphs = []string{"A token chain is stored (" + who + "). No restream_auth of this account runs in this Caddy: " +
			"the instances that share this storage use and renew it."}
	case stateUnreadable:
		p.Title = "The stored token record cannot be read"
		p.Paragraphs = []string{"The account's stored token record exists but cannot be read with this configuration. It is never " +
			"overwritten, as it may hold the only live refresh token: fix it (for example, configure the encryption key it was " +
			"written with) or delete it, then connect again."}
		connect = pageLink{}
	default: // stateStorageFailed
		p.Title = "The account's state could not be read"
		p.Paragraphs = []string{"Reading the stored token record failed. Reload this page to try again."}
		connect = pageLink{}
	}
	p.Facts = []pageFact{{"Account", l.Account}}
	if v.user != nil {
		p.Facts = append(p.Facts, pageFact{"Restream user", userText(v.user)})
	} else if v.generation > 0 {
		p.Facts = append(p.Facts, pageFact{"Restream user", "not known yet"})
	}
	p.Facts = append(p.Facts, pageFact{"State", string(v.state)})
	if v.generation > 0 {
		p.Facts = append(p.Facts, pageFact{"Generation", strconv.FormatUint(v.generation, 10)})
	}
	if !v.access.IsZero() {
		p.Facts = append(p.Facts, pageFact{"Access token expires", whenText(v.access, now) + " (renewed automatically before then)"})
	}
	if !v.refresh.IsZero() {
		p.Facts = append(p.Facts, pageFact{"Chain valid until", whenText(v.refresh, now) + " (re-authorize before then)"})
	}
	if connect.URL != "" {
		p.Links = []pageLink{connect}
	}
	return l.page(w, r, http.StatusOK, p)
}

// whenText writes t in UTC with how far it is from now:
// "2026-12-01 00:08 UTC, in 59 minutes".
func whenText(t, now time.Time) string {
	d := t.Sub(now)
	rel := "in " + humanDuration(d)
	if d < 0 {
		rel = humanDuration(-d) + " ago"
	}
	return t.UTC().Format("2006-01-02 15:04 UTC") + ", " + rel
}

// humanDuration writes d as people do, rounded down to at most two units:
// "45 seconds", "10 minutes", "59 minutes", "23 hours 5 minutes",
// "1 day 3 hours", "364 days".
func humanDuration(d time.Duration) string {
	const day = 24 * time.Hour
	d = max(d, 0)
	n := func(v int64, unit string) string {
		if v == 1 {
			return "1 " + unit
		}
		return fmt.Sprintf("%d %ss", v, unit)
	}
	pair := func(big int64, bigUnit string, small int64, smallUnit string) string {
		if small == 0 {
			return n(big, bigUnit)
		}
		return n(big, bigUnit) + " " + n(small, smallUnit)
	}
	switch {
	case d < time.Minute:
		return n(int64(d/time.Second), "second")
	case d < time.Hour:
		return n(int64(d/time.Minute), "minute")
	case d < day:
		return pair(int64(d/time.Hour), "hour", int64(d%time.Hour/time.Minute), "minute")
	case d < 2*day:
		return pair(1, "day", int64((d-day)/time.Hour), "hour")
	}
	return n(int64(d/day), "day")
}

// unauthenticated refuses a request that no Caddy authentication handler
// identified: the flow decides which Restream account the sidecar acts as.
func (l *Login) unauthenticated(w http.ResponseWriter, r *http.Request) error {
	l.strangers.refused(l.logger, "login route refused a request that no authentication handler identified",
		zap.String("account", l.Account), zap.String("remote_ip", remoteIP(r)))
	return l.page(w, r, http.StatusForbidden, loginPage{
		Title: "Sign-in required",
		Paragraphs: []string{
			"Whoever completes this flow decides which Restream account the sidecar acts as, so it answers only requests that Caddy authenticated.",
			"Put basic_auth in front of restream_auth_login in the Caddyfile (create the hash with caddy hash-password), for example:",
		},
		Code: "handle /restream/* {\n\tbasic_auth {\n\t\toperator <hash from caddy hash-password>\n\t}\n\trestream_auth_login {\n\t\t…\n\t}\n}",
		After: []string{
			"With forward_auth, copy the user header and set {http.auth.user.id} from it before restream_auth_login " +
				"(inside a route block: vars http.auth.user.id {http.request.header.Remote-User}).",
			"If something in front of Caddy already authenticates every request to this route, add allow_unauthenticated to restream_auth_login.",
		},
	})
}

func (l *Login) methodNotAllowed(w http.ResponseWriter, r *http.Request, allow string) error {
	w.Header().Set("Allow", allow)
	return l.page(w, r, http.StatusMethodNotAllowed, loginPage{
		Title:      "Method not allowed",
		Paragraphs: []string{"Use " + allow + "."},
	})
}
