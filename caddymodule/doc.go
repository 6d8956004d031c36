// Package caddymodule is the Caddy side of caddy-restream-auth: the HTTP
// handlers and the app that keep a Restream token chain valid through
// tokensource, their Caddyfile directives, the admin API, the metrics and
// the `caddy restream-auth` command. Importing it registers them all.
//
// Each module X has its code in X.go (struct and JSON fields, Provision,
// ServeHTTP), its Caddyfile parser in X_caddyfile.go (the directive's
// option table and UnmarshalCaddyfile) and its tests in X_test.go:
//
//	handler.go     restream_auth (http.handlers.restream_auth): puts the
//	               account's access token on requests, replays once on 401;
//	               replay.go, replay_body.go and replay_budget.go hold the
//	               replay's writer, body copy and process-wide byte budget
//	login.go       restream_auth_login: the onboarding flow; its callback and
//	               checks in login_callback.go, the state cookie and ledger
//	               in login_state.go, the pages in login_page.go, the check
//	               that it is bound like restream_auth in login_app.go
//	tokenproxy.go  restream_token_proxy: device refresh and revocation calls
//	               with the client credentials added; what a device may send
//	               in tokenproxy_request.go, the metrics in tokenproxy_metrics.go
//	health.go      restream_auth_health: liveness and readiness probes
//	app.go         the restream_auth app and global option: starts the
//	               sources of a config, keeps accounts in Redis if told;
//	               redis_backend.go picks Redis or Caddy storage per account
//	admin.go       the admin API (/restream_auth/)
//	metrics.go     the Prometheus metrics of the token sources
//	command*.go    the `caddy restream-auth` command
//
// Shared by the modules: options.go (the option table that parses every
// directive's block, the client options and their resolution at
// provisioning: placeholders, defaults, URL and account checks), pool.go
// (the token sources shared by the handlers of an account across config
// reloads, and their key) and storage.go (a guard for file_system locks).
// Calls to Restream's endpoints go through tokensource.Endpoint.
package caddymodule
