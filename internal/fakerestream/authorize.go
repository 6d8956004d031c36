package fakerestream

import (
	"net/http"
	"net/url"
	"strings"
)

// AuthorizeHandler returns a stand-in for Restream's login and consent page,
// https://api.restream.io/login?response_type=code&client_id=…&redirect_uri=…&state=…,
// as a browser meets it after the user has signed in. Serve it on a listener
// of its own (httptest.NewServer(fake.AuthorizeHandler())); it answers on any
// path.
//
// It checks the request strictly (GET, response_type=code, this Server's
// client_id, an absolute http(s) redirect_uri) and answers 400 otherwise.
// Then it "approves" as the signed-in user (Options.User, SetUser): 302 to
// redirect_uri?code=<IssueCode(redirect_uri)>&scope=<comma-separated>&state=<state>,
// as Restream does. With deny=1 in the query it "denies" instead: 302 to
// redirect_uri with no parameters at all, which is how Restream reports
// refused consent.
func (s *Server) AuthorizeHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-store")
		if r.Method != http.MethodGet {
			w.Header().Set("Allow", http.MethodGet)
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		q := r.URL.Query()
		redirect := q.Get("redirect_uri")
		ru, err := url.Parse(redirect)
		switch {
		case q.Get("response_type") != "code":
			http.Error(w, "response_type must be code", http.StatusBadRequest)
			return
		case q.Get("client_id") != s.opts.ClientID:
			http.Error(w, "unknown client_id", http.StatusBadRequest)
			return
		case redirect == "" || err != nil || ru.Host == "" || (ru.Scheme != "http" && ru.Scheme != "https"):
			http.Error(w, "redirect_uri must be an absolute http(s) URL", http.StatusBadRequest)
			return
		}
		if q.Get("deny") == "1" {
			http.Redirect(w, r, redirect, http.StatusFound)
			return
		}
		cb := url.Values{
			"code":  {s.IssueCode(redirect)},
			"scope": {strings.Join(s.opts.Scopes, ",")},
		}
		if st := q.Get("state"); st != "" {
			cb.Set("state", st)
		}
		sep := "?"
		if ru.RawQuery != "" {
			sep = "&"
		}
		s.logf("fakerestream: authorize page approved for %s", redirect)
		http.Redirect(w, r, redirect+sep+cb.Encode(), http.StatusFound)
	})
}
