package tokensource

import "time"

// Observer receives a Source's events, for metrics. Its methods are called
// off the request hot path, must be fast and must not block. Arguments are
// account names, fixed words and times: never a token or secret.
type Observer interface {
	// Refreshed reports the result of one attempt: ok, adopted, transient,
	// invalid_grant, invalid_client or unauthorized_client. Rounds that
	// send nothing (no_chain, rate_limited, in_doubt) are not reported.
	Refreshed(account string, result RefreshResult, took time.Duration)
	// LockWaited reports the time spent getting the storage lock and lease.
	LockWaited(account string, d time.Duration)
	// Published reports a newly published token.
	Published(account string, t *Token)
	// PersistFailed reports a new pair that could not be written to storage.
	PersistFailed(account string)
	// StateChanged reports the account's state after an attempt.
	StateChanged(account string, state State)
}

type nopObserver struct{}

func (nopObserver) Refreshed(string, RefreshResult, time.Duration) {}
func (nopObserver) LockWaited(string, time.Duration)               {}
func (nopObserver) Published(string, *Token)                       {}
func (nopObserver) PersistFailed(string)                           {}
func (nopObserver) StateChanged(string, State)                     {}
