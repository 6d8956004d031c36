// Package demo runs the restream_auth sidecar against a local fake Restream
// server, so the token rotation can be watched without a Restream account.
//
// It is the `caddy restream-demo` subcommand (see Command). Run loads Caddy
// in this process, and Caddy has one running config per process: do not call
// Run while another config is loaded, nor twice at the same time.
package demo

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"

	// The demo's config uses the standard HTTP modules and restream_auth.
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/restream-sidecar/caddy-restream-auth/caddymodule"
	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/tokensource"
)

// Defaults of Options.
const (
	DefaultDuration = 30 * time.Second
	DefaultTokenTTL = 10 * time.Second
	DefaultListen   = "127.0.0.1:8080"
	DefaultInterval = 200 * time.Millisecond
	DefaultLatency  = 150 * time.Millisecond

	// Account is the restream_auth account the demo configures.
	Account = "demo"
	// ClientID is the fake's OAuth client id; the secret is random per run.
	ClientID = "demo-client"
	// RequestPath is the API path the demo requests.
	RequestPath = "/v2/user/profile"
	// BogusAuthorization is what the demo sends on every bogusEvery-th
	// request, to show that the sidecar replaces client credentials.
	BogusAuthorization = "Bearer not-a-real-token"
	bogusEvery         = 5
	requestTimeout     = 10 * time.Second
)

// Options configure Run. Zero values get the defaults.
type Options struct {
	Duration time.Duration // how long to send requests (default 30s)
	TokenTTL time.Duration // access token lifetime at the fake (default 10s)
	Listen   string        // sidecar address (default 127.0.0.1:8080)
	Interval time.Duration // between two demo requests (default 200ms)
	Latency  time.Duration // token endpoint latency at the fake, plus up to half again as jitter (default 150ms)
	Out      io.Writer     // progress output (default os.Stdout)
}

// Result is what a demo run observed.
type Result struct {
	Elapsed     time.Duration
	Interrupted bool // the context ended before Duration
	Requests    int  // demo requests answered or failed (not counting ones cut short by an interruption)
	OK          int
	Failed      int
	// Bogus counts requests sent with BogusAuthorization; BogusReplaced those
	// whose upstream saw the sidecar's token instead.
	Bogus, BogusReplaced int
	// Rotations counts access token changes seen in responses.
	Rotations int
	// FirstGen and LastGen are the chain generations of the first and last
	// token seen (0 if unknown).
	FirstGen, LastGen uint64
	// Fake are the fake Restream server's counters at the end.
	Fake fakerestream.Stats
}

// Success reports a run without failed requests and without invalid_grant
// answers at the token endpoint.
func (r Result) Success() bool {
	return r.Failed == 0 && r.Fake.InvalidGrant == 0 && r.Requests > 0
}

// ErrListenBusy is returned (wrapped) when the sidecar address cannot be
// listened on.
var ErrListenBusy = errors.New("address not available")

func (o *Options) defaults() error {
	if o.Duration == 0 {
		o.Duration = DefaultDuration
	}
	if o.TokenTTL == 0 {
		o.TokenTTL = DefaultTokenTTL
	}
	if o.Listen == "" {
		o.Listen = DefaultListen
	}
	if o.Interval == 0 {
		o.Interval = DefaultInterval
	}
	if o.Latency == 0 {
		o.Latency = DefaultLatency
	}
	if o.Out == nil {
		o.Out = os.Stdout
	}
	switch {
	case o.Duration < 0:
		return fmt.Errorf("--duration %s: must be positive", o.Duration)
	case o.TokenTTL < time.Second:
		return fmt.Errorf("--token-ttl %s: must be at least 1s", o.TokenTTL)
	case o.Interval < 0 || o.Latency < 0:
		return errors.New("interval and latency must not be negative")
	}
	if _, _, err := net.SplitHostPort(o.Listen); err != nil {
		return fmt.Errorf("--listen %q: want host:port, e.g. 127.0.0.1:8080: %v", o.Listen, err)
	}
	return nil
}

