package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/armon/go-metrics"
	"github.com/armon/go-metrics/datadog"
	prometheussink "github.com/armon/go-metrics/prometheus"
	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Telemetry timings. The in-memory sink keeps 10s intervals for a minute (what SIGUSR1 dumps), the
// runtime collector samples every second (go-metrics' default), and the HTTP server gets the
// original's 5s to finish in-flight requests on shutdown.
const (
	inmemInterval       = 10 * time.Second
	inmemRetain         = time.Minute
	runtimeStatsEvery   = time.Second
	httpShutdownTimeout = 5 * time.Second
	httpReadHeaderLimit = 10 * time.Second
	healthMinStaleAfter = 5 * time.Second
)

type metricKind int

const (
	gaugeMetric metricKind = iota
	counterMetric
	summaryMetric
)

// metricDef documents one metric this program emits. The Prometheus sink pre-registers every entry
// so each series exists (at zero) with its help text from the first scrape, which keeps rate()
// and absent() queries meaningful on a fresh instance.
type metricDef struct {
	key    []string
	kind   metricKind
	help   string
	labels []metrics.Label
}

// esmMetrics is the catalogue of metric keys (before metrics_prefix and, for gauges, the hostname
// are prepended). The first group carries the original's names and the original's pre-registered
// definitions; the second the original's other metrics, which it emitted without pre-registering;
// the third is ours.
var esmMetrics = []metricDef{
	{key: []string{"esm", "agent", "isLeader"}, kind: gaugeMetric, help: "Whether this ESM instance holds the leader lock (1) or not (0)."},
	{key: []string{"esm", "agents", "healthy"}, kind: gaugeMetric, help: "Number of healthy ESM instances the leader distributes work to (0 on non-leaders)."},
	{key: []string{"esm", "nodes", "monitored"}, kind: gaugeMetric, help: "Number of external nodes whose checks this instance runs."},
	{key: []string{"esm", "services", "monitored"}, kind: gaugeMetric, help: "Number of distinct node/service pairs among the checks this instance runs."},
	{key: []string{"esm", "checks", "fetch_and_update", "duration"}, kind: summaryMetric, help: "Time in ms to decode the assigned health checks and update the running set, once the blocking query returned (its wait is not counted)."},

	{key: []string{"esm", "checks", "count"}, kind: gaugeMetric, help: "Number of health checks this instance runs."},
	{key: []string{"esm", "checks", "healthy"}, kind: gaugeMetric, help: "Number of health checks run by this instance that are passing."},
	{key: []string{"esm", "checks", "unhealthy"}, kind: gaugeMetric, help: "Number of health checks run by this instance that are warning or critical."},
	{key: []string{"checks", "update"}, kind: summaryMetric, help: "Time in ms to reconcile the running checks with a new check list."},
	{key: []string{"check", "txn"}, kind: counterMetric, help: "Check status transactions sent to Consul."},
	{key: []string{"check", "txn", "retry"}, kind: counterMetric, help: "Check status transactions retried after a compare-and-set conflict."},
	{key: []string{"coord", "txn"}, kind: counterMetric, help: "Node health and coordinate transactions sent to Consul for probed nodes."},

	{key: []string{"esm", "checks", "results"}, kind: counterMetric, help: "Health check runs by result.", labels: []metrics.Label{{Name: "status", Value: "passing"}}},
	{key: []string{"esm", "checks", "results"}, kind: counterMetric, help: "Health check runs by result.", labels: []metrics.Label{{Name: "status", Value: "warning"}}},
	{key: []string{"esm", "checks", "results"}, kind: counterMetric, help: "Health check runs by result.", labels: []metrics.Label{{Name: "status", Value: "critical"}}},
	{key: []string{"esm", "checks", "latency"}, kind: summaryMetric, help: "Time in ms one health check probe took."},
	{key: []string{"esm", "consul", "write_failures"}, kind: counterMetric, help: "Check status writes given up after Consul rejected or failed them (retried from the next result)."},
	{key: []string{"esm", "agents", "assignment_oversize"}, kind: gaugeMetric, help: "Instances whose assignment the leader cannot write because it does not fit one Consul transaction (leader only)."},
	{key: []string{"esm", "checks", "write_refused"}, kind: counterMetric, help: "Check status writes Consul refused as such (a check too large for txn_max_req_len); each is sent alone and retried from the next result."},
	{key: []string{"esm", "probes", "monitored"}, kind: gaugeMetric, help: "Number of external nodes this instance pings."},
	{key: []string{"esm", "probes", "reachable"}, kind: gaugeMetric, help: "Number of pinged external nodes that answered their last probe."},
}

