package tokensource

import "time"

// States of an account, as Status reports them.
const (
	StateOK             = "ok"
	StateRefreshing     = "refreshing"
	StateBackoff        = "backoff"
	StateReauthRequired = "reauth_required"
	StateNoChain        = "no_chain"
	// StateMisconfigured: the endpoint refuses the client credentials.
	StateMisconfigured = "misconfigured"
	// StateDegraded: the served pair is not in storage yet (I2).
	StateDegraded = "degraded"
)

// Observer receives a Source's events, for metrics. Its methods are called
// off the request hot path, must be fast and must not block. Arguments are
// account names, fixed words and times: never a token or secret.
type Observer interface {
	// Refreshed reports one attempt's result: ok, adopted, transient,
	// invalid_grant, invalid_client (or another OAuth code), no_chain or
	// rate_limited.
	Refreshed(account, result string, took time.Duration)
	// LockWaited reports the time spent getting the storage lock and lease.
	LockWaited(account string, d time.Duration)
	// Published reports a newly published token.
	Published(account string, t *Token)
	// PersistFailed reports a new pair that could not be written to storage.
	PersistFailed(account string)
	// StateChanged reports the account's state after an attempt.
	StateChanged(account, state string)
}

type nopObserver struct{}

func (nopObserver) Refreshed(string, string, time.Duration) {}
func (nopObserver) LockWaited(string, time.Duration)        {}
func (nopObserver) Published(string, *Token)                {}
func (nopObserver) PersistFailed(string)                    {}
func (nopObserver) StateChanged(string, string)             {}
