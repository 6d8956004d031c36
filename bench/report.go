package main

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"
)

// Goals of the plugin against the floor (B).
const (
	goalThroughput = 0.98 // A/B requests/s at least this
	goalRSS        = 0.10 // A/B peak RSS within ±10 %
)

// result is one setup in one round.
type result struct {
	Setup     setup
	Round     int
	Load      load
	PeakRSS   int64         // bytes, 0 if unknown
	CPUPerReq time.Duration // Caddy's CPU time per 200 answer, 0 if unknown
	CPUUtil   float64       // Caddy's CPU time / wall time (cores)
	Refreshes int64         // token endpoint refresh calls during the measurement
	// SelfUtil and SelfPerReq are this program's CPU (load generator and
	// fake upstream); OtherUtil is every other process's, in cores.
	SelfUtil   float64
	SelfPerReq time.Duration
	OtherUtil  float64
}

func (r result) rps() float64 { return float64(r.Load.OK) / r.Load.Elapsed.Seconds() }

func (r result) oneLine() string {
	return fmt.Sprintf("%.0f req/s, p50 %s, p99 %s, %d errors, peak RSS %s, Caddy CPU %s/req (%.2f cores), "+
		"load generator+fake %s/req (%.2f cores), other processes %.2f cores",
		r.rps(), fmtLatency(r.Load.Hist.quantile(0.50)), fmtLatency(r.Load.Hist.quantile(0.99)),
		r.Load.Errors, fmtBytes(r.PeakRSS), fmtCPU(r.CPUPerReq), r.CPUUtil, fmtCPU(r.SelfPerReq), r.SelfUtil, r.OtherUtil)
}

// row is one line of a table: a result, or the medians of several.
type row struct {
	setup          setup
	rps, p50, p99  float64 // req/s; latencies in ns
	errors         float64
	rss, cpu, util float64 // bytes; ns per request; cores
	other          float64 // other processes' CPU, cores
	vsB            float64 // rps / B's rps, NaN if unknown
}

func rowOf(r result) row {
	return row{
		setup: r.Setup, rps: r.rps(),
		p50: float64(r.Load.Hist.quantile(0.50)), p99: float64(r.Load.Hist.quantile(0.99)),
		errors: float64(r.Load.Errors), rss: float64(r.PeakRSS), cpu: float64(r.CPUPerReq), util: r.CPUUtil,
		other: r.OtherUtil, vsB: math.NaN(),
	}
}

type report struct {
	cfg     config
	machine machine
	rounds  [][]result
	elapsed time.Duration

	summary []row // per setup, in setups order: medians over rounds
	tput    ratio // A/B requests/s
	rss     ratio // A/B peak RSS
	cpu     ratio // A/B Caddy CPU per request
	other   float64
	refresh int64 // refresh calls during A's measurements, all rounds
}

// ratio is A/B per round and their median.
type ratio struct {
	median   float64
	perRound []float64
}

