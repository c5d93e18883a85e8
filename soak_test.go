package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/consul/sdk/freeport"
)

// TestSoak runs the consul-esm binary for a long time (10 minutes by default) with 10,000 HTTP checks
// against a dev Consul and samples it every 30 seconds: resident memory, Go heap, goroutines, CPU,
// how many checks missed their interval (last run older than two intervals), how many runs happened
// against how many were due (1.00: every check exactly once per interval), how many new connections
// the targets accepted (keep-alive reuse keeps this near 0), and whether the health changes made
// during the previous period reached the catalog. It prints the curves as a table.
//
// It is not part of `make test`: run it with `make soak` (ESM_SOAK=1). Knobs: ESM_SOAK_DURATION (a Go
// duration, default 10m) and ESM_SOAK_CHECKS (default 10000, in nodes of 10 checks).
func TestSoak(t *testing.T) {
	if os.Getenv("ESM_SOAK") != "1" {
		t.Skip("soak test: run with ESM_SOAK=1 (make soak)")
	}
	const (
		checksPerNode = 10
		interval      = 10 * time.Second
		samplePeriod  = 30 * time.Second
		flipsPerRound = 100 // checks whose target changes health each sample period
		targets       = 4   // target servers; consul-esm allows 32 concurrent probes per target
	)
	duration := 10 * time.Minute
	if v := os.Getenv("ESM_SOAK_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < samplePeriod {
			t.Fatalf("ESM_SOAK_DURATION=%q: want a Go duration of at least %s", v, samplePeriod)
		}
		duration = d
	}
	total := 10000
	if v := os.Getenv("ESM_SOAK_CHECKS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < checksPerNode {
			t.Fatalf("ESM_SOAK_CHECKS=%q: want a number >= %d", v, checksPerNode)
		}
		total = n
	}
	nodes := total / checksPerNode
	total = nodes * checksPerNode
	if dl, ok := t.Deadline(); ok && time.Until(dl) < duration+5*time.Minute {
		t.Fatalf("-timeout leaves %s; the soak needs its duration (%s) plus ~5m of setup", time.Until(dl).Round(time.Second), duration)
	}

	srv := newTestConsul(t)
	st := newSoakTargets(t, total, targets)
	t.Logf("registering %d external nodes with %d HTTP checks each (interval %s)", nodes, checksPerNode, interval)
	regStart := time.Now()
	soakRegister(t, srv.Client, nodes, checksPerNode, interval, st)
	t.Logf("registered %d checks in %s", total, time.Since(regStart).Round(time.Millisecond))

	esm := startSoakESM(t, srv.HTTPAddr)

	// Warm-up: every check has run and the catalog shows all of them passing.
	warmStart := time.Now()
	var lastErr error
	for {
		lastErr = nil
		if n := st.neverRun(); n > 0 {
			lastErr = fmt.Errorf("%d checks never ran", n)
		} else if wrong, err := soakWrongStatuses(srv.Client, st); err != nil || wrong > 0 {
			lastErr = fmt.Errorf("%d checks not passing in the catalog (%v)", wrong, err)
		}
		if lastErr == nil {
			break
		}
		if time.Since(warmStart) > 5*time.Minute {
			t.Fatalf("warm-up not done after 5m: %v\nconsul-esm log tail:\n%s", lastErr, esm.logTail())
		}
		time.Sleep(time.Second)
	}
	t.Logf("warm-up: all %d checks ran and are passing in the catalog %s after consul-esm started",
		total, time.Since(esm.started).Round(time.Millisecond))

	type sample struct {
		at                    time.Duration
		rss, heap, sys        int64
		goroutines            int
		cpu                   float64 // share of one core over the period
		missed                int
		newConns              int64
		runRatio              float64
		flipped, flipsPending int
	}
	var samples []sample
	header := fmt.Sprintf("%8s %8s %8s %8s %10s %6s %7s %9s %9s %8s %11s",
		"elapsed", "rss_MB", "heap_MB", "sys_MB", "goroutines", "cpu%", "missed", "run_ratio", "new_conns", "flipped", "not_written")
	row := func(s sample) string {
		return fmt.Sprintf("%8s %8.1f %8.1f %8.1f %10d %6.1f %7d %9.3f %9d %8d %11d",
			s.at.Round(time.Second), float64(s.rss)/(1<<20), float64(s.heap)/(1<<20), float64(s.sys)/(1<<20),
			s.goroutines, 100*s.cpu, s.missed, s.runRatio, s.newConns, s.flipped, s.flipsPending)
	}
	t.Log(header)

	soakStart := time.Now()
	prevAt, prevRuns, prevCPU, prevConns := soakStart, st.totalRuns(), esm.cpuTime(t), st.conns.Load()
	round := 0
	lastFlipped := 0
	for time.Since(soakStart) < duration {
		// The point of the test: sample at a fixed period for a long time.
		time.Sleep(time.Until(prevAt.Add(samplePeriod)))
		now := time.Now()
		runs, cpu, conns := st.totalRuns(), esm.cpuTime(t), st.conns.Load()
		s := sample{at: now.Sub(soakStart), rss: esm.rss(t), missed: st.missed(now, 2*interval), flipped: lastFlipped,
			newConns: conns - prevConns}
		s.heap, s.sys, s.goroutines = esm.runtimeStats(t)
		s.cpu = float64(cpu-prevCPU) / float64(now.Sub(prevAt))
		due := float64(total) * float64(now.Sub(prevAt)) / float64(interval)
		s.runRatio = float64(runs-prevRuns) / due
		// The changes made a full period (three intervals) ago must all be in the catalog by now.
		wrong, err := soakWrongStatuses(srv.Client, st)
		if err != nil {
			t.Errorf("reading the catalog: %v", err)
		}
		s.flipsPending = wrong
		samples = append(samples, s)
		t.Log(row(s))
		prevAt, prevRuns, prevCPU, prevConns = now, runs, cpu, conns

		// Flip the next batch: half of it changes to failing, the half flipped last time back.
		lastFlipped = st.flip(round*flipsPerRound%total, flipsPerRound)
		round++
	}

	var b strings.Builder
	fmt.Fprintf(&b, "soak: %d checks every %s for %s, sampled every %s\n%s\n", total, interval, duration, samplePeriod, header)
	for _, s := range samples {
		b.WriteString(row(s) + "\n")
	}
	t.Log("\n" + b.String())

	// Verdicts: nothing missed or left unwritten at any sample, and no growth that looks like a leak.
	first, last := samples[0], samples[len(samples)-1]
	for _, s := range samples {
		if s.missed > 0 {
			t.Errorf("at %s: %d checks missed their interval (no run for 2 x %s)", s.at.Round(time.Second), s.missed, interval)
		}
		if s.flipsPending > 0 {
			t.Errorf("at %s: %d checks' health changes not in the catalog after %s", s.at.Round(time.Second), s.flipsPending, samplePeriod)
		}
		if s.runRatio < 0.97 || s.runRatio > 1.03 {
			t.Errorf("at %s: %.3f runs per due run", s.at.Round(time.Second), s.runRatio)
		}
	}
	if len(samples) >= 4 {
		if last.goroutines > first.goroutines+first.goroutines/2+50 {
			t.Errorf("goroutines grew from %d to %d", first.goroutines, last.goroutines)
		}
		if last.heap > 2*first.heap+32<<20 {
			t.Errorf("heap grew from %.1f MB to %.1f MB", float64(first.heap)/(1<<20), float64(last.heap)/(1<<20))
		}
		if last.rss > 2*first.rss {
			t.Errorf("RSS grew from %.1f MB to %.1f MB", float64(first.rss)/(1<<20), float64(last.rss)/(1<<20))
		}
	}
	if t.Failed() {
		t.Logf("consul-esm log tail:\n%s", esm.logTail())
	}
}

