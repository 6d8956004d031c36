package tokensource

// The Restream user a chain acts as. An operator who re-authorizes must not
// switch the sidecar to another Restream account by accident, and status
// pages should say which account is connected, so every chain records its
// user: read from the profile endpoint with the chain's own access token,
// stored with the record, and copied to every later generation.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"regexp"

	"go.uber.org/zap"
)

// ProfilePath is where Restream serves the profile of the user a token
// acts as.
const ProfilePath = "/v2/user/profile"

// maxProfileBytes caps a profile answer; a real one is a few hundred bytes.
const maxProfileBytes = 64 << 10

// ProfileURLFor returns the profile endpoint on the token endpoint's host
// (scheme and host of tokenURL, then ProfilePath), as at api.restream.io.
// It returns "" if tokenURL has no scheme or host.
func ProfileURLFor(tokenURL string) string {
	u, err := url.Parse(tokenURL)
	if err != nil || u.Scheme == "" || u.Host == "" {
		return ""
	}
	return (&url.URL{Scheme: u.Scheme, Host: u.Host, Path: ProfilePath}).String()
}

// ReadUser asks Config.ProfileURL which Restream user accessToken acts as.
// The call, like every call to Restream (see send), follows no redirect (a
// 3xx is an error: following it would hand the token to another host), is
// bounded by Config.Timeout and reads at most 64 KiB. Errors describe the answer by status, OAuth error code and body
// type, never by its text, and never contain the token.
func (s *Source) ReadUser(ctx context.Context, accessToken string) (*User, error) {
	if s.cfg.ProfileURL == "" {
		return nil, errors.New("reading the Restream profile: no profile URL is configured")
	}
	ctx, cancel := withTimeout(ctx, s.clock, s.cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.cfg.ProfileURL, nil)
	if err != nil {
		return nil, errors.New("reading the Restream profile: bad profile URL")
	}
	req.Header.Set("Authorization", "Bearer "+accessToken)
	req.Header.Set("Accept", "application/json")
	answer, err := send(s.x.client, req, maxProfileBytes)
	if err != nil {
		return nil, errors.New("reading the Restream profile: the endpoint " + err.Error())
	}
	if answer.Status != http.StatusOK {
		msg := fmt.Sprintf("reading the Restream profile: the endpoint answered %d", answer.Status)
		if code, _, ok := ParseOAuthError(answer.Body); ok && oauthCodePattern.MatchString(code) {
			msg += " " + code
		}
		if answer.Status == http.StatusForbidden {
			msg += " (does the Restream application have the profile read scope?)"
		}
		return nil, errors.New(msg)
	}
	u, err := parseProfile(answer.Body, answer.Header.Get("Content-Type"))
	if err != nil {
		return nil, errors.New("reading the Restream profile: " + err.Error())
	}
	return u, nil
}

var (
	oauthCodePattern = regexp.MustCompile(`^[a-z][a-z_]{0,63}$`)
	userIDPattern    = regexp.MustCompile(`^[1-9][0-9]{0,19}$`)
)

// parseProfile takes the user from a profile answer: id (a positive
// integer, kept as its decimal string) and username (optional).
func parseProfile(body []byte, contentType string) (*User, error) {
	var p struct {
		ID       json.RawMessage `json:"id"`
		Username json.RawMessage `json:"username"`
	}
	if err := json.Unmarshal(body, &p); err != nil {
		return nil, fmt.Errorf("the answer is not a profile: %s", DescribeBody(contentType, body))
	}
	var id json.Number
	if len(p.ID) == 0 || json.Unmarshal(p.ID, &id) != nil || !userIDPattern.MatchString(id.String()) {
		return nil, errors.New("the profile has no usable id (want a positive integer)")
	}
	u := &User{ID: id.String()}
	var name string
	if json.Unmarshal(p.Username, &name) == nil {
		u.Username = truncate(sanitize(name), 128)
	}
	return u, nil
}

// recordUser reads the user of the chain whose newest stored record is rec
// and writes it into that same generation. The pair was stored (and may be
// served) before its access token is used for this (persist before use).
//
// The write is a compare-and-set on the version only, and writes of the
// same version (another instance recording a dead token) happen only under
// the lease: so the caller holds lease, and recordUser renews it after the
// profile read (which may take up to Config.Timeout) and writes only if the
// renewal shows the lease is still its own. A lease lapsed and taken over
// meanwhile means the user is not written; the next rotation tries again.
// A failure is logged once per chain. It never blocks a refresh: it runs
// after the round's work, bounded by Config.Timeout.
func (s *Source) recordUser(ctx context.Context, rec *Record, lease *Lease) {
	if s.cfg.ProfileURL == "" || rec.User != nil || !rec.HasPair() || s.closing() || lease == nil {
		return
	}
	u, err := s.ReadUser(ctx, rec.AccessToken)
	if err != nil {
		s.userUnknown(rec.Chain, err)
		return
	}
	octx, cancel := s.op(ctx)
	err = s.store.RenewLease(octx, lease)
	cancel()
	if err != nil {
		s.userUnknown(rec.Chain, fmt.Errorf("the refresh lease could not be renewed before storing the Restream user: %w", err))
		return
	}
	withUser := *rec
	withUser.User = u
	octx, cancel = s.op(ctx)
	err = s.store.CompareAndStore(octx, &withUser, rec.version())
	cancel()
	switch {
	case errors.Is(err, ErrConflict):
		s.log.Debug("the record changed before its Restream user was written; the next generation's read records it", zap.Error(err))
	case err != nil:
		s.userUnknown(rec.Chain, fmt.Errorf("storing the Restream user: %w", err))
	default:
		s.noteUser(&withUser)
		s.log.Info("recorded the Restream user of the token chain", zap.String("restream_user_id", u.ID),
			zap.String("restream_username", u.Username), zap.Uint64("generation", rec.Generation))
	}
}

// userUnknown logs, once per chain, that its user could not be recorded.
func (s *Source) userUnknown(chain string, err error) {
	s.mu.Lock()
	first := s.userWarned != chain
	s.userWarned = chain
	s.mu.Unlock()
	log := s.log.Debug
	if first {
		log = s.log.Warn
	}
	log("the Restream user of the token chain is unknown; refreshing is unaffected and the next rotation tries again",
		zap.String("error", err.Error()))
}

// noteUser shows rec's user in Status if rec is the served generation.
func (s *Source) noteUser(rec *Record) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if t := s.cur.Load(); t != nil && t.Chain == rec.Chain && t.Generation == rec.Generation {
		s.user = rec.User
	}
}
