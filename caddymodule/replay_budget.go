package caddymodule

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Bounds of the replay options.
const (
	DefaultMaxReplayTotal = 64 << 20
	maxReplayBodyLimit    = 1 << 30 // 1 GiB
	maxReplayTotalLimit   = 1 << 40 // 1 TiB
)

// replayBytes counts the request body bytes held for replays by every
// restream_auth handler in the process. It is package-level because the
// memory it bounds is the process's: handlers of several sites or accounts,
// and the old and new config during a reload, share one heap, so caps per
// handler would add up to no bound at all. Each handler applies its own
// max_replay_total to this one count.
var replayBytes replayBudget

// replayBudget is an atomic byte count with a cap given at each
// reservation; it takes no lock.
type replayBudget struct{ held atomic.Int64 }

// reserve adds n bytes unless that would take the count past limit.
func (b *replayBudget) reserve(n, limit int64) bool {
	for {
		cur := b.held.Load()
		if cur+n > limit {
			return false
		}
		if b.held.CompareAndSwap(cur, cur+n) {
			return true
		}
	}
}

func (b *replayBudget) release(n int64) {
	if n != 0 {
		b.held.Add(-n)
	}
}

// replayMetrics are package-level for the reason metrics are: collectors
// are made once per process and registered into each config's registry.
var replayMetrics = struct {
	once    sync.Once
	skipped *prometheus.CounterVec
	held    prometheus.GaugeFunc
}{}

// registerReplayMetrics registers the replay collectors with a config's
// registry and creates the account's series at zero.
func registerReplayMetrics(registry *prometheus.Registry, account string) (prometheus.Counter, error) {
	replayMetrics.once.Do(func() {
		const ns, sub = "caddy", "restream_auth"
		replayMetrics.skipped = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "replay_skipped_total",
			Help: "Requests proxied without a replay copy because max_replay_total was reached (an upstream 401 on them passes through).",
		}, []string{"account"})
		replayMetrics.held = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "replay_bytes_held",
			Help: "Request body bytes held for replays by all restream_auth handlers of the process (at most max_replay_total).",
		}, func() float64 { return float64(replayBytes.held.Load()) })
	})
	if registry != nil {
		for _, c := range []prometheus.Collector{replayMetrics.skipped, replayMetrics.held} {
			if err := registry.Register(c); err != nil && !errors.As(err, new(prometheus.AlreadyRegisteredError)) {
				return nil, err
			}
		}
	}
	return replayMetrics.skipped.WithLabelValues(account), nil
}

// provisionReplay checks and defaults the replay options and prepares what
// a request sent without a replay copy reports to.
func (h *Handler) provisionReplay(registry *prometheus.Registry) error {
	if err := h.replayLimits(); err != nil {
		return err
	}
	skipped, err := registerReplayMetrics(registry, h.Account)
	if err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	h.skips = &skipLog{every: skipLogInterval, now: time.Now, counter: skipped}
	return nil
}

// replayLimits defaults max_replay_total and checks it with
// max_replay_body (which tokenConfig has defaulted), for JSON configs too:
// the Caddyfile checks them when parsing.
func (h *Handler) replayLimits() error {
	if h.MaxReplayTotal < 0 {
		return errors.New("max_replay_total must not be negative")
	}
	if h.MaxReplayTotal == 0 {
		h.MaxReplayTotal = DefaultMaxReplayTotal
	}
	return checkReplayLimits(h.MaxReplayBody, h.MaxReplayTotal)
}

// checkReplayLimits checks max_replay_body and max_replay_total as they
// will be used (defaults applied).
func checkReplayLimits(body, total int64) error {
	switch {
	case body > maxReplayBodyLimit:
		return fmt.Errorf("max_replay_body %d: at most 1GiB", body)
	case total > maxReplayTotalLimit:
		return fmt.Errorf("max_replay_total %d: at most 1TiB", total)
	case total < body:
		return fmt.Errorf("max_replay_total (%s) is below max_replay_body (%s): no body that large could be kept; raise max_replay_total or lower max_replay_body",
			humanize.IBytes(uint64(total)), humanize.IBytes(uint64(body)))
	}
	return nil
}

// skipLogInterval is the least time between two log lines about requests
// sent without a replay copy.
const skipLogInterval = 30 * time.Second

// skipLog reports the requests sent without a replay copy because
// max_replay_total was reached: each one in replay_skipped_total, and at
// most one log line per interval, with the count since the last line, so
// that a flood of requests does not flood the log.
type skipLog struct {
	every   time.Duration
	now     func() time.Time
	counter prometheus.Counter
	next    atomic.Int64 // Unix nanoseconds before which no line is written
	skipped atomic.Int64 // requests since the last line
}

func (l *skipLog) note(logger *zap.Logger, account string, total int64) {
	l.counter.Inc()
	l.skipped.Add(1)
	now, next := l.now().UnixNano(), l.next.Load()
	if now < next || !l.next.CompareAndSwap(next, now+int64(l.every)) {
		return
	}
	logger.Warn("max_replay_total reached: proxying requests without a replay copy, so an upstream 401 on them goes to the client",
		zap.String("account", account),
		zap.Int64("max_replay_total", total),
		zap.Int64("bytes_held", replayBytes.held.Load()),
		zap.Int64("requests", l.skipped.Swap(0)),
		zap.Duration("log_interval", l.every))
}
