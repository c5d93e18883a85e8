package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/net/icmp"
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
	logs := &logBuffer{}
	var out io.Writer = logs
	if testing.Verbose() {
		out = io.MultiWriter(logs, os.Stderr)
	}
	logger := hclog.New(&hclog.LoggerOptions{Name: "consul-esm", Level: hclog.Trace, Output: out})
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

func nodeHealthCheck(c *api.Client, node string) (*api.HealthCheck, error) {
	checks, _, err := c.Health().Node(node, nil)
	if err != nil {
		return nil, err
	}
	for _, hc := range checks {
		if hc.CheckID == externalNodeHealthCheckID {
			return hc, nil
		}
	}
	return nil, nil
}

// waitNodeCheck waits until node's externalNodeHealth has status and returns it.
func waitNodeCheck(t *testing.T, c *api.Client, node, status string) *api.HealthCheck {
	t.Helper()
	var got *api.HealthCheck
	waitFor(t, 10*time.Second, func() error {
		hc, err := nodeHealthCheck(c, node)
		if err != nil {
			return err
		}
		if hc == nil || hc.Status != status {
			return fmt.Errorf("%s: externalNodeHealth = %+v, want %s", node, hc, status)
		}
		got = hc
		return nil
	})
	want := map[string]string{api.HealthPassing: nodeAliveOutput, api.HealthCritical: nodeCriticalOutput}[status]
	if got.Name != externalCheckName || got.Output != want {
		t.Fatalf("%s: check name/output = %q/%q, want %q/%q", node, got.Name, got.Output, externalCheckName, want)
	}
	return got
}

// readMarker returns the decoded first-failure time at <kv>probes/<node> and its raw bytes.
func readMarker(t *testing.T, c *api.Client, cfg *Config, node string) (time.Time, []byte, bool) {
	t.Helper()
	kv, _, err := c.KV().Get(cfg.KVPath+"probes/"+node, nil)
	if err != nil {
		t.Fatal(err)
	}
	if kv == nil {
		return time.Time{}, nil, false
	}
	var ts time.Time
	if err := ts.GobDecode(kv.Value); err != nil {
		t.Fatalf("marker of %s is not a gob time: %v", node, err)
	}
	return ts, kv.Value, true
}

func putMarker(t *testing.T, c *api.Client, cfg *Config, node string, at time.Time) {
	t.Helper()
	b, err := at.UTC().GobEncode()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.KV().Put(&api.KVPair{Key: cfg.KVPath + "probes/" + node, Value: b}, nil); err != nil {
		t.Fatal(err)
	}
}

func nodeExists(t *testing.T, c *api.Client, node string) bool {
	t.Helper()
	cn, _, err := c.Catalog().Node(node, nil)
	if err != nil {
		t.Fatal(err)
	}
	return cn != nil && cn.Node != nil
}

// waitCoordinate waits until Consul holds a valid network coordinate for node.
func waitCoordinate(t *testing.T, c *api.Client, node string) {
	t.Helper()
	waitFor(t, 15*time.Second, func() error {
		entries, _, err := c.Coordinate().Node(node, nil)
		if err != nil {
			return err
		}
		if len(entries) == 0 || entries[0].Coord == nil || !entries[0].Coord.IsValid() {
			return fmt.Errorf("no coordinate for %s yet", node)
		}
		return nil
	})
}

// icmpPingType returns a ping_type that works on this machine, or skips the test saying why none
// does.
func icmpPingType(t *testing.T) string {
	t.Helper()
	pingType, whyNot := icmpPingTypeAt("udp4", "ip4:icmp", "127.0.0.1")
	if pingType == "" {
		t.Skip(whyNot)
	}
	return pingType
}