// soakTargets are target servers for n checks: check i is GET /c/<i> on server i%len(servers). They
// record the last run and the number of runs per check; failing checks answer 503.
type soakTargets struct {
	servers []*httptest.Server
	last    []atomic.Int64 // unix nanos of the last run
	runs    atomic.Int64
	conns   atomic.Int64 // connections accepted: reused keep-alive connections keep this flat
	failing []atomic.Bool
}

func newSoakTargets(t *testing.T, n, servers int) *soakTargets {
	st := &soakTargets{last: make([]atomic.Int64, n), failing: make([]atomic.Bool, n)}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		i, err := strconv.Atoi(strings.TrimPrefix(r.URL.Path, "/c/"))
		if err != nil || i < 0 || i >= n {
			http.NotFound(w, r)
			return
		}
		st.last[i].Store(time.Now().UnixNano())
		st.runs.Add(1)
		if st.failing[i].Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		_, _ = w.Write([]byte("ok"))
	})
	for k := 0; k < servers; k++ {
		s := httptest.NewUnstartedServer(handler)
		s.Config.ConnState = func(_ net.Conn, cs http.ConnState) {
			if cs == http.StateNew {
				st.conns.Add(1)
			}
		}
		s.Start()
		t.Cleanup(s.Close)
		st.servers = append(st.servers, s)
	}
	return st
}