func newReport(cfg config, m machine, rounds [][]result, elapsed time.Duration) *report {
	rep := &report{cfg: cfg, machine: m, rounds: rounds, elapsed: elapsed}
	for _, s := range setups {
		var rs []row
		for _, round := range rounds {
			for _, r := range round {
				if r.Setup == s {
					rs = append(rs, rowOf(r))
				}
			}
		}
		med := func(f func(row) float64) float64 {
			v := make([]float64, len(rs))
			for i, r := range rs {
				v[i] = f(r)
			}
			return median(v)
		}
		rep.summary = append(rep.summary, row{
			setup:  s,
			rps:    med(func(r row) float64 { return r.rps }),
			p50:    med(func(r row) float64 { return r.p50 }),
			p99:    med(func(r row) float64 { return r.p99 }),
			errors: med(func(r row) float64 { return r.errors }),
			rss:    med(func(r row) float64 { return r.rss }),
			cpu:    med(func(r row) float64 { return r.cpu }),
			util:   med(func(r row) float64 { return r.util }),
			other:  med(func(r row) float64 { return r.other }),
		})
	}
	// vs B: per round, then the median of the per-round ratios (each round's
	// setups ran back to back, so the ratio cancels slower drift).
	for i := range rep.summary {
		var v []float64
		for _, round := range rounds {
			a, b := find(round, rep.summary[i].setup.Key), find(round, "B")
			if a != nil && b != nil && b.rps() > 0 {
				v = append(v, a.rps()/b.rps())
			}
		}
		rep.summary[i].vsB = median(v)
	}
	for _, round := range rounds {
		a, b := find(round, "A"), find(round, "B")
		if a != nil {
			rep.refresh += a.Refreshes
		}
		if a == nil || b == nil {
			continue
		}
		if b.rps() > 0 {
			rep.tput.perRound = append(rep.tput.perRound, a.rps()/b.rps())
		}
		if b.PeakRSS > 0 && a.PeakRSS > 0 {
			rep.rss.perRound = append(rep.rss.perRound, float64(a.PeakRSS)/float64(b.PeakRSS))
		}
		if b.CPUPerReq > 0 && a.CPUPerReq > 0 {
			rep.cpu.perRound = append(rep.cpu.perRound, float64(a.CPUPerReq)/float64(b.CPUPerReq))
		}
	}
	rep.tput.median = median(rep.tput.perRound)
	rep.rss.median = median(rep.rss.perRound)
	rep.cpu.median = median(rep.cpu.perRound)
	var others []float64
	for _, round := range rounds {
		for _, r := range round {
			others = append(others, r.OtherUtil)
		}
	}
	rep.other = median(others)
	return rep
}