// telemetry owns the go-metrics pipeline of one agent: the global metrics instance, its sinks (always
// the in-memory sink; statsd, statsite, dogstatsd and Prometheus when configured), the SIGUSR1 dump
// and the Prometheus registry that /metrics serves. Close releases all of it.
type telemetry struct {
	logger  hclog.Logger
	metrics *metrics.Metrics
	inmem   *metrics.InmemSink
	signal  *metrics.InmemSignal
	sink    *guardedSink
	config  *metrics.Config // how keys are named (prefix, hostname)

	// registry is nil when Prometheus is disabled (prometheus_retention_time = 0). It is ours rather
	// than prometheus.DefaultRegisterer so that several agents in one process (tests) do not collide.
	registry *prometheus.Registry

	closeOnce sync.Once
}

// newTelemetry builds the sinks described by cfg.Telemetry and installs them as the go-metrics global,
// which every metrics.* call in the program writes to.
func newTelemetry(cfg *Config, logger hclog.Logger) (*telemetry, error) {
	tc := cfg.Telemetry
	mc := metrics.DefaultConfig(tc.MetricsPrefix)
	mc.EnableHostname = !tc.DisableHostname
	// The runtime collector is run by runHTTP instead, so it stops with the agent; go-metrics' own
	// collector goroutine never returns.
	mc.EnableRuntimeMetrics = false
	mc.FilterDefault = tc.FilterDefault
	mc.AllowedPrefixes = tc.AllowedPrefixes
	mc.BlockedPrefixes = tc.BlockedPrefixes

	t := &telemetry{logger: logger, inmem: metrics.NewInmemSink(inmemInterval, inmemRetain)}
	fanout := metrics.FanoutSink{t.inmem}
	// Sinks with a flush goroutine are shut down if a later sink fails, so nothing leaks.
	fail := func(err error) (*telemetry, error) {
		fanout.Shutdown()
		return nil, err
	}

	if tc.StatsdAddr != "" {
		s, err := metrics.NewStatsdSink(tc.StatsdAddr)
		if err != nil {
			return fail(fmt.Errorf("creating statsd sink for %q: %w", tc.StatsdAddr, err))
		}
		fanout = append(fanout, s)
	}
	if tc.StatsiteAddr != "" {
		s, err := metrics.NewStatsiteSink(tc.StatsiteAddr)
		if err != nil {
			return fail(fmt.Errorf("creating statsite sink for %q: %w", tc.StatsiteAddr, err))
		}
		fanout = append(fanout, s)
	}
	if tc.DogstatsdAddr != "" {
		s, err := datadog.NewDogStatsdSink(tc.DogstatsdAddr, mc.HostName)
		if err != nil {
			return fail(fmt.Errorf("creating dogstatsd sink for %q: %w", tc.DogstatsdAddr, err))
		}
		s.SetTags(tc.DogstatsdTags)
		fanout = append(fanout, s)
	}
	if tc.PrometheusRetentionTime > 0 {
		reg, s, err := newPrometheusSink(mc, tc)
		if err != nil {
			return fail(err)
		}
		t.registry = reg
		fanout = append(fanout, s)
	}
	if tc.circonusConfigured() {
		// The circonus-gometrics client starts a flush goroutine that can never be stopped and pulls
		// in an unmaintained HTTP stack; the keys are accepted so existing files still load.
		logger.Warn("Circonus telemetry is not supported in this build; the telemetry.circonus_* settings are ignored")
	}

	t.sink = &guardedSink{inner: fanout}
	t.config = mc
	m, err := metrics.NewGlobal(mc, t.sink)
	if err != nil {
		return fail(fmt.Errorf("initializing metrics: %w", err))
	}
	t.metrics = m
	// Registered now rather than in Run so SIGUSR1 never hits the default action (exit) while the
	// agent is still waiting for Consul.
	t.signal = metrics.DefaultInmemSignal(t.inmem)
	return t, nil
}