// icmpPingTypeAt finds the ping_type that works for one address family, given the unprivileged and
// raw ICMP networks to try on the loopback address addr; "" and the reason when neither does.
func icmpPingTypeAt(udpNet, rawNet, addr string) (pingType, whyNot string) {
	c, udpErr := icmp.ListenPacket(udpNet, addr)
	if udpErr == nil {
		c.Close()
		return "udp", ""
	}
	c, rawErr := icmp.ListenPacket(rawNet, addr)
	if rawErr == nil {
		c.Close()
		return "socket", ""
	}
	rng, _ := os.ReadFile("/proc/sys/net/ipv4/ping_group_range")
	return "", fmt.Sprintf("cannot send real ICMP pings here: unprivileged ICMP sockets are refused (net.ipv4.ping_group_range=%q does not cover gid %d: %v) "+
		"and raw ICMP sockets need root or CAP_NET_RAW (%v)", strings.Join(strings.Fields(string(rng)), " "), os.Getgid(), udpErr, rawErr)
}

// TestNodeProbeRealPing runs the whole agent with the real pinger: the leader assigns the probe
// node, the node monitor pings 127.0.0.1, marks it passing and writes its coordinate.
func TestNodeProbeRealPing(t *testing.T) {
	pingType := icmpPingType(t)
	srv := newTestConsul(t)
	cfg := testConfig(srv)
	cfg.PingType = pingType
	ra := startAgent(t, cfg)
	registerExternalNode(t, srv.Client, "ext-real", true)

	waitNodeCheck(t, srv.Client, "ext-real", api.HealthPassing)
	waitCoordinate(t, srv.Client, "ext-real")
	if n, up := ra.monitor.Stats(); n != 1 || up != 1 {
		t.Fatalf("Stats() = %d nodes, %d reachable; want 1, 1", n, up)
	}
	logs := ra.logs.String()
	if !strings.Contains(logs, "[DEBUG] consul-esm.probes: Updated coordinates") {
		t.Fatalf("no DEBUG 'Updated coordinates' line in:\n%s", logs)
	}
	if strings.Contains(logs, "[INFO]  consul-esm.probes: Updated coordinates") {
		t.Fatal("'Updated coordinates' logged at INFO (original issue #214)")
	}
	for _, want := range []string{"Now running probes for external nodes: count=1", "Fetched nodes from catalog: count=1"} {
		if !strings.Contains(logs, want) {
			t.Errorf("log lacks %q", want)
		}
	}
	t.Logf("ping_type %q", pingType)
}

