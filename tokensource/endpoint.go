package tokensource

// The one client of Restream's OAuth endpoints. Every call that carries a
// credential (the client's, a refresh token, a code, an access token) goes
// through send: it never follows a redirect, which would carry the
// credential wherever the Location points, and it reads a bounded answer.
// Everything said about an answer that could not be used comes from
// DescribeBody and DescribeTransportError, which never quote it.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"time"
)

// AuthStyle says how the client credentials reach the token endpoint.
type AuthStyle int

const (
	// AuthBasic sends HTTP Basic client_id:client_secret (Restream's recommendation).
	AuthBasic AuthStyle = iota
	// AuthBody sends client_id and client_secret as form fields.
	AuthBody
)

// MaxResponseBytes caps what is read from the token endpoint.
const MaxResponseBytes = 1 << 20

// Endpoint is an OAuth client of a token endpoint (RFC 6749 section 3.2)
// and of the endpoints beside it, such as the revocation endpoint (RFC
// 7009). It posts forms with the client's authentication, follows no
// redirect, and reads at most MaxResponseBytes of an answer. The refreshing
// Source (and through it the login's code exchange and the CLI) and
// restream_token_proxy call Restream with it.
type Endpoint struct {
	// URL is the token endpoint, where Post sends its form.
	URL string
	// ClientID and ClientSecret authenticate the client, as AuthStyle says.
	ClientID, ClientSecret string
	AuthStyle              AuthStyle
	// Client makes the calls; nil means http.DefaultClient. Its
	// CheckRedirect is not used: no redirect is ever followed.
	Client *http.Client
}

// Answer is what an endpoint answered, body read whole.
type Answer struct {
	Status int
	Header http.Header
	Body   []byte
	// Elapsed runs from sending the request to the end of the body.
	Elapsed time.Duration
}

// Post sends form to the token endpoint; see PostTo.
func (e *Endpoint) Post(ctx context.Context, form url.Values) (*Answer, error) {
	return e.PostTo(ctx, e.URL, form)
}

// PostTo sends form with the client's authentication to target, the token
// endpoint or another endpoint of the same client (revocation), and returns
// the answer, whatever its status but a redirect. When no answer can be
// used the error is a *CallError. form is not modified.
func (e *Endpoint) PostTo(ctx context.Context, target string, form url.Values) (*Answer, error) {
	if e.AuthStyle == AuthBody {
		withClient := make(url.Values, len(form)+2)
		for k, v := range form {
			withClient[k] = v
		}
		withClient.Set("client_id", e.ClientID)
		withClient.Set("client_secret", e.ClientSecret)
		form = withClient
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, target, strings.NewReader(form.Encode()))
	if err != nil {
		return nil, &CallError{Failure: CallUnbuildable}
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	if e.AuthStyle == AuthBasic {
		req.SetBasicAuth(e.ClientID, e.ClientSecret)
	}
	return send(e.Client, req, MaxResponseBytes)
}

// send makes one call that follows no redirect and reads at most limit
// bytes of the answer.
func send(client *http.Client, req *http.Request, limit int64) (*Answer, error) {
	if client == nil {
		client = http.DefaultClient
	}
	start := time.Now()
	resp, err := noRedirects(client).Do(req)
	if err != nil {
		return nil, &CallError{Failure: CallNoAnswer, Elapsed: time.Since(start), cause: err,
			timedOut: timedOut(req.Context(), err)}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, limit+1))
	elapsed := time.Since(start)
	switch {
	case err != nil:
		return nil, &CallError{Failure: CallUnreadable, Status: resp.StatusCode, Elapsed: elapsed, cause: err,
			timedOut: timedOut(req.Context(), err)}
	case int64(len(body)) > limit:
		return nil, &CallError{Failure: CallTooLarge, Status: resp.StatusCode, Elapsed: elapsed, Limit: limit}
	case resp.StatusCode >= 300 && resp.StatusCode < 400:
		return nil, &CallError{Failure: CallRedirected, Status: resp.StatusCode, Elapsed: elapsed}
	}
	return &Answer{Status: resp.StatusCode, Header: resp.Header, Body: body, Elapsed: elapsed}, nil
}

