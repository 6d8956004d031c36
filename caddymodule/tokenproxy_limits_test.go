package caddymodule_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/restream-sidecar/caddy-restream-auth/internal/fakerestream"
	"github.com/restream-sidecar/caddy-restream-auth/internal/testproc"
)

// Tests of restream_token_proxy's max_concurrent: calls beyond it are
// answered 429 locally, so a flood of devices cannot spend the client_id's
// rate limit at Restream that the sidecar's own refreshes need.

// passOn forwards a call (its body already read into raw) to target and
// relays the answer, as the recorder does.
func passOn(w http.ResponseWriter, r *http.Request, hc *http.Client, target string, raw []byte) (int, []byte) {
	req, _ := http.NewRequestWithContext(r.Context(), r.Method, target, bytes.NewReader(raw))
	for _, k := range []string{"Content-Type", "Authorization", "Accept"} {
		if v := r.Header.Get(k); v != "" {
			req.Header.Set(k, v)
		}
	}
	resp, err := hc.Do(req)
	if err != nil {
		panic(http.ErrAbortHandler) // no answer, passed on as such
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for k, v := range resp.Header {
		w.Header()[k] = v
	}
	w.WriteHeader(resp.StatusCode)
	_, _ = w.Write(body)
	return resp.StatusCode, body
}

// holdingGate holds every call until opened, then passes it on to next. Each
// call reports its arrival on arrived.
type holdingGate struct {
	srv      *httptest.Server
	arrived  chan struct{}
	release  chan struct{}
	openOnce sync.Once
	calls    atomic.Int64
}

func newHoldingGate(t *testing.T, next string) *holdingGate {
	t.Helper()
	g := &holdingGate{arrived: make(chan struct{}, 1024), release: make(chan struct{})}
	hc := &http.Client{Timeout: time.Minute}
	g.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		g.calls.Add(1)
		raw, _ := io.ReadAll(r.Body)
		g.arrived <- struct{}{}
		select {
		case <-g.release:
		case <-r.Context().Done():
			return
		}
		passOn(w, r, hc, next+r.URL.Path, raw)
	}))
	t.Cleanup(func() {
		g.open()
		g.srv.Close()
	})
	return g
}

func (g *holdingGate) open() { g.openOnce.Do(func() { close(g.release) }) }

// wait returns once n more calls have arrived.
func (g *holdingGate) wait(t *testing.T, n int) {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for i := range n {
		select {
		case <-g.arrived:
		case <-timeout:
			t.Fatalf("only %d of %d calls reached the upstream", i, n)
		}
	}
}

// scrapeMetric reads one unlabelled metric from the site's `metrics` handler.
func scrapeMetric(t *testing.T, base, name string) float64 {
	t.Helper()
	status, body, _ := do(t, http.MethodGet, base+"/metrics", nil, nil)
	if status != http.StatusOK {
		t.Fatalf("metrics: status %d", status)
	}
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("metric %s: %v", name, err)
			}
			return f
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

const (
	throttledMetric = "caddy_restream_auth_token_proxy_throttled_total"
	inFlightMetric  = "caddy_restream_auth_token_proxy_in_flight"
)

