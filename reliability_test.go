package main

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/consul/sdk/freeport"
	"github.com/hashicorp/consul/sdk/testutil"
)

// Reliability tests: Consul restarts under a running ESM, a leader crash measured per check at the
// targets, and instance churn. Every check runs at relInterval, the production floor
// (minCheckInterval), so the agents schedule exactly as in production; the agent timings are
// testConfig's (AgentTTL 3s, SessionTTL 2s, LockDelay 500ms).
const relInterval = time.Second

// ---------------------------------------------------------------------------------------------
// Targets that remember when each check ran

// hitTarget is an HTTP target that records the arrival time of every request per path (one path per
// check) and answers 503 on the paths set failing.
type hitTarget struct {
	*httptest.Server
	mu      sync.Mutex
	hits    map[string][]time.Time
	failing map[string]bool
}

func newHitTarget(t testing.TB) *hitTarget {
	ht := &hitTarget{hits: make(map[string][]time.Time), failing: make(map[string]bool)}
	ht.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		now := time.Now()
		ht.mu.Lock()
		ht.hits[r.URL.Path] = append(ht.hits[r.URL.Path], now)
		fail := ht.failing[r.URL.Path]
		ht.mu.Unlock()
		if fail {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		_, _ = io.WriteString(w, "ok")
	}))
	t.Cleanup(ht.Close)
	return ht
}

func (ht *hitTarget) setFailing(path string, v bool) {
	ht.mu.Lock()
	defer ht.mu.Unlock()
	ht.failing[path] = v
}

func (ht *hitTarget) hitsOf(path string) []time.Time {
	ht.mu.Lock()
	defer ht.mu.Unlock()
	return slices.Clone(ht.hits[path])
}

// countIn counts the hits of path in [from, to).
func (ht *hitTarget) countIn(path string, from, to time.Time) int {
	n := 0
	for _, h := range ht.hitsOf(path) {
		if !h.Before(from) && h.Before(to) {
			n++
		}
	}
	return n
}

// firstAfter returns the first hit of path after at.
func (ht *hitTarget) firstAfter(path string, at time.Time) (time.Time, bool) {
	for _, h := range ht.hitsOf(path) {
		if h.After(at) {
			return h, true
		}
	}
	return time.Time{}, false
}

// worstGap is the longest time in (from, to] during which the check behind hits did not run: the
// gaps between consecutive hits, counting the one that spans from, and the open gap up to to.
func worstGap(hits []time.Time, from, to time.Time) time.Duration {
	prev := from
	for _, h := range hits {
		if !h.After(from) {
			prev = h
		}
	}
	var worst time.Duration
	for _, h := range hits {
		if !h.After(from) || h.After(to) {
			continue
		}
		worst = max(worst, h.Sub(prev))
		prev = h
	}
	return max(worst, to.Sub(prev))
}

// registerHitNodes registers n external nodes named <prefix>-NN, each with a service and one HTTP
// check (critical until ESM writes its first result) on the path /<node> of ht. It returns the node
// names; the check's path is "/" + node.
func registerHitNodes(t testing.TB, c *api.Client, prefix string, n int, ht *hitTarget) []string {
	t.Helper()
	var nodes []string
	for i := 0; i < n; i++ {
		node := fmt.Sprintf("%s-%02d", prefix, i)
		_, err := c.Catalog().Register(&api.CatalogRegistration{
			Node: node, Address: "127.0.0.1", NodeMeta: map[string]string{"external-node": "true"},
			Service: &api.AgentService{ID: "svc", Service: "svc"},
			Check: &api.AgentCheck{Node: node, CheckID: "http", Name: "http", ServiceID: "svc", Status: api.HealthCritical,
				Definition: api.HealthCheckDefinition{HTTP: ht.URL + "/" + node, IntervalDuration: relInterval, TimeoutDuration: time.Second}},
		}, nil)
		if err != nil {
			t.Fatalf("registering %s: %v", node, err)
		}
		nodes = append(nodes, node)
	}
	return nodes
}