func (st *soakTargets) url(i int) string {
	return st.servers[i%len(st.servers)].URL + "/c/" + strconv.Itoa(i)
}

func (st *soakTargets) totalRuns() int64 { return st.runs.Load() }

func (st *soakTargets) neverRun() int {
	n := 0
	for i := range st.last {
		if st.last[i].Load() == 0 {
			n++
		}
	}
	return n
}

// missed counts the checks whose last run is older than limit.
func (st *soakTargets) missed(now time.Time, limit time.Duration) int {
	cut := now.Add(-limit).UnixNano()
	n := 0
	for i := range st.last {
		if st.last[i].Load() < cut {
			n++
		}
	}
	return n
}

// flip toggles the health of checks [from, from+n) and returns how many changed.
func (st *soakTargets) flip(from, n int) int {
	for k := 0; k < n; k++ {
		i := (from + k) % len(st.failing)
		st.failing[i].Store(!st.failing[i].Load())
	}
	return n
}

func soakNodeName(i int) string { return fmt.Sprintf("soak-%05d", i) }

// soakRegister registers nodes external nodes with perNode HTTP checks each; check j of node i is
// check number i*perNode+j of st.
func soakRegister(t *testing.T, c *api.Client, nodes, perNode int, interval time.Duration, st *soakTargets) {
	t.Helper()
	next := make(chan int)
	errs := make(chan error, 8)
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				node := soakNodeName(i)
				reg := &api.CatalogRegistration{Node: node, Address: "127.0.0.1",
					NodeMeta: map[string]string{"external-node": "true"},
					Service:  &api.AgentService{ID: "soak", Service: "soak"}}
				for j := 0; j < perNode; j++ {
					reg.Checks = append(reg.Checks, &api.HealthCheck{Node: node, CheckID: "c" + strconv.Itoa(j),
						Name: "soak " + strconv.Itoa(j), ServiceID: "soak", Status: api.HealthCritical,
						Definition: api.HealthCheckDefinition{HTTP: st.url(i*perNode + j), IntervalDuration: interval, TimeoutDuration: 5 * time.Second}})
				}
				if _, err := c.Catalog().Register(reg, nil); err != nil {
					select {
					case errs <- fmt.Errorf("registering %s: %w", node, err):
					default:
					}
					return
				}
			}
		}()
	}
	for i := 0; i < nodes; i++ {
		select {
		case next <- i:
		case err := <-errs:
			close(next)
			wg.Wait()
			t.Fatal(err)
		}
	}
	close(next)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
}

// soakWrongStatuses counts the soak checks whose catalog status is not what their target answers.
func soakWrongStatuses(c *api.Client, st *soakTargets) (int, error) {
	checks, _, err := c.Health().State(api.HealthAny, &api.QueryOptions{NodeMeta: map[string]string{"external-node": "true"}})
	if err != nil {
		return 0, err
	}
	seen := 0
	wrong := 0
	for _, ch := range checks {
		var i, j int
		if _, err := fmt.Sscanf(ch.Node, "soak-%d", &i); err != nil {
			continue
		}
		if _, err := fmt.Sscanf(ch.CheckID, "c%d", &j); err != nil {
			continue
		}
		k := i*10 + j
		if k >= len(st.failing) {
			continue
		}
		seen++
		want := api.HealthPassing
		if st.failing[k].Load() {
			want = api.HealthCritical
		}
		if ch.Status != want {
			wrong++
		}
	}
	return wrong + len(st.failing) - seen, nil
}

