package main

import (
	"time"

	"github.com/armon/go-metrics"
	"github.com/prometheus/client_golang/prometheus"
)

// Per-check series, labelled by node and check ID. They are computed from the running checks at
// scrape time rather than pushed through go-metrics: go-metrics' Prometheus sink forgets a series only
// after prometheus_retention_time, so a deregistered check would go on reporting its certificate for
// that long, and the time left until expiry would be as old as the last run. Reading the runner's state
// at scrape time means a check that stops takes its series with it, and a run costs one atomic store.
// They exist only on the Prometheus /metrics endpoint: the push sinks (statsd, dogstatsd) have no
// notion of a series that ends.
var checkMetricDefs = struct {
	tlsExpiry metricDef
}{
	tlsExpiry: metricDef{key: []string{"esm", "check", "tls_expiry_seconds"}, kind: gaugeMetric,
		help: "Seconds until the leaf TLS certificate seen by the check's last handshake expires (negative once expired)."},
}

// checkLabels are the labels of every per-check series.
var checkLabels = []string{"node", "check_id"}

// checkCollector is the Prometheus collector of the per-check series.
type checkCollector struct {
	runner    *CheckRunner
	tlsExpiry *prometheus.Desc
}

func newCheckCollector(mc *metrics.Config, r *CheckRunner) *checkCollector {
	desc := func(d metricDef) *prometheus.Desc {
		return prometheus.NewDesc(promName(emittedKey(mc, d)), d.help, checkLabels, nil)
	}
	return &checkCollector{runner: r, tlsExpiry: desc(checkMetricDefs.tlsExpiry)}
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
}

// Collect emits one series per running check that has something to report. Two checks with the
// same node and check ID (possible only in different namespaces) would collide; the first one wins,
// since a registry refuses a scrape with duplicate series.
func (c *checkCollector) Collect(ch chan<- prometheus.Metric) {
	now := time.Now()
	seen := make(map[[2]string]struct{})
	for _, s := range c.runner.checkSeries() {
		exp := s.task.certExpiry.Load()
		if exp == 0 {
			continue
		}
		id := [2]string{s.node, s.checkID}
		if _, dup := seen[id]; dup {
			continue
		}
		seen[id] = struct{}{}
		left := time.Unix(exp, 0).Sub(now).Seconds()
		ch <- prometheus.MustNewConstMetric(c.tlsExpiry, prometheus.GaugeValue, left, s.node, s.checkID)
	}
}

// checkSeriesEntry is one running check as a scrape sees it.
type checkSeriesEntry struct {
	node, checkID string
	task          *checkTask
}

// checkSeries snapshots the running checks, so a scrape holds the runner's lock only for the copy.
func (r *CheckRunner) checkSeries() []checkSeriesEntry {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]checkSeriesEntry, 0, len(r.states))
	for _, st := range r.states {
		if st.task != nil {
			out = append(out, checkSeriesEntry{node: st.check.Node, checkID: st.check.CheckID, task: st.task})
		}
	}
	return out
}
