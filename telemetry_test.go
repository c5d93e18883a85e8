package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/armon/go-metrics"
	"github.com/hashicorp/go-hclog"
	dto "github.com/prometheus/client_model/go"
)

// httpGet fetches url and returns status and body; transport errors come back as status 0.
func httpGet(t testing.TB, url string, header ...string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// waitHTTPBase waits until ra's HTTP interface listens and returns its base URL.
func waitHTTPBase(t testing.TB, ra *runningAgent) string {
	t.Helper()
	var base string
	waitFor(t, 15*time.Second, func() error {
		if m := httpAddrLine.FindStringSubmatch(ra.logs.String()); m != nil {
			base = "http://" + m[1]
			return nil
		}
		return errNotYet
	})
	return base
}

// TestTelemetryHTTPEndToEnd runs an agent against a real Consul with Prometheus and pprof enabled,
// scrapes /metrics for the original's series, and watches /health go from 200 to 503 once Consul
// is gone. Serial: it reads metrics through the go-metrics global.
func TestTelemetryHTTPEndToEnd(t *testing.T) {
	srv := newTestConsul(t)
	cfg := testConfig(srv)
	cfg.ClientAddress = "127.0.0.1:0"
	cfg.EnableDebug = true
	cfg.Telemetry.PrometheusRetentionTime = time.Minute
	cfg.Telemetry.DisableHostname = true
	ra := startAgent(t, cfg)

	base := waitHTTPBase(t, ra)

	var report healthReport
	waitFor(t, 15*time.Second, func() error {
		code, body := httpGet(t, base+"/health")
		if code != http.StatusOK {
			return fmt.Errorf("/health = %d %s", code, body)
		}
		report = healthReport{}
		if err := json.Unmarshal([]byte(body), &report); err != nil {
			return fmt.Errorf("decoding /health %q: %v", body, err)
		}
		if !report.Leader {
			return fmt.Errorf("not leader yet: %s", body)
		}
		return nil
	})
	if !report.Registered || report.LastConsulContact == "" || report.ConsulError != "" {
		t.Fatalf("healthy report looks wrong: %+v", report)
	}
	if _, err := time.Parse(time.RFC3339, report.LastConsulContact); err != nil {
		t.Fatalf("last_consul_contact %q is not RFC3339: %v", report.LastConsulContact, err)
	}
	code, body := httpGet(t, base+"/health")
	for _, field := range []string{"leader", "registered", "assigned_nodes", "checks", "checks_passing", "probe_nodes", "last_consul_contact", "consul_error"} {
		if !strings.Contains(body, `"`+field+`"`) {
			t.Errorf("/health (%d) lacks field %q: %s", code, field, body)
		}
	}

	// The leader gauge, a pre-registered counter with its help text, runtime gauges from our collector
	// and the Go collector of the registry.
	waitFor(t, 10*time.Second, func() error {
		code, body := httpGet(t, base+"/metrics")
		if code != http.StatusOK {
			return fmt.Errorf("/metrics = %d", code)
		}
		for _, want := range []string{
			"esm_agent_isLeader 1",
			"# HELP esm_agent_isLeader Whether this ESM instance holds the leader lock",
			"esm_agents_healthy 1",
			"# TYPE check_txn counter",
			`esm_checks_results{status="critical"}`,
			"esm_consul_write_failures 0",
			"esm_checks_fetch_and_update_duration",
			"runtime_num_goroutines",
			"go_goroutines",
		} {
			if !strings.Contains(body, want) {
				return fmt.Errorf("/metrics lacks %q", want)
			}
		}
		return nil
	})

	for _, path := range []string{"/debug/pprof/", "/debug/pprof/cmdline", "/debug/pprof/goroutine?debug=1"} {
		if code, body := httpGet(t, base+path); code != http.StatusOK {
			t.Errorf("GET %s = %d %.200s", path, code, body)
		}
	}

	if err := srv.Stop(); err != nil {
		t.Logf("stopping consul: %v", err)
	}
	waitFor(t, 10*time.Second, func() error {
		code, body := httpGet(t, base+"/health")
		if code != http.StatusServiceUnavailable {
			return fmt.Errorf("/health = %d %s", code, body)
		}
		var r healthReport
		if err := json.Unmarshal([]byte(body), &r); err != nil {
			return err
		}
		if r.ConsulError == "" {
			return fmt.Errorf("503 without consul_error: %s", body)
		}
		return nil
	})

	if err := ra.stop(t); err != nil {
		t.Fatalf("Run returned %v", err)
	}
	if code, _ := httpGet(t, base+"/health"); code != 0 {
		t.Fatalf("HTTP interface still answers after the agent stopped (status %d)", code)
	}
}

// newTestAgent builds an agent that never runs (no Consul needed) for handler tests.
func newTestAgent(t *testing.T, mutate func(*Config)) (*Agent, *logBuffer) {
	t.Helper()
	cfg := DefaultConfig()
	cfg.HTTPAddr = "127.0.0.1:1" // never dialled
	cfg.TTLRefreshInterval = 300 * time.Millisecond
	if mutate != nil {
		mutate(cfg)
	}
	logger, logs := testLogger(hclog.Debug)
	a, err := NewAgent(cfg, logger, AgentOptions{})
	if err != nil {
		t.Fatalf("NewAgent: %v", err)
	}
	t.Cleanup(a.telemetry.Close)
	return a, logs
}

func TestTelemetryHealthRules(t *testing.T) {
	a, _ := newTestAgent(t, nil)
	now := time.Now()
	check := func(name string, wantHealthy bool) {
		t.Helper()
		r, healthy := a.health(now)
		if healthy != wantHealthy {
			t.Errorf("%s: healthy = %v, want %v (%+v)", name, healthy, wantHealthy, r)
		}
	}
	check("fresh agent", false)

	a.status.contact()
	check("contacted but not registered", false)

	a.status.setRegistered(true)
	check("registered and in contact", true)

	// One failed call (a rejected write, a query that timed out) shows in the body only: a
	// liveness probe must not restart an instance that still reaches Consul.
	a.status.failed(fmt.Errorf("connection refused"))
	check("error after the last contact", true)
	if r, _ := a.health(now); r.ConsulError != "connection refused" {
		t.Errorf("consul_error = %q", r.ConsulError)
	}

	a.status.contact()
	check("contact after the error", true)

	// The staleness window is max(3×TTLRefreshInterval, 5s): 5s here.
	a.status.lastContact.Store(now.Add(-4 * time.Second).UnixNano())
	check("contact 4s ago", true)
	a.status.lastContact.Store(now.Add(-6 * time.Second).UnixNano())
	check("contact 6s ago", false)

	a.status.contact()
	rec := httptest.NewRecorder()
	a.httpHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/health", nil))
	if rec.Code != http.StatusOK || rec.Header().Get("Content-Type") != "application/json" {
		t.Fatalf("/health = %d %q", rec.Code, rec.Header().Get("Content-Type"))
	}
	a.status.setRegistered(false)
	rec = httptest.NewRecorder()
	a.httpHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/health", nil))
	if rec.Code != http.StatusServiceUnavailable {
		t.Fatalf("/health unregistered = %d", rec.Code)
	}
}

// Without prometheus_retention_time /metrics shows the in-memory sink as JSON to people and a clear
// 404 to Prometheus; pprof is absent without enable_debug.
func TestTelemetryMetricsWithoutPrometheus(t *testing.T) {
	a, _ := newTestAgent(t, func(c *Config) { c.Telemetry.DisableHostname = true })
	metrics.SetGauge([]string{"esm", "agent", "isLeader"}, 1)
	h := a.httpHandler()

	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if rec.Code != http.StatusOK || !strings.Contains(rec.Body.String(), `"esm.agent.isLeader"`) {
		t.Fatalf("/metrics = %d %s", rec.Code, rec.Body.String())
	}
	var parsed map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &parsed); err != nil {
		t.Fatalf("/metrics is not JSON: %v", err)
	}

	for _, req := range []*http.Request{
		httptest.NewRequest(http.MethodGet, "/metrics?format=prometheus", nil),
		func() *http.Request {
			r := httptest.NewRequest(http.MethodGet, "/metrics", nil)
			r.Header.Set("Accept", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
			return r
		}(),
	} {
		rec = httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != http.StatusNotFound || !strings.Contains(rec.Body.String(), "prometheus_retention_time") {
			t.Errorf("Prometheus scrape without Prometheus = %d %s", rec.Code, rec.Body.String())
		}
	}

	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/debug/pprof/", nil))
	if rec.Code != http.StatusNotFound {
		t.Fatalf("pprof without enable_debug = %d", rec.Code)
	}
}

// gatherGauge returns the value and help of one gauge from the telemetry's registry.
func gatherGauge(t testing.TB, tel *telemetry, name string) (float64, string, bool) {
	t.Helper()
	return gatherMetric(t, tel, name, dto.MetricType_GAUGE)
}

// gatherCounter returns the value and help of one counter from the telemetry's registry.
func gatherCounter(t testing.TB, tel *telemetry, name string) (float64, string, bool) {
	t.Helper()
	return gatherMetric(t, tel, name, dto.MetricType_COUNTER)
}

func gatherMetric(t testing.TB, tel *telemetry, name string, typ dto.MetricType) (float64, string, bool) {
	t.Helper()
	mfs, err := tel.registry.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name || mf.GetType() != typ || len(mf.Metric) == 0 {
			continue
		}
		if typ == dto.MetricType_COUNTER {
			return mf.Metric[0].GetCounter().GetValue(), mf.GetHelp(), true
		}
		return mf.Metric[0].GetGauge().GetValue(), mf.GetHelp(), true
	}
	return 0, "", false
}