// Run starts the fake Restream server and the sidecar in front of it, sends
// requests without credentials for opts.Duration while printing what happens,
// prints a summary and cleans up. Canceling ctx (Ctrl-C) ends the run early;
// that is not an error. An error means the demo could not start.
func Run(ctx context.Context, opts Options) (Result, error) {
	if err := opts.defaults(); err != nil {
		return Result{}, err
	}
	out := &printer{w: opts.Out}

	if err := checkListen(opts.Listen); err != nil {
		return Result{}, err
	}

	tmp, err := os.MkdirTemp("", "restream-demo-")
	if err != nil {
		return Result{}, err
	}
	defer os.RemoveAll(tmp)
	storageDir := filepath.Join(tmp, "storage")
	secretsDir := filepath.Join(tmp, "secrets")
	if err := os.Mkdir(secretsDir, 0o700); err != nil {
		return Result{}, err
	}

	out.plain("restream-demo: starting a fake Restream server and the restream_auth sidecar in front of it.\n")
	secret := randHex(32)
	fake := fakerestream.New(fakerestream.Options{
		ClientID:      ClientID,
		ClientSecret:  secret,
		AccessTTL:     opts.TokenTTL,
		Latency:       opts.Latency,
		LatencyJitter: opts.Latency / 2,
		Logf: func(format string, args ...any) {
			// The fake shortens every token it logs.
			out.event("fake Restream: " + strings.TrimPrefix(fmt.Sprintf(format, args...), "fakerestream: "))
		},
	})
	defer fake.Close()
	seed := fake.Seed()

	secretFile, seedFile, err := writeSecrets(secretsDir, secret, seed)
	if err != nil {
		return Result{}, err
	}
	cfgText := Caddyfile(opts.Listen, storageDir, secretFile, seedFile, fake)
	out.plain("Caddyfile of the sidecar (secrets are read from files by the {file.*} placeholders):\n")
	out.plain(indent(cfgText, "    "))
	out.plain("\n")
	if err := startCaddy(cfgText, opts.Listen); err != nil {
		return Result{}, err
	}
	stopped := false
	stopCaddy := func() {
		if stopped {
			return
		}
		stopped = true
		if err := caddy.Stop(); err != nil {
			out.plain(fmt.Sprintf("stopping Caddy: %v\n", err))
		}
	}
	defer stopCaddy()

	base := "http://" + dialAddr(opts.Listen)
	printIntro(out, opts, fake, base, storageDir)

	d := &driver{
		opts:       opts,
		out:        out,
		fake:       fake,
		url:        base + RequestPath,
		recordPath: filepath.Join(storageDir, filepath.FromSlash(tokensource.RecordKey(Account))),
		client: &http.Client{
			Timeout:   requestTimeout,
			Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 4},
		},
		gens: make(map[string]uint64),
	}
	res := d.run(ctx)
	d.client.CloseIdleConnections()
	// Stopping Caddy waits for a refresh in flight, so the counters below
	// are final; the fake's later events are not shown.
	stopCaddy()
	out.mute()
	res.Fake = fake.Stats()
	d.summary(res)
	return res, nil
}

// writeSecrets writes the client secret and the seed where the Caddyfile's
// {file.*} placeholders read them, so the Caddyfile printed is exactly the
// one used and holds no secret.
func writeSecrets(dir, secret, seed string) (secretFile, seedFile string, err error) {
	secretFile = filepath.Join(dir, "client_secret")
	seedFile = filepath.Join(dir, "refresh_token")
	if err := os.WriteFile(secretFile, []byte(secret), 0o600); err != nil {
		return "", "", err
	}
	if err := os.WriteFile(seedFile, []byte(seed), 0o600); err != nil {
		return "", "", err
	}
	return secretFile, seedFile, nil
}

// startCaddy adapts the Caddyfile and runs it in this process.
func startCaddy(cfgText, listen string) error {
	cfgJSON, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfgText), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		return fmt.Errorf("adapting the demo Caddyfile: %w", err)
	}
	if err := caddy.Load(cfgJSON, true); err != nil {
		if isAddrInUse(err) {
			return fmt.Errorf("%w: %s is in use: %v; choose another address with --listen, e.g. --listen 127.0.0.1:18080", ErrListenBusy, listen, err)
		}
		return fmt.Errorf("starting Caddy: %w", err)
	}
	return nil
}

// printIntro says what runs where and what the demo is about to do.
func printIntro(out *printer, opts Options, fake *fakerestream.Server, base, storageDir string) {
	out.plain(fmt.Sprintf("Fake Restream at %s (access tokens live %s; every refresh rotates the access AND refresh token).\n", fake.URL(), opts.TokenTTL))
	out.plain(fmt.Sprintf("Sidecar at %s; token chain stored under %s\n", base, storageDir))
	out.plain(fmt.Sprintf("Try it meanwhile (the fake echoes the headers it received, so this shows a full fake token):\n"+
		"    curl -s %s%s\n    curl -s -H 'Authorization: Bearer mine' %s%s\n", base, RequestPath, base, RequestPath))
	out.plain(fmt.Sprintf("Sending GET %s without credentials every %s for %s (every %dth with %q)...\n\n",
		RequestPath, opts.Interval, opts.Duration, bogusEvery, BogusAuthorization))
}

