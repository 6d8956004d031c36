// Command caddy-faults is cmd/caddy (Caddy with its standard modules, the
// restream_auth plugin and the restream-demo subcommand) plus the test-only
// storage module caddy.storage.restream_test_faults. It is for integration
// tests, which build it with
//
//	go build -o <dir>/caddy-faults ./internal/faultstorage/cmd/caddy-faults
//
// and must never be shipped.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/restream-sidecar/caddy-restream-auth"
	"github.com/restream-sidecar/caddy-restream-auth/internal/demo"
	_ "github.com/restream-sidecar/caddy-restream-auth/internal/faultstorage"
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
