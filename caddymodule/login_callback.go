package caddymodule

import (
	"context"
	"crypto/subtle"
	"errors"
	"net/http"

	"go.uber.org/zap"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// callbackFailure is a refused callback: what the page and the log say.
type callbackFailure struct {
	status int
	reason string // short, for the log
	title  string
	text   []string
	detail string // redacted, shown and logged
}

// refusal carries a callbackFailure through an install check.
type refusal struct{ f *callbackFailure }

// callback verifies the state, exchanges the code, identifies the Restream
// user, installs the chain and sends the browser to <prefix>/, so that the
// spent code leaves the address bar.
func (l *Login) callback(w http.ResponseWriter, r *http.Request) error {
	// The state is single-use whatever happens next.
	http.SetCookie(w, l.cookie("", -1))
	q := r.URL.Query()
	code, state, oauthErr := q.Get("code"), q.Get("state"), q.Get("error")
	if f := l.checkCallback(r, code, state, oauthErr); f != nil {
		return l.fail(w, r, f)
	}
	if f := l.checkStoredRecord(r.Context()); f != nil {
		return l.fail(w, r, f)
	}
	rec, err := l.own.ExchangeCode(r.Context(), code, l.RedirectURI)
	if err != nil {
		return l.fail(w, r, exchangeFailure(err, l.redact(err.Error(), code, state)))
	}
	secrets := []string{code, state, rec.AccessToken, rec.RefreshToken}
	// The pair is not the account's chain yet: the user it acts as decides
	// whether it may become so.
	user, profileErr := l.own.ReadUser(r.Context(), rec.AccessToken)
	var profileDetail string
	if profileErr != nil {
		profileDetail = l.redact(profileErr.Error(), secrets...)
	}
	rec.User = user
	if f := l.checkExpectedUser(user, profileDetail); f != nil {
		l.discard(r.Context(), rec, secrets)
		return l.fail(w, r, f)
	}
	installer, live := l.installer()
	tok, err := installer.InstallPair(r.Context(), rec, func(stored *tokensource.Record) error {
		if f := l.checkAccountChange(stored, user, profileDetail); f != nil {
			return &refusal{f}
		}
		return nil
	})
	var refused *refusal
	switch {
	case errors.As(err, &refused):
		l.discard(r.Context(), rec, secrets)
		return l.fail(w, r, refused.f)
	case err != nil:
		return l.fail(w, r, &callbackFailure{
			status: http.StatusInternalServerError, reason: "storing the new chain failed",
			title: "The authorization could not be stored",
			text: []string{"Restream authorized the account, but the sidecar could not store the new token chain, so it is not in use. " +
				"Check the storage, then start again."},
			detail: l.redact(err.Error(), secrets...),
		})
	}
	fields := []zap.Field{zap.String("account", l.Account), zap.Uint64("generation", tok.Generation),
		zap.Time("access_expires_at", tok.Expiry), zap.Bool("served_at_once", live),
		zap.String("operator", authenticatedUser(r)), zap.String("remote_ip", remoteIP(r))}
	if user != nil {
		l.logger.Info("installed a new token chain from the login flow",
			append(fields, zap.String("restream_user_id", user.ID), zap.String("restream_username", user.Username))...)
	} else {
		l.logger.Warn("installed a new token chain from the login flow; its Restream user is unknown (the next rotation tries again)",
			append(fields, zap.String("profile_error", profileDetail))...)
	}
	w.Header().Set("Location", "./")
	return l.page(w, r, http.StatusSeeOther, loginPage{
		Title: "Restream account connected",
		Links: []pageLink{{URL: "./", Text: "Show the account"}},
	})
}

// discard revokes a pair the flow refused (another user than the pinned
// one, or one that would change the account's user): dropped but valid, its
// refresh token would stay usable at Restream for a year by whoever else
// saw it. Not after a failed store: the pair may have been stored and be in
// use.
func (l *Login) discard(ctx context.Context, rec *tokensource.Record, secrets []string) {
	if err := l.own.Revoke(context.WithoutCancel(ctx), rec.RefreshToken); err != nil {
		l.logger.Warn("the refused pair could not be revoked; it stays valid at Restream until it expires",
			zap.String("account", l.Account), zap.String("error", l.redact(err.Error(), secrets...)))
		return
	}
	l.logger.Info("revoked the refused pair at Restream", zap.String("account", l.Account))
}

// checkCallback refuses denied consent, errors from Restream, and a state
// that is missing, forged, expired, bound to another flow or used before.
// A state that passes is spent.
func (l *Login) checkCallback(r *http.Request, code, state, oauthErr string) *callbackFailure {
	again := "Start again to authorize the account."
	switch {
	case oauthErr == "access_denied" || (oauthErr == "" && code == "" && state == ""):
		// Restream redirects with no parameters at all when consent is denied.
		return &callbackFailure{status: http.StatusForbidden, reason: "consent denied",
			title: "Authorization was not granted",
			text:  []string{"Restream did not authorize the sidecar (consent was denied or cancelled). Nothing was changed.", again}}
	case oauthErr != "":
		return &callbackFailure{status: http.StatusBadGateway, reason: "Restream returned an error",
			title:  "Restream returned an error",
			text:   []string{"Restream did not issue an authorization code. Nothing was changed.", again},
			detail: "error=" + loginOAuthCode(oauthErr)}
	case code == "" || state == "":
		return &callbackFailure{status: http.StatusBadRequest, reason: "incomplete callback",
			title: "Incomplete callback",
			text:  []string{"The callback lacks the authorization code or the state. Nothing was changed.", again}}
	}
	c, err := r.Cookie(l.cookieName)
	if err != nil || c.Value == "" {
		return &callbackFailure{status: http.StatusBadRequest, reason: "no state cookie",
			title: "No authorization in progress in this browser",
			text: []string{"This browser did not start the authorization here, or its cookie expired (after " +
				humanDuration(loginStateTTL) + "), was used already, or was blocked. Start and finish the flow in the same browser, " +
				"on the host of the configured redirect_uri. Nothing was changed.", again}}
	}
	now := l.now()
	want, exp, err := l.verifyState(c.Value, now)
	if err != nil {
		f := &callbackFailure{status: http.StatusBadRequest, reason: "invalid state cookie",
			title: "The authorization could not be verified",
			text: []string{"The state cookie is not valid (tampered with, signed with another client secret, " +
				"or issued for another redirect_uri or account). Nothing was changed.", again}}
		if errors.Is(err, errStateExpired) {
			f.reason, f.title = "state expired", "The authorization took too long"
			f.text = []string{"More than " + humanDuration(loginStateTTL) + " passed since the authorization started. Nothing was changed.", again}
		}
		return f
	}
	if subtle.ConstantTimeCompare([]byte(want), []byte(state)) != 1 {
		return &callbackFailure{status: http.StatusBadRequest, reason: "state mismatch",
			title: "The authorization could not be verified",
			text: []string{"The state returned by Restream does not match the one this browser started with " +
				"(an old or forged link, or a flow started in another tab). Nothing was changed.", again}}
	}
	if !spentStates.spend(l.Account+"\x00"+state, exp, now) {
		return &callbackFailure{status: http.StatusBadRequest, reason: "state replayed",
			title: "This authorization was used already",
			text: []string{"This callback (its state) was completed before; a state works once. " +
				"Nothing was changed. Reloading a finished callback does this: the account's page shows what is connected.", again}}
	}
	return nil
}

// checkStoredRecord refuses, before the code is spent, to replace a stored
// record that exists but cannot be read: it is never overwritten, as it may
// hold the only live refresh token.
func (l *Login) checkStoredRecord(ctx context.Context) *callbackFailure {
	ctx, cancel := context.WithTimeout(ctx, tokensource.StorageTimeout)
	defer cancel()
	_, err := l.ownPool.loadRecord(ctx)
	if !errors.Is(err, tokensource.ErrCorruptRecord) && !errors.Is(err, tokensource.ErrUnreadableRecord) {
		return nil // a transient read error is the install's to report
	}
	return &callbackFailure{
		status: http.StatusConflict, reason: "stored record unreadable",
		title: "The stored token record cannot be read",
		text: []string{"The account's stored token record exists but cannot be read with this configuration. It is never " +
			"overwritten, as it may hold the only live refresh token: fix it (for example, configure the encryption key it " +
			"was written with) or delete it, then start again. The authorization code was not used."},
		detail: err.Error(),
	}
}

// checkExpectedUser refuses a user other than expected_user_id, and a user
// that could not be read while expected_user_id is set.
func (l *Login) checkExpectedUser(user *tokensource.User, profileErr string) *callbackFailure {
	switch {
	case l.ExpectedUserID == "":
		return nil
	case user == nil:
		return unidentified(profileErr, "restream_auth_login is pinned to Restream user id "+l.ExpectedUserID+" (expected_user_id)")
	case user.ID != l.ExpectedUserID:
		return &callbackFailure{status: http.StatusForbidden, reason: "not the expected Restream user",
			title: "This is not the expected Restream account",
			text: []string{"You authorized Restream user " + userText(user) + ", but restream_auth_login is pinned to Restream user id " +
				l.ExpectedUserID + " (expected_user_id). Nothing was installed.",
				"Sign in to Restream as that account (sign out of Restream first if another account is signed in), then start again."}}
	}
	return nil
}

// checkAccountChange runs under the account's lease with the stored record:
// a chain whose user is known is replaced only by the same user's, unless
// allow_account_change is set.
func (l *Login) checkAccountChange(stored *tokensource.Record, user *tokensource.User, profileErr string) *callbackFailure {
	if l.AllowAccountChange || !stored.HasPair() || stored.User == nil {
		return nil
	}
	switch {
	case user == nil:
		return unidentified(profileErr, "the sidecar acts as Restream user "+userText(stored.User))
	case user.ID != stored.User.ID:
		return &callbackFailure{status: http.StatusConflict, reason: "another Restream user",
			title: "This is another Restream account",
			text: []string{"The sidecar acts as Restream user " + userText(stored.User) + "; you authorized Restream user " +
				userText(user) + ". Nothing was installed.",
				"To connect that account instead, add allow_account_change to restream_auth_login, reload Caddy and start again. " +
					"To re-authorize the current account, sign in to Restream as " + userText(stored.User) + " and start again."}}
	}
	return nil
}

// unidentified refuses an authorization whose user could not be read while
// the account is pinned (pin says how).
func unidentified(profileErr, pin string) *callbackFailure {
	return &callbackFailure{status: http.StatusBadGateway, reason: "Restream user unknown",
		title: "The Restream account could not be identified",
		text: []string{"Restream authorized the sidecar, but its profile could not be read, so the sidecar cannot tell which " +
			"Restream account this is; " + pin + ". Nothing was installed.",
			"Check that the Restream application has the profile read scope and that Restream is reachable, then start again."},
		detail: profileErr}
}

func userText(u *tokensource.User) string {
	if u.Username == "" {
		return "id " + u.ID
	}
	return u.Username + " (id " + u.ID + ")"
}

// exchangeFailure describes a failed code exchange.
func exchangeFailure(err error, detail string) *callbackFailure {
	f := &callbackFailure{status: http.StatusBadGateway, reason: "code exchange failed",
		title:  "Restream did not accept the authorization",
		text:   []string{"The token endpoint could not be reached or answered with an error. Nothing was changed. Start again to authorize the account."},
		detail: detail}
	var te *tokensource.Error
	if errors.As(err, &te) {
		switch te.Code {
		case "invalid_grant":
			f.status = http.StatusBadRequest
			f.text = []string{"Restream rejected the authorization code: it was already used, it expired, or it was issued " +
				"for another redirect URI. Nothing was changed. Start again to get a new code."}
		case "invalid_client", "unauthorized_client":
			f.text = []string{"Restream rejected the sidecar's client credentials: check client_id and client_secret " +
				"of restream_auth_login. Nothing was changed."}
		}
	}
	return f
}

func (l *Login) fail(w http.ResponseWriter, r *http.Request, f *callbackFailure) error {
	fields := []zap.Field{zap.String("account", l.Account), zap.String("reason", f.reason),
		zap.Int("status", f.status), zap.String("operator", authenticatedUser(r)), zap.String("remote_ip", remoteIP(r))}
	if f.detail != "" {
		fields = append(fields, zap.String("detail", f.detail))
	}
	l.logger.Warn("login callback refused", fields...)
	return l.page(w, r, f.status, loginPage{
		Title:      f.title,
		Paragraphs: f.text,
		Detail:     f.detail,
		Links:      []pageLink{{URL: "./login", Text: "Start again"}, {URL: "./", Text: "Show the account"}},
	})
}

// redact removes the flow's secrets and the client secret from a message;
// tokensource errors carry none, this is a second line of defence.
func (l *Login) redact(msg string, secrets ...string) string {
	return tokensource.NewRedactor(l.clientID, l.clientSecret, secrets...).RedactString(msg)
}

// loginOAuthCode keeps an OAuth error code only if it looks like one.
func loginOAuthCode(v string) string {
	if len(v) > 64 {
		return "(unrecognized)"
	}
	for _, c := range v {
		if (c < 'a' || c > 'z') && c != '_' {
			return "(unrecognized)"
		}
	}
	return v
}
