package caddymodule

import (
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"slices"
)

// What a device may send to restream_token_proxy: a form POST of the
// refresh or authorization_code grant, or of a revocation. Everything else is
// refused without calling upstream, and only the grant's own fields are
// forwarded.

// tokenProxyRefusal is an answer given without calling upstream.
type tokenProxyRefusal struct {
	status      int
	code, desc  string
	allowHeader bool
}

func badRequest(desc string) *tokenProxyRefusal {
	return &tokenProxyRefusal{status: http.StatusBadRequest, code: "invalid_request", desc: desc}
}

// deviceCall is a device's request, checked, as the proxy forwards it.
type deviceCall struct {
	name   string     // the grant type, or "revoke"
	target string     // the token or the revocation endpoint
	form   url.Values // only the fields of the grant, never client credentials the device sent
}

// parseRequest checks the device's request and returns the call to forward,
// or the refusal to answer with.
func (p *TokenProxy) parseRequest(w http.ResponseWriter, r *http.Request, revoke bool) (deviceCall, *tokenProxyRefusal) {
	if r.Method != http.MethodPost {
		return deviceCall{}, &tokenProxyRefusal{status: http.StatusMethodNotAllowed, code: "invalid_request",
			desc: "method must be POST", allowHeader: true}
	}
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/x-www-form-urlencoded" {
		return deviceCall{}, badRequest("content type must be application/x-www-form-urlencoded")
	}
	in, refusal := readTokenProxyForm(w, r)
	if refusal != nil {
		return deviceCall{}, refusal
	}
	if revoke {
		return p.parseRevocation(deviceForm(in))
	}
	return p.parseGrant(deviceForm(in))
}

// deviceForm is the form a device sent.
type deviceForm url.Values

// single returns the one value of a parameter; a missing, empty or repeated
// one is refused.
func (in deviceForm) single(name string) (string, *tokenProxyRefusal) {
	switch v := in[name]; {
	case len(v) > 1:
		return "", badRequest("parameter " + name + " is repeated")
	case len(v) == 0 || v[0] == "":
		return "", badRequest("missing parameter: " + name)
	default:
		return v[0], nil
	}
}

// has reports whether the device sent a parameter, even empty.
func (in deviceForm) has(name string) bool {
	_, given := in[name]
	return given
}

// parseRevocation checks a revocation (RFC 7009): a token and an optional
// token_type_hint.
func (p *TokenProxy) parseRevocation(in deviceForm) (deviceCall, *tokenProxyRefusal) {
	out := url.Values{}
	tok, refusal := in.single("token")
	if refusal != nil {
		return deviceCall{}, refusal
	}
	out.Set("token", tok)
	if in.has("token_type_hint") {
		hint, refusal := in.single("token_type_hint")
		if refusal != nil {
			return deviceCall{}, refusal
		}
		if hint != "access_token" && hint != "refresh_token" {
			return deviceCall{}, badRequest("token_type_hint must be access_token or refresh_token")
		}
		out.Set("token_type_hint", hint)
	}
	return deviceCall{name: "revoke", target: p.RevokeURL, form: out}, nil
}

// parseGrant checks a token request: the refresh grant, or the
// authorization_code grant for a redirect_uri of RedirectURIs.
func (p *TokenProxy) parseGrant(in deviceForm) (deviceCall, *tokenProxyRefusal) {
	grant, refusal := in.single("grant_type")
	if refusal != nil {
		return deviceCall{}, refusal
	}
	var fields []string
	switch grant {
	case "refresh_token":
		fields = []string{"refresh_token"}
	case "authorization_code":
		if len(p.RedirectURIs) == 0 {
			return deviceCall{}, badRequest("the authorization_code grant is disabled: configure redirect_uris in restream_token_proxy to allow it")
		}
		fields = []string{"code", "redirect_uri"}
	default:
		return deviceCall{}, &tokenProxyRefusal{status: http.StatusBadRequest, code: "unsupported_grant_type",
			desc: "grant_type must be refresh_token or authorization_code"}
	}
	out := url.Values{"grant_type": {grant}}
	for _, name := range fields {
		v, refusal := in.single(name)
		if refusal != nil {
			return deviceCall{}, refusal
		}
		out.Set(name, v)
	}
	if grant == "authorization_code" {
		// Exactly as listed: no prefix, case or normalization games.
		if !slices.Contains(p.RedirectURIs, out.Get("redirect_uri")) {
			return deviceCall{}, badRequest("redirect_uri is not one of the redirect_uris configured for this proxy")
		}
		// PKCE (RFC 7636): the verifier goes upstream unchanged.
		if in.has("code_verifier") {
			v, refusal := in.single("code_verifier")
			if refusal != nil {
				return deviceCall{}, refusal
			}
			if !validCodeVerifier(v) {
				return deviceCall{}, badRequest("code_verifier must be 43 to 128 characters of A-Z a-z 0-9 - . _ ~ (RFC 7636)")
			}
			out.Set("code_verifier", v)
		}
	}
	return deviceCall{name: grant, target: p.TokenURL, form: out}, nil
}

// validCodeVerifier checks RFC 7636's code_verifier syntax.
func validCodeVerifier(v string) bool {
	if len(v) < 43 || len(v) > 128 {
		return false
	}
	for _, c := range []byte(v) {
		switch {
		case 'A' <= c && c <= 'Z', 'a' <= c && c <= 'z', '0' <= c && c <= '9', c == '-', c == '.', c == '_', c == '~':
		default:
			return false
		}
	}
	return true
}

// readTokenProxyForm reads a form body of at most TokenProxyMaxRequestBody
// bytes. The query string is not part of it.
func readTokenProxyForm(w http.ResponseWriter, r *http.Request) (url.Values, *tokenProxyRefusal) {
	tooLarge := &tokenProxyRefusal{status: http.StatusRequestEntityTooLarge, code: "invalid_request",
		desc: fmt.Sprintf("request body is larger than %d KiB", TokenProxyMaxRequestBody>>10)}
	if r.ContentLength > TokenProxyMaxRequestBody {
		return nil, tooLarge
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, TokenProxyMaxRequestBody))
	if err != nil {
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			return nil, tooLarge
		}
		return nil, badRequest("request body could not be read")
	}
	form, err := url.ParseQuery(string(body))
	if err != nil {
		return nil, badRequest("malformed form body")
	}
	return form, nil
}