// TestNodeProbePermissionError checks the not-permitted path of the real pinger: one clear error
// naming the sysctl, logged once, and no node marked critical for our own misconfiguration.
func TestNodeProbePermissionError(t *testing.T) {
	if c, err := icmp.ListenPacket("udp4", "127.0.0.1"); err == nil {
		c.Close()
		rng, _ := os.ReadFile("/proc/sys/net/ipv4/ping_group_range")
		t.Skipf("unprivileged ICMP is permitted here (net.ipv4.ping_group_range=%q covers gid %d), so the not-permitted path cannot be exercised",
			strings.Join(strings.Fields(string(rng)), " "), os.Getgid())
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, err := icmpPinger{}.Ping(ctx, "127.0.0.1")
	var perm *pingPermissionError
	if !errors.As(err, &perm) {
		t.Fatalf("Ping error = %v, want a pingPermissionError", err)
	}
	for _, want := range []string{"net.ipv4.ping_group_range", `sudo sysctl -w net.ipv4.ping_group_range="0 2147483647"`, `ping_type "socket"`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}

	srv := newTestConsul(t)
	cfg := probeTestConfig(srv)
	cfg.PingType = "udp"
	registerProbeNode(t, srv.Client, "perm-1", "127.0.0.1", nil)
	registerProbeNode(t, srv.Client, "perm-2", "127.0.0.1", nil)
	r := startMonitor(t, cfg, nil)
	r.nm.SetNodes([]string{"perm-1", "perm-2"})
	// Several rounds of pings, each refused.
	waitFor(t, 10*time.Second, func() error {
		if n := strings.Count(r.logs.String(), "ICMP ping is not permitted"); n != 1 {
			return fmt.Errorf("%d 'not permitted' lines", n)
		}
		return nil
	})
	start := time.Now()
	waitFor(t, 5*time.Second, func() error {
		if time.Since(start) < 5*cfg.NodeProbeInterval {
			return errNotYet
		}
		return nil
	})
	logs := r.logs.String()
	if n := strings.Count(logs, "ICMP ping is not permitted"); n != 1 {
		t.Fatalf("'not permitted' logged %d times, want once:\n%s", n, logs)
	}
	if strings.Contains(logs, "could not ping node") {
		t.Fatal("a local permission problem was reported as an unreachable node")
	}
	for _, n := range []string{"perm-1", "perm-2"} {
		if hc, err := nodeHealthCheck(srv.Client, n); err != nil || hc != nil {
			t.Fatalf("%s: check %+v (err %v) written although no ping could be sent", n, hc, err)
		}
	}
}

// TestNodeProbeFailureAndReap drives failures through an injected pinger: the first failure writes
// critical plus the gob-encoded first-failure time; once node_reconnect_timeout has passed the next
// failure reaps node and marker together, despite the 1h write debounce. A marker left by an
// earlier instance is honoured (survives restarts and failover).
func TestNodeProbeFailureAndReap(t *testing.T) {
	srv := newTestConsul(t)
	cfg := probeTestConfig(srv)
	cfg.NodeReconnectTimeout = 200 * time.Millisecond
	c := srv.Client
	registerProbeNode(t, c, "dead", "127.0.0.2", nil)
	registerProbeNode(t, c, "stale", "127.0.0.3", nil)
	putMarker(t, c, cfg, "stale", time.Now().Add(-time.Hour)) // failing since before "we" started

	release := make(chan struct{})
	fp := newFakePinger()
	fp.set("127.0.0.2", func(ctx context.Context, call int) (time.Duration, error) {
		if call > 1 {
			// Hold later pings until the test has seen the marker: it lives only ~200ms.
			select {
			case <-release:
			case <-ctx.Done():
			}
		}
		return 0, pingDown("127.0.0.2")
	})
	fp.set("127.0.0.3", func(context.Context, int) (time.Duration, error) { return 0, pingDown("127.0.0.3") })

	start := time.Now()
	r := startMonitor(t, cfg, fp)
	r.nm.SetNodes([]string{"dead", "stale"})

	// "stale" is reaped at its first failed ping: the earlier instance's clock counts.
	waitFor(t, 10*time.Second, func() error {
		if nodeExists(t, c, "stale") {
			return errors.New("stale still registered")
		}
		if _, _, ok := readMarker(t, c, cfg, "stale"); ok {
			return errors.New("stale's marker still there")
		}
		return nil
	})
	if hc, _ := nodeHealthCheck(c, "stale"); hc != nil {
		t.Fatalf("reaped node still has a check: %+v", hc)
	}

	waitNodeCheck(t, c, "dead", api.HealthCritical)
	since, raw, ok := readMarker(t, c, cfg, "dead")
	if !ok {
		t.Fatal("no marker for dead")
	}
	if since.Location() != time.UTC || since.Before(start.Add(-time.Second)) || since.After(time.Now()) {
		t.Fatalf("marker time %v (loc %v) not a UTC time of this run", since, since.Location())
	}
	if want, _ := since.UTC().GobEncode(); !bytes.Equal(raw, want) {
		t.Fatalf("marker bytes %x are not time.GobEncode of the UTC time (%x)", raw, want)
	}

	// While a ping is held the scheduler must not start a second one for the node.
	waitFor(t, 5*time.Second, func() error {
		if !strings.Contains(r.logs.String(), "Error pinging node, last request still outstanding: node=dead") {
			return errors.New("no outstanding-ping warning yet")
		}
		return nil
	})
	waitFor(t, 5*time.Second, func() error {
		if time.Since(since) <= cfg.NodeReconnectTimeout {
			return errNotYet
		}
		return nil
	})
	close(release)
	waitFor(t, 5*time.Second, func() error {
		if nodeExists(t, c, "dead") {
			return errors.New("dead still registered")
		}
		if _, _, ok := readMarker(t, c, cfg, "dead"); ok {
			return errors.New("dead's marker still there")
		}
		return nil
	})
	// On time: within a few probe intervals of the timeout, not up to the 1h debounce later.
	if late := time.Since(since) - cfg.NodeReconnectTimeout; late > 3*time.Second {
		t.Fatalf("reaped %v after the timeout", late)
	}
	logs := r.logs.String()
	for _, want := range []string{
		"reaping node has been failed for too long: node=dead failureTimeout=200ms",
		"reaping node has been failed for too long: node=stale",
		"could not ping node: node=dead",
	} {
		if !strings.Contains(logs, want) {
			t.Errorf("log lacks %q", want)
		}
	}
	if fp.maxActive > 1 {
		t.Fatalf("%d pings of one node in flight at once", fp.maxActive)
	}
}

// TestNodeProbeRecovery: a node that fails keeps the clock an earlier instance started, turns
// passing with its marker removed when it answers, and starts a fresh clock when it fails again.
func TestNodeProbeRecovery(t *testing.T) {
	srv := newTestConsul(t)
	cfg := probeTestConfig(srv)
	c := srv.Client
	registerProbeNode(t, c, "flaky", "127.0.0.4", nil)
	earlier := time.Now().Add(-10 * time.Minute).UTC()
	putMarker(t, c, cfg, "flaky", earlier)

	var up atomic.Bool
	fp := newFakePinger()
	fp.set("127.0.0.4", func(context.Context, int) (time.Duration, error) {
		if up.Load() {
			return 2 * time.Millisecond, nil
		}
		return 0, pingDown("127.0.0.4")
	})
	r := startMonitor(t, cfg, fp)
	r.nm.SetNodes([]string{"flaky"})

	waitNodeCheck(t, c, "flaky", api.HealthCritical)
	if since, _, ok := readMarker(t, c, cfg, "flaky"); !ok || !since.Equal(earlier) {
		t.Fatalf("marker = %v (present %v), want the earlier instance's %v kept", since, ok, earlier)
	}

	up.Store(true)
	waitNodeCheck(t, c, "flaky", api.HealthPassing)
	if _, _, ok := readMarker(t, c, cfg, "flaky"); ok {
		t.Fatal("marker not removed on recovery")
	}
	if n, reachable := r.nm.Stats(); n != 1 || reachable != 1 {
		t.Fatalf("Stats() = %d, %d; want 1, 1", n, reachable)
	}

	failedAgain := time.Now()
	up.Store(false)
	waitNodeCheck(t, c, "flaky", api.HealthCritical)
	since, _, ok := readMarker(t, c, cfg, "flaky")
	if !ok || since.Before(failedAgain.Add(-time.Second)) {
		t.Fatalf("marker after a new failure = %v (present %v), want a fresh clock", since, ok)
	}
}

// TestNodeProbeChurn changes the node set under a running node monitor: removed nodes stop at once (a
// ping in flight is discarded), added nodes start, staying nodes keep their debounce state.
func TestNodeProbeChurn(t *testing.T) {
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

// TestNodeProbeReapCAS: the reap is a check-and-set on the node's ModifyIndex as seen when its ping
// started, so a node re-registered meanwhile survives and its failure clock restarts.
func TestNodeProbeReapCAS(t *testing.T) {
	srv := newTestConsul(t)
	cfg := probeTestConfig(srv)
	c := srv.Client
	ctx := context.Background()

	t.Run("direct", func(t *testing.T) {
		r := newMonitorAgent(t, cfg, newFakePinger())
		registerProbeNode(t, c, "moved", "127.0.0.9", nil)
		cn, _, err := c.Catalog().Node("moved", nil)
		if err != nil || cn == nil {
			t.Fatal(cn, err)
		}
		seen := *recordOf(cn.Node)
		putMarker(t, c, cfg, "moved", time.Now().Add(-time.Hour))
		kv, _, err := c.KV().Get(cfg.KVPath+"probes/moved", nil)
		if err != nil {
			t.Fatal(err)
		}
		r.nm.SetNodes([]string{"moved"})
		st := r.nm.state["moved"]
		st.marker, st.kvKnown = r.nm.decodeMarker("moved", kv), true

		// Re-registered (changed) after the ping started.
		registerProbeNode(t, c, "moved", "127.0.0.9", map[string]string{"rack": "b"})
		r.nm.reap(ctx, "moved", st, seen, st.marker, time.Minute)
		if !nodeExists(t, c, "moved") {
			t.Fatal("re-registered node was reaped")
		}
		if _, _, ok := readMarker(t, c, cfg, "moved"); !ok {
			t.Fatal("marker removed although the reap transaction failed")
		}
		if !st.marker.restart || st.lastStatus != "" {
			t.Fatalf("failure clock not restarted: %+v", st)
		}
		if !strings.Contains(r.logs.String(), "Not reaping node: it was re-registered") {
			t.Fatalf("no explanation logged:\n%s", r.logs)
		}

		// With the current index the reap goes through, node and marker in one transaction.
		cn, _, _ = c.Catalog().Node("moved", nil)
		r.nm.reap(ctx, "moved", st, *recordOf(cn.Node), st.marker, time.Minute)
		if nodeExists(t, c, "moved") {
			t.Fatal("node not reaped with the current index")
		}
		if _, _, ok := readMarker(t, c, cfg, "moved"); ok {
			t.Fatal("marker left behind")
		}

		// Someone else deleted the node first: only our marker is cleaned up.
		registerProbeNode(t, c, "gone", "127.0.0.10", nil)
		cn, _, _ = c.Catalog().Node("gone", nil)
		putMarker(t, c, cfg, "gone", time.Now().Add(-time.Hour))
		kv, _, _ = c.KV().Get(cfg.KVPath+"probes/gone", nil)
		if _, err := c.Catalog().Deregister(&api.CatalogDeregistration{Node: "gone"}, nil); err != nil {
			t.Fatal(err)
		}
		r.nm.SetNodes([]string{"gone"})
		gst := r.nm.state["gone"]
		gst.marker, gst.kvKnown = r.nm.decodeMarker("gone", kv), true
		r.nm.reap(ctx, "gone", gst, *recordOf(cn.Node), gst.marker, time.Minute)
		if _, _, ok := readMarker(t, c, cfg, "gone"); ok {
			t.Fatal("marker of an already deleted node left behind")
		}
	})

	t.Run("running", func(t *testing.T) {
		cfg := *cfg
		cfg.NodeReconnectTimeout = 200 * time.Millisecond
		cfg.NodeProbeInterval = 300 * time.Millisecond
		registerProbeNode(t, c, "revived", "127.0.0.11", nil)
		fp := newFakePinger()
		fp.set("127.0.0.11", func(_ context.Context, call int) (time.Duration, error) {
			switch {
			case call == 1:
				return 0, pingDown("127.0.0.11")
			case call == 2:
				// Past the timeout: an operator re-registers the node while this ping runs.
				registerProbeNode(t, c, "revived", "127.0.0.11", map[string]string{"rev": "2"})
				return 0, pingDown("127.0.0.11")
			default:
				return time.Millisecond, nil
			}
		})
		r := startMonitor(t, &cfg, fp)
		r.nm.SetNodes([]string{"revived"})
		waitNodeCheck(t, c, "revived", api.HealthPassing)
		if !nodeExists(t, c, "revived") {
			t.Fatal("re-registered node reaped")
		}
		if _, _, ok := readMarker(t, c, &cfg, "revived"); ok {
			t.Fatal("marker left after recovery")
		}
		if strings.Contains(r.logs.String(), "Reaped failed external node") {
			t.Fatal("reap reported for a node that survived")
		}
	})
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
