// Package caddyrestreamauth is the plugin's import path for xcaddy:
//
//	xcaddy build --with github.com/restream-sidecar/caddy-restream-auth
//
// Importing it registers the restream_auth modules and Caddyfile directives,
// which live in the caddymodule package.
package caddyrestreamauth

import (
	// The Caddy modules.
	_ "github.com/restream-sidecar/caddy-restream-auth/caddymodule"
)