func find(round []result, key string) *result {
	for i := range round {
		if round[i].Setup.Key == key {
			return &round[i]
		}
	}
	return nil
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// failed reports whether any measured request failed.
func (rep *report) failed() bool {
	for _, round := range rep.rounds {
		for _, r := range round {
			if r.Load.Errors > 0 || r.Load.OK == 0 {
				return true
			}
		}
	}
	return false
}

func (rep *report) tputVerdict() string {
	switch {
	case math.IsNaN(rep.tput.median):
		return "n/a"
	case rep.tput.median >= goalThroughput:
		return "PASS"
	}
	return "MISS"
}

func (rep *report) rssVerdict() string {
	switch {
	case math.IsNaN(rep.rss.median):
		return "n/a"
	case math.Abs(rep.rss.median-1) <= goalRSS:
		return "PASS"
	}
	return "MISS"
}

func (rep *report) request() string {
	if rep.cfg.Body > 0 {
		return fmt.Sprintf("POST %s with a %d-byte body", loadPath, rep.cfg.Body)
	}
	return "GET " + loadPath
}

func (rep *report) slice() time.Duration {
	if rep.cfg.Slice <= 0 || rep.cfg.Slice > rep.cfg.Duration {
		return rep.cfg.Duration
	}
	return rep.cfg.Slice
}

func (rep *report) machineLine() string {
	m := rep.machine
	return fmt.Sprintf("%d CPUs (%s), %s, %s, Caddy %s", m.CPUs, m.Model, m.Kernel, m.Go, m.Caddy)
}

func (rep *report) orderOf(round []result) string {
	keys := make([]string, len(round))
	for i, r := range round {
		keys[i] = r.Setup.Key
	}
	return strings.Join(keys, ", ")
}

var header = []string{"setup", "req/s", "vs B", "p50", "p99", "errors", "Caddy peak RSS", "Caddy CPU/req", "Caddy CPU", "others' CPU"}

func (r row) cells(roundRow bool) []string {
	errs := fmt.Sprintf("%.0f", r.errors)
	if !roundRow && r.errors != math.Trunc(r.errors) {
		errs = fmt.Sprintf("%.1f", r.errors)
	}
	return []string{
		r.setup.Key + ": " + r.setup.Name,
		fmt.Sprintf("%.0f", r.rps),
		fmtRatio(r.vsB),
		fmtLatency(time.Duration(r.p50)),
		fmtLatency(time.Duration(r.p99)),
		errs,
		fmtBytes(int64(r.rss)),
		fmtCPU(time.Duration(r.cpu)),
		fmtCores(r.util),
		fmt.Sprintf("%.2f cores", r.other),
	}
}

// roundRows returns a round's rows in setups order, with vs B filled in.
func roundRows(round []result) []row {
	var rows []row
	b := find(round, "B")
	for _, s := range setups {
		if r := find(round, s.Key); r != nil {
			x := rowOf(*r)
			if b != nil && b.rps() > 0 {
				x.vsB = r.rps() / b.rps()
			}
			rows = append(rows, x)
		}
	}
	return rows
}

// busyOther is how much CPU other processes may use (median, in cores)
// before the report calls the machine busy.
const busyOther = 0.10

func (rep *report) notes() []string {
	cfg := rep.cfg
	n := []string{
		fmt.Sprintf("Load: %s through Caddy on %d kept-alive HTTP/1.1 connections, one worker each sending one request at a time "+
			"(a minimal client on net/http's response parser, cheaper than http.Transport). "+
			"%d rounds; each starts a fresh Caddy per setup, checks and warms it up (%s), then measures %s per setup, "+
			"the setups taking turns in %s slices (A, B, C, A, B, C, …, the order rotating by round), so that drift and "+
			"other processes' bursts hit all three alike.", rep.request(), cfg.Conns, cfg.Rounds, cfg.Warmup, cfg.Duration, rep.slice()),
		"Upstream: the strict fake Restream, in the benchmark's process on 127.0.0.1. `" + loadPath + "` is a public route, " +
			"so the upstream does the same work for A, B and C; A still gets its token and sets the header on every request " +
			"(a preflight per process checks that A and B deliver a valid token and C none). Access tokens live 1 h: " +
			fmt.Sprintf("%d token refreshes happened during A's measurements (each A process exchanged its seed once, before them).", rep.refresh),
		"Caddy: `admin off`, `auto_https off`, `protocols h1`, logs at ERROR, storage in a temp dir, a fresh process per setup and round. " +
			"B sets the header with `header_up Authorization \"Bearer …\"` (a constant: the floor). " +
			"Peak RSS is the Caddy process's VmHWM (warm-up included); Caddy CPU is its utime+stime during the measurement, " +
			"per 200 answer and in cores; others' CPU is what the rest of the machine (neither Caddy nor the benchmark's process) used meanwhile.",
		fmt.Sprintf("The %d CPUs are shared by Caddy, the load generator and the fake, so Caddy gets what the other two leave: "+
			"absolute figures are lower than on a dedicated machine, and the throughput ratio understates Caddy's own difference "+
			"(the generator's cost is the same for every setup); Caddy CPU per request is the direct measure. "+
			"Latencies come from a log-linear histogram (±1.6 %%). \"vs B\" and the goal ratios are medians of per-round ratios.", rep.machine.CPUs),
	}
	if rep.other > busyOther {
		n = append(n, fmt.Sprintf("**The machine was not idle**: other processes used %.2f cores (median) during the measurements. "+
			"The interleaved slices spread that over A, B and C alike, but absolute figures drop and the ratios get noisier "+
			"(a few %% per round with half a core taken); for publishable figures, run on a quiet machine.", rep.other))
	}
	return n
}

func (rep *report) writeMarkdown(w io.Writer) {
	p := func(format string, args ...any) { fmt.Fprintf(w, format, args...) }
	table := func(rows []row, roundRow bool) {
		p("| %s |\n", strings.Join(header, " | "))
		p("|---|%s\n", strings.Repeat("---:|", len(header)-1))
		for _, r := range rows {
			p("| %s |\n", strings.Join(r.cells(roundRow), " | "))
		}
		p("\n")
	}
	p("```sh\n%s\n```\n\n", rep.cfg.command())
	p("Machine: %s. Run took %s.\n\n", rep.machineLine(), rep.elapsed.Round(time.Second))
	p("Median of %d rounds:\n\n", len(rep.rounds))
	table(rep.summary, false)
	p("| goal | A/B (median of rounds) | per round | target | |\n|---|---:|---|---|---|\n")
	p("| throughput | %s | %s | ≥ %.2f | %s |\n", fmtRatio(rep.tput.median), fmtRatios(rep.tput.perRound), goalThroughput, rep.tputVerdict())
	p("| peak RSS | %s | %s | within ±%.0f %% | %s |\n", fmtRatio(rep.rss.median), fmtRatios(rep.rss.perRound), goalRSS*100, rep.rssVerdict())
	p("| Caddy CPU per request | %s | %s | (information) | |\n\n", fmtRatio(rep.cpu.median), fmtRatios(rep.cpu.perRound))
	for _, n := range rep.notes() {
		p("- %s\n", n)
	}
	p("\n")
	for i, round := range rep.rounds {
		p("Round %d (order %s):\n\n", i+1, rep.orderOf(round))
		table(roundRows(round), true)
	}
}

func (rep *report) writeText(w io.Writer) {
	table := func(rows []row, roundRow bool) {
		// Right-aligned columns; the setup names padded to read left-aligned.
		lines := [][]string{slices.Clone(header)}
		for _, r := range rows {
			lines = append(lines, r.cells(roundRow))
		}
		width := 0
		for _, l := range lines {
			width = max(width, utf8.RuneCountInString(l[0]))
		}
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		for _, l := range lines {
			l[0] += strings.Repeat(" ", width-utf8.RuneCountInString(l[0]))
			fmt.Fprintf(tw, "%s\t\n", strings.Join(l, "\t"))
		}
		tw.Flush()
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "command: %s\nmachine: %s\nrun took %s\n\n", rep.cfg.command(), rep.machineLine(), rep.elapsed.Round(time.Second))
	for i, round := range rep.rounds {
		fmt.Fprintf(w, "round %d (order %s)\n", i+1, rep.orderOf(round))
		table(roundRows(round), true)
	}
	fmt.Fprintf(w, "median of %d rounds\n", len(rep.rounds))
	table(rep.summary, false)
	fmt.Fprintf(w, "throughput A/B %s (rounds %s), goal >= %.2f: %s\n", fmtRatio(rep.tput.median), fmtRatios(rep.tput.perRound), goalThroughput, rep.tputVerdict())
	fmt.Fprintf(w, "peak RSS A/B   %s (rounds %s), goal within ±%.0f %%: %s\n", fmtRatio(rep.rss.median), fmtRatios(rep.rss.perRound), goalRSS*100, rep.rssVerdict())
	fmt.Fprintf(w, "Caddy CPU per request A/B %s (rounds %s), information\n\n", fmtRatio(rep.cpu.median), fmtRatios(rep.cpu.perRound))
	for _, n := range rep.notes() {
		fmt.Fprintf(w, "* %s\n", strings.ReplaceAll(n, "`", ""))
	}
}

func fmtRatio(v float64) string {
	if math.IsNaN(v) {
		return "n/a"
	}
	return fmt.Sprintf("%.3f", v)
}

func fmtRatios(v []float64) string {
	if len(v) == 0 {
		return "n/a"
	}
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = fmtRatio(x)
	}
	return strings.Join(s, ", ")
}

func fmtLatency(d time.Duration) string {
	if d < time.Millisecond {
		return fmt.Sprintf("%d µs", d.Microseconds())
	}
	return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond))
}

func fmtBytes(b int64) string {
	if b <= 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
}

func fmtCPU(d time.Duration) string {
	if d <= 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.1f µs", float64(d)/float64(time.Microsecond))
}

func fmtCores(c float64) string {
	if c <= 0 || math.IsNaN(c) {
		return "n/a"
	}
	return fmt.Sprintf("%.2f cores", c)
}