// timedOut reports whether a call's error came from a deadline, the
// context's or the network's.
func timedOut(ctx context.Context, err error) bool {
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(ctx.Err(), context.DeadlineExceeded) || isTimeout(err)
}

func isTimeout(err error) bool {
	var t interface{ Timeout() bool }
	return errors.As(err, &t) && t.Timeout()
}

// CallFailure says why a call brought no answer to use.
type CallFailure int

const (
	// CallUnbuildable: the request could not be built (a bad URL).
	CallUnbuildable CallFailure = iota + 1
	// CallNoAnswer: no answer arrived (unreachable, refused, timed out).
	// The request may have reached the endpoint all the same.
	CallNoAnswer
	// CallUnreadable: the status arrived, its body could not be read.
	CallUnreadable
	// CallTooLarge: the body is larger than the call's cap.
	CallTooLarge
	// CallRedirected: the endpoint answered 3xx, which is not followed.
	CallRedirected
)

// CallError is a call that brought no answer to use. Its text says what the
// endpoint did, as a predicate for the caller to name the endpoint
// ("token endpoint " + err.Error()), in words safe to log and show: never
// the URL (it may carry a query), the form or the answer.
type CallError struct {
	Failure CallFailure
	// Status is the answer's HTTP status; 0 if none arrived.
	Status int
	// Elapsed is how long the call ran.
	Elapsed time.Duration
	// Limit is the cap a CallTooLarge answer exceeded.
	Limit int64

	cause    error // the transport's error: its text may hold the URL
	timedOut bool
}

func (e *CallError) Error() string {
	switch e.Failure {
	case CallUnbuildable:
		return "cannot be called: the request could not be built (bad URL)"
	case CallNoAnswer:
		return "unreachable: " + DescribeTransportError(e.cause, e.Elapsed)
	case CallUnreadable:
		return fmt.Sprintf("answered %d and its body could not be read: %s", e.Status, DescribeTransportError(e.cause, e.Elapsed))
	case CallTooLarge:
		return fmt.Sprintf("answered %d with a body larger than %d bytes", e.Status, e.Limit)
	case CallRedirected:
		return fmt.Sprintf("answered %d, a redirect (not followed: it would carry the credentials elsewhere)", e.Status)
	}
	return "call failed"
}

// Unwrap returns the transport's error, if any.
func (e *CallError) Unwrap() error { return e.cause }

// Timeout reports whether the call ended because a deadline passed. The
// request may have reached the endpoint, which may have acted on it (a
// refresh token rotated).
func (e *CallError) Timeout() bool { return e.timedOut }

// mediaType is what DescribeBody is willing to repeat of a Content-Type.
var mediaType = regexp.MustCompile(`^[a-z0-9][a-z0-9.+-]{0,30}/[a-z0-9][a-z0-9.+-]{0,40}$`)

// DescribeBody names an unusable body by kind, media type and size, without
// quoting it: an HTML error page or a proxy's answer may echo request data.
func DescribeBody(contentType string, body []byte) string {
	mt, _, _ := mime.ParseMediaType(contentType)
	if mt == "" {
		mt = http.DetectContentType(body)
		if i := strings.IndexByte(mt, ';'); i >= 0 {
			mt = mt[:i]
		}
	}
	kind := "a non-JSON body"
	switch {
	case len(bytes.TrimSpace(body)) == 0:
		return "an empty body"
	case strings.Contains(mt, "html"):
		kind = "an HTML page"
	case json.Valid(body):
		kind = "unexpected JSON"
	}
	if !mediaType.MatchString(mt) {
		mt = "unnamed type"
	}
	return fmt.Sprintf("%s (%s, %d bytes)", kind, mt, len(body))
}

// DescribeTransportError says why a call got no answer (or lost it midway)
// without the URL, which may carry a query string, and without control
// characters.
func DescribeTransportError(err error, elapsed time.Duration) string {
	switch {
	case err == nil:
		return "failed"
	case errors.Is(err, context.DeadlineExceeded) || isTimeout(err):
		return fmt.Sprintf("timed out after %s", elapsed.Round(time.Millisecond))
	case errors.Is(err, context.Canceled):
		return "cancelled"
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err // drop the URL: it could carry a query string
	}
	return truncate(sanitize(err.Error()), 200)
}
