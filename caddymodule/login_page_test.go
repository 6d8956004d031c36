package caddymodule

import (
	"testing"
	"time"
)

// Durations read as people write them, rounded down.
func TestHumanDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		0:                                     "0 seconds",
		-time.Minute:                          "0 seconds",
		time.Second:                           "1 second",
		45*time.Second + 900*time.Millisecond: "45 seconds",
		loginStateTTL:                         "10 minutes",
		time.Hour - time.Second:               "59 minutes",
		time.Minute:                           "1 minute",
		time.Hour:                             "1 hour",
		23*time.Hour + 5*time.Minute + 30*time.Second: "23 hours 5 minutes",
		24 * time.Hour:                 "1 day",
		27*time.Hour + 59*time.Minute:  "1 day 3 hours",
		365*24*time.Hour - time.Second: "364 days",
		365 * 24 * time.Hour:           "365 days",
	} {
		if got := humanDuration(d); got != want {
			t.Errorf("humanDuration(%v) = %q, want %q", d, got, want)
		}
	}
	now := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	if got := whenText(now.Add(time.Hour-time.Second), now); got != "2026-12-01 00:59 UTC, in 59 minutes" {
		t.Errorf("whenText future: %q", got)
	}
	if got := whenText(now.Add(-90*time.Minute), now.In(time.FixedZone("x", 3600))); got != "2026-11-30 22:30 UTC, 1 hour 30 minutes ago" {
		t.Errorf("whenText past: %q", got)
	}
}
