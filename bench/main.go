// Command bench is the load benchmark of restream_auth: it builds Caddy from
// this module, starts the fake Restream server on 127.0.0.1 and drives the
// same keep-alive load through three Caddy configurations in turn:
//
//	A  restream_auth + reverse_proxy                (the plugin)
//	B  reverse_proxy with a constant header_up      (the floor: a fixed token)
//	C  reverse_proxy alone                          (no token at all)
//
// All three request the fake's public GET /v2/platform/all (or POST it with
// -body), so the upstream does the same work for each; A still gets its token
// and sets the header. Every round starts a fresh Caddy per setup and gives
// each -duration of load, the setups taking turns in short slices (A, B, C,
// A, B, C, ..., rotated by round), so drift and other processes' bursts hit
// all three alike. It reports requests/s, p50/p99 latency, errors, Caddy's
// peak RSS and Caddy's CPU time per request; the summary gives the median
// over rounds and the ratios A/B.
//
//	go run ./bench [-duration 10s] [-rounds 3] [-conns 32] [-body 0] [-out markdown|text] [-slice 500ms] [-warmup 1s] [-pprof dir]
//
// Markdown (the default) goes to standard output, ready to paste; progress
// goes to standard error. The exit status is non-zero only when the benchmark
// itself failed (a build, a start, a failed request), not when a goal is
// missed. Linux gives RSS and CPU figures (from /proc); elsewhere they read
// n/a.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

// config is what the flags set.
type config struct {
	Duration time.Duration // measured time per setup and round
	Slice    time.Duration // the setups take turns in slices this long
	Warmup   time.Duration // unmeasured load before each measurement
	Rounds   int
	Conns    int
	Body     int    // request body bytes; 0 = GET
	Out      string // markdown or text
	PProf    string // if set, also save CPU profiles of A and B under load here
}

func (c config) validate() error {
	switch {
	case c.Duration <= 0:
		return fmt.Errorf("-duration %s: must be positive", c.Duration)
	case c.Slice < 0:
		return fmt.Errorf("-slice %s: must not be negative", c.Slice)
	case c.Warmup < 0:
		return fmt.Errorf("-warmup %s: must not be negative", c.Warmup)
	case c.Rounds < 1:
		return fmt.Errorf("-rounds %d: must be at least 1", c.Rounds)
	case c.Conns < 1 || c.Conns > 4096:
		return fmt.Errorf("-conns %d: want 1..4096", c.Conns)
	case c.Body < 0 || c.Body > 1<<20:
		return fmt.Errorf("-body %d: want 0..1048576 (restream_auth buffers bodies up to max_replay_body, 1 MiB by default)", c.Body)
	case c.Out != "markdown" && c.Out != "text":
		return fmt.Errorf("-out %q: want markdown or text", c.Out)
	}
	return nil
}

// command is the command line that reproduces a run, for the report.
func (c config) command() string {
	args := []string{"go run ./bench"}
	def := defaults()
	if c.Duration != def.Duration {
		args = append(args, "-duration "+c.Duration.String())
	}
	if c.Slice != def.Slice {
		args = append(args, "-slice "+c.Slice.String())
	}
	if c.Warmup != def.Warmup {
		args = append(args, "-warmup "+c.Warmup.String())
	}
	if c.Rounds != def.Rounds {
		args = append(args, fmt.Sprintf("-rounds %d", c.Rounds))
	}
	if c.Conns != def.Conns {
		args = append(args, fmt.Sprintf("-conns %d", c.Conns))
	}
	if c.Body != def.Body {
		args = append(args, fmt.Sprintf("-body %d", c.Body))
	}
	if c.Out != def.Out {
		args = append(args, "-out "+c.Out)
	}
	if c.PProf != "" {
		args = append(args, "-pprof "+c.PProf)
	}
	return strings.Join(args, " ")
}

func defaults() config {
	return config{Duration: 10 * time.Second, Slice: 500 * time.Millisecond, Warmup: time.Second, Rounds: 3, Conns: 32, Out: "markdown"}
}

func main() {
	cfg := defaults()
	flag.DurationVar(&cfg.Duration, "duration", cfg.Duration, "measured load per setup and round")
	flag.DurationVar(&cfg.Slice, "slice", cfg.Slice, "within a round the setups take turns (A,B,C,A,B,C,...) in slices this long; 0 = one slice of -duration each")
	flag.DurationVar(&cfg.Warmup, "warmup", cfg.Warmup, "unmeasured load before each measurement")
	flag.IntVar(&cfg.Rounds, "rounds", cfg.Rounds, "rounds; each runs A, B and C once, in a rotated order")
	flag.IntVar(&cfg.Conns, "conns", cfg.Conns, "concurrent keep-alive connections (one goroutine each)")
	flag.IntVar(&cfg.Body, "body", cfg.Body, "request body bytes (POST); 0 sends GET")
	flag.StringVar(&cfg.Out, "out", cfg.Out, "report format: markdown or text")
	flag.StringVar(&cfg.PProf, "pprof", "", "after the rounds, save CPU profiles of Caddy under load for A and B in this `dir` (admin endpoint on; not measured)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: go run ./bench [flags]\n\n"+
			"Load benchmark: Caddy with restream_auth (A) against reverse_proxy with a constant\n"+
			"Authorization header (B) and reverse_proxy alone (C), in front of the fake Restream.\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "bench: unexpected arguments %q\n", flag.Args())
		os.Exit(2)
	}
	if err := cfg.validate(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		stop()
		os.Exit(1)
	}
}

// errRequestsFailed is returned (after the report) when a measured request
// did not get a 200.
var errRequestsFailed = errors.New("requests failed during the measurement: the figures are not valid")

// run builds Caddy, runs the rounds and writes the report to out; progress
// goes to progress. Every process it starts is killed before it returns.
func run(ctx context.Context, cfg config, out, progress io.Writer) error {
	if err := cfg.validate(); err != nil {
		return err
	}
	started := time.Now()
	logf := func(format string, args ...any) {
		fmt.Fprintf(progress, "[%6.1fs] "+format+"\n", append([]any{time.Since(started).Seconds()}, args...)...)
	}

	if busy, ok := sampleBusy(ctx, time.Second); ok && busy > busyOther {
		logf("warning: the machine is busy (%.2f cores in use before the benchmark started); the figures will be noisy", busy)
	}
	env, err := newEnv(ctx, logf)
	if err != nil {
		return err
	}
	defer env.close()

	var rounds [][]result
	for r := range cfg.Rounds {
		round, err := env.measureRound(ctx, cfg, r)
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("interrupted: %w", context.Cause(ctx))
			}
			return fmt.Errorf("round %d: %w", r+1, err)
		}
		for _, res := range round {
			logf("round %d/%d %s: %s", r+1, cfg.Rounds, res.Setup.Key, res.oneLine())
		}
		rounds = append(rounds, round)
	}
	if cfg.PProf != "" {
		for _, s := range setups[:2] {
			path, err := env.profile(ctx, cfg, s, cfg.PProf)
			if err != nil {
				return fmt.Errorf("profiling setup %s: %w", s.Key, err)
			}
			logf("CPU profile of Caddy, setup %s: %s (go tool pprof -top %s)", s.Key, path, path)
		}
	}
	env.close()

	rep := newReport(cfg, env.machine, rounds, time.Since(started))
	if cfg.Out == "text" {
		rep.writeText(out)
	} else {
		rep.writeMarkdown(out)
	}
	logf("done in %s", time.Since(started).Round(time.Second))
	if rep.failed() {
		return errRequestsFailed
	}
	return nil
}
