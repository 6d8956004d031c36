package caddymodule

import dto "github.com/prometheus/client_model/go"

// ReplayBytesHeld reports the request body bytes held for replays by the
// process now (what max_replay_total caps).
func ReplayBytesHeld() int64 { return replayBytes.held.Load() }

// ReplaySkipped reports caddy_restream_auth_replay_skipped_total for an
// account (0 before any handler registered the metric).
func ReplaySkipped(account string) float64 {
	if replayMetrics.skipped == nil {
		return 0
	}
	var m dto.Metric
	if err := replayMetrics.skipped.WithLabelValues(account).Write(&m); err != nil {
		panic(err)
	}
	return m.GetCounter().GetValue()
}

// ReplayChunk is the step in which bodies are read and reserved.
const ReplayChunk = replayChunk
