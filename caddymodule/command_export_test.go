package caddymodule

// Internals of the restream-auth commands, for the external tests.
var (
	CLIClean      = cliClean
	CLICleanError = cliCleanError
)