// With max_concurrent calls held upstream, further device calls (token and
// revoke) get 429 + Retry-After at once and nothing is forwarded; once the
// held calls end, calls go through again. The default is 16.
func TestTokenProxyMaxConcurrent(t *testing.T) {
	for _, tc := range []struct {
		name  string
		lines []string
		limit int
	}{
		{"max_concurrent 3", []string{"max_concurrent 3"}, 3},
		{"default", nil, 16},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake := newFake(t, fakerestream.Options{})
			rec := newUpstreamRecorder(t, fake)
			gate := newHoldingGate(t, rec.srv.URL)
			site := proxySite{Port: testproc.Port(t), Lines: append([]string{
				"client_id test-client",
				"client_secret test-secret",
				"token_url " + gate.srv.URL + "/oauth/token",
				"revoke_url " + gate.srv.URL + "/oauth/revoke",
				"redirect_uris " + deviceRedirectURI,
			}, tc.lines...), Extra: []string{"metrics /metrics"}}
			runInProcess(t, proxyCaddyfile(nil, site))
			throttled0 := scrapeMetric(t, site.base(), throttledMetric)

			type answer struct {
				status int
				body   []byte
			}
			answers := make(chan answer, tc.limit)
			for range tc.limit {
				_, refresh := fake.SeedPair()
				go func() {
					st, b, _ := postForm(t, site.base()+"/oauth/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}}, nil)
					answers <- answer{st, b}
				}()
			}
			gate.wait(t, tc.limit)
			if got := scrapeMetric(t, site.base(), inFlightMetric); got != float64(tc.limit) {
				t.Errorf("in-flight metric %v, want %d", got, tc.limit)
			}

			access, refresh := fake.SeedPair()
			code := fake.IssueCode(deviceRedirectURI)
			for _, call := range []struct {
				path string
				form url.Values
			}{
				{"/oauth/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}}},
				{"/oauth/token", url.Values{"grant_type": {"authorization_code"}, "code": {code}, "redirect_uri": {deviceRedirectURI}}},
				{"/oauth/revoke", url.Values{"token": {access}}},
			} {
				status, body, hdr := postForm(t, site.base()+call.path, call.form, nil)
				if status != http.StatusTooManyRequests {
					t.Fatalf("%s beyond max_concurrent: status %d, want 429: %s", call.path, status, body)
				}
				if ra := hdr.Get("Retry-After"); ra != "1" {
					t.Errorf("Retry-After %q, want 1", ra)
				}
				errCode, desc := oauthError(t, body, hdr)
				if errCode != "temporarily_unavailable" || !strings.Contains(desc, "max_concurrent") || !strings.Contains(desc, strconv.Itoa(tc.limit)) {
					t.Errorf("429 body %s", body)
				}
			}
			if n := gate.calls.Load(); n != int64(tc.limit) {
				t.Errorf("%d calls reached the upstream, want %d", n, tc.limit)
			}
			if got := scrapeMetric(t, site.base(), throttledMetric) - throttled0; got != 3 {
				t.Errorf("throttled metric grew by %v, want 3", got)
			}

			gate.open()
			for range tc.limit {
				if a := <-answers; a.status != http.StatusOK {
					t.Errorf("held call: status %d: %s", a.status, a.body)
				}
			}
			// The slots are free again: the refused calls now go through
			// (none of them was spent upstream).
			if st, b, _ := postForm(t, site.base()+"/oauth/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}}, nil); st != http.StatusOK {
				t.Errorf("after the held calls ended: status %d: %s", st, b)
			}
			if st, b, _ := postForm(t, site.base()+"/oauth/token", url.Values{"grant_type": {"authorization_code"}, "code": {code}, "redirect_uri": {deviceRedirectURI}}, nil); st != http.StatusOK {
				t.Errorf("the refused code, redeemed later: status %d: %s", st, b)
			}
			if got := scrapeMetric(t, site.base(), inFlightMetric); got != 0 {
				t.Errorf("in-flight metric %v after every call ended", got)
			}
			if st := fake.Stats(); st.RefreshOK != int64(tc.limit)+1 || st.CodeCalls != 1 || st.InvalidGrant != 0 {
				t.Errorf("fake stats %+v", st)
			}
		})
	}
}

// floodDevicePrefix marks the flood's refresh tokens, so the limiter can tell
// device calls from the sidecar's own.
const floodDevicePrefix = "device-flood-"

// rateLimiter sits in front of the fake's token endpoint and models a
// per-client_id limit at Restream: a client_id with limit calls in
// progress gets 429 for the next one.
type rateLimiter struct {
	srv   *httptest.Server
	limit int

	mu                                        sync.Mutex
	inFlight                                  map[string]int // by client_id
	deviceInFlight, maxDeviceInFlight         int
	deviceForwarded, deviceLimited            int
	sidecarForwarded, sidecarOK, sidecarLimit int
}

func newRateLimiter(t *testing.T, fake *fakerestream.Server, limit int) *rateLimiter {
	t.Helper()
	l := &rateLimiter{limit: limit, inFlight: map[string]int{}}
	upstream := strings.TrimSuffix(fake.TokenURL(), "/oauth/token")
	hc := &http.Client{Timeout: time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	l.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		raw, _ := io.ReadAll(r.Body)
		form, _ := url.ParseQuery(string(raw))
		id, _, ok := r.BasicAuth()
		if !ok {
			id = form.Get("client_id")
		}
		device := strings.HasPrefix(form.Get("refresh_token"), floodDevicePrefix)

		l.mu.Lock()
		if l.inFlight[id] >= l.limit {
			if device {
				l.deviceLimited++
			} else {
				l.sidecarLimit++
			}
			l.mu.Unlock()
			w.Header().Set("Retry-After", "1")
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusTooManyRequests)
			_, _ = io.WriteString(w, `{"error":"rate_limited","error_description":"too many token calls for this client"}`)
			return
		}
		l.inFlight[id]++
		if device {
			l.deviceInFlight++
			l.maxDeviceInFlight = max(l.maxDeviceInFlight, l.deviceInFlight)
		}
		l.mu.Unlock()

		// The call ends here for the limit before its answer leaves, so the
		// caller cannot start another one that still finds it counted.
		rw := httptest.NewRecorder()
		status, _ := passOn(rw, r, hc, upstream+r.URL.Path, raw)
		l.mu.Lock()
		l.inFlight[id]--
		if device {
			l.deviceInFlight--
			l.deviceForwarded++
		} else {
			l.sidecarForwarded++
			if status == http.StatusOK {
				l.sidecarOK++
			}
		}
		l.mu.Unlock()
		for k, v := range rw.Header() {
			w.Header()[k] = v
		}
		w.WriteHeader(rw.Code)
		_, _ = w.Write(rw.Body.Bytes())
	}))
	t.Cleanup(l.srv.Close)
	return l
}

