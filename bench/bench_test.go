package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"
)

func TestPercentileNearestRank(t *testing.T) {
	vals := make([]float64, 100)
	for i := range vals {
		vals[i] = float64(i + 1)
	}
	for _, c := range []struct{ p, want float64 }{{50, 50}, {95, 95}, {99, 99}, {100, 100}, {0.1, 1}} {
		if got := percentile(vals, c.p); got != c.want {
			t.Errorf("p%v of 1..100 = %v, want %v", c.p, got, c.want)
		}
	}
	if got := percentile([]float64{7}, 99); got != 7 {
		t.Errorf("p99 of one value = %v, want 7", got)
	}
	if got := percentile(nil, 50); !math.IsNaN(got) {
		t.Errorf("p50 of nothing = %v, want NaN", got)
	}
	// Ten values: p95 and p99 are both the largest (rank ceil(9.5)=10).
	ten := []float64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	if got := percentile(ten, 95); got != 10 {
		t.Errorf("p95 of 1..10 = %v, want 10", got)
	}
}

func TestLatencies(t *testing.T) {
	base := time.Unix(1000, 0)
	start := []time.Time{base, base, base.Add(time.Second), base}
	seen := []time.Time{base.Add(2 * time.Second), base.Add(4 * time.Second), base.Add(2 * time.Second), {}}
	s := latencies(start, seen)
	if s.N != 3 || s.Missing != 1 {
		t.Fatalf("N=%d Missing=%d, want 3 and 1", s.N, s.Missing)
	}
	if s.P50 != 2 || s.Max != 4 || s.P99 != 4 {
		t.Errorf("p50=%v p99=%v max=%v, want 2 4 4", s.P50, s.P99, s.Max)
	}
	none := latencies([]time.Time{base}, []time.Time{{}})
	if !math.IsNaN(float64(none.P50)) || !math.IsNaN(float64(none.Max)) {
		t.Errorf("no latencies: p50=%v max=%v, want NaN", none.P50, none.Max)
	}
}

