package tokensource

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
)

// DefaultRevokeURL is Restream's token revocation endpoint.
const DefaultRevokeURL = "https://api.restream.io/oauth/revoke"

// RevokeURLFor returns the revocation endpoint beside tokenURL, as Restream
// has them (…/oauth/token, …/oauth/revoke): tokenURL with its last segment
// "token" replaced by "revoke", or DefaultRevokeURL if it does not end so.
func RevokeURLFor(tokenURL string) string {
	if base, ok := strings.CutSuffix(tokenURL, "/token"); ok {
		return base + "/revoke"
	}
	return DefaultRevokeURL
}

// Revoke asks Restream to revoke a refresh token the sidecar will not use
// (a pair a login refused), which ends its pair at once: a valid pair that
// was only dropped would stay usable by whoever else held it for up to a
// year. It is a plain call, outside the chain's protocol: never use it on
// the account's chain. Bounded by Config.Timeout; errors never contain the
// token.
func (s *Source) Revoke(ctx context.Context, refreshToken string) error {
	ctx, cancel := withTimeout(ctx, s.clock, s.cfg.Timeout)
	defer cancel()
	form := url.Values{"token": {refreshToken}, "token_type_hint": {"refresh_token"}}
	answer, err := s.x.endpoint().PostTo(ctx, RevokeURLFor(s.cfg.TokenURL), form)
	if err != nil {
		return fmt.Errorf("revoking a refused refresh token: %w", err)
	}
	if answer.Status != http.StatusOK {
		return fmt.Errorf("revoking a refused refresh token: the revocation endpoint answered %d (%s)",
			answer.Status, DescribeBody(answer.Header.Get("Content-Type"), answer.Body))
	}
	return nil
}
