package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"
)

// TestSmoke runs the whole benchmark briefly (about 2 s of load, plus
// building Caddy): it exercises the build, the three configurations, the
// preflight, the load generator (with a request body, the path that buffers
// it in restream_auth) and both report formats. It checks that the run
// works, not its figures.
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("builds Caddy and starts it three times")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cfg := config{Duration: 400 * time.Millisecond, Slice: 200 * time.Millisecond, Warmup: 200 * time.Millisecond, Rounds: 1, Conns: 4, Body: 100, Out: "markdown"}
	var out, progress bytes.Buffer
	if err := run(ctx, cfg, &out, &progress); err != nil {
		t.Fatalf("run: %v\nprogress:\n%s\nreport:\n%s", err, progress.String(), out.String())
	}
	report := out.String()
	for _, want := range []string{
		"go run ./bench -duration 400ms -slice 200ms -warmup 200ms -rounds 1 -conns 4 -body 100",
		"| A: restream_auth + reverse_proxy |",
		"| B: reverse_proxy + constant header_up (floor) |",
		"| C: reverse_proxy alone |",
		"| throughput |",
		"| peak RSS |",
		"0 token refreshes happened",
		"Round 1 (order A, B, C)",
	} {
		if !strings.Contains(report, want) {
			t.Errorf("report lacks %q:\n%s", want, report)
		}
	}
	if !strings.Contains(progress.String(), "round 1/1 C:") {
		t.Errorf("progress lacks the last setup:\n%s", progress.String())
	}
	t.Logf("report:\n%s", report)
}

func TestHistogram(t *testing.T) {
	var h histogram
	for i := 1; i <= 1000; i++ {
		h.record(time.Duration(i) * time.Microsecond)
	}
	for _, c := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 500 * time.Microsecond}, {0.99, 990 * time.Microsecond}, {1, 1000 * time.Microsecond}} {
		got := h.quantile(c.q)
		if d := float64(got-c.want) / float64(c.want); d < -0.02 || d > 0.02 {
			t.Errorf("quantile(%v) = %v, want %v ±2%%", c.q, got, c.want)
		}
	}
	for v := uint64(0); v < 1<<20; v = v*5/4 + 1 {
		lo, hi := bucketRange(bucketOf(v))
		if v < lo || v >= hi {
			t.Errorf("value %d in bucket %d = [%d, %d)", v, bucketOf(v), lo, hi)
		}
	}
}

func TestMedian(t *testing.T) {
	if got := median([]float64{3, 1, 2}); got != 2 {
		t.Errorf("median of 3 = %v", got)
	}
	if got := median([]float64{4, 1, 2, 3}); got != 2.5 {
		t.Errorf("median of 4 = %v", got)
	}
}