// checkStatuses returns the catalog status of every external node's "http" check by node.
func checkStatuses(c *api.Client) (map[string]string, error) {
	checks, _, err := c.Health().State(api.HealthAny, &api.QueryOptions{NodeMeta: map[string]string{"external-node": "true"}})
	if err != nil {
		return nil, err
	}
	out := make(map[string]string, len(checks))
	for _, ch := range checks {
		if ch.CheckID == "http" {
			out[ch.Node] = ch.Status
		}
	}
	return out, nil
}

// waitStatuses waits until every node's check has status want in the catalog.
func waitStatuses(t testing.TB, c *api.Client, nodes []string, want string, timeout time.Duration) {
	t.Helper()
	waitFor(t, timeout, func() error {
		got, err := checkStatuses(c)
		if err != nil {
			return err
		}
		for _, n := range nodes {
			if got[n] != want {
				return fmt.Errorf("%s is %q, want %q", n, got[n], want)
			}
		}
		return nil
	})
}

// waitRunsSince waits until every node's check ran at least n times after since.
func waitRunsSince(t testing.TB, ht *hitTarget, nodes []string, since time.Time, n int, timeout time.Duration) {
	t.Helper()
	waitFor(t, timeout, func() error {
		for _, node := range nodes {
			if got := ht.countIn("/"+node, since, time.Now().Add(time.Hour)); got < n {
				return fmt.Errorf("%s ran %d times since the mark, want %d", node, got, n)
			}
		}
		return nil
	})
}

// configFor is testConfig for a Consul at addr that is not a testutil server.
func configFor(addr string) *Config {
	return testConfig(&testConsul{TestServer: &testutil.TestServer{HTTPAddr: addr}})
}

// ---------------------------------------------------------------------------------------------
// A Consul server we can kill and restart on the same data dir

// consulProc is a single-server Consul (not -dev: it keeps its state in dataDir) that the test can
// kill and start again on the same ports and data, which sdk/testutil cannot do.
type consulProc struct {
	bin     string
	dataDir string
	ports   []int // HTTP, Serf LAN, Serf WAN, server RPC
	logs    *logBuffer
	client  *api.Client

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
}

func startConsulProc(t *testing.T) *consulProc {
	t.Helper()
	bin, err := exec.LookPath("consul")
	if err != nil {
		t.Fatalf("no `consul` on PATH (run `make consul` and put bin/ on PATH): %v", err)
	}
	cp := &consulProc{bin: bin, dataDir: t.TempDir(), ports: freeport.GetN(t, 4), logs: &logBuffer{}}
	cp.client, err = api.NewClient(&api.Config{Address: cp.addr()})
	if err != nil {
		t.Fatal(err)
	}
	// Registered after TempDir and freeport: runs before the data dir is removed and the ports returned.
	t.Cleanup(func() {
		cp.stop(t, syscall.SIGKILL)
		if t.Failed() {
			t.Logf("consul output:\n%s", cp.logs.String())
		}
	})
	cp.start(t)
	return cp
}

func (cp *consulProc) addr() string { return "127.0.0.1:" + strconv.Itoa(cp.ports[0]) }

