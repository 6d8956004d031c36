package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"golang.org/x/term"

	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// cliSeedCobra is `caddy restream-auth seed`.
func cliSeedCobra() *cobra.Command {
	c := &cobra.Command{
		Use:   "seed --config <file> [--adapter <name>] [--account <name>]",
		Short: "Starts a new token chain from a refresh token read on stdin",
		Long: `
Reads one refresh token from stdin (without echo on a terminal), exchanges it
at the account's token endpoint with the client credentials of its
restream_auth handler, and stores the new pair as a new chain, the next
generation, under the account's refresh lease. The exchange spends the
refresh token. Instances sharing the storage (or Redis) pick the new chain
up by themselves; no restart or reload is needed. The handler's own refresh_token
seed, if any, is marked as used so that a restart does not replace the new
chain with it.

{env.*} and {file.*} placeholders in the handler are resolved in this
command's environment: run it with the environment Caddy runs with, and as
the user Caddy runs as (file_system storage writes files only their owner
can read; the default storage lives in the caller's data directory).
`,
		Args: cobra.NoArgs,
		RunE: caddycmd.WrapCommandFuncForCobra(cliCommand(cliSeedCommand)),
	}
	cliConfigFlags(c)
	c.Flags().String("account", DefaultAccount, "Account to seed")
	return c
}

// cliMaxSeedInput bounds what the seed command reads from stdin.
const cliMaxSeedInput = 64 << 10

func cliSeedCommand(fl caddycmd.Flags) (int, error) {
	account := cliAccountFlag(fl)
	if fl.String("config") == "-" {
		return 1, errors.New("--config -: stdin carries the refresh token; give the config as a file")
	}
	cfg, err := loadCLIConfig(fl.String("config"), fl.String("adapter"))
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	defer cfg.cancel()
	h, err := cfg.handlerFor(account)
	if err != nil {
		return 1, err
	}
	logger := caddy.Log().Named("restream_auth.seed")
	srcCfg, err := cliSourceConfig(h, logger)
	if err != nil {
		return 1, fmt.Errorf("account %q: %w", account, err)
	}
	backend := cfg.backend(account, srcCfg.Keyring, logger)
	src, err := newPooledSource(srcCfg, backend)
	if err != nil {
		return 1, fmt.Errorf("account %q: %w", account, err)
	}
	defer src.Destruct()
	// A record that exists but cannot be read is never replaced (it may hold
	// the only live refresh token): say so before the token is read, let
	// alone spent. Any other failure to read it fails the install too, so
	// it is reported now, while the token is still good. On Redis, this
	// read imports the account from Caddy storage if Redis has none yet.
	lctx, lcancel := context.WithTimeout(context.Background(), tokensource.StorageTimeout)
	_, lerr := src.loadRecord(lctx)
	lcancel()
	switch {
	case errors.Is(lerr, tokensource.ErrCorruptRecord) || errors.Is(lerr, tokensource.ErrUnreadableRecord):
		return 1, fmt.Errorf("account %q: %v; it is never overwritten, as it may hold the only live refresh token: "+
			"fix it (e.g. configure the encryption key it was written with) or delete it, then seed again; the refresh token was not read", account, lerr)
	case lerr != nil:
		return 1, fmt.Errorf("account %q: reading the stored record in %s: %v; nothing was changed and the refresh token was not read",
			account, backend.identity, lerr)
	}
	rt, err := cliReadRefreshToken(os.Stdin, os.Stderr)
	if err != nil {
		return 1, err
	}
	tok, err := src.InstallSeed(context.Background(), rt)
	if err != nil {
		return 1, cliSeedError(account, err)
	}
	now := time.Now()
	fmt.Fprintf(os.Stdout, "account %q: installed a new token chain in %s\n", account, cliClean(backend.identity.String()))
	fmt.Fprintf(os.Stdout, "  generation      %d\n", tok.Generation)
	fmt.Fprintf(os.Stdout, "  chain           %s\n", cliClean(tok.Chain))
	fmt.Fprintf(os.Stdout, "  access expires  %s\n", cliTime(tok.Expiry, now))
	if !tok.RefreshExpiry.IsZero() {
		fmt.Fprintf(os.Stdout, "  refresh expires %s\n", cliTime(tok.RefreshExpiry, now))
	}
	fmt.Fprintln(os.Stdout, "Running instances that share it adopt it by themselves.")
	return 0, nil
}

// cliSourceConfig builds a token source configuration from a handler's
// settings as Provision does: placeholders resolved, defaults applied, the
// token URL checked. Its backend (cliConfig.backend) sets where it stores.
func cliSourceConfig(h *Handler, logger *zap.Logger) (tokensource.Config, error) {
	// The handler's own seed (cfg.Seed) is marked as used by the new chain,
	// so that a restart does not start yet another chain from it.
	cfg, err := h.tokenConfig()
	if err != nil {
		return tokensource.Config{}, cliPlaceholderError(err)
	}
	host, _ := os.Hostname()
	cfg.HTTPClient = &http.Client{Transport: tokenTransport()}
	cfg.Logger = logger
	cfg.Owner = fmt.Sprintf("caddy restream-auth seed (%s, pid %d)", host, os.Getpid())
	return cfg, nil
}

// cliSeedError explains a failed InstallSeed. A token source's errors name
// the account already; others get it here, once.
func cliSeedError(account string, err error) error {
	var te *tokensource.Error
	if !errors.As(err, &te) {
		return fmt.Errorf("account %q: %w", account, err)
	}
	prefix := fmt.Sprintf("account %q: ", account)
	msg := strings.TrimPrefix(te.Msg, prefix)
	switch {
	case te.Code == "invalid_grant":
		return fmt.Errorf("%sthe token endpoint refused the refresh token (%s): it is spent, expired or revoked, or was issued to another client; nothing was stored. Re-authorize to get a new one", prefix, msg)
	case te.Kind == tokensource.Terminal, te.Kind == tokensource.Misconfigured:
		return fmt.Errorf("%sthe token endpoint refused the request (%s); check client_id, client_secret and client_auth; nothing was stored", prefix, msg)
	case te.Unknown:
		return fmt.Errorf("%s%s; the exchange may have reached the endpoint, in which case the refresh token is spent; nothing was stored", prefix, msg)
	}
	return fmt.Errorf("%s%s; nothing was stored", prefix, msg)
}

// cliReadRefreshToken reads one refresh token: a line typed without echo on a
// terminal, or the whole input otherwise.
func cliReadRefreshToken(stdin *os.File, stderr io.Writer) (string, error) {
	var in []byte
	if fd := int(stdin.Fd()); term.IsTerminal(fd) {
		fmt.Fprint(stderr, "reading refresh token from stdin…\n")
		b, err := term.ReadPassword(fd)
		fmt.Fprintln(stderr)
		if err != nil {
			return "", fmt.Errorf("reading the refresh token from the terminal: %v", err)
		}
		in = b
	} else {
		b, err := io.ReadAll(io.LimitReader(stdin, cliMaxSeedInput+1))
		if err != nil {
			return "", fmt.Errorf("reading the refresh token from stdin: %v", err)
		}
		if len(b) > cliMaxSeedInput {
			return "", fmt.Errorf("stdin holds more than %d bytes: expected one refresh token", cliMaxSeedInput)
		}
		in = b
	}
	return parseRefreshToken("the refresh token on stdin", string(in))
}