// With the hostname enabled (the default) gauges carry it, and so must the pre-registered series,
// or the help text would sit on a series that never moves. A dotted metrics_prefix must not break
// the sink's registration either.
func TestTelemetryPrometheusNames(t *testing.T) {
	host, err := os.Hostname()
	if err != nil || host == "" {
		t.Skip("no hostname")
	}
	cfg := DefaultConfig()
	cfg.Telemetry.PrometheusRetentionTime = time.Minute
	cfg.Telemetry.MetricsPrefix = "consul.esm"
	tel, err := newTelemetry(cfg, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer tel.Close()
	metrics.SetGauge([]string{"esm", "agent", "isLeader"}, 1)
	metrics.IncrCounter([]string{"coord", "txn"}, 1)

	flat := invalidPromNameChars.ReplaceAllString(strings.ReplaceAll(host, ".", "_"), "_")
	flat = strings.NewReplacer("-", "_", " ", "_", "=", "_", "/", "_").Replace(flat)
	name := "consul_esm_" + flat + "_esm_agent_isLeader"
	v, help, ok := gatherGauge(t, tel, name)
	if !ok || v != 1 || !strings.HasPrefix(help, "Whether this ESM instance") {
		t.Fatalf("%s = %v help %q found %v", name, v, help, ok)
	}
	if _, _, ok := gatherGauge(t, tel, "consul_esm_esm_agent_isLeader"); ok {
		t.Fatalf("a hostname-less isLeader series was registered next to the real one")
	}
	mfs, _ := tel.registry.Gather()
	found := false
	for _, mf := range mfs {
		if mf.GetName() == "consul_esm_coord_txn" {
			found = mf.Metric[0].GetCounter().GetValue() == 1
		}
	}
	if !found {
		t.Fatalf("counter consul_esm_coord_txn (no hostname for counters) missing or wrong")
	}
}

func TestTelemetryFilters(t *testing.T) {
	gaugeSet := func(tel *telemetry, key string) bool {
		for _, iv := range tel.inmem.Data() {
			iv.RLock()
			_, ok := iv.Gauges[key]
			iv.RUnlock()
			if ok {
				return true
			}
		}
		return false
	}
	for _, tc := range []struct {
		name          string
		filterDefault bool
		allow, block  []string
		wantLeader    bool
		wantRuntime   bool
	}{
		{"defaults keep everything", true, nil, nil, true, true},
		{"block a prefix", true, nil, []string{"esm.agent"}, false, true},
		{"allow list with filter_default=false", false, []string{"esm"}, nil, true, false},
		{"filter_default=false and no allow list drops all", false, nil, nil, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.Telemetry.DisableHostname = true
			cfg.Telemetry.FilterDefault = tc.filterDefault
			cfg.Telemetry.AllowedPrefixes, cfg.Telemetry.BlockedPrefixes = tc.allow, tc.block
			tel, err := newTelemetry(cfg, hclog.NewNullLogger())
			if err != nil {
				t.Fatal(err)
			}
			defer tel.Close()
			metrics.SetGauge([]string{"esm", "agent", "isLeader"}, 1)
			tel.metrics.EmitRuntimeStats()
			if got := gaugeSet(tel, "esm.agent.isLeader"); got != tc.wantLeader {
				t.Errorf("isLeader kept = %v, want %v", got, tc.wantLeader)
			}
			if got := gaugeSet(tel, "runtime.num_goroutines"); got != tc.wantRuntime {
				t.Errorf("runtime kept = %v, want %v", got, tc.wantRuntime)
			}
		})
	}
}