// start launches the server in its own process group and waits until it has elected itself leader.
// It returns when the leader was first seen.
func (cp *consulProc) start(t testing.TB) time.Time {
	t.Helper()
	p := func(i int) string { return strconv.Itoa(cp.ports[i]) }
	cmd := exec.Command(cp.bin, "agent", "-server", "-bootstrap", "-node", "esm-restart",
		"-data-dir", cp.dataDir, "-bind", "127.0.0.1", "-client", "127.0.0.1",
		"-http-port", p(0), "-serf-lan-port", p(1), "-serf-wan-port", p(2), "-server-port", p(3),
		"-dns-port", "-1", "-grpc-port", "-1", "-log-level", "info",
		"-hcl", `session_ttl_min = "1s"`,
		"-hcl", `performance { raft_multiplier = 1 }`,
		"-hcl", `ports { grpc_tls = -1 }`,
		"-hcl", `disable_update_check = true`)
	cmd.Stdout, cmd.Stderr = cp.logs, cp.logs
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting consul: %v", err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	cp.mu.Lock()
	cp.cmd, cp.exited = cmd, exited
	cp.mu.Unlock()

	var ready time.Time
	waitFor(t, 30*time.Second, func() error {
		select {
		case <-exited:
			return fmt.Errorf("consul exited: %s", cp.logs.String())
		default:
		}
		leader, err := cp.client.Status().Leader()
		if err != nil {
			return err
		}
		if leader == "" {
			return errNotYet
		}
		ready = time.Now()
		return nil
	})
	return ready
}

// stop signals the whole process group and waits for the server to exit (SIGKILL after 10s).
// Safe to call when it is not running.
func (cp *consulProc) stop(t testing.TB, sig syscall.Signal) {
	cp.mu.Lock()
	cmd, exited := cp.cmd, cp.exited
	cp.cmd = nil
	cp.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = syscall.Kill(-cmd.Process.Pid, sig)
	select {
	case <-exited:
		return
	case <-time.After(10 * time.Second):
	}
	t.Errorf("consul did not exit within 10s of %s; killing it", sig)
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	<-exited
}

// ---------------------------------------------------------------------------------------------
// 1. Consul restarts while ESM runs

