package tokensource

import "time"

// The words below are an interface, declared once here: the admin API, the
// health handler, the `caddy restream-auth status` command, the metrics'
// state and result labels, the alert rules and the docs all use them.
// Renaming one breaks operators' alerts.

// State is the state of a running Source's account, as Status and
// Observer.StateChanged report it.
type State string

// States of a running Source's account.
const (
	// StateOK: a valid access token is served.
	StateOK State = "ok"
	// StateRefreshing: a refresh is under way.
	StateRefreshing State = "refreshing"
	// StateBackoff: the last refresh failed and will be retried.
	StateBackoff State = "backoff"
	// StateDegraded: the served pair is not in storage yet (I2).
	StateDegraded State = "degraded"
	// StateMisconfigured: the endpoint refuses the client credentials.
	StateMisconfigured State = "misconfigured"
	// StateReauthRequired: the chain is dead (invalid_grant, or a token
	// that may be spent): it needs a new seed.
	StateReauthRequired State = "reauth_required"
	// StateNoChain: no chain is stored and no seed is configured.
	StateNoChain State = "no_chain"
)

// States lists every State, in the order the state metric creates its
// series.
func States() []State {
	return []State{StateOK, StateRefreshing, StateBackoff, StateDegraded, StateMisconfigured, StateReauthRequired, StateNoChain}
}

// RefreshResult is the outcome of one refresh round, as Status.LastResult
// and Observer.Refreshed report it: one of the Result constants, or the
// OAuth error code of a refusal the constants do not name.
type RefreshResult string

// Results of a round that reached the token endpoint or storage.
const (
	// ResultOK: the endpoint issued a new pair, and it is served.
	ResultOK RefreshResult = "ok"
	// ResultAdopted: a newer pair another instance stored is served; no
	// token was sent.
	ResultAdopted RefreshResult = "adopted"
	// ResultInstalled: a new chain was installed (a seed or a login).
	ResultInstalled RefreshResult = "installed"
	// ResultTransient: the attempt failed and is retried with backoff.
	ResultTransient RefreshResult = "transient"
	// ResultInvalidGrant: the endpoint rejected the refresh token.
	ResultInvalidGrant RefreshResult = "invalid_grant"
	// ResultInvalidClient: the endpoint refused the client credentials.
	ResultInvalidClient RefreshResult = "invalid_client"
	// ResultUnauthorizedClient: the endpoint refused the client; the same
	// refusal as ResultInvalidClient, in the endpoint's other word.
	ResultUnauthorizedClient RefreshResult = "unauthorized_client"
)

// Results of a round that sent nothing.
const (
	// ResultNoChain: there is no chain to refresh.
	ResultNoChain = RefreshResult(StateNoChain)
	// ResultRateLimited: a refresh forced by an upstream 401 was refused,
	// as the stored pair is younger than ForcedRefreshInterval.
	ResultRateLimited RefreshResult = "rate_limited"
	// ResultInDoubt: the stored refresh token is marked in the lease by a
	// sender that stopped before storing the answer; it may be spent, so
	// it is never sent again.
	ResultInDoubt RefreshResult = "in_doubt"
)

// RefreshResults lists the results of refresh attempts, the values of the
// refreshes_total metric's result label: a new pair (ok), an adopted one,
// or the endpoint's failure or refusal. ResultUnauthorizedClient counts as
// ResultInvalidClient; rounds that sent nothing, and installs, are not
// attempts.
func RefreshResults() []RefreshResult {
	return []RefreshResult{ResultOK, ResultInvalidGrant, ResultInvalidClient, ResultTransient, ResultAdopted}
}

// RecordState is the state of an account's stored record, judged from
// storage alone, as `caddy restream-auth status` reports it. Where it means
// what a running Source's State means, it is the same word, by
// construction.
type RecordState string

// States of a stored record.
const (
	// RecordOK: a stored pair whose access token is still valid.
	RecordOK = RecordState(StateOK)
	// RecordAccessExpired: a stored pair whose access token expired; its
	// refresh token may still work.
	RecordAccessExpired RecordState = "access_expired"
	// RecordRefreshExpired: the stored refresh token expired.
	RecordRefreshExpired RecordState = "refresh_expired"
	// RecordReauthRequired: the endpoint rejected the stored refresh token.
	RecordReauthRequired = RecordState(StateReauthRequired)
	// RecordInDoubt: the stored refresh token is marked in a released
	// lease: its sender stopped before storing the answer (ResultInDoubt).
	RecordInDoubt = RecordState(ResultInDoubt)
	// RecordNoChain: no pair is stored (perhaps only history).
	RecordNoChain = RecordState(StateNoChain)
	// RecordUnreadable: the record exists but cannot be read or decrypted.
	RecordUnreadable RecordState = "unreadable"
)

// RecordStates lists every RecordState.
func RecordStates() []RecordState {
	return []RecordState{RecordOK, RecordAccessExpired, RecordRefreshExpired, RecordReauthRequired,
		RecordInDoubt, RecordNoChain, RecordUnreadable}
}

// HasChain reports whether the state is of a chain instances can refresh
// (ok or access_expired).
func (s RecordState) HasChain() bool {
	return s == RecordOK || s == RecordAccessExpired
}

// StateAt judges the record at now from its content alone: no_chain
// without a pair (r may be nil), reauth_required if its refresh token was
// rejected, refresh_expired, access_expired or ok. Whether the lease marks
// its refresh token (in_doubt) and whether it could be read (unreadable)
// are for the caller, which read them, to judge.
func (r *Record) StateAt(now time.Time) RecordState {
	switch {
	case !r.HasPair():
		return RecordNoChain
	case r.dead():
		return RecordReauthRequired
	case !r.RefreshExpiry.IsZero() && !now.Before(r.RefreshExpiry):
		return RecordRefreshExpired
	case !now.Before(r.Expiry):
		return RecordAccessExpired
	}
	return RecordOK
}