// TestTelemetryPushSinks checks statsd, statsite and dogstatsd (with tags) each receive a gauge on
// loopback listeners, and that metrics emitted after Close are dropped instead of panicking.
func TestTelemetryPushSinks(t *testing.T) {
	statsd, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer statsd.Close()
	dogstatsd, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer dogstatsd.Close()
	statsite, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer statsite.Close()
	statsiteLines := make(chan string, 100)
	go func() {
		conn, err := statsite.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		sc := bufio.NewScanner(conn)
		for sc.Scan() {
			statsiteLines <- sc.Text()
		}
	}()

	cfg := DefaultConfig()
	cfg.Telemetry.DisableHostname = true
	cfg.Telemetry.MetricsPrefix = "pfx"
	cfg.Telemetry.StatsdAddr = statsd.LocalAddr().String()
	cfg.Telemetry.StatsiteAddr = statsite.Addr().String()
	cfg.Telemetry.DogstatsdAddr = dogstatsd.LocalAddr().String()
	cfg.Telemetry.DogstatsdTags = []string{"env:test"}
	tel, err := newTelemetry(cfg, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer tel.Close()

	readUDP := func(pc net.PacketConn, want string) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		buf := make([]byte, 65536)
		var seen []string
		for time.Now().Before(deadline) {
			// go-metrics flushes statsd every 100ms; keep emitting until a packet carries the gauge.
			metrics.SetGauge([]string{"esm", "agent", "isLeader"}, 1)
			_ = pc.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			n, _, err := pc.ReadFrom(buf)
			if err != nil {
				continue
			}
			pkt := string(buf[:n])
			if strings.Contains(pkt, want) {
				return
			}
			seen = append(seen, pkt)
		}
		t.Fatalf("no packet with %q; saw %q", want, seen)
	}
	readUDP(statsd, "pfx.esm.agent.isLeader:1.000000|g")
	readUDP(dogstatsd, "pfx.esm.agent.isLeader:1|g|#env:test")

	deadline := time.After(5 * time.Second)
	for found := false; !found; {
		metrics.SetGauge([]string{"esm", "agent", "isLeader"}, 1)
		select {
		case line := <-statsiteLines:
			found = strings.Contains(line, "pfx.esm.agent.isLeader:1.000000|g")
		case <-time.After(200 * time.Millisecond):
		case <-deadline:
			t.Fatal("statsite received no isLeader gauge")
		}
	}

	tel.Close()
	tel.Close()
	metrics.SetGauge([]string{"esm", "agent", "isLeader"}, 0) // must not panic on closed queues
	metrics.IncrCounter([]string{"check", "txn"}, 1)
}