func TestNormalizeEndpoint(t *testing.T) {
	cases := map[string]string{
		"/v1/kv/consul-esm/agents/consul-esm:1234":  "/v1/kv/*",
		"/v1/kv/consul-esm/leader":                  "/v1/kv/*",
		"/v1/health/state/any":                      "/v1/health/state/any",
		"/v1/health/state/critical":                 "/v1/health/state/critical",
		"/v1/health/service/consul-esm":             "/v1/health/service/*",
		"/v1/health/node/web-1":                     "/v1/health/node/*",
		"/v1/agent/check/update/consul-esm:x:ttl":   "/v1/agent/check/update/*",
		"/v1/agent/check/register":                  "/v1/agent/check/register",
		"/v1/agent/service/register":                "/v1/agent/service/register",
		"/v1/agent/service/deregister/consul-esm:x": "/v1/agent/service/deregister/*",
		"/v1/agent/service/consul-esm:x":            "/v1/agent/service/*",
		"/v1/agent/self":                            "/v1/agent/self",
		"/v1/catalog/nodes":                         "/v1/catalog/nodes",
		"/v1/catalog/node/bench-node-00001":         "/v1/catalog/node/*",
		"/v1/catalog/service/consul":                "/v1/catalog/service/*",
		"/v1/session/renew/8f2a-11":                 "/v1/session/renew/*",
		"/v1/session/create":                        "/v1/session/create",
		"/v1/txn":                                   "/v1/txn",
		"/v1/status/leader":                         "/v1/status/leader",
		"/v1/coordinate/update":                     "/v1/coordinate/update",
		"/":                                         "/",
		"/metrics":                                  "/metrics",
	}
	for in, want := range cases {
		if got := normalizeEndpoint(in); got != want {
			t.Errorf("normalizeEndpoint(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestClassifyRequest(t *testing.T) {
	cases := []struct {
		method, url string
		key         string
		kind        string
	}{
		{"GET", "/v1/health/state/any?index=42&wait=45s&node-meta=external-node:true", "GET /v1/health/state/any (blocking)", kindBlocking},
		{"GET", "/v1/health/state/any?index=0&wait=45s", "GET /v1/health/state/any", kindRead},
		{"GET", "/v1/health/state/any", "GET /v1/health/state/any", kindRead},
		{"GET", "/v1/kv/esm/agents/x?index=7", "GET /v1/kv/* (blocking)", kindBlocking},
		{"PUT", "/v1/txn", "PUT /v1/txn", kindWrite},
		{"PUT", "/v1/kv/esm/leader?acquire=abc", "PUT /v1/kv/*", kindWrite},
		{"PUT", "/v1/agent/check/update/consul-esm:x:agent-ttl", "PUT /v1/agent/check/update/*", kindLiveness},
		{"PUT", "/v1/session/renew/abc", "PUT /v1/session/renew/*", kindLiveness},
		{"DELETE", "/v1/kv/esm/agents/x", "DELETE /v1/kv/*", kindWrite},
	}
	for _, c := range cases {
		u, err := url.Parse(c.url)
		if err != nil {
			t.Fatal(err)
		}
		k := classifyRequest(c.method, u)
		if k.String() != c.key || k.kind() != c.kind {
			t.Errorf("%s %s: key %q kind %q, want %q %q", c.method, c.url, k, k.kind(), c.key, c.kind)
		}
	}
}

func TestRequestCountsArithmetic(t *testing.T) {
	blocking := endpointKey{"GET", "/v1/health/state/any", true}
	txn := endpointKey{"PUT", "/v1/txn", false}
	ttl := endpointKey{"PUT", "/v1/agent/check/update/*", false}
	before := requestCounts{blocking: {10, 0, 1000}, txn: {5, 500, 50}}
	after := requestCounts{blocking: {16, 0, 1600}, txn: {5, 500, 50}, ttl: {4, 0, 0}}
	d := after.sub(before)
	if len(d) != 2 || d[blocking].Requests != 6 || d[ttl].Requests != 4 {
		t.Fatalf("sub = %v", d)
	}
	if d.total() != 10 {
		t.Errorf("total = %d, want 10", d.total())
	}
	k := d.byKind()
	if k[kindBlocking] != 6 || k[kindLiveness] != 4 || k[kindWrite] != 0 {
		t.Errorf("byKind = %v", k)
	}
	rates := d.rates(2 * time.Second)
	if rates[0].Endpoint != blocking.String() || rates[0].PerSecond != 3 || rates[0].BytesOutSec != 300 {
		t.Errorf("rates[0] = %+v", rates[0])
	}
}

func TestProxyCountsByEndpoint(t *testing.T) {
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "0123456789")
	}))
	defer upstream.Close()
	p, err := startProxy(strings.TrimPrefix(upstream.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer p.close()
	do := func(method, path string) {
		req, _ := http.NewRequest(method, "http://"+p.addr()+path, strings.NewReader("body"))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != "0123456789" {
			t.Fatalf("%s %s through the proxy: %q", method, path, b)
		}
	}
	do("GET", "/v1/health/state/any?index=3")
	do("GET", "/v1/health/state/any?index=4")
	do("PUT", "/v1/txn")
	snap := p.snapshot()
	if c := snap[endpointKey{"GET", "/v1/health/state/any", true}]; c.Requests != 2 || c.BytesOut != 20 {
		t.Errorf("blocking health/state/any: %+v", c)
	}
	if c := snap[endpointKey{"PUT", "/v1/txn", false}]; c.Requests != 1 || c.BytesIn != 4 {
		t.Errorf("txn: %+v", c)
	}
}

func TestLayout(t *testing.T) {
	o, err := parseOptions([]string{"-nodes", "7", "-checks", "10", "-tcp-frac", "0.2", "-tcp-ports", "3"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	l := newLayout(o)
	if l.total() != 70 || l.httpChecks() != 56 || l.tcpChecks() != 14 {
		t.Fatalf("total %d http %d tcp %d", l.total(), l.httpChecks(), l.tcpChecks())
	}
	seen := map[int]bool{}
	for i := 0; i < l.nodes; i++ {
		for j := 0; j < l.perNode; j++ {
			if !l.isHTTP(j) {
				if p := l.tcpPort(i, j); p < 0 || p >= 3 {
					t.Errorf("tcpPort(%d,%d) = %d", i, j, p)
				}
				continue
			}
			id := l.httpID(i, j)
			if seen[id] {
				t.Errorf("http id %d used twice", id)
			}
			seen[id] = true
			if got := l.httpCheckIndex(id); got != i*l.perNode+j {
				t.Errorf("httpCheckIndex(%d) = %d, want %d", id, got, i*l.perNode+j)
			}
		}
	}
	if j, ok := parseCheckID(checkID(9)); !ok || j != 9 {
		t.Errorf("parseCheckID(checkID(9)) = %d %v", j, ok)
	}
	if _, ok := parseCheckID("serfHealth"); ok {
		t.Error("parseCheckID accepted serfHealth")
	}
}

func TestParseOptions(t *testing.T) {
	o, err := parseOptions([]string{"-size", "10k"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.Nodes != 1000 || o.ChecksPerNode != 10 || o.Rounds != 1 || o.tcpPerNode() != 2 {
		t.Errorf("10k: %d x %d, rounds %d, tcp/node %d", o.Nodes, o.ChecksPerNode, o.Rounds, o.tcpPerNode())
	}
	if o.FirstWriteTimeout != 5*time.Minute || o.ChangeTimeout != 3*time.Minute || o.Interval != 10*time.Second {
		t.Errorf("timeouts %s %s, interval %s", o.FirstWriteTimeout, o.ChangeTimeout, o.Interval)
	}
	o, err = parseOptions([]string{"-size", "50k", "-compare", "/x", "-tcp-frac", "0"}, io.Discard)
	if err != nil || o.Nodes != 5000 || o.Rounds != 2 || o.tcpPerNode() != 0 {
		t.Errorf("50k compare: %+v %v", o, err)
	}
	for _, bad := range [][]string{{"-size", "2k"}, {"-interval", "500ms"}, {"-fail-mode", "drop"}, {"-tcp-frac", "2"}, {"extra"}} {
		if _, err := parseOptions(bad, io.Discard); err == nil {
			t.Errorf("%v: no error", bad)
		}
	}
}

func TestProcReading(t *testing.T) {
	rss, err := parseVmRSS([]byte("Name:\tx\nVmHWM:\t  900 kB\nVmRSS:\t   1234 kB\nThreads: 3\n"))
	if err != nil || rss != 1234*1024 {
		t.Errorf("parseVmRSS = %d, %v", rss, err)
	}
	if _, err := parseVmRSS([]byte("Name:\tx\n")); err == nil {
		t.Error("parseVmRSS without VmRSS: no error")
	}
	s, err := readProc(os.Getpid())
	if err != nil || s.RSS <= 0 || s.CPU < 0 {
		t.Errorf("readProc(self) = %+v, %v", s, err)
	}
	a := procSample{At: time.Unix(0, 0), CPU: time.Second}
	b := procSample{At: time.Unix(10, 0), CPU: 3 * time.Second}
	if got := cpuCores(a, b); got != 0.2 {
		t.Errorf("cpuCores = %v, want 0.2", got)
	}
}

func TestESMConfig(t *testing.T) {
	c := esmConfig("127.0.0.1:21000", "consul-esm-bench/A1/", "")
	for _, want := range []string{`log_level = "WARN"`, `http_addr = "127.0.0.1:21000"`, `consul_kv_path = "consul-esm-bench/A1/"`} {
		if !strings.Contains(c, want) {
			t.Errorf("config lacks %s:\n%s", want, c)
		}
	}
	if strings.Contains(c, "check_update_interval") || strings.Contains(c, "client_address") {
		t.Errorf("config sets a key the original rejects or that adds work:\n%s", c)
	}
	if c := esmConfig("a", "b/", "0s"); !strings.Contains(c, `check_update_interval = "0s"`) {
		t.Errorf("check_update_interval not written:\n%s", c)
	}
}

func TestTargetFlips(t *testing.T) {
	tg, err := startTarget(3, 1, false)
	if err != nil {
		t.Fatal(err)
	}
	defer tg.close()
	get := func(id int) int {
		resp, err := (&http.Client{Transport: &http.Transport{DisableKeepAlives: true}}).Get(tg.httpURL(id))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := get(1); code != 200 {
		t.Errorf("healthy target: %d", code)
	}
	tg.setHTTPHealthy(1, false)
	if code := get(1); code != 503 {
		t.Errorf("failing target: %d", code)
	}
	if code := get(2); code != 200 {
		t.Errorf("other target: %d", code)
	}
	dial := func() error {
		c, err := net.DialTimeout("tcp", tg.tcpAddr(0), time.Second)
		if err == nil {
			c.Close()
		}
		return err
	}
	// The accept loop counts a connection after the dial returns: wait for it.
	waitTCPHits := func(n int64) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for tg.tcp[0].hits.Load() < n {
			if time.Now().After(deadline) {
				t.Fatalf("TCP hits %d, want %d", tg.tcp[0].hits.Load(), n)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	if err := dial(); err != nil {
		t.Errorf("healthy TCP port: %v", err)
	}
	waitTCPHits(1)
	if err := tg.setAllHealthy(false); err != nil {
		t.Fatal(err)
	}
	if err := dial(); err == nil {
		t.Error("failing TCP port accepted a connection")
	}
	if code := get(0); code != 503 {
		t.Errorf("all failing: %d", code)
	}
	if err := tg.setAllHealthy(true); err != nil {
		t.Fatal(err)
	}
	if err := dial(); err != nil {
		t.Errorf("recovered TCP port: %v", err)
	}
	waitTCPHits(2)
	if h, tcp := tg.hits(); h != 4 || tcp != 2 {
		t.Errorf("hits: http %d tcp %d, want 4 and 2", h, tcp)
	}
	if c := tg.httpHitCounts(); c[0] != 1 || c[1] != 2 || c[2] != 1 {
		t.Errorf("per-id hits %v", c)
	}
}

// sampleReport is a two-binary report as runBenchmark builds it, without running anything.
func sampleReport() *report {
	run := func(label string, round int, cpu float64, p99 float64) *runResult {
		return &runResult{
			Label: label, Round: round, Checks: 1000, ScheduledPerSec: 100,
			RegisterSeconds: 1, FirstWriteSeconds: 9.5, FirstWritten: 1000,
			ESMPeakRSSBytes: 50e6, ESMBytesPerCheck: 50e3,
			Steady: &steadyResult{
				Seconds: 60, ESMCPUCores: num(cpu), ESMPeakRSSBytes: 40e6, ESMEndRSSBytes: 39e6,
				ChecksPerSec: 99.5, ExecutedRatio: 0.995, HTTPChecksNotRun: 0, RequestsPerSec: 0.5,
				PerKind:   map[string]num{kindBlocking: 0.3, kindRead: 0.1, kindLiveness: 0.1, kindWrite: 0},
				Endpoints: []endpointRate{{Endpoint: "GET /v1/health/state/any (blocking)", Kind: kindBlocking, Requests: 18, PerSecond: 0.3}},
			},
			Flip: &transitionResult{FloorSeconds: 12,
				Fail:    changeResult{Checks: 100, Latency: latencyStats{N: 100, P50: 5, P95: 9.5, P99: num(p99), Max: num(p99)}, RequestsPerChange: 1, WritesPerChange: 1},
				Recover: changeResult{Checks: 100, Latency: latencyStats{N: 100, P50: 5, P95: 9.5, P99: num(p99 - 1), Max: num(p99)}, RequestsPerChange: unknown(), WritesPerChange: 1},
			},
		}
	}
	rep := &report{
		Settings: settings{Size: "1k", Nodes: 100, ChecksPerNode: 10, Checks: 1000, HTTPChecks: 800, TCPChecks: 200, TCPPorts: 16, IntervalSeconds: 10, TimeoutSeconds: 2, WindowSeconds: 60, Flip: 100, FailMode: "503"},
		Env:      environment{CPUs: 2, Consul: "Consul v1.22.7"},
		Binaries: []binaryInfo{{"A", "bin/consul-esm", "consul-esm v1"}, {"B", "/old/consul-esm", "consul-esm v0.10"}},
		Runs:     []*runResult{run("A", 1, 0.04, 10), run("B", 1, 0.2, 11), run("A", 2, 0.06, 10), run("B", 2, 0.2, 11)},
	}
	rep.Runs[3].Error = "consul-esm exited unexpectedly"
	rep.Runs[3].Steady, rep.Runs[3].Flip = nil, nil
	rep.Summary = summarize(rep)
	o, _ := parseOptions(nil, io.Discard)
	rep.Goals = judgeGoals(rep, o)
	return rep
}

func TestSummaryMeansAndRatios(t *testing.T) {
	rep := sampleReport()
	if v := summaryValue(rep.Summary, "steady_esm_cpu_cores", "A"); math.Abs(v-0.05) > 1e-9 {
		t.Errorf("A's CPU mean = %v, want 0.05", v)
	}
	if v := summaryValue(rep.Summary, "steady_esm_cpu_cores", "B"); v != 0.2 {
		t.Errorf("B's CPU mean over its one finished run = %v, want 0.2", v)
	}
	for _, row := range rep.Summary {
		if row.Key == "steady_esm_cpu_cores" && math.Abs(float64(*row.Ratio)-0.25) > 1e-9 {
			t.Errorf("A/B CPU = %v, want 0.25", *row.Ratio)
		}
	}
	if v := summaryValue(rep.Summary, "outage_fail_p99_seconds", "A"); !math.IsNaN(v) {
		t.Errorf("outage not run but figure = %v", v)
	}
	goals := map[string]goalResult{}
	for _, g := range rep.Goals {
		goals[g.Goal] = g
	}
	if g := goals["steady ESM CPU, A / B"]; g.Passed == nil || !*g.Passed || math.Abs(float64(g.Value)-0.25) > 1e-9 {
		t.Errorf("CPU goal against B: %+v", g)
	}
	if g := goals["steady ESM CPU / floor CPU"]; g.Passed != nil {
		t.Errorf("floor goal judged without a floor run: %+v", g)
	}
	rep.Floor = &floorResult{CPUCores: 0.04}
	rep.Goals = judgeGoals(rep, options{Interval: 10 * time.Second})
	for _, g := range rep.Goals {
		if g.Goal == "steady ESM CPU / floor CPU" && (g.Passed == nil || !*g.Passed || math.Abs(float64(g.Value)-1.25) > 1e-9) {
			t.Errorf("floor goal: %+v", g)
		}
	}
	if g := goals["checks executed / scheduled (%)"]; g.Passed == nil || !*g.Passed {
		t.Errorf("executed goal: %+v", g)
	}
	if g := goals["outage: every check critical after (s)"]; g.Passed != nil {
		t.Errorf("outage goal judged without an outage phase: %+v", g)
	}
}

func TestPrintReport(t *testing.T) {
	var buf bytes.Buffer
	printReport(&buf, sampleReport())
	out := buf.String()
	for _, want := range []string{
		"A = bin/consul-esm (consul-esm v1)",
		"runs: A1 B1 A2 B2",
		"run B2 FAILED: consul-esm exited unexpectedly",
		"steady state\n",
		"flip K targets to failing\n",
		"GET /v1/health/state/any (blocking)",
		"they are set for 10k HTTP checks at 10s",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
	// Columns line up: the CPU row ends with A's mean, B's mean and the ratio.
	var cpuLine string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "  ESM CPU ") && cpuLine == "" {
			cpuLine = l
		}
	}
	if f := strings.Fields(cpuLine); len(f) < 4 || strings.Join(f[len(f)-4:], " ") != "cores 0.050 0.200 0.250" {
		t.Errorf("CPU row %q", cpuLine)
	}
	if !strings.Contains(out, "detection latency p99") {
		t.Errorf("no latency rows:\n%s", out)
	}
}

func TestJSONReport(t *testing.T) {
	rep := sampleReport()
	path := t.TempDir() + "/sub/out.json"
	if err := writeJSON(path, rep); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var back map[string]any
	if err := json.Unmarshal(data, &back); err != nil {
		t.Fatalf("invalid JSON: %v", err)
	}
	runs := back["runs"].([]any)
	flip := runs[0].(map[string]any)["flip"].(map[string]any)
	if v := flip["recover"].(map[string]any)["requests_per_change"]; v != nil {
		t.Errorf("unknown figure encoded as %v, want null", v)
	}
	if v := runs[0].(map[string]any)["steady"].(map[string]any)["esm_cpu_cores"]; v != 0.04 {
		t.Errorf("esm_cpu_cores = %v", v)
	}
	var n num
	if err := json.Unmarshal([]byte("null"), &n); err != nil || !math.IsNaN(float64(n)) {
		t.Errorf("null -> %v, %v", n, err)
	}
}

func TestWaitProgress(t *testing.T) {
	ctx := context.Background()
	n := 0
	grow := func() (int, error) { n++; return n, nil }
	if err := waitProgress(ctx, 3, time.Second, 5*time.Second, grow); err != nil {
		t.Errorf("growing count: %v", err)
	}
	stuck := func() (int, error) { return 1, nil }
	if err := waitProgress(ctx, 3, 250*time.Millisecond, 5*time.Second, stuck); !errors.Is(err, errStalled) {
		t.Errorf("stuck count: %v, want errStalled", err)
	}
	slow := func() (int, error) { n++; return n, nil }
	n = 0
	if err := waitProgress(ctx, 1000, time.Second, 300*time.Millisecond, slow); !errors.Is(err, errTimeout) {
		t.Errorf("slow count: %v, want errTimeout", err)
	}
	boom := errors.New("boom")
	if err := waitProgress(ctx, 3, time.Second, time.Second, func() (int, error) { return 0, boom }); !errors.Is(err, boom) {
		t.Errorf("failing count: %v", err)
	}
}

func TestFormatValue(t *testing.T) {
	for v, want := range map[float64]string{0: "0", 0.00123: "0.0012", 0.0456: "0.046", 1.234: "1.23", 12.34: "12.3", 1234.5: "1234", math.NaN(): "-", math.Inf(1): "inf"} {
		if got := formatValue(v); got != want {
			t.Errorf("formatValue(%v) = %q, want %q", v, got, want)
		}
	}
	if got := fmt.Sprint(ratio(0, 0), ratio(1, 0)); got != "1 +Inf" {
		t.Errorf("ratio edge cases: %s", got)
	}
}

// TestReadmeDocumentsEveryFlag keeps the README's Benchmark section in step with the flags (it skips
// while the README has no such section).
func TestReadmeDocumentsEveryFlag(t *testing.T) {
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Skip(err)
	}
	_, section, ok := strings.Cut(string(b), "\n## Benchmark\n")
	if !ok {
		t.Skip("README has no Benchmark section yet")
	}
	if end := strings.Index(section, "\n## "); end >= 0 {
		section = section[:end]
	}
	var o options
	newFlagSet(&o, io.Discard).VisitAll(func(f *flag.Flag) {
		if !strings.Contains(section, "`-"+f.Name+"`") {
			t.Errorf("README Benchmark section does not document -%s", f.Name)
		}
	})
}
