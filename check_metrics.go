package main

import (
	"time"

	"github.com/armon/go-metrics"
	"github.com/prometheus/client_golang/prometheus"
)

// Per-check series, labelled by node and check ID: the TLS certificate expiry of TLS checks (always,
// with Prometheus enabled) and, with telemetry.per_check_metrics, every check's last probe duration
// and result. They are computed from the running checks at scrape time rather than pushed through
// go-metrics: go-metrics' Prometheus sink forgets a series only after prometheus_retention_time, so a
// deregistered check would go on reporting its certificate for that long, and the time left until
// expiry would be as old as the last run. Reading the runner's state at scrape time means a check that
// stops takes its series with it, and a run costs an atomic store per value. They exist only on the
// Prometheus /metrics endpoint: the push sinks (statsd, dogstatsd) have no notion of a series that
// ends.
var checkMetricDefs = struct {
	tlsExpiry, latency, status metricDef
}{
	tlsExpiry: metricDef{key: []string{"esm", "check", "tls_expiry_seconds"}, kind: gaugeMetric,
		help: "Seconds until the leaf TLS certificate seen by the check's last handshake expires (negative once expired)."},
	latency: metricDef{key: []string{"esm", "check", "latency"}, kind: gaugeMetric,
		help: "Time in ms the check's last probe took (telemetry.per_check_metrics)."},
	status: metricDef{key: []string{"esm", "check", "status"}, kind: gaugeMetric,
		help: "Result of the check's last probe, before anti-flapping thresholds: 0 passing, 1 warning, 2 critical (telemetry.per_check_metrics)."},
}

// statusCode encodes a result for checkTask.lastStatus: its esm.check.status value plus one, so that
// zero means no run recorded yet.
func statusCode(status string) int32 {
	switch status {
	case statusPassing:
		return 1
	case statusWarning:
		return 2
	default:
		return 3
	}
}

// checkLabels are the labels of every per-check series.
var checkLabels = []string{"node", "check_id"}

// checkCollector is the Prometheus collector of the per-check series.
type checkCollector struct {
	runner                     *CheckRunner
	tlsExpiry, latency, status *prometheus.Desc
}

func newCheckCollector(mc *metrics.Config, r *CheckRunner) *checkCollector {
	desc := func(d metricDef) *prometheus.Desc {
		return prometheus.NewDesc(promName(emittedKey(mc, d)), d.help, checkLabels, nil)
	}
	return &checkCollector{runner: r, tlsExpiry: desc(checkMetricDefs.tlsExpiry),
		latency: desc(checkMetricDefs.latency), status: desc(checkMetricDefs.status)}
}

// registerCheckCollector adds the per-check series to /metrics when Prometheus is enabled.
func (t *telemetry) registerCheckCollector(r *CheckRunner) error {
	if t.registry == nil {
		return nil
	}
	return t.registry.Register(newCheckCollector(t.config, r))
}

func (c *checkCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.tlsExpiry
	ch <- c.latency
	ch <- c.status
}

// Collect emits the series of every running check that has something to report. Two checks with
// the same node and check ID (possible only in different namespaces) would collide; the first one
// wins, since a registry refuses a scrape with duplicate series.
func (c *checkCollector) Collect(ch chan<- prometheus.Metric) {
	now := time.Now()
	seen := make(map[[2]string]struct{})
	for _, s := range c.runner.checkSamples(c.runner.settings.Load().perCheckMetrics) {
		id := [2]string{s.node, s.checkID}
		if _, dup := seen[id]; dup {
			continue
		}
		seen[id] = struct{}{}
		if s.certExpiry != 0 {
			left := time.Unix(s.certExpiry, 0).Sub(now).Seconds()
			ch <- prometheus.MustNewConstMetric(c.tlsExpiry, prometheus.GaugeValue, left, s.node, s.checkID)
		}
		if s.status != 0 {
			ms := float64(s.latency) / float64(time.Millisecond)
			ch <- prometheus.MustNewConstMetric(c.latency, prometheus.GaugeValue, ms, s.node, s.checkID)
			ch <- prometheus.MustNewConstMetric(c.status, prometheus.GaugeValue, float64(s.status-1), s.node, s.checkID)
		}
	}
}

// checkSample is what a scrape reports of one running check.
type checkSample struct {
	node, checkID string
	certExpiry    int64 // checkTask.certExpiry
	status        int32 // checkTask.lastStatus (0 unless perCheck)
	latency       int64 // checkTask.lastLatency
}

// checkSamples copies the reportable state of the running checks, so a scrape holds the runner's lock
// only for the copy. Checks with nothing to report are skipped, so with neither TLS checks nor
// per_check_metrics a scrape costs one walk over the map and no allocation.
func (r *CheckRunner) checkSamples(perCheck bool) []checkSample {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []checkSample
	for _, st := range r.states {
		t := st.task
		if t == nil {
			continue
		}
		s := checkSample{node: st.check.Node, checkID: st.check.CheckID, certExpiry: t.certExpiry.Load()}
		if perCheck {
			s.status, s.latency = t.lastStatus.Load(), t.lastLatency.Load()
		}
		if s.certExpiry != 0 || s.status != 0 {
			out = append(out, s)
		}
	}
	return out
}
