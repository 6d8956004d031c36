package caddymodule

import (
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"
)

// deviceCallCounters holds one in-flight counter per client_id, shared by
// every restream_token_proxy handler of the process and across config
// reloads. Restream limits calls per client_id, so the limit that spares
// the sidecar's own refreshes is about the client_id, not about one
// handler: two handlers (two sites, or the old and the new config during a
// reload) must not get max_concurrent calls each. Package-level because a
// reload provisions the new handlers while the old ones still serve.
var deviceCallCounters = caddy.NewUsagePool()

// inFlightCalls counts a client_id's device calls at Restream.
type inFlightCalls struct{ n atomic.Int64 }

// Destruct is a no-op: the counter holds nothing to release.
func (*inFlightCalls) Destruct() error { return nil }

// acquire takes a slot if fewer than limit calls are in flight. Each handler
// applies its own max_concurrent to the shared count.
func (c *inFlightCalls) acquire(limit int) bool {
	for {
		cur := c.n.Load()
		if cur >= int64(limit) {
			return false
		}
		if c.n.CompareAndSwap(cur, cur+1) {
			return true
		}
	}
}

func (c *inFlightCalls) release() { c.n.Add(-1) }

// loadInFlightCalls returns the client_id's shared counter; each call must be
// matched by a deviceCallCounters.Delete(clientID) at Cleanup.
func loadInFlightCalls(clientID string) *inFlightCalls {
	v, _, _ := deviceCallCounters.LoadOrNew(clientID, func() (caddy.Destructor, error) { return new(inFlightCalls), nil })
	return v.(*inFlightCalls)
}