// TestReliabilityConsulRestart restarts the Consul server under two running ESM instances, first
// gracefully (SIGTERM) and then as a crash (SIGKILL), each time on the same data dir and ports. During
// each outage half of the targets change health; right after Consul is back the other half does. Both
// changes must reach the catalog within two check intervals (plus a second of slack for the round
// trips), every check must be executed again within two intervals, both instances must be registered
// and passing again, and exactly one of them must lead again. Parallel: its bounds leave seconds of
// slack over what it measures with other tests running.
func TestReliabilityConsulRestart(t *testing.T) {
	t.Parallel()
	const (
		outage = 4 * time.Second // longer than the session TTL (2s) and the agent TTL (3s)
		slack  = time.Second
	)
	cp := startConsulProc(t)
	ht := newHitTarget(t)
	nodes := registerHitNodes(t, cp.client, "restart", 6, ht)
	during, after := nodes[:3], nodes[3:] // flipped during the outage / right after Consul is back

	agents := []*runningAgent{startAgent(t, configFor(cp.addr())), startAgent(t, configFor(cp.addr()))}
	waitAssigned(t, cp.client, agents, nodes)
	waitStatuses(t, cp.client, nodes, api.HealthPassing, 20*time.Second)

	failing := false
	for _, restart := range []struct {
		name string
		sig  syscall.Signal
	}{{"SIGTERM", syscall.SIGTERM}, {"SIGKILL", syscall.SIGKILL}} {
		t.Run(restart.name, func(t *testing.T) {
			failing = !failing
			want := api.HealthPassing
			if failing {
				want = api.HealthCritical
			}
			downAt := time.Now()
			cp.stop(t, restart.sig)
			stopped := time.Now()
			for _, n := range during {
				ht.setFailing("/"+n, failing)
			}
			// The point of the test: Consul stays down for a while (sessions and TTLs run out).
			time.Sleep(outage - time.Since(downAt))
			restartAt := time.Now()
			backAt := cp.start(t)
			for _, n := range after {
				ht.setFailing("/"+n, failing)
			}
			flipAt := time.Now()
			t.Logf("consul stopped in %s, down %s, restarted and leader after %s",
				stopped.Sub(downAt).Round(time.Millisecond), restartAt.Sub(downAt).Round(time.Millisecond),
				backAt.Sub(restartAt).Round(time.Millisecond))
			for _, n := range nodes {
				runs := ht.countIn("/"+n, stopped, restartAt)
				if runs == 0 {
					t.Errorf("%s: no check run while Consul was down", n)
				}
			}

			// Written: poll the catalog and note when each check first shows the new status.
			written := map[string]time.Time{}
			waitFor(t, 15*time.Second, func() error {
				got, err := checkStatuses(cp.client)
				if err != nil {
					return err
				}
				now := time.Now()
				var missing []string
				for _, n := range nodes {
					if _, ok := written[n]; !ok && got[n] == want {
						written[n] = now
					}
					if _, ok := written[n]; !ok {
						missing = append(missing, n)
					}
				}
				if len(missing) > 0 {
					return fmt.Errorf("still not %s: %v", want, missing)
				}
				return nil
			})
			bound := 2*relInterval + slack
			for _, n := range nodes {
				ref, what := flipAt, "after the flip"
				if slices.Contains(during, n) {
					ref, what = backAt, "after Consul was back"
				}
				lag := written[n].Sub(ref)
				t.Logf("%s: %s written %s %s", n, want, lag.Round(time.Millisecond), what)
				if lag > bound {
					t.Errorf("%s: status %s written %s %s, bound %s", n, want, lag, what, bound)
				}
			}
			// Executed: every check ran within two intervals of Consul being back.
			waitFor(t, time.Until(backAt.Add(2*relInterval+slack)), func() error {
				for _, n := range nodes {
					if _, ok := ht.firstAfter("/"+n, backAt); !ok {
						return fmt.Errorf("%s not run since Consul was back", n)
					}
				}
				return nil
			})
			var firstRuns []string
			for _, n := range nodes {
				first, _ := ht.firstAfter("/"+n, backAt)
				firstRuns = append(firstRuns, fmt.Sprintf("%s +%s", n, first.Sub(backAt).Round(time.Millisecond)))
				if first.Sub(backAt) > 2*relInterval {
					t.Errorf("%s: first run %s after Consul was back, want within %s", n, first.Sub(backAt), 2*relInterval)
				}
			}
			t.Logf("first runs after Consul was back: %s", strings.Join(firstRuns, ", "))

			// Registered and passing again, and exactly one leader.
			waitFor(t, 15*time.Second, func() error {
				entries, _, err := cp.client.Health().Service("consul-esm", "", true, nil)
				if err != nil {
					return err
				}
				if len(entries) != len(agents) {
					return fmt.Errorf("%d passing ESM instances, want %d", len(entries), len(agents))
				}
				if l := leaders(agents); len(l) != 1 {
					return fmt.Errorf("%d leaders", len(l))
				}
				return nil
			})
			t.Logf("instances registered and passing, one leader, %s after Consul was back", time.Since(backAt).Round(time.Millisecond))
			waitAssigned(t, cp.client, agents, nodes)
		})
	}
	for _, ra := range agents {
		if n := strings.Count(ra.logs.String(), "[ERROR]"); n > 20 {
			t.Errorf("%s logged %d errors over two Consul restarts", ra.serviceID, n)
		}
	}
}

// TestReliabilityLeaderLosesLock takes the lock away from a running leader (its session is destroyed,
// as when Consul invalidates it after a restart or a failed health check) while the instance keeps
// running: it must notice, end its term (no leader work without the lock) and compete again, so it
// leads again once the lock delay has passed, and its leader work still reacts to changes.
func TestReliabilityLeaderLosesLock(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	c := srv.Client
	registerExternalNode(t, c, "lock-a", false)
	cfg := testConfig(srv)
	ra := startAgent(t, cfg)
	waitAssigned(t, c, []*runningAgent{ra}, []string{"lock-a"})

	pair, _, err := c.KV().Get("consul-esm/leader", nil)
	if err != nil || pair == nil || pair.Session == "" {
		t.Fatalf("leader key = %+v, %v", pair, err)
	}
	lostAt := time.Now()
	if _, err := c.Session().Destroy(pair.Session, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, func() error {
		if !strings.Contains(ra.logs.String(), "Lost leadership") {
			return errNotYet
		}
		return nil
	})
	waitFor(t, 10*time.Second, func() error {
		p, _, err := c.KV().Get("consul-esm/leader", nil)
		if err != nil {
			return err
		}
		if p == nil || p.Session == "" || p.Session == pair.Session || !ra.status.leader.Load() {
			return fmt.Errorf("not leading again (leader key %+v)", p)
		}
		return nil
	})
	t.Logf("lock lost and taken again after %s (lock delay %s)", time.Since(lostAt).Round(time.Millisecond), cfg.LockDelay)
	registerExternalNode(t, c, "lock-b", false)
	waitAssigned(t, c, []*runningAgent{ra}, []string{"lock-a", "lock-b"})
}