type rateLimiterStats struct {
	MaxDeviceInFlight, DeviceForwarded, DeviceLimited int
	SidecarForwarded, SidecarOK, SidecarLimited       int
}

func (l *rateLimiter) stats() rateLimiterStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	return rateLimiterStats{l.maxDeviceInFlight, l.deviceForwarded, l.deviceLimited, l.sidecarForwarded, l.sidecarOK, l.sidecarLimit}
}

// deviceFlood is a crowd of devices refreshing through the proxy as fast as
// they can, with refresh tokens the fake never issued (every forwarded call
// is answered invalid_grant, and still counts against the limit). A device
// answered 429 tries again 100 ms later.
type deviceFlood struct {
	local429, relayed429, forwarded, other atomic.Int64
	stop                                   chan struct{}
	stopOnce                               sync.Once
	wg                                     sync.WaitGroup
	hc                                     *http.Client
}

func startDeviceFlood(t *testing.T, tokenURL string, devices int) *deviceFlood {
	t.Helper()
	tr := &http.Transport{MaxIdleConnsPerHost: devices}
	f := &deviceFlood{stop: make(chan struct{}), hc: &http.Client{Timeout: time.Minute, Transport: tr}}
	t.Cleanup(func() {
		f.halt()
		tr.CloseIdleConnections()
	})
	for i := range devices {
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			for n := 0; ; n++ {
				select {
				case <-f.stop:
					return
				default:
				}
				body := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {fmt.Sprintf("%s%d-%d", floodDevicePrefix, i, n)}}.Encode()
				resp, err := f.hc.Post(tokenURL, formContentType, strings.NewReader(body))
				if err != nil {
					t.Errorf("device %d: %v", i, err)
					return
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				switch {
				case resp.StatusCode == http.StatusTooManyRequests && bytes.Contains(b, []byte("max_concurrent")):
					if resp.Header.Get("Retry-After") != "1" {
						t.Errorf("local 429 without Retry-After: %s", b)
					}
					f.local429.Add(1)
				case resp.StatusCode == http.StatusTooManyRequests:
					f.relayed429.Add(1)
				case resp.StatusCode == http.StatusBadRequest && bytes.Contains(b, []byte("invalid_grant")):
					f.forwarded.Add(1)
					continue
				default:
					if f.other.Add(1) <= 3 {
						t.Errorf("device %d: status %d: %s", i, resp.StatusCode, b)
					}
				}
				select { // pacing, as a retrying client would
				case <-f.stop:
					return
				case <-time.After(100 * time.Millisecond):
				}
			}
		}()
	}
	return f
}

// halt stops the flood and waits for every device.
func (f *deviceFlood) halt() {
	f.stopOnce.Do(func() { close(f.stop) })
	f.wg.Wait()
}

// sidecarProbe calls the API through the sidecar every 50 ms until halted.
type sidecarProbe struct {
	ok, bad  atomic.Int64
	stop     chan struct{}
	stopOnce sync.Once
	done     chan struct{}
}

func startSidecarProbe(t *testing.T, apiURL string) *sidecarProbe {
	p := &sidecarProbe{stop: make(chan struct{}), done: make(chan struct{})}
	t.Cleanup(p.halt)
	go func() {
		defer close(p.done)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-p.stop:
				return
			case <-tick.C:
			}
			status, body, _ := do(t, http.MethodGet, apiURL, nil, nil)
			if status == http.StatusOK {
				p.ok.Add(1)
			} else if p.bad.Add(1) <= 3 {
				t.Logf("sidecar API call: status %d: %s", status, body)
			}
		}
	}()
	return p
}

