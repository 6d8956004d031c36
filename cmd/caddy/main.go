// Command caddy is Caddy with its standard modules and the restream_auth
// plugin built in, the same binary `xcaddy build --with
// github.com/restream-sidecar/caddy-restream-auth` produces, plus the
// restream-demo subcommand (a local demo against a fake Restream server).
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/restream-sidecar/caddy-restream-auth"
	"github.com/restream-sidecar/caddy-restream-auth/internal/demo"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:      demo.CommandName,
		Usage:     demo.CommandUsage,
		Short:     demo.CommandShort,
		Long:      demo.CommandLong,
		CobraFunc: demo.CobraFunc,
	})
}

func main() {
	caddycmd.Main()
}