// ---------------------------------------------------------------------------------------------
// 2. Leader crash: the longest time any check went unexecuted

// TestReliabilityLeaderCrashGaps crashes the leader of three instances (Run returns without releasing
// the lock or deregistering, as after SIGKILL) and records at the targets when every check ran. The
// lock is free once the dead instance's TTL check (bound to its session) or the session itself
// expires, then the lock delay runs; the new leader hands the dead instance's nodes to the survivors,
// which start them within one interval. So no check may go unexecuted longer than
// TTL + lock delay + 2 intervals (the interval it last ran before the crash, and the random start
// within one interval after the handover), plus the Consul round trips of the handover. Checks that
// stay with a survivor must not notice the crash at all. Serial: a survivor's check may run at most
// half an interval late.
func TestReliabilityLeaderCrashGaps(t *testing.T) {
	srv := newTestConsul(t)
	c := srv.Client
	ht := newHitTarget(t)
	nodes := registerHitNodes(t, c, "crash", 12, ht)

	crashCfg := testConfig(srv)
	crasher := startAgentOpts(t, crashCfg, AgentOptions{crashOnStop: true})
	waitLeader(t, crasher, 10*time.Second)
	survivors := []*runningAgent{startAgent(t, testConfig(srv)), startAgent(t, testConfig(srv))}
	before := waitAssigned(t, c, append([]*runningAgent{crasher}, survivors...), nodes)
	orphans := before[crasher.serviceID].all()
	waitStatuses(t, c, nodes, api.HealthPassing, 15*time.Second)
	waitRunsSince(t, ht, nodes, time.Now(), 2, 10*time.Second) // steady state: every check runs

	crashAt := time.Now()
	if err := crasher.stop(t); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, func() error {
		if len(leaders(survivors)) != 1 {
			return errNotYet
		}
		return nil
	})
	tookLock := time.Since(crashAt)
	waitAssigned(t, c, survivors, nodes)
	reassignedAt := time.Now()
	waitRunsSince(t, ht, nodes, reassignedAt, 2, 10*time.Second)
	end := time.Now()

	// The lock is free when the dead instance's TTL check fails (it is bound to the session) or the
	// session expires, which Consul does at 2 x its TTL. roundTrips covers what the bound leaves out:
	// the new leader's lock-retry poll (LockDelay/8, at least 100ms), its assignment write, the
	// survivor's assignment watch and check load, each a Consul round trip (measured: the survivors
	// own the nodes 3.3-3.65s after the crash, TTL + lock delay being 3.5s).
	const roundTrips = 500 * time.Millisecond
	ttl := min(crashCfg.AgentTTL, 2*crashCfg.SessionTTL)
	bound := ttl + crashCfg.LockDelay + 2*relInterval
	var worst time.Duration
	var worstNode string
	var lines []string
	for _, n := range nodes {
		gap := worstGap(ht.hitsOf("/"+n), crashAt.Add(-2*relInterval), end)
		owner := "survivor"
		if slices.Contains(orphans, n) {
			owner = "crashed"
		}
		lines = append(lines, fmt.Sprintf("%s (%s) %s", n, owner, gap.Round(time.Millisecond)))
		if gap > worst {
			worst, worstNode = gap, n
		}
		if gap > bound+roundTrips {
			t.Errorf("%s (owned by the %s instance) went unexecuted for %s, bound %s + %s for round trips", n, owner, gap, bound, roundTrips)
		}
		if owner == "survivor" && gap > relInterval+relInterval/2 {
			t.Errorf("%s stayed with a survivor but went unexecuted for %s", n, gap)
		}
	}
	t.Logf("leader crash: lock taken after %s, nodes reassigned after %s; %d of %d checks orphaned",
		tookLock.Round(time.Millisecond), reassignedAt.Sub(crashAt).Round(time.Millisecond), len(orphans), len(nodes))
	t.Logf("worst gaps per check: %s", strings.Join(lines, ", "))
	t.Logf("WORST GAP %s (%s), bound %s = TTL %s + lock delay %s + 2 x interval %s (asserted with %s for round trips)",
		worst.Round(time.Millisecond), worstNode, bound, ttl, crashCfg.LockDelay, relInterval, roundTrips)
}