func (tc *TelemetryConfig) circonusConfigured() bool {
	for _, v := range []string{
		tc.CirconusAPIApp, tc.CirconusAPIToken, tc.CirconusAPIURL, tc.CirconusBrokerID,
		tc.CirconusBrokerSelectTag, tc.CirconusCheckDisplayName, tc.CirconusCheckForceMetricActivation,
		tc.CirconusCheckID, tc.CirconusCheckInstanceID, tc.CirconusCheckSearchTag, tc.CirconusCheckTags,
		tc.CirconusSubmissionInterval, tc.CirconusSubmissionURL,
	} {
		if v != "" {
			return true
		}
	}
	return false
}

var invalidPromNameChars = regexp.MustCompile(`[^a-zA-Z0-9_:]`)

// newPrometheusSink creates the Prometheus sink on a registry of its own (plus the Go and process
// collectors the default registry would have had), with every catalogued metric pre-registered.
func newPrometheusSink(mc *metrics.Config, tc TelemetryConfig) (*prometheus.Registry, metrics.MetricSink, error) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	opts := prometheussink.PrometheusOpts{
		Expiration: tc.PrometheusRetentionTime,
		Registerer: reg,
		// The sink name only labels a dummy descriptor; an invalid metric name there (a prefix with
		// dots, as the original allowed) would make registration fail.
		Name: "default_prometheus_sink",
	}
	if tc.MetricsPrefix != "" {
		opts.Name = invalidPromNameChars.ReplaceAllString(tc.MetricsPrefix, "_")
	}
	for _, d := range esmMetrics {
		name := emittedKey(mc, d)
		switch d.kind {
		case gaugeMetric:
			opts.GaugeDefinitions = append(opts.GaugeDefinitions, prometheussink.GaugeDefinition{Name: name, Help: d.help, ConstLabels: d.labels})
		case counterMetric:
			opts.CounterDefinitions = append(opts.CounterDefinitions, prometheussink.CounterDefinition{Name: name, Help: d.help, ConstLabels: d.labels})
		case summaryMetric:
			opts.SummaryDefinitions = append(opts.SummaryDefinitions, prometheussink.SummaryDefinition{Name: name, Help: d.help, ConstLabels: d.labels})
		}
	}
	sink, err := prometheussink.NewPrometheusSinkFrom(opts)
	if err != nil {
		return nil, nil, fmt.Errorf("creating prometheus sink: %w", err)
	}
	return reg, sink, nil
}

// emittedKey is the key go-metrics hands its sinks for d: [metrics_prefix, hostname (gauges only,
// unless disable_hostname), key...]. Pre-registering that exact series matters, or the help text
// would sit on a series that stays at zero forever next to the real one.
func emittedKey(mc *metrics.Config, d metricDef) []string {
	name := d.key
	if d.kind == gaugeMetric && mc.EnableHostname && mc.HostName != "" {
		name = append([]string{mc.HostName}, name...)
	}
	if mc.ServiceName != "" {
		name = append([]string{mc.ServiceName}, name...)
	}
	return name
}

// promName flattens a go-metrics key into a Prometheus metric name as the Prometheus sink does.
func promName(key []string) string {
	return invalidPromNameChars.ReplaceAllString(strings.Join(key, "_"), "_")
}

// Close stops the SIGUSR1 handler and shuts the sinks down (statsd/statsite/dogstatsd flush
// goroutines). Metrics emitted afterwards are dropped instead of panicking on a closed queue.
// It is idempotent.
func (t *telemetry) Close() {
	if t == nil {
		return
	}
	t.closeOnce.Do(func() {
		if t.signal != nil {
			t.signal.Stop()
		}
		t.sink.Shutdown()
	})
}