func (p *sidecarProbe) halt() {
	p.stopOnce.Do(func() { close(p.stop) })
	<-p.done
}

// One Caddy runs restream_auth (2-second tokens, so it refreshes every
// second or so) and restream_token_proxy on the same client_id; a limiter
// in front of the fake refuses a client_id's 7th concurrent token call.
// 300 devices flood the proxy.
//
// With max_concurrent 4 the proxy never has more than 4 device calls at the
// limiter: the sidecar's refreshes all pass (its generation advances, its
// API calls all answer 200) and the devices beyond 4 get the proxy's own 429.
// With max_concurrent 10000 (as good as no limit) the same flood fills the
// client_id's quota and the limiter refuses the sidecar's refresh: the
// failure the limit prevents.
func TestTokenProxyFloodSparesSidecarRefresh(t *testing.T) {
	skipIfShort(t, "floods the proxy for seconds")
	const (
		devices      = 300
		clientLimit  = 6
		refreshesDue = 3
	)
	type setup struct {
		lim        *rateLimiter
		flood      *deviceFlood
		probe      *sidecarProbe
		generation func() uint64 // the sidecar's, from restream_auth_health
		g0         uint64        // before the flood
		throttled  func() float64
	}
	run := func(t *testing.T, maxConcurrent int) setup {
		fake := newFake(t, fakerestream.Options{AccessTTL: 2 * time.Second, Latency: 150 * time.Millisecond, Logf: func(string, ...any) {}})
		lim := newRateLimiter(t, fake, clientLimit)
		apiPort, devPort := testproc.Port(t), testproc.Port(t)
		runInProcess(t, fmt.Sprintf(`{
	admin off
	storage file_system %s
	auto_https off
	persist_config off
}

http://127.0.0.1:%d {
	restream_auth {
		client_id test-client
		client_secret test-secret
		refresh_token %s
		token_url %s/oauth/token
		refresh_ahead 1s
	}
	reverse_proxy %s
}

http://127.0.0.1:%d {
	restream_token_proxy /oauth/* {
		allow_unauthenticated
		client_id test-client
		client_secret test-secret
		token_url %s/oauth/token
		max_concurrent %d
	}
	restream_auth_health /health
	metrics /metrics
}
`, t.TempDir(), apiPort, fake.Seed(), lim.srv.URL, fake.URL(), devPort, lim.srv.URL, maxConcurrent))
		api := "http://127.0.0.1:" + itoa(apiPort)
		dev := "http://127.0.0.1:" + itoa(devPort)
		generation := func() uint64 {
			_, body, _ := do(t, http.MethodGet, dev+"/health", nil, nil)
			var h struct {
				Generation uint64 `json:"generation"`
			}
			_ = json.Unmarshal(body, &h)
			return h.Generation
		}
		if st, b, _ := do(t, http.MethodGet, api+"/v2/user/profile", nil, nil); st != http.StatusOK {
			t.Fatalf("sidecar before the flood: status %d: %s", st, b)
		}
		throttled0 := scrapeMetric(t, dev, throttledMetric)
		g0 := generation()
		return setup{
			lim:        lim,
			flood:      startDeviceFlood(t, dev+"/oauth/token", devices),
			probe:      startSidecarProbe(t, api+"/v2/user/profile"),
			generation: generation,
			g0:         g0,
			throttled:  func() float64 { return scrapeMetric(t, dev, throttledMetric) - throttled0 },
		}
	}

	t.Run("max_concurrent 4", func(t *testing.T) {
		s := run(t, 4)
		lim, flood, probe := s.lim, s.flood, s.probe
		start := time.Now()
		waitFor(t, 30*time.Second, "the sidecar to refresh during the flood", func() bool { return s.generation() >= s.g0+refreshesDue })
		took := time.Since(start)
		flood.halt()
		probe.halt()
		st := lim.stats()
		throttled := s.throttled()
		t.Logf("%d refreshes in %s; devices: %d answered 429 by the proxy, %d forwarded, %d 429 from the limiter; limiter: %+v; sidecar API calls: %d ok, %d failed",
			refreshesDue, took.Round(time.Millisecond), flood.local429.Load(), flood.forwarded.Load(), flood.relayed429.Load(), st, probe.ok.Load(), probe.bad.Load())
		if st.SidecarLimited != 0 || st.DeviceLimited != 0 || flood.relayed429.Load() != 0 {
			t.Errorf("the limiter refused %d sidecar and %d device calls, want none", st.SidecarLimited, st.DeviceLimited)
		}
		if st.MaxDeviceInFlight > 4 {
			t.Errorf("%d device calls at the limiter at once, want at most max_concurrent 4", st.MaxDeviceInFlight)
		}
		if st.SidecarOK < refreshesDue {
			t.Errorf("the limiter passed %d successful sidecar refreshes, want %d or more", st.SidecarOK, refreshesDue)
		}
		if flood.local429.Load() < devices || flood.forwarded.Load() == 0 || flood.other.Load() != 0 {
			t.Errorf("devices: %d local 429s, %d forwarded, %d other answers: not the flood intended", flood.local429.Load(), flood.forwarded.Load(), flood.other.Load())
		}
		if throttled != float64(flood.local429.Load()) {
			t.Errorf("throttled metric grew by %v, devices saw %d local 429s", throttled, flood.local429.Load())
		}
		if probe.bad.Load() != 0 || probe.ok.Load() == 0 {
			t.Errorf("sidecar API calls during the flood: %d ok, %d failed", probe.ok.Load(), probe.bad.Load())
		}
	})

	t.Run("max_concurrent 10000 lets the flood starve the sidecar", func(t *testing.T) {
		s := run(t, 10000)
		lim, flood, probe := s.lim, s.flood, s.probe
		waitFor(t, 30*time.Second, "the limiter to refuse a sidecar refresh", func() bool { return lim.stats().SidecarLimited > 0 })
		flood.halt()
		probe.halt()
		st := lim.stats()
		t.Logf("devices: %d answered 429 by the proxy, %d forwarded, %d 429 from the limiter; limiter: %+v; sidecar API calls: %d ok, %d failed",
			flood.local429.Load(), flood.forwarded.Load(), flood.relayed429.Load(), st, probe.ok.Load(), probe.bad.Load())
		if flood.local429.Load() != 0 || st.DeviceLimited == 0 || st.MaxDeviceInFlight != clientLimit {
			t.Errorf("without an effective max_concurrent the devices should fill the client_id's quota at the limiter")
		}
	})
}

