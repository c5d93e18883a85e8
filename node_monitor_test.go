package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

// fakePinger answers pings per address through the behaviour set for it (default: reachable in
// 1ms) and records how many pings ran and how many ran at once.
type fakePinger struct {
	mu        sync.Mutex
	behave    map[string]func(ctx context.Context, call int) (time.Duration, error)
	calls     map[string]int
	active    map[string]int
	maxActive int
}

func newFakePinger() *fakePinger {
	return &fakePinger{
		behave: map[string]func(context.Context, int) (time.Duration, error){},
		calls:  map[string]int{},
		active: map[string]int{},
	}
}

func (f *fakePinger) set(addr string, fn func(ctx context.Context, call int) (time.Duration, error)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.behave[addr] = fn
}

func (f *fakePinger) callCount(addr string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[addr]
}

func (f *fakePinger) Ping(ctx context.Context, addr string) (time.Duration, error) {
	f.mu.Lock()
	f.calls[addr]++
	call := f.calls[addr]
	f.active[addr]++
	f.maxActive = max(f.maxActive, f.active[addr])
	fn := f.behave[addr]
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		f.active[addr]--
		f.mu.Unlock()
	}()
	if fn == nil {
		return time.Millisecond, nil
	}
	return fn(ctx, call)
}

func pingDown(addr string) error { return fmt.Errorf("ping to %q timed out", addr) }

// monitorRun is a NodeMonitor running on its own, outside Agent.Run: tests drive its node set
// directly instead of waiting for leader election and assignment.
type monitorRun struct {
	a    *Agent
	nm   *NodeMonitor
	logs *logBuffer
	// stop cancels Run and waits for it to return; idempotent.
	stop func()
}

// newMonitorAgent builds an agent (not running) whose node monitor uses pg when non-nil.
func newMonitorAgent(t *testing.T, cfg *Config, pg pinger) *monitorRun {
	t.Helper()
	logger, logs := testLogger(hclog.Trace)
	a, err := NewAgent(cfg, logger, AgentOptions{})
	if err != nil {
		t.Fatalf("NewAgent: %v", err)
	}
	if pg != nil {
		a.monitor.pinger = pg // before Run, so no synchronisation is needed
	}
	return &monitorRun{a: a, nm: a.monitor, logs: logs}
}

// startMonitor runs the node monitor until the test ends and checks that Run returns promptly.
func startMonitor(t *testing.T, cfg *Config, pg pinger) *monitorRun {
	t.Helper()
	r := newMonitorAgent(t, cfg, pg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.nm.Run(ctx)
	}()
	r.stop = func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Errorf("NodeMonitor.Run did not return within 10s of cancellation")
		}
	}
	t.Cleanup(r.stop)
	return r
}

// assignedNodes returns the monitor's assigned node set, sorted.
func assignedNodes(nm *NodeMonitor) []string {
	nm.mu.Lock()
	defer nm.mu.Unlock()
	return slices.Sorted(maps.Keys(nm.state))
}

func probeTestConfig(srv *testConsul) *Config {
	cfg := testConfig(srv)
	cfg.NodeProbeInterval = 200 * time.Millisecond
	cfg.PingTimeout = 500 * time.Millisecond
	return cfg
}

func registerProbeNode(t *testing.T, c *api.Client, name, addr string, extraMeta map[string]string) {
	t.Helper()
	meta := map[string]string{"external-node": "true", "external-probe": "true"}
	for k, v := range extraMeta {
		meta[k] = v
	}
	if _, err := c.Catalog().Register(&api.CatalogRegistration{Node: name, Address: addr, NodeMeta: meta}, nil); err != nil {
		t.Fatalf("registering %s: %v", name, err)
	}
}