// guardedSink makes shutdown safe: go-metrics' statsd and statsite sinks panic when written after
// Shutdown (send on a closed channel), and a loop may still emit a last gauge while the agent stops.
type guardedSink struct {
	mu     sync.RWMutex
	closed bool
	inner  metrics.FanoutSink
}

func (g *guardedSink) emit(f func(metrics.MetricSink)) {
	g.mu.RLock()
	defer g.mu.RUnlock()
	if !g.closed {
		f(g.inner)
	}
}

func (g *guardedSink) SetGauge(key []string, val float32) {
	g.emit(func(s metrics.MetricSink) { s.SetGauge(key, val) })
}

func (g *guardedSink) SetGaugeWithLabels(key []string, val float32, labels []metrics.Label) {
	g.emit(func(s metrics.MetricSink) { s.SetGaugeWithLabels(key, val, labels) })
}

func (g *guardedSink) EmitKey(key []string, val float32) {
	g.emit(func(s metrics.MetricSink) { s.EmitKey(key, val) })
}

func (g *guardedSink) IncrCounter(key []string, val float32) {
	g.emit(func(s metrics.MetricSink) { s.IncrCounter(key, val) })
}

func (g *guardedSink) IncrCounterWithLabels(key []string, val float32, labels []metrics.Label) {
	g.emit(func(s metrics.MetricSink) { s.IncrCounterWithLabels(key, val, labels) })
}

func (g *guardedSink) AddSample(key []string, val float32) {
	g.emit(func(s metrics.MetricSink) { s.AddSample(key, val) })
}

func (g *guardedSink) AddSampleWithLabels(key []string, val float32, labels []metrics.Label) {
	g.emit(func(s metrics.MetricSink) { s.AddSampleWithLabels(key, val, labels) })
}

func (g *guardedSink) Shutdown() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return
	}
	g.closed = true
	g.inner.Shutdown()
}

// runHTTP owns the telemetry work that lives as long as Run: the runtime/probe gauge collector and,
// when client_address is set, the HTTP interface (/health, /metrics, /debug/pprof/*). It returns
// once both have stopped after ctx ends.
func (a *Agent) runHTTP(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Add(1)
	go func() {
		defer wg.Done()
		a.collectStats(ctx)
	}()

	addr := a.config().ClientAddress
	if addr == "" {
		return
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		a.logger.Error("Failed to open http interface", "address", addr, "error", err)
		return
	}
	bound := ln.Addr().String()
	srv := &http.Server{
		Handler:           a.httpHandler(),
		ReadHeaderTimeout: httpReadHeaderLimit,
		ErrorLog:          a.logger.StandardLogger(&hclog.StandardLoggerOptions{InferLevels: true}),
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.logger.Error("Failed to open http interface", "address", bound, "error", err)
		}
	}()
	a.logger.Info("Serving HTTP interface", "address", bound)

	<-ctx.Done()
	// ctx is already done, so the budget hangs off a fresh context.
	sctx, cancel := context.WithTimeout(context.Background(), httpShutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		a.logger.Error("Failed to shutdown http interface", "error", err)
		_ = srv.Close() // drop what is still running (e.g. a 30s CPU profile)
	}
}

// collectStats emits go-metrics' runtime gauges and our probe gauges every second until ctx ends.
func (a *Agent) collectStats(ctx context.Context) {
	every(ctx, runtimeStatsEvery, func(context.Context) {
		a.telemetry.metrics.EmitRuntimeStats()
		nodes, reachable := a.monitor.Stats()
		metrics.SetGauge([]string{"esm", "probes", "monitored"}, float32(nodes))
		metrics.SetGauge([]string{"esm", "probes", "reachable"}, float32(reachable))
	})
}

// httpHandler routes the operator endpoints. pprof is only exposed with enable_debug: profiles reveal
// internals and cost CPU, and the listener has no authentication.
func (a *Agent) httpHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/health", a.handleHealth)
	mux.Handle("/metrics", a.metricsHandler())
	if a.config().EnableDebug {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}