// max_concurrent limits a client_id's calls at Restream, where the rate
// limit is: two sites with the same client_id share the count, and so do
// the old and the new config during a reload (the old config's calls are
// still in flight); another client_id has its own.
func TestTokenProxyMaxConcurrentPerClientID(t *testing.T) {
	fake := newFake(t, fakerestream.Options{})
	rec := newUpstreamRecorder(t, fake)
	gate := newHoldingGate(t, rec.srv.URL)
	site := func(clientID string, extra ...string) proxySite {
		return proxySite{Port: testproc.Port(t), Lines: append([]string{
			"client_id " + clientID,
			"client_secret test-secret",
			"token_url " + gate.srv.URL + "/oauth/token",
			"max_concurrent 2",
		}, extra...)}
	}
	first, second, other := site("test-client"), site("test-client"), site("other-client")
	runInProcess(t, proxyCaddyfile(nil, first, second, other))
	refresh := func(s proxySite) (int, []byte) {
		_, rt := fake.SeedPair()
		status, body, _ := postForm(t, s.base()+"/oauth/token", url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}}, nil)
		return status, body
	}

	held := make(chan int, 2)
	for range 2 {
		go func() { status, _ := refresh(first); held <- status }()
	}
	gate.wait(t, 2)
	if status, body := refresh(second); status != http.StatusTooManyRequests {
		t.Fatalf("another site of the same client_id with 2 calls in flight: status %d, want 429: %s", status, body)
	}

	// A reload while the two calls are held: the new config's handlers
	// count them too.
	first.Lines = append(first.Lines, "timeout 20s")
	loadInProcess(t, proxyCaddyfile(nil, first, second, other))
	if status, body := refresh(first); status != http.StatusTooManyRequests {
		t.Fatalf("after a reload, with the old config's 2 calls in flight: status %d, want 429: %s", status, body)
	}
	if n := gate.calls.Load(); n != 2 {
		t.Fatalf("%d calls reached the upstream, want 2", n)
	}

	// Another client_id has its own count (the fake refuses its credentials;
	// what matters is that the call was forwarded, not refused here).
	go func() { _, _ = refresh(other) }()
	gate.wait(t, 1)

	gate.open()
	for range 2 {
		if status := <-held; status != http.StatusOK {
			t.Errorf("held call: status %d", status)
		}
	}
	if status, body := refresh(second); status != http.StatusOK {
		t.Fatalf("with the held calls ended: status %d: %s", status, body)
	}
}
