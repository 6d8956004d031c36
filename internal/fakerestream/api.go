package fakerestream

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net/http"
	"strings"
)

// ProfileFault is a failure mode of GET /v2/user/profile, applied to calls
// with a valid access token (a bad token gets 401 as always).
type ProfileFault int

const (
	// ProfileNone: the profile endpoint answers with the chain's user.
	ProfileNone ProfileFault = iota
	// ProfileForbidden answers 403 insufficient_scope, as Restream does for
	// a token whose application lacks the profile scope.
	ProfileForbidden
	// Profile500 answers 500 with Restream's JSON error shape.
	Profile500
	// ProfileGarbage answers 200 with an HTML page.
	ProfileGarbage
	// ProfileHuge answers 200 with a JSON body of HugeBodyBytes.
	ProfileHuge
	// ProfileRedirect answers 302 to the URL given to SetProfileRedirect.
	ProfileRedirect
)

// SetProfileFault makes GET /v2/user/profile fail as f describes, for
// valid tokens, until the next call; ProfileNone restores it.
func (s *Server) SetProfileFault(f ProfileFault) { s.profileFault.Store(int64(f)) }

// SetProfileRedirect makes GET /v2/user/profile answer 302 to target (the
// ProfileRedirect fault); "" restores it.
func (s *Server) SetProfileRedirect(target string) {
	s.mu.Lock()
	s.profileTo = target
	s.mu.Unlock()
	if target == "" {
		s.profileFault.Store(int64(ProfileNone))
		return
	}
	s.profileFault.Store(int64(ProfileRedirect))
}

var (
	platforms = []map[string]any{
		{"id": 1, "name": "Twitch", "url": "http://twitch.tv", "image": map[string]string{"png": "https://restream.io/img/api/platforms/platform-1.png"}},
		{"id": 5, "name": "Youtube", "url": "https://www.youtube.com", "image": map[string]string{"png": "https://restream.io/img/api/platforms/platform-5.png"}},
	}
	servers = []map[string]any{
		{"id": 0, "name": "Autodetect", "url": "live.restream.io", "rtmpUrl": "rtmp://live.restream.io/live", "latitude": "0", "longitude": "0"},
		{"id": 1, "name": "EU-West (London, GB)", "url": "london.restream.io", "rtmpUrl": "rtmp://london.restream.io/live", "latitude": "51.5073", "longitude": "-0.1277"},
	}
)

// handleAPI serves /v2/: the public platform and server lists, and for a
// valid access token an echo of the request (the profile adds the chain's
// user to it).
func (s *Server) handleAPI(w http.ResponseWriter, r *http.Request) {
	// Profile reads on the token listener are the clients' own (they derive
	// the URL from the token URL); APICalls and API401 count the API on
	// URL(), where proxied traffic goes.
	api := r.Context().Value(tokenServerKey{}) == nil
	if api {
		s.apiCalls.Add(1)
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, "read body: "+err.Error(), http.StatusBadRequest)
		return
	}
	switch r.URL.Path {
	case "/v2/platform/all":
		writeJSON(w, http.StatusOK, platforms)
		return
	case "/v2/server/all":
		writeJSON(w, http.StatusOK, servers)
		return
	}

	tok := accessToken(r)
	profile := r.URL.Path == "/v2/user/profile" && r.Method == http.MethodGet
	if profile {
		s.profileCalls.Add(1)
	}
	if tok == "" || !s.ValidAccessToken(tok) {
		if api {
			s.api401.Add(1)
		}
		writeAPIError(w, http.StatusUnauthorized, "invalid_token", "Invalid token: access token is invalid")
		return
	}
	echo := describeRequest(r, body)
	if profile && s.writeProfileFault(w, r) {
		return
	}
	if profile {
		// Restream's profile: id (a number), username, email. The echo
		// fields stay, for tests that check what a proxy sent.
		u, _ := s.UserOf(tok)
		echo["id"], echo["username"], echo["email"] = u.ID, u.Username, u.Email
	}
	writeJSON(w, http.StatusOK, echo)
}

// accessToken is the access token r presents: the Bearer token of its
// Authorization header, or, without that header, its accessToken query
// parameter. It is "" if there is none, or if the header is not Bearer.
func accessToken(r *http.Request) string {
	authz := r.Header.Get("Authorization")
	if authz == "" {
		return r.URL.Query().Get("accessToken")
	}
	if scheme, t, ok := strings.Cut(authz, " "); ok && strings.EqualFold(scheme, "Bearer") {
		return strings.TrimSpace(t)
	}
	return ""
}

// describeRequest is the API's echo of r, for tests that check what a
// proxy sent: method, path, query, the body's length and hash, and both
// places a token can travel.
func describeRequest(r *http.Request, body []byte) map[string]any {
	sum := sha256.Sum256(body)
	return map[string]any{
		"method":             r.Method,
		"path":               r.URL.Path,
		"query":              r.URL.RawQuery,
		"body_sha256":        hex.EncodeToString(sum[:]),
		"body_len":           len(body),
		"authorization":      r.Header.Get("Authorization"),
		"access_token_query": r.URL.Query().Get("accessToken"),
	}
}

// writeProfileFault answers a profile call under the current ProfileFault;
// false if there is none.
func (s *Server) writeProfileFault(w http.ResponseWriter, r *http.Request) bool {
	switch ProfileFault(s.profileFault.Load()) {
	case ProfileForbidden:
		writeAPIError(w, http.StatusForbidden, "insufficient_scope", "Insufficient scope: authorized scope is insufficient")
	case Profile500:
		writeAPIError(w, http.StatusInternalServerError, "server_error", "Internal server error")
	case ProfileGarbage:
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, "<!DOCTYPE html>\n<html><body><h1>Restream</h1><p>Something went wrong.</p></body></html>\n")
	case ProfileHuge:
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, `{"id":1,"username":"`+strings.Repeat("x", HugeBodyBytes)+`"}`)
	case ProfileRedirect:
		s.mu.Lock()
		to := s.profileTo
		s.mu.Unlock()
		http.Redirect(w, r, to, http.StatusFound)
	default:
		return false
	}
	return true
}

// writeAPIError answers in the API's error shape.
func writeAPIError(w http.ResponseWriter, status int, name, msg string) {
	writeJSON(w, status, map[string]any{"error": map[string]any{
		"statusCode": status, "status": status, "code": status, "message": msg, "name": name,
	}})
}