// TestNodeProbeChurn changes the node set under a running node monitor: removed nodes stop at once (a
// ping in flight is discarded), added nodes start, staying nodes keep their debounce state.
func TestNodeProbeChurn(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	cfg := probeTestConfig(srv)
	c := srv.Client
	addrs := map[string]string{"n1": "127.0.0.5", "n2": "127.0.0.6", "n3": "127.0.0.7"}
	for n, a := range addrs {
		registerProbeNode(t, c, n, a, nil)
	}
	fp := newFakePinger()
	r := startMonitor(t, cfg, fp)
	r.nm.SetNodes([]string{"n2", "n1", "n1"})
	if got := assignedNodes(r.nm); !slices.Equal(got, []string{"n1", "n2"}) {
		t.Fatalf("assigned nodes = %v", got)
	}
	waitNodeCheck(t, c, "n1", api.HealthPassing)
	n2Check := waitNodeCheck(t, c, "n2", api.HealthPassing)

	// Hold n1's next ping, then drop n1 while it is in flight.
	release := make(chan struct{})
	fp.set(addrs["n1"], func(ctx context.Context, _ int) (time.Duration, error) {
		select {
		case <-release:
		case <-ctx.Done():
		}
		return 0, pingDown(addrs["n1"])
	})
	waitFor(t, 5*time.Second, func() error {
		r.nm.mu.Lock()
		defer r.nm.mu.Unlock()
		if _, ok := r.nm.inflight["n1"]; !ok {
			return errors.New("n1 not in flight")
		}
		return nil
	})
	r.nm.mu.Lock()
	n2State := r.nm.state["n2"]
	n2Written := n2State.lastWrite
	r.nm.mu.Unlock()

	r.nm.SetNodes([]string{"n2", "n3"})
	r.nm.mu.Lock()
	_, hasN1 := r.nm.state["n1"]
	sameN2 := r.nm.state["n2"] == n2State
	r.nm.mu.Unlock()
	if hasN1 || !sameN2 {
		t.Fatalf("after churn: n1 state kept=%v, n2 state kept=%v; want false, true", hasN1, sameN2)
	}
	if got := assignedNodes(r.nm); !slices.Equal(got, []string{"n2", "n3"}) {
		t.Fatalf("assigned nodes = %v", got)
	}
	waitNodeCheck(t, c, "n3", api.HealthPassing)

	// The held ping now fails; its node is no longer ours, so nothing may be written for it.
	close(release)
	waitFor(t, 5*time.Second, func() error {
		r.nm.mu.Lock()
		defer r.nm.mu.Unlock()
		if _, ok := r.nm.inflight["n1"]; ok {
			return errors.New("n1 still in flight")
		}
		return nil
	})
	if hc, _ := nodeHealthCheck(c, "n1"); hc == nil || hc.Status != api.HealthPassing {
		t.Fatalf("n1's late failure was written after n1 left: %+v", hc)
	}
	if _, _, ok := readMarker(t, c, cfg, "n1"); ok {
		t.Fatal("n1's late failure wrote a marker after n1 left")
	}
	calls := fp.callCount(addrs["n1"])

	// n2 kept its debounce: probed on, never rewritten.
	n2Calls := fp.callCount(addrs["n2"])
	waitFor(t, 5*time.Second, func() error {
		if fp.callCount(addrs["n2"]) < n2Calls+3 {
			return errNotYet
		}
		return nil
	})
	r.nm.mu.Lock()
	rewritten := !n2State.lastWrite.Equal(n2Written)
	r.nm.mu.Unlock()
	if hc, _ := nodeHealthCheck(c, "n2"); rewritten || hc == nil || hc.ModifyIndex != n2Check.ModifyIndex {
		t.Fatalf("n2 rewritten after churn (state %v, check %+v)", rewritten, hc)
	}
	if got := fp.callCount(addrs["n1"]); got != calls {
		t.Fatalf("n1 pinged %d more times after it left", got-calls)
	}

	// Re-adding n1 starts it afresh.
	fp.set(addrs["n1"], nil)
	r.nm.SetNodes([]string{"n1", "n2", "n3"})
	waitFor(t, 5*time.Second, func() error {
		if fp.callCount(addrs["n1"]) == calls {
			return errors.New("n1 not pinged again")
		}
		return nil
	})
	if fp.maxActive > 1 {
		t.Fatalf("%d pings of one node in flight at once", fp.maxActive)
	}
	if n, _ := r.nm.Stats(); n != 3 {
		t.Fatalf("Stats() nodes = %d, want 3", n)
	}
	r.nm.SetNodes(nil)
	if n, _ := r.nm.Stats(); n != 0 || len(assignedNodes(r.nm)) != 0 {
		t.Fatalf("after SetNodes(nil): %d nodes, %v", n, assignedNodes(r.nm))
	}
}