// ---------------------------------------------------------------------------------------------
// 3. Instance churn

const (
	// churnDuration is how long instances keep coming and going; churnStep the time between changes.
	churnDuration = 20 * time.Second
	churnStep     = 2500 * time.Millisecond
	// churnWindow is the window over which runs per check are counted once the cluster settled.
	churnWindow = 6 * time.Second
)

// TestReliabilityInstanceChurn starts with three instances and then, every churnStep for
// churnDuration, stops one (gracefully, or as a crash for every third instance started) or starts a
// new one, the leader included. Afterwards, with three instances settled, every check must be run by
// exactly one instance (churnWindow/interval runs in the window, not twice that; and in exactly one
// runner's state), and once all instances stopped no goroutine may be left behind. Serial: it
// counts runs in a fixed window and the process's goroutines.
func TestReliabilityInstanceChurn(t *testing.T) {
	srv := newTestConsul(t)
	// The test's own Consul client on a transport it can drain, so its keep-alive connections do not
	// count as goroutines left behind by the agents.
	tr := &http.Transport{MaxIdleConnsPerHost: 4, IdleConnTimeout: 30 * time.Second}
	t.Cleanup(tr.CloseIdleConnections)
	c, err := api.NewClient(&api.Config{Address: srv.HTTPAddr, Transport: tr})
	if err != nil {
		t.Fatal(err)
	}
	ht := newHitTarget(t)
	nodes := registerHitNodes(t, c, "churn", 12, ht)
	tr.CloseIdleConnections()
	baseline := runtime.NumGoroutine()

	started := 0
	start := func() *runningAgent {
		crash := started%3 == 2
		started++
		return startAgentOpts(t, testConfig(srv), AgentOptions{crashOnStop: crash})
	}
	var all, live []*runningAgent
	for i := 0; i < 3; i++ {
		ra := start()
		all, live = append(all, ra), append(live, ra)
	}
	waitAssigned(t, c, live, nodes)
	waitStatuses(t, c, nodes, api.HealthPassing, 15*time.Second)

	rng := rand.New(rand.NewPCG(10, uint64(time.Now().UnixNano())))
	churnStart := time.Now()
	var events []string
	for time.Since(churnStart) < churnDuration {
		// The point of the test: the membership changes every churnStep, settled or not.
		time.Sleep(churnStep)
		at := time.Since(churnStart).Round(100 * time.Millisecond)
		if len(live) == 3 {
			k := rng.IntN(len(live))
			victim := live[k]
			live = slices.Delete(live, k, k+1)
			how := "stop"
			if victim.opts.crashOnStop {
				how = "crash"
			}
			if victim.status.leader.Load() {
				how += " leader"
			}
			if err := victim.stop(t); err != nil {
				t.Fatal(err)
			}
			events = append(events, fmt.Sprintf("%s %s %s", at, how, victim.serviceID[len("consul-esm:"):][:8]))
		} else {
			ra := start()
			all, live = append(all, ra), append(live, ra)
			events = append(events, fmt.Sprintf("%s start %s", at, ra.serviceID[len("consul-esm:"):][:8]))
		}
	}
	if len(live) < 3 {
		ra := start()
		all, live = append(all, ra), append(live, ra)
		events = append(events, fmt.Sprintf("%s start %s", time.Since(churnStart).Round(100*time.Millisecond), ra.serviceID[len("consul-esm:"):][:8]))
	}
	churnEnd := time.Now()
	t.Logf("churn over %s: %d instances started in all; %s", churnEnd.Sub(churnStart).Round(100*time.Millisecond), len(all), strings.Join(events, ", "))

	// Settled: one leader, the assignment covers every node across exactly the live instances (the
	// crashed ones' keys removed once their TTL checks failed), and every check runs in one runner.
	waitAssigned(t, c, live, nodes)
	waitFor(t, 10*time.Second, func() error {
		if l := leaders(live); len(l) != 1 {
			return fmt.Errorf("%d leaders", len(l))
		}
		owners := map[string][]string{}
		for _, ra := range live {
			ra.runner.mu.Lock()
			for key := range ra.runner.states {
				owners[key] = append(owners[key], ra.serviceID)
			}
			ra.runner.mu.Unlock()
		}
		for _, n := range nodes {
			if o := owners[n+"/svc/http"]; len(o) != 1 {
				return fmt.Errorf("%s runs in %d instances %v", n, len(o), o)
			}
		}
		if len(owners) != len(nodes) {
			return fmt.Errorf("%d checks running, want %d", len(owners), len(nodes))
		}
		return nil
	})
	settled := time.Now()
	t.Logf("settled %s after the churn", settled.Sub(churnEnd).Round(time.Millisecond))

	// Count the runs of every check over churnWindow, starting one interval after settling (checks
	// that just moved start at a random point within their first interval).
	windowStart := settled.Add(relInterval)
	windowEnd := windowStart.Add(churnWindow)
	// The point of the test: runs are counted over a fixed window.
	time.Sleep(time.Until(windowEnd) + 100*time.Millisecond)
	want := int(churnWindow / relInterval)
	var counts []string
	for _, n := range nodes {
		got := ht.countIn("/"+n, windowStart, windowEnd)
		counts = append(counts, fmt.Sprintf("%s=%d", n, got))
		if got < want-1 || got > want+1 {
			t.Errorf("%s ran %d times in %s at interval %s, want %d +- 1 (exactly one instance running it)", n, got, churnWindow, relInterval, want)
		}
	}
	t.Logf("runs per check in %s (want %d): %s", churnWindow, want, strings.Join(counts, " "))

	var worst time.Duration
	for _, n := range nodes {
		worst = max(worst, worstGap(ht.hitsOf("/"+n), churnStart, windowEnd))
	}
	t.Logf("longest a check went unexecuted during the churn: %s", worst.Round(time.Millisecond))

	// Every instance stopped: no goroutine is left behind (Run returns only after everything it
	// started returned; the agents' Consul and probe connections are closed with them).
	for _, ra := range all {
		if err := ra.stop(t); err != nil {
			t.Fatal(err)
		}
	}
	tr.CloseIdleConnections()
	const slack = 4
	var last int
	deadline := time.Now().Add(10 * time.Second)
	for {
		last = runtime.NumGoroutine()
		if last <= baseline+slack || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("goroutines: %d before the first instance started, %d after all %d stopped", baseline, last, len(all))
	if last > baseline+slack {
		t.Errorf("goroutine leak: %d goroutines, %d before the instances ran (slack %d)\n%s", last, baseline, slack, goroutineDump())
	}
}

// goroutineDump returns the goroutine stacks grouped by identical stack, most frequent first.
func goroutineDump() string {
	var b bytes.Buffer
	_ = pprof.Lookup("goroutine").WriteTo(&b, 1)
	return b.String()
}
