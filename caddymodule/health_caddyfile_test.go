package caddymodule

import "testing"

func TestHealthCaddyfile(t *testing.T) {
	checkCaddyfileCases(t, []caddyfileCase[Health]{
		{name: "default account (applied at provisioning)", input: "restream_auth_health", want: Health{}},
		{name: "named account", input: "restream_auth_health ops", want: Health{Account: "ops"}},
	})
	checkCaddyfileErrors[Health](t, []caddyfileErrorCase{
		{"a block", "restream_auth_health ops {\n\tverbose\n}", `restream_auth_health takes no block (unexpected "verbose")`, 2},
		{"two accounts", "restream_auth_health one two", "wrong argument count or unexpected line ending after 'two'", 1},
		{"bad account name", "restream_auth_health ../etc", `account "../etc": use 1-64 letters`, 1},
	})
}