// TestNodeProbeCycle checks the scheduler's order bookkeeping: every node once per round, leavers
// gone, newcomers in, the position kept.
func TestNodeProbeCycle(t *testing.T) {
	set := func(names ...string) map[string]*nodeState {
		m := map[string]*nodeState{}
		for _, n := range names {
			m[n] = &nodeState{}
		}
		return m
	}
	var c probeCycle
	c.sync(set("a", "b", "c", "d"))
	round := func() []string {
		var got []string
		for range c.order {
			got = append(got, c.take())
		}
		slices.Sort(got)
		return got
	}
	if got := round(); !slices.Equal(got, []string{"a", "b", "c", "d"}) {
		t.Fatalf("round = %v", got)
	}
	c.take()
	c.take()
	c.sync(set("b", "c", "e", "f", "g"))
	if got := round(); !slices.Equal(got, []string{"b", "c", "e", "f", "g"}) {
		t.Fatalf("round after churn = %v", got)
	}
	// Mostly newcomers: taken in bulk, still every node exactly once per round.
	var many []string
	for i := range 200 {
		many = append(many, fmt.Sprintf("m%03d", i))
	}
	c.sync(set(append(many, "b")...))
	if got := round(); !slices.Equal(got, slices.Sorted(slices.Values(append(many, "b")))) {
		t.Fatalf("round after bulk add has %d entries", len(got))
	}
	c.sync(set())
	if len(c.order) != 0 || c.next != 0 {
		t.Fatalf("empty cycle = %+v", c)
	}
}

// consulProxy forwards to the test Consul and counts requests per "METHOD path".
type consulProxy struct {
	addr   string
	mu     sync.Mutex
	counts map[string]int
	errs   int // proxy errors (e.g. Consul dropping connections)
}

func newConsulProxy(t *testing.T, srv *testConsul) *consulProxy {
	t.Helper()
	target, err := url.Parse("http://" + srv.HTTPAddr)
	if err != nil {
		t.Fatal(err)
	}
	cp := &consulProxy{counts: map[string]int{}}
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.ErrorLog = log.New(cp, "", 0)
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cp.mu.Lock()
		cp.counts[r.Method+" "+r.URL.Path]++
		cp.mu.Unlock()
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(hs.Close)
	cp.addr = strings.TrimPrefix(hs.URL, "http://")
	return cp
}

func (cp *consulProxy) snapshot() map[string]int {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	out := make(map[string]int, len(cp.counts))
	for k, v := range cp.counts {
		out[k] = v
	}
	return out
}

func (cp *consulProxy) errorCount() int {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return cp.errs
}

func (cp *consulProxy) Write(b []byte) (int, error) {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	cp.errs++
	return len(b), nil
}

func (cp *consulProxy) countPrefix(prefix string) int {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	total := 0
	for k, v := range cp.counts {
		if strings.HasPrefix(k, prefix) {
			total += v
		}
	}
	return total
}

func (cp *consulProxy) count(key string) int {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return cp.counts[key]
}