// Caddyfile returns the demo sidecar's Caddyfile.
func Caddyfile(listen, storageDir, secretFile, seedFile string, fake *fakerestream.Server) string {
	host, port, _ := net.SplitHostPort(listen)
	bind := ""
	if host != "" {
		bind = "\tbind " + quote(host) + "\n"
	}
	return fmt.Sprintf(`{
	admin off
	auto_https off
	persist_config off
	storage file_system %s
	servers {
		protocols h1
	}
	log {
		level WARN
		exclude admin
	}
}

http://:%s {
%s	restream_auth %s {
		client_id %s
		client_secret %s
		refresh_token %s
		token_url %s
	}
	reverse_proxy %s
}
`, quote(storageDir), port, bind, Account, ClientID,
		quote("{file."+secretFile+"}"), quote("{file."+seedFile+"}"), fake.TokenURL(), fake.URL())
}

// quote quotes a Caddyfile token if it needs it.
func quote(s string) string {
	if !strings.ContainsAny(s, " \t\"#\\") {
		return s
	}
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(s) + `"`
}

// checkListen fails early, with advice, when addr cannot be listened on.
func checkListen(addr string) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		hint := "choose another address with --listen, e.g. --listen 127.0.0.1:18080"
		if isAddrInUse(err) {
			return fmt.Errorf("%w: %s is already in use (%v); %s", ErrListenBusy, addr, err, hint)
		}
		return fmt.Errorf("%w: cannot listen on %s (%v); %s", ErrListenBusy, addr, err, hint)
	}
	return l.Close()
}

func isAddrInUse(err error) bool {
	return errors.Is(err, syscall.EADDRINUSE) || strings.Contains(err.Error(), "address already in use")
}

// dialAddr is the address clients use for listen address addr.
func dialAddr(addr string) string {
	host, port, _ := net.SplitHostPort(addr)
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}

// driver sends the demo requests and reports on them.
type driver struct {
	opts       Options
	out        *printer
	fake       *fakerestream.Server
	url        string
	recordPath string
	client     *http.Client

	res        Result
	lastTok    string
	lastGen    uint64
	gens       map[string]uint64 // access token -> generation, as learned from storage
	shownOK    bool
	shownBogus bool
}

func (d *driver) run(ctx context.Context) Result {
	start := time.Now()
	d.out.setStart(start)
	deadline := time.NewTimer(d.opts.Duration)
	defer deadline.Stop()
	reqTick := time.NewTicker(d.opts.Interval)
	defer reqTick.Stop()
	statusTick := time.NewTicker(time.Second)
	defer statusTick.Stop()

	d.request(ctx)
loop:
	for {
		select {
		case <-ctx.Done():
			d.res.Interrupted = true
			break loop
		case <-deadline.C:
			break loop
		case <-statusTick.C:
			d.status()
		case <-reqTick.C:
			d.request(ctx)
		}
	}
	d.res.Elapsed = time.Since(start)
	d.res.LastGen = d.lastGen
	if ctx.Err() != nil {
		d.res.Interrupted = true
	}
	return d.res
}

// echo is the part of the fake's API answer the demo looks at.
type echo struct {
	Authorization string `json:"authorization"`
}

func (d *driver) request(ctx context.Context) {
	n := d.res.Requests + 1
	bogus := n%bogusEvery == 0
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodGet, d.url, nil)
	if err != nil {
		d.fail(n, err.Error())
		return
	}
	if bogus {
		req.Header.Set("Authorization", BogusAuthorization)
	}
	resp, err := d.client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return // interrupted: not a failure of the sidecar
		}
		d.res.Requests = n
		d.fail(n, err.Error())
		return
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	resp.Body.Close()
	if err != nil && ctx.Err() != nil {
		return
	}
	d.res.Requests = n
	if err != nil {
		d.fail(n, "reading response: "+err.Error())
		return
	}
	if resp.StatusCode != http.StatusOK {
		// Error bodies (the fake's 401, restream_auth's 503) carry no token.
		d.fail(n, fmt.Sprintf("HTTP %d: %s", resp.StatusCode, oneLine(body, 160)))
		return
	}
	var e echo
	if err := json.Unmarshal(body, &e); err != nil {
		d.fail(n, "HTTP 200 but not the fake's echo")
		return
	}
	tok, ok := strings.CutPrefix(e.Authorization, "Bearer ")
	if !ok || tok == "" {
		d.fail(n, "upstream received no bearer token")
		return
	}
	if bogus {
		d.res.Bogus++
		if e.Authorization == BogusAuthorization {
			d.fail(n, "upstream received the client's bogus Authorization header")
			return
		}
		d.res.BogusReplaced++
	}
	d.res.OK++
	d.observe(tok)
	if !d.shownOK {
		d.shownOK = true
		d.out.event(fmt.Sprintf("request #%d: 200 OK, no credentials sent; upstream received Bearer %s (generation %d)", n, Short(tok), d.lastGen))
	}
	if bogus && !d.shownBogus {
		d.shownBogus = true
		d.out.event(fmt.Sprintf("request #%d: client sent %q; upstream received Bearer %s instead: replaced", n, BogusAuthorization, Short(tok)))
	}
}

