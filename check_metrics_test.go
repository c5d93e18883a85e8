package main

import (
	"bytes"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/armon/go-metrics"
	"github.com/hashicorp/consul/api"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
)

// The per-check series are named like every other gauge: metrics_prefix, then the host name unless
// disable_hostname.
func TestCheckCollectorNames(t *testing.T) {
	cases := []struct {
		name string
		mc   metrics.Config
		want string
	}{
		{"plain", metrics.Config{}, `"esm_check_status"`},
		{"host name", metrics.Config{EnableHostname: true, HostName: "esm-1.dc1"}, `"esm_1_dc1_esm_check_status"`},
		{"prefix and host name", metrics.Config{EnableHostname: true, HostName: "h", ServiceName: "consul.esm"}, `"consul_esm_h_esm_check_status"`},
		{"prefix only", metrics.Config{ServiceName: "myesm"}, `"myesm_esm_check_status"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := newCheckCollector(&tc.mc, nil)
			if got := c.status.String(); !strings.Contains(got, "fqName: "+tc.want) {
				t.Fatalf("desc %s, want fqName %s", got, tc.want)
			}
		})
	}
}

// TestCheckRunnerPerCheckMetrics: off by default; once telemetry.per_check_metrics is reloaded on,
// /metrics has every check's last probe duration and result, and a deregistered check's series are
// gone from the next scrape; reloaded off, they all go.
func TestCheckRunnerPerCheckMetrics(t *testing.T) {
	srv := newTestConsul(t)
	ok := crNewTarget(t)
	busy := crNewTarget(t)
	busy.code.Store(http.StatusTooManyRequests)
	r := crStart(t, srv, func(c *Config) {
		c.Telemetry.PrometheusRetentionTime = time.Minute
		c.Telemetry.DisableHostname = true
	}, nil)
	crRegister(t, srv.Client, "pcm-node", "web", crHTTPCheck("ok", ok.URL, 200*time.Millisecond))
	crRegister(t, srv.Client, "pcm-node", "web", crHTTPCheck("busy", busy.URL, 200*time.Millisecond))
	crRegister(t, srv.Client, "pcm-node", "web", catalogRegisterCheck{CheckID: "down", Status: statusPassing,
		Definition: withTiming(checkDefinition{TCP: closedTCPAddr(t)}, 200*time.Millisecond, time.Second)})
	r.SetNodes([]string{"pcm-node"})
	crWaitCheck(t, srv.Client, "pcm-node", "ok", 10*time.Second, crStatus(statusPassing, "200 OK"))
	crWaitCheck(t, srv.Client, "pcm-node", "down", 10*time.Second, crStatus(statusCritical, "connection refused"))
	if body := scrapeMetrics(t, r.agent); strings.Contains(body, "esm_check_") {
		t.Fatalf("per-check series without per_check_metrics:\n%s", grepLines(body, "esm_check_"))
	}

	reload := func(on bool) {
		cfg := *r.agent.config()
		cfg.Telemetry.PerCheckMetrics = on
		r.Reload(&cfg)
	}
	reload(true)
	for id, want := range map[string]float64{"ok": 0, "busy": 1, "down": 2} {
		waitSeries(t, r.agent, checkSeriesName("esm_check_status", "pcm-node", id), want, want)
		waitSeries(t, r.agent, checkSeriesName("esm_check_latency", "pcm-node", id), 0.001, 1000)
	}
	body := scrapeMetrics(t, r.agent)
	for _, want := range []string{
		"# HELP esm_check_status Result of the check's last probe, before anti-flapping thresholds: 0 passing, 1 warning, 2 critical",
		"# TYPE esm_check_latency gauge",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}

	if _, err := srv.Client.Catalog().Deregister(&api.CatalogDeregistration{Node: "pcm-node", CheckID: "down"}, nil); err != nil {
		t.Fatal(err)
	}
	crWaitRunning(t, r, 2)
	if body := scrapeMetrics(t, r.agent); strings.Contains(body, `check_id="down"`) {
		t.Fatalf("series of the deregistered check still on /metrics:\n%s", grepLines(body, `check_id="down"`))
	}

	reload(false)
	if body := scrapeMetrics(t, r.agent); strings.Contains(body, "esm_check_") {
		t.Fatalf("per-check series after per_check_metrics was turned off:\n%s", grepLines(body, "esm_check_"))
	}
}

// collectorRunner is a runner holding n checks whose last run is recorded, without scheduling any:
// what a scrape sees at steady state. tls makes every check carry a certificate expiry too.
func collectorRunner(n int, perCheck, tls bool) *CheckRunner {
	r := &CheckRunner{states: make(map[string]*checkState, n)}
	r.settings.Store(&runnerSettings{perCheckMetrics: perCheck})
	for i := range n {
		c := &catalogCheck{Node: fmt.Sprintf("node-%d", i/10), CheckID: fmt.Sprintf("service:web-%d", i)}
		task := &checkTask{}
		task.lastLatency.Store(int64(3 * time.Millisecond))
		task.lastStatus.Store(statusCode(statusPassing))
		if tls {
			task.certExpiry.Store(time.Now().Add(30 * 24 * time.Hour).Unix())
		}
		r.states[c.checkKey()] = &checkState{key: c.checkKey(), check: c, task: task}
	}
	return r
}

// BenchmarkCheckCollector10k measures one scrape of the per-check series of 10,000 checks (gather and
// text encoding) and reports the series and bytes it adds. Figures are in the README.
func BenchmarkCheckCollector10k(b *testing.B) {
	for _, tc := range []struct {
		name          string
		perCheck, tls bool
	}{
		{"off", false, false},
		{"per_check_metrics", true, false},
		{"per_check_metrics+tls", true, true},
	} {
		b.Run(tc.name, func(b *testing.B) {
			reg := prometheus.NewRegistry()
			reg.MustRegister(newCheckCollector(&metrics.Config{}, collectorRunner(10000, tc.perCheck, tc.tls)))
			var buf bytes.Buffer
			series := 0
			b.ReportAllocs()
			for b.Loop() {
				buf.Reset()
				mfs, err := reg.Gather()
				if err != nil {
					b.Fatal(err)
				}
				enc := expfmt.NewEncoder(&buf, expfmt.NewFormat(expfmt.TypeTextPlain))
				series = 0
				for _, mf := range mfs {
					series += len(mf.Metric)
					if err := enc.Encode(mf); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.ReportMetric(float64(series), "series")
			b.ReportMetric(float64(buf.Len()), "bytes/scrape")
		})
	}
}
