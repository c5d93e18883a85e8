package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// cpuTicks returns utime+stime of a process from /proc/<pid>/stat, in clock ticks.
func cpuTicks(t *testing.T, pid string) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	// Fields after the ")" that closes the command name: state is field 3, utime 14, stime 15.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	u, _ := strconv.ParseInt(f[11], 10, 64)
	s, _ := strconv.ParseInt(f[12], 10, 64)
	return u + s
}

// consulPID finds the test Consul's process by its data directory on the command line.
func consulPID(srv *testConsul) string {
	dir := filepath.Dir(srv.Config.DataDir)
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		cmd, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if bytes.Contains(cmd, []byte(dir)) && bytes.Contains(cmd, []byte("consul")) {
			return e.Name()
		}
	}
	return ""
}

// countingPinger wraps the real pinger and counts outcomes.
type countingPinger struct {
	inner    pinger
	ok, fail atomic.Int64
	rttSum   atomic.Int64
}

func (cp *countingPinger) Ping(ctx context.Context, addr string) (time.Duration, error) {
	rtt, err := cp.inner.Ping(ctx, addr)
	if err != nil {
		cp.fail.Add(1)
	} else {
		cp.ok.Add(1)
		cp.rttSum.Add(int64(rtt))
	}
	return rtt, err
}

// TestNodeProbeBench measures one instance probing ESM_BENCH_NODES (default 1000) nodes at
// 127.0.x.y with the real pinger at a 10s interval, coordinates on: the first round (every node
// new: one status write and coordinate write each), ESM_BENCH_SECONDS (default 30) of steady
// state, and a second instance taking all nodes over. Run:
//
//	ESM_BENCH=1 ESM_BENCH_NODES=5000 go test -run TestNodeProbeBench -v .
func TestNodeProbeBench(t *testing.T) {
	if os.Getenv("ESM_BENCH") == "" {
		t.Skip("benchmark; set ESM_BENCH=1 to run")
	}
	pingType := icmpPingType(t)
	n := 1000
	if v, err := strconv.Atoi(os.Getenv("ESM_BENCH_NODES")); err == nil && v > 0 {
		n = v
	}
	dur := 30 * time.Second
	if v, err := strconv.Atoi(os.Getenv("ESM_BENCH_SECONDS")); err == nil && v > 0 {
		dur = time.Duration(v) * time.Second
	}
	srv := newTestConsul(t)
	proxy := newConsulProxy(t, srv)
	cfg := testConfig(srv)
	cfg.HTTPAddr = proxy.addr
	cfg.PingType = pingType
	cfg.NodeProbeInterval = 10 * time.Second
	cfg.PingTimeout = 5 * time.Second
	cfg.DisableCoordinateUpdates = false

	names := make([]string, n)
	var ops api.TxnOps
	for i := range n {
		names[i] = fmt.Sprintf("bench-%05d", i)
		addr := fmt.Sprintf("127.0.%d.%d", i/250, i%250+1)
		ops = append(ops, &api.TxnOp{Node: &api.NodeTxnOp{Verb: api.NodeSet, Node: api.Node{
			Node: names[i], Address: addr, Meta: map[string]string{"external-node": "true", "external-probe": "true"},
		}}})
	}
	txnInBatches(t, srv.Client, ops)

	const hz = 100 // USER_HZ on Linux
	self := strconv.Itoa(os.Getpid())
	cpid := consulPID(srv)
	type mark struct {
		at          time.Time
		self, cons  int64
		ok, fail    int64
		reqs        map[string]int
		proxyErrors int
	}
	var cp *countingPinger
	snap := func() mark {
		m := mark{at: time.Now(), self: cpuTicks(t, self), reqs: proxy.snapshot(), proxyErrors: proxy.errorCount()}
		if cpid != "" {
			m.cons = cpuTicks(t, cpid)
		}
		if cp != nil {
			m.ok, m.fail = cp.ok.Load(), cp.fail.Load()
		}
		return m
	}
	report := func(phase string, a, b mark) {
		secs := b.at.Sub(a.at).Seconds()
		var reqs []string
		for k, v := range b.reqs {
			if d := v - a.reqs[k]; d > 0 && !strings.Contains(k, "/v1/catalog/nodes") {
				reqs = append(reqs, fmt.Sprintf("%s=%d", k, d))
			}
		}
		slices.Sort(reqs)
		t.Logf("%s: %.1fs; pings %d ok %d failed (%.0f/s); esm CPU %.1f%% of a core, consul %.1f%%; proxy errors %d; requests %v",
			phase, secs, b.ok-a.ok, b.fail-a.fail, float64(b.ok-a.ok+b.fail-a.fail)/secs,
			float64(b.self-a.self)/hz/secs*100, float64(b.cons-a.cons)/hz/secs*100, b.proxyErrors-a.proxyErrors, reqs)
	}
	newPinger := func() {
		cp = &countingPinger{inner: icmpPinger{privileged: func() bool { return pingType == "socket" }}}
	}
	run := func() *monitorRun {
		r := startMonitor(t, cfg, cp)
		r.nm.SetNodes(names)
		return r
	}
	waitAll := func(what string, cond func() int) {
		waitFor(t, 4*cfg.NodeProbeInterval, func() error {
			if got := cond(); got < n {
				return fmt.Errorf("%s: %d of %d", what, got, n)
			}
			return nil
		})
	}

	t.Logf("nodes=%d interval=%v ping_type=%s GOMAXPROCS=%d", n, cfg.NodeProbeInterval, pingType, runtime.GOMAXPROCS(0))
	newPinger()
	m0 := snap()
	r := run()
	waitAll("reachable", func() int { _, up := r.nm.Stats(); return up })
	// Also wait for the writes of the round (they queue behind maxConsulCalls).
	waitAll("written", func() int {
		r.nm.mu.Lock()
		defer r.nm.mu.Unlock()
		done := 0
		for _, st := range r.nm.state {
			if st.lastStatus == api.HealthPassing {
				done++
			}
		}
		return done
	})
	m1 := snap()
	report("first round (all nodes new)", m0, m1)

	waitFor(t, dur+5*time.Second, func() error {
		if time.Since(m1.at) < dur {
			return errNotYet
		}
		return nil
	})
	m2 := snap()
	report("steady state", m1, m2)
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	t.Logf("heap in use %d MiB, goroutines %d, mean rtt %v", ms.HeapInuse>>20, runtime.NumGoroutine(),
		time.Duration(cp.rttSum.Load()/max(cp.ok.Load(), 1)))

	r.stop()
	newPinger()
	m3 := snap()
	r = run()
	waitAll("probed by the new instance", func() int { _, up := r.nm.Stats(); return up })
	report("takeover by a new instance (one round)", m3, snap())
}