// healthReport is the /health body.
type healthReport struct {
	Leader            bool   `json:"leader"`
	Registered        bool   `json:"registered"`
	AssignedNodes     int    `json:"assigned_nodes"`
	Checks            int    `json:"checks"`
	ChecksPassing     int    `json:"checks_passing"`
	ProbeNodes        int    `json:"probe_nodes"`
	LastConsulContact string `json:"last_consul_contact"`
	ConsulError       string `json:"consul_error"`
	// WriteFailures and WritesRefused count check status writes given up since start (the
	// esm.consul.write_failures and esm.checks.write_refused metrics).
	WriteFailures   uint64 `json:"write_failures"`
	WritesRefused   uint64 `json:"writes_refused"`
	AssignmentError string `json:"assignment_error,omitempty"`
}

// health reports this instance's state and whether it is healthy: registered with Consul and a
// successful Consul call within the staleness window. A failed call (one rejected write, one
// timed-out query) shows in the body and in the metrics but does not make the instance unhealthy:
// a liveness probe would restart an instance that is doing its job.
func (a *Agent) health(now time.Time) (healthReport, bool) {
	s := a.status
	r := healthReport{Leader: s.leader.Load(), Registered: s.registered.Load()}
	r.AssignedNodes, r.Checks, r.ChecksPassing = a.runner.Stats()
	r.ProbeNodes, _ = a.monitor.Stats()
	var last time.Time
	if n := s.lastContact.Load(); n != 0 {
		last = time.Unix(0, n)
		r.LastConsulContact = last.UTC().Format(time.RFC3339)
	}
	if e := s.consulErr.Load(); e != nil {
		r.ConsulError = *e
	}
	if e := s.assignmentErr.Load(); e != nil {
		r.AssignmentError = *e
	}
	r.WriteFailures, r.WritesRefused = a.runner.WriteStats()
	// Three missed TTL refreshes mean Consul has been unreachable for longer than a blip; the floor
	// keeps short test intervals from flapping.
	staleAfter := max(3*a.config().TTLRefreshInterval, healthMinStaleAfter)
	healthy := r.Registered && !last.IsZero() && now.Sub(last) <= staleAfter
	return r, healthy
}

func (a *Agent) handleHealth(w http.ResponseWriter, _ *http.Request) {
	r, healthy := a.health(time.Now())
	body, err := json.Marshal(r)
	if err != nil { // cannot happen with these field types
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	if !healthy {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	_, _ = w.Write(append(body, '\n'))
}

// metricsHandler serves Prometheus text when prometheus_retention_time > 0. Otherwise it serves the
// in-memory sink as JSON (the shape of Consul's /v1/agent/metrics) so curl still shows current
// values, and answers Prometheus scrapers 404 with the reason, so a misconfigured scrape fails loudly.
func (a *Agent) metricsHandler() http.Handler {
	t := a.telemetry
	if t.registry != nil {
		return promhttp.HandlerFor(t.registry, promhttp.HandlerOpts{
			ErrorLog:      a.logger.StandardLogger(&hclog.StandardLoggerOptions{InferLevels: true}),
			ErrorHandling: promhttp.ContinueOnError,
		})
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if wantsPrometheus(r) {
			http.Error(w, "Prometheus metrics are disabled: set telemetry.prometheus_retention_time to enable them", http.StatusNotFound)
			return
		}
		summary, err := t.inmem.DisplayMetrics(w, r)
		if err != nil {
			http.Error(w, fmt.Sprintf("reading in-memory metrics: %v", err), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(summary)
	})
}

// wantsPrometheus recognizes a Prometheus scrape: ?format=prometheus (Consul's convention) or an
// Accept header naming the Prometheus text or OpenMetrics formats.
func wantsPrometheus(r *http.Request) bool {
	if r.URL.Query().Get("format") == "prometheus" {
		return true
	}
	accept := r.Header.Get("Accept")
	return strings.Contains(accept, "openmetrics") || strings.Contains(accept, "version=0.0.4")
}