func TestTelemetryCirconusWarns(t *testing.T) {
	logs := &logBuffer{}
	cfg := DefaultConfig()
	cfg.Telemetry.CirconusAPIToken = "secret"
	tel, err := newTelemetry(cfg, hclog.New(&hclog.LoggerOptions{Output: logs}))
	if err != nil {
		t.Fatal(err)
	}
	defer tel.Close()
	if !strings.Contains(logs.String(), "[WARN]") || !strings.Contains(logs.String(), "Circonus telemetry is not supported") {
		t.Fatalf("no circonus warning: %q", logs.String())
	}
}

func TestTelemetryHTTPOpenFailure(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	a, logs := newTestAgent(t, func(c *Config) { c.ClientAddress = busy.Addr().String() })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.runHTTP(ctx); close(done) }()
	waitFor(t, 5*time.Second, func() error {
		if strings.Contains(logs.String(), "Failed to open http interface") {
			return nil
		}
		return errNotYet
	})
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("runHTTP did not return after cancel")
	}
}

// TestHealthIgnoresSingleFailedWrite: a check whose every write Consul refuses does not take
// /health to 503 (a liveness probe would restart an instance doing its job); the body and the
// metrics show the failures.
func TestHealthIgnoresSingleFailedWrite(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	tg := crNewTarget(t)
	big := crHTTPCheck("big", tg.URL+"/big", 200*time.Millisecond)
	big.Definition.Body = strings.Repeat("x", 600<<10)
	crRegister(t, srv.Client, "refused-node", "", big)
	cfg := testConfig(srv)
	cfg.ClientAddress = "127.0.0.1:0"
	ra := startAgent(t, cfg)
	base := waitHTTPBase(t, ra)

	refusedSince := time.Time{}
	waitFor(t, 15*time.Second, func() error {
		code, body := httpGet(t, base+"/health")
		var r healthReport
		if err := json.Unmarshal([]byte(body), &r); err != nil {
			return fmt.Errorf("%d %s: %w", code, body, err)
		}
		if r.WritesRefused == 0 {
			return fmt.Errorf("no refused write yet: %d %s", code, body)
		}
		if refusedSince.IsZero() {
			refusedSince = time.Now()
		}
		if code != http.StatusOK {
			t.Fatalf("/health = %d after a refused write of one check: %s", code, body)
		}
		if r.WritesRefused < 5 || r.WriteFailures < r.WritesRefused {
			return fmt.Errorf("refused %d, failures %d: waiting for more rounds", r.WritesRefused, r.WriteFailures)
		}
		return nil
	})
	t.Logf("/health stayed 200 for %s of refused writes", time.Since(refusedSince))
}