// TestNodeProbeUnchangedNotRewritten: a steady node is written once, then only probed; its
// coordinate is read once and the local agent's coordinate is cached.
func TestNodeProbeUnchangedNotRewritten(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	proxy := newConsulProxy(t, srv)
	cfg := probeTestConfig(srv)
	cfg.HTTPAddr = proxy.addr
	c := srv.Client
	registerProbeNode(t, c, "steady", "127.0.0.8", nil)
	fp := newFakePinger()
	r := startMonitor(t, cfg, fp)
	r.nm.SetNodes([]string{"steady"})

	first := waitNodeCheck(t, c, "steady", api.HealthPassing)
	txns := proxy.count("PUT /v1/txn")
	calls := fp.callCount("127.0.0.8")
	waitFor(t, 10*time.Second, func() error {
		if fp.callCount("127.0.0.8") < calls+6 {
			return errNotYet
		}
		return nil
	})
	hc, err := nodeHealthCheck(c, "steady")
	if err != nil || hc == nil || hc.ModifyIndex != first.ModifyIndex {
		t.Fatalf("check changed: %+v (err %v), first ModifyIndex %d", hc, err, first.ModifyIndex)
	}
	if got := proxy.count("PUT /v1/txn"); got != txns || txns != 1 {
		t.Fatalf("%d txns after the first status write, %d after 6 more probes; want 1 and 1", txns, got)
	}
	if n := proxy.count("GET /v1/agent/self"); n != 1 {
		t.Errorf("/v1/agent/self read %d times, want once (cached)", n)
	}
	if n := proxy.count("GET /v1/coordinate/node/steady"); n != 1 {
		t.Errorf("node coordinate read %d times, want once", n)
	}
	if n := proxy.count("GET /v1/kv/" + cfg.KVPath + "probes/steady"); n != 0 {
		t.Errorf("marker read per node %d times, want 0 (one list for new nodes)", n)
	}
	if n := proxy.count("PUT /v1/coordinate/update"); n < 1 {
		t.Errorf("no coordinate update")
	}
}

// TestNodeProbeTakeover: an instance taking over many nodes (restart, failover, rebalance) seeds
// its state from three list requests and rewrites nothing that is already right, while a failure
// clock started by the previous owner keeps running.
func TestNodeProbeTakeover(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	cfg := probeTestConfig(srv)
	c := srv.Client
	var names []string
	for i := range bulkPrefetchMin + 4 {
		names = append(names, fmt.Sprintf("tk-%02d", i))
		registerProbeNode(t, c, names[i], fmt.Sprintf("127.0.1.%d", i+1), nil)
	}
	down := "127.0.1.1" // tk-00 stays unreachable
	failing := func(context.Context, int) (time.Duration, error) { return 0, pingDown(down) }

	fpA := newFakePinger()
	fpA.set(down, failing)
	a := startMonitor(t, cfg, fpA)
	a.nm.SetNodes(names)
	for _, n := range names[1:] {
		waitNodeCheck(t, c, n, api.HealthPassing)
	}
	waitNodeCheck(t, c, "tk-00", api.HealthCritical)
	since, _, ok := readMarker(t, c, cfg, "tk-00")
	if !ok {
		t.Fatal("no marker for tk-00")
	}
	waitFor(t, 10*time.Second, func() error {
		entries, _, err := c.Coordinate().Nodes(nil)
		if err != nil {
			return err
		}
		have := 0
		for _, e := range entries {
			if strings.HasPrefix(e.Node, "tk-") {
				have++
			}
		}
		if have != len(names)-1 {
			return fmt.Errorf("%d coordinates", have)
		}
		return nil
	})
	a.stop()

	proxy := newConsulProxy(t, srv)
	cfgB := *cfg
	cfgB.HTTPAddr = proxy.addr
	fpB := newFakePinger()
	fpB.set(down, failing)
	b := startMonitor(t, &cfgB, fpB)
	b.nm.SetNodes(names)
	waitFor(t, 10*time.Second, func() error {
		for i := range names {
			if fpB.callCount(fmt.Sprintf("127.0.1.%d", i+1)) < 2 {
				return fmt.Errorf("%s not probed twice yet", names[i])
			}
		}
		return nil
	})
	if n := proxy.count("PUT /v1/txn"); n != 0 {
		t.Errorf("%d txns on takeover, want 0: every status was already right", n)
	}
	for key, want := range map[string]int{
		"GET /v1/kv/" + cfg.KVPath + "probes/": 1,
		"GET /v1/health/state/any":             1,
		"GET /v1/coordinate/nodes":             1,
	} {
		if n := proxy.count(key); n != want {
			t.Errorf("%s: %d requests, want %d", key, n, want)
		}
	}
	if n := proxy.countPrefix("GET /v1/coordinate/node/"); n != 0 {
		t.Errorf("%d per-node coordinate reads, want 0 (listed once)", n)
	}
	if got, _, _ := readMarker(t, c, cfg, "tk-00"); !got.Equal(since) {
		t.Fatalf("failure clock reset on takeover: %v, was %v", got, since)
	}
}
