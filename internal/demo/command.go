package demo

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
)

// Command metadata for caddycmd.RegisterCommand.
const (
	CommandName  = "restream-demo"
	CommandUsage = "[--duration 30s] [--token-ttl 10s] [--listen 127.0.0.1:8080]"
	CommandShort = "Runs restream_auth against a local fake Restream server (no account needed)"
	CommandLong  = `
Starts a strict fake of the Restream OAuth and REST API on 127.0.0.1 with
short-lived tokens, and the restream_auth sidecar in front of it (Caddy in
this process, storage in a temporary directory). It then sends requests
without credentials for --duration, printing every token rotation, and a
summary at the end. Every refresh at the fake rotates both the access and the
refresh token, and a reused refresh token is answered with invalid_grant, so
the demo fails loudly if the sidecar ever loses the chain.

Tokens are printed shortened. The exit status is 0 when no request failed
and the fake saw no invalid_grant, 1 otherwise. Ctrl-C stops it early.
`
)

// CobraFunc sets up the restream-demo command's flags and action.
func CobraFunc(cmd *cobra.Command) {
	cmd.Flags().Duration("duration", DefaultDuration, "how long to send requests")
	cmd.Flags().Duration("token-ttl", DefaultTokenTTL, "access token lifetime at the fake Restream server")
	cmd.Flags().String("listen", DefaultListen, "address of the sidecar")
	cmd.RunE = caddycmd.WrapCommandFuncForCobra(runCommand)
}

// Command is the caddycmd registration of restream-demo.
func Command() caddycmd.Command {
	return caddycmd.Command{
		Name:      CommandName,
		Usage:     CommandUsage,
		Short:     CommandShort,
		Long:      CommandLong,
		CobraFunc: CobraFunc,
	}
}

func runCommand(fl caddycmd.Flags) (int, error) {
	var opts Options
	var err error
	if opts.Duration, err = fl.GetDuration("duration"); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	if opts.TokenTTL, err = fl.GetDuration("token-ttl"); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	if opts.Listen, err = fl.GetString("listen"); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	if opts.Duration <= 0 {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("--duration %s: must be positive", opts.Duration)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		// After the first Ctrl-C, a second one kills the process as usual.
		<-ctx.Done()
		stop()
	}()

	res, err := Run(ctx, opts)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	if !res.Success() {
		return 1, fmt.Errorf("restream-demo failed: %d of %d requests failed, %d invalid_grant at the token endpoint",
			res.Failed, res.Requests, res.Fake.InvalidGrant)
	}
	return 0, nil
}
