package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestCheckRunnerThroughput measures how many HTTP checks per second one runner sustains and the CPU
// it spends doing so. It is skipped unless ESM_BENCH=1. Knobs: ESM_BENCH_CHECKS (default 10000),
// ESM_BENCH_INTERVAL (default 10s), ESM_BENCH_SECONDS (measurement window, default 20),
// ESM_BENCH_TARGETS (listening ports the checks are spread over, default 50: real checks hit many
// hosts).
//
// The target HTTP server runs in a child process (this test binary re-executed) so the CPU numbers
// are the runner's alone. The checks are fed to reconcile directly and already carry the output the
// target produces, so the steady state writes nothing to Consul: this is the cost of scheduling,
// probing and result handling (telemetry included).
func TestCheckRunnerThroughput(t *testing.T) {
	if os.Getenv("ESM_BENCH") != "1" {
		t.Skip("set ESM_BENCH=1 to run the throughput measurement")
	}
	checks := crEnvInt("ESM_BENCH_CHECKS", 10000)
	interval := 10 * time.Second
	if v := os.Getenv("ESM_BENCH_INTERVAL"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatal(err)
		}
		interval = d
	}
	window := time.Duration(crEnvInt("ESM_BENCH_SECONDS", 20)) * time.Second
	targets := crEnvInt("ESM_BENCH_TARGETS", 50)

	cmd := exec.Command(os.Args[0], "-test.run=^TestCheckRunnerBenchTarget$")
	cmd.Env = append(os.Environ(), "ESM_BENCH_TARGET="+strconv.Itoa(targets))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var addrs []string
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if a, ok := strings.CutPrefix(sc.Text(), "ADDRS "); ok {
			addrs = strings.Fields(a)
			break
		}
	}
	if len(addrs) == 0 {
		t.Fatal("target process did not report its addresses")
	}
	go func() { _, _ = io.Copy(io.Discard, stdout) }()
	targetDone := false
	stopTarget := func() {
		if !targetDone {
			targetDone = true
			stdin.Close()
			_ = cmd.Wait()
		}
	}
	t.Cleanup(stopTarget)

	list := make([]*catalogCheck, checks)
	for i := range list {
		url := "http://" + addrs[i%len(addrs)] + "/health"
		list[i] = &catalogCheck{
			Node: fmt.Sprintf("bench-%d", i%100), CheckID: fmt.Sprintf("c%d", i), Status: statusPassing,
			Output:      "HTTP GET " + url + ": 200 OK Output: ok",
			ModifyIndex: 1,
			Definition:  checkDefinition{HTTP: url, Interval: durationField(interval), Timeout: durationField(5 * time.Second)},
		}
	}
	var nodes []string
	for i := range 100 {
		nodes = append(nodes, fmt.Sprintf("bench-%d", i))
	}
	r := crStart(t, nil, func(cfg *Config) { cfg.LogLevel = "INFO" }, nil)
	r.SetNodes(nodes)
	r.reconcile(list, 100)

	// Warm-up: one full interval, so every check has been staggered in and runs at its rate.
	waitFor(t, interval+30*time.Second, func() error {
		if n := r.runs.Load(); n < uint64(checks) {
			return fmt.Errorf("%d runs", n)
		}
		return nil
	})
	runtime.GC()
	runs0, cpu0, t0 := r.runs.Load(), crCPU(t), time.Now()
	var peakWorkers int
	deadline := t0.Add(window)
	waitFor(t, window+10*time.Second, func() error {
		r.sched.mu.Lock()
		peakWorkers = max(peakWorkers, r.sched.workers)
		r.sched.mu.Unlock()
		if time.Now().Before(deadline) {
			return errNotYet
		}
		return nil
	})
	runs1, cpu1, elapsed := r.runs.Load(), crCPU(t), time.Since(t0)
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	goroutines := runtime.NumGoroutine()
	r.stop()
	stopTarget()

	rate := float64(runs1-runs0) / elapsed.Seconds()
	cpu := cpu1 - cpu0
	want := float64(checks) / interval.Seconds()
	t.Logf("checks=%d interval=%s targets=%d window=%s", checks, interval, len(addrs), elapsed.Round(time.Millisecond))
	t.Logf("runs/s=%.0f (expected %.0f), runner CPU=%.2fs (%.1f%% of one core), %.1f µs CPU per check run",
		rate, want, cpu.Seconds(), 100*cpu.Seconds()/elapsed.Seconds(), float64(cpu.Microseconds())/float64(runs1-runs0))
	t.Logf("goroutines=%d peak workers=%d heap in use=%.1f MiB", goroutines, peakWorkers, float64(ms.HeapInuse)/(1<<20))
	if ps := cmd.ProcessState; ps != nil {
		t.Logf("target process CPU (whole run incl. warm-up)=%.2fs", (ps.UserTime() + ps.SystemTime()).Seconds())
	}
	if rate < 0.95*want {
		t.Errorf("sustained %.0f runs/s, want about %.0f", rate, want)
	}
}

// TestCheckRunnerBenchTarget is the child process of TestCheckRunnerThroughput: an HTTP server on
// ESM_BENCH_TARGET ports of 127.0.0.1 that answers "ok" until its stdin closes.
func TestCheckRunnerBenchTarget(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("ESM_BENCH_TARGET"))
	if n <= 0 {
		t.Skip("helper process for TestCheckRunnerThroughput")
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok"))
	})}
	addrs := make([]string, n)
	for i := range addrs {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addrs[i] = ln.Addr().String()
		go func() { _ = srv.Serve(ln) }()
	}
	fmt.Printf("ADDRS %s\n", strings.Join(addrs, " "))
	_, _ = io.Copy(io.Discard, os.Stdin)
	_ = srv.Close()
}

func crEnvInt(name string, def int) int {
	if v := os.Getenv(name); v != "" {
		if n, err := strconv.Atoi(v); err == nil {
			return n
		}
	}
	return def
}

// crCPU is this process's user+system CPU time so far.
func crCPU(t *testing.T) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
