package caddymodule

import (
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// A scanner hammering a guarded route gets one WARN a minute, carrying how
// many refusals it stands for; the rest go to DEBUG.
func TestStrangerLogRateLimitsWarnings(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	logger := zap.New(core)
	now := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	s := &strangerLog{now: func() time.Time { return now }}

	for range 100 {
		s.refused(logger, "refused", zap.String("remote_ip", "192.0.2.1"))
		now = now.Add(time.Second) // 100 refusals over 100 s
	}
	var warns []observer.LoggedEntry
	debug := 0
	for _, e := range logs.All() {
		switch e.Level {
		case zapcore.WarnLevel:
			warns = append(warns, e)
		case zapcore.DebugLevel:
			debug++
		}
	}
	if len(warns) != 2 || debug != 98 {
		t.Fatalf("%d warnings and %d debug lines for 100 refusals in 100 s, want 2 and 98", len(warns), debug)
	}
	if _, ok := warns[0].ContextMap()["refused_since_last_warning"]; ok {
		t.Fatal("the first warning claims earlier refusals")
	}
	if got := warns[1].ContextMap()["refused_since_last_warning"]; got != int64(59) {
		t.Fatalf("the second warning counts %v refusals since the first, want 59", got)
	}
	if warns[1].ContextMap()["remote_ip"] != "192.0.2.1" {
		t.Fatalf("the warning lost its fields: %v", warns[1].ContextMap())
	}
}