func (d *driver) fail(n int, why string) {
	d.res.Failed++
	d.out.event(fmt.Sprintf("request #%d FAILED: %s", n, why))
}

// observe notes the token a response carried and reports a rotation.
func (d *driver) observe(tok string) {
	if tok == d.lastTok {
		return
	}
	gen := d.generation(tok)
	if d.lastTok == "" {
		d.res.FirstGen = gen
	} else {
		d.res.Rotations++
		d.out.event(fmt.Sprintf("token rotated: generation %d %s -> generation %d %s (rotation %d seen by the client)",
			d.lastGen, Short(d.lastTok), gen, Short(tok), d.res.Rotations))
	}
	d.lastTok, d.lastGen = tok, gen
}

// generation looks tok up in the stored token record; if the chain has moved
// on already, it assumes the generation after the previous one.
func (d *driver) generation(tok string) uint64 {
	if g, ok := d.gens[tok]; ok {
		return g
	}
	g := d.lastGen + 1
	if b, err := os.ReadFile(d.recordPath); err == nil {
		var rec tokensource.Record
		if json.Unmarshal(b, &rec) == nil && rec.AccessToken == tok {
			g = rec.Generation
		}
	}
	d.gens[tok] = g
	return g
}

func (d *driver) status() {
	st := d.fake.Stats()
	tok := "(none yet)"
	if d.lastTok != "" {
		tok = fmt.Sprintf("generation %d %s", d.lastGen, Short(d.lastTok))
	}
	d.out.event(fmt.Sprintf("%d ok / %d failed | token %s | refresh calls at fake: %d",
		d.res.OK, d.res.Failed, tok, st.RefreshCalls))
}

func (d *driver) summary(r Result) {
	p := d.out
	p.plain("\n")
	if r.Interrupted {
		p.plain(fmt.Sprintf("Interrupted after %.1fs.\n", r.Elapsed.Seconds()))
	}
	p.plain("Summary\n")
	p.plain(fmt.Sprintf("  duration            %.1fs\n", r.Elapsed.Seconds()))
	p.plain(fmt.Sprintf("  requests            %d (%d ok, %d failed)\n", r.Requests, r.OK, r.Failed))
	p.plain(fmt.Sprintf("  bogus Authorization %d sent, %d replaced by the sidecar\n", r.Bogus, r.BogusReplaced))
	p.plain(fmt.Sprintf("  token rotations     %d seen by the client (generation %d -> %d)\n", r.Rotations, r.FirstGen, r.LastGen))
	p.plain(fmt.Sprintf("  fake Restream       %d refresh calls (%d ok, incl. the seed exchange), %d invalid_grant, %d API 401s, max %d concurrent refresh\n",
		r.Fake.RefreshCalls, r.Fake.RefreshOK, r.Fake.InvalidGrant, r.Fake.API401, r.Fake.MaxConcurrentRefresh))
	if r.Success() {
		p.plain("  result              PASS: every request carried a valid token across the rotations\n")
	} else {
		p.plain("  result              FAIL\n")
	}
}

// Short abbreviates a token for display: its first 8 characters and "…".
func Short(tok string) string {
	if len(tok) > 8 {
		return tok[:8] + "…"
	}
	return tok + "…"
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func oneLine(b []byte, limit int) string {
	s := strings.Join(strings.Fields(string(b)), " ")
	if len(s) > limit {
		s = s[:limit] + "…"
	}
	return s
}

func indent(s, prefix string) string {
	lines := strings.SplitAfter(strings.TrimRight(s, "\n"), "\n")
	return prefix + strings.Join(lines, prefix) + "\n"
}

// printer serializes output lines; lines after setStart carry the elapsed time.
type printer struct {
	mu    sync.Mutex
	w     io.Writer
	start time.Time
	muted bool
}

func (p *printer) setStart(t time.Time) {
	p.mu.Lock()
	p.start = t
	p.mu.Unlock()
}

func (p *printer) plain(s string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, _ = io.WriteString(p.w, s)
}

// mute drops later events; plain lines still print.
func (p *printer) mute() {
	p.mu.Lock()
	p.muted = true
	p.mu.Unlock()
}

func (p *printer) event(s string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.muted {
		return
	}
	if p.start.IsZero() {
		_, _ = fmt.Fprintf(p.w, "%s\n", s)
		return
	}
	_, _ = fmt.Fprintf(p.w, "[%5.1fs] %s\n", time.Since(p.start).Seconds(), s)
}
