// Command caddy is Caddy with its standard modules and the restream_auth
// plugin built in, the same binary `xcaddy build --with
// github.com/restream-sidecar/caddy-restream-auth` produces.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/restream-sidecar/caddy-restream-auth/caddymodule"
)

func main() {
	caddycmd.Main()
}