// soakESM is the consul-esm binary running in its own process group.
type soakESM struct {
	cmd     *exec.Cmd
	addr    string // client_address: /metrics
	logPath string
	started time.Time
	exited  chan struct{}
	client  *http.Client
}

func startSoakESM(t *testing.T, consulAddr string) *soakESM {
	t.Helper()
	bin := esmBinary(t)
	dir := t.TempDir()
	addr := "127.0.0.1:" + strconv.Itoa(freeport.GetOne(t))
	cfgPath := filepath.Join(dir, "esm.hcl")
	cfg := fmt.Sprintf("http_addr = %q\nclient_address = %q\nlog_level = \"INFO\"\ntelemetry {\n  disable_hostname = true\n}\n", consulAddr, addr)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	e := &soakESM{addr: addr, logPath: filepath.Join(dir, "esm.log"), exited: make(chan struct{}),
		client: &http.Client{Timeout: 10 * time.Second}}
	logf, err := os.Create(e.logPath)
	if err != nil {
		t.Fatal(err)
	}
	e.cmd = exec.Command(bin, "-config-file", cfgPath)
	e.cmd.Stdout, e.cmd.Stderr = logf, logf
	e.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := e.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	e.started = time.Now()
	go func() {
		_ = e.cmd.Wait()
		logf.Close()
		close(e.exited)
	}()
	t.Cleanup(func() {
		_ = syscall.Kill(-e.cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-e.exited:
		case <-time.After(10 * time.Second):
			t.Errorf("consul-esm did not exit within 10s of SIGTERM")
			_ = syscall.Kill(-e.cmd.Process.Pid, syscall.SIGKILL)
			<-e.exited
		}
		e.client.CloseIdleConnections()
	})
	return e
}

func (e *soakESM) logTail() string {
	b, _ := os.ReadFile(e.logPath)
	if len(b) > 8000 {
		b = b[len(b)-8000:]
	}
	return string(b)
}

// rss is the resident set size (VmRSS) of the process.
func (e *soakESM) rss(t *testing.T) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", e.cmd.Process.Pid))
	if err != nil {
		t.Fatalf("consul-esm gone? %v\n%s", err, e.logTail())
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(rest)
			kb, _ := strconv.ParseInt(f[0], 10, 64)
			return kb << 10
		}
	}
	return 0
}

// cpuTime is the process's user + system CPU time from /proc/<pid>/stat (clock ticks of 10ms).
func (e *soakESM) cpuTime(t *testing.T) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", e.cmd.Process.Pid))
	if err != nil {
		t.Fatalf("consul-esm gone? %v\n%s", err, e.logTail())
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * 10 * time.Millisecond
}

// runtimeStats reads the Go heap (alloc), the memory obtained from the OS (sys) and the goroutine
// count from the runtime gauges of consul-esm's in-memory /metrics.
func (e *soakESM) runtimeStats(t *testing.T) (heap, sys int64, goroutines int) {
	resp, err := e.client.Get("http://" + e.addr + "/metrics")
	if err != nil {
		t.Errorf("GET /metrics: %v", err)
		return
	}
	defer resp.Body.Close()
	var m struct {
		Gauges []struct {
			Name  string
			Value float64
		}
	}
	if err := json.NewDecoder(resp.Body).Decode(&m); err != nil {
		t.Errorf("decoding /metrics: %v", err)
		return
	}
	for _, g := range m.Gauges {
		switch {
		case strings.HasSuffix(g.Name, "runtime.alloc_bytes"):
			heap = int64(g.Value)
		case strings.HasSuffix(g.Name, "runtime.sys_bytes"):
			sys = int64(g.Value)
		case strings.HasSuffix(g.Name, "runtime.num_goroutines"):
			goroutines = int(g.Value)
		}
	}
	return heap, sys, goroutines
}
