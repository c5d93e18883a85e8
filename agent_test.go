package main

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

func serviceEntry(t *testing.T, c *api.Client, id string) (*api.AgentService, *api.AgentCheck) {
	t.Helper()
	svc, _, err := c.Agent().Service(id, nil)
	if err != nil {
		return nil, nil
	}
	checks, err := c.Agent().Checks()
	if err != nil {
		t.Fatal(err)
	}
	return svc, checks[id+":agent-ttl"]
}

func TestAgentRegistrationLifecycle(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	cfg := testConfig(srv)
	cfg.Tag = "blue"
	ra := startAgent(t, cfg)
	id := ra.serviceID
	if !strings.HasPrefix(id, "consul-esm:") || len(id) != len("consul-esm:")+36 {
		t.Fatalf("service ID %q is not consul-esm:<uuid>", id)
	}

	waitFor(t, 10*time.Second, func() error {
		svc, check := serviceEntry(t, srv.Client, id)
		if svc == nil || check == nil {
			return errNotYet
		}
		if svc.Service != "consul-esm" || !slices.Equal(svc.Tags, []string{"blue"}) || svc.Meta["external-source"] != "consul-esm" {
			return fmt.Errorf("service = %+v", svc)
		}
		if check.Name != ttlCheckName || check.Notes != ttlCheckNotes || check.ServiceID != id || check.Status != api.HealthPassing {
			return fmt.Errorf("ttl check = %+v", check)
		}
		return nil
	})

	// The TTL (3s) is kept passing by refreshes, well past its own length.
	deadline := time.Now().Add(4 * time.Second)
	for time.Now().Before(deadline) {
		if _, check := serviceEntry(t, srv.Client, id); check == nil || check.Status != api.HealthPassing {
			t.Fatalf("TTL check not kept passing: %+v", check)
		}
		time.Sleep(250 * time.Millisecond)
	}

	// An operator deregisters the service: the keeper restores it.
	if err := srv.Client.Agent().ServiceDeregister(id); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() error {
		if svc, check := serviceEntry(t, srv.Client, id); svc == nil || check == nil || check.Status != api.HealthPassing {
			return errNotYet
		}
		return nil
	})
	if !strings.Contains(ra.logs.String(), "Service registration was lost, reregistering") {
		t.Errorf("no re-registration log line")
	}

	start := time.Now()
	if err := ra.stop(t); err != nil {
		t.Fatalf("Run returned %v", err)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("shutdown took %s", el)
	}
	if svc, check := serviceEntry(t, srv.Client, id); svc != nil || check != nil {
		t.Fatalf("service left behind after shutdown: %+v %+v", svc, check)
	}
}

// TestAgentDuplicateInstanceID: with a fixed instance_id, a restart right after a crash (the dead
// registration's TTL check still passing) waits, logging it once, and takes the registration over
// once the TTL check turns critical; it never exits for this (five such exits used to exhaust the
// systemd unit's start limit). A second live instance with the same ID waits too.
func TestAgentDuplicateInstanceID(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	cfg := testConfig(srv)
	cfg.InstanceID = "fixed"
	crashed := startAgentOpts(t, cfg, AgentOptions{crashOnStop: true})
	waitFor(t, 10*time.Second, func() error {
		if _, check := serviceEntry(t, srv.Client, crashed.serviceID); check == nil || check.Status != api.HealthPassing {
			return errNotYet
		}
		return nil
	})
	if err := crashed.stop(t); err != nil {
		t.Fatal(err)
	}
	crashedAt := time.Now()

	cfg2 := testConfig(srv)
	cfg2.InstanceID = "fixed"
	restarted := startAgent(t, cfg2)
	const waiting = "Waiting for the registration with this service id to expire before taking it over"
	waitFor(t, 10*time.Second, func() error {
		if !strings.Contains(restarted.logs.String(), waiting) {
			return errNotYet
		}
		return nil
	})
	waitFor(t, cfg.AgentTTL+5*time.Second, func() error {
		select {
		case err := <-restarted.done:
			t.Fatalf("the restarted instance exited: %v", err)
		default:
		}
		if !restarted.status.registered.Load() {
			return errNotYet
		}
		if _, check := serviceEntry(t, srv.Client, restarted.serviceID); check == nil || check.Status != api.HealthPassing {
			return errNotYet
		}
		return nil
	})
	t.Logf("restart after a crash took over the registration %s after the crash (agent TTL %s)",
		time.Since(crashedAt).Round(10*time.Millisecond), cfg.AgentTTL)
	if n := strings.Count(restarted.logs.String(), waiting); n != 1 {
		t.Errorf("the wait was logged %d times, want once", n)
	}

	// A live duplicate waits as well, for as long as the other lives.
	cfg3 := testConfig(srv)
	cfg3.InstanceID = "fixed"
	dup := startAgent(t, cfg3)
	waitFor(t, 10*time.Second, func() error {
		if !strings.Contains(dup.logs.String(), waiting) {
			return errNotYet
		}
		return nil
	})
	select {
	case err := <-dup.done:
		t.Fatalf("the duplicate exited: %v", err)
	case <-time.After(2 * time.Second): // the point: it is still waiting, not gone
	}
	if dup.status.registered.Load() {
		t.Fatal("the duplicate registered while the live instance holds the service id")
	}
}

// leaders returns the running agents that believe they lead.
func leaders(agents []*runningAgent) []*runningAgent {
	var out []*runningAgent
	for _, a := range agents {
		if a.status.leader.Load() {
			out = append(out, a)
		}
	}
	return out
}

func kvAssignments(t *testing.T, c *api.Client) (map[string]assignment, map[string]uint64) {
	t.Helper()
	pairs, _, err := c.KV().List("consul-esm/agents/", nil)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]assignment{}
	idx := map[string]uint64{}
	for _, p := range pairs {
		as, err := decodeAssignment(p.Value)
		if err != nil {
			continue // not an assignment (tests that corrupt keys wait for the leader to repair them)
		}
		id := strings.TrimPrefix(p.Key, "consul-esm/agents/")
		out[id] = as
		idx[id] = p.ModifyIndex
	}
	return out, idx
}

func registerExternalNode(t *testing.T, c *api.Client, name string, probe bool) {
	t.Helper()
	meta := map[string]string{"external-node": "true"}
	if probe {
		meta["external-probe"] = "true"
	}
	_, err := c.Catalog().Register(&api.CatalogRegistration{Node: name, Address: "127.0.0.1", NodeMeta: meta}, nil)
	if err != nil {
		t.Fatal(err)
	}
}

// waitAssigned waits until the KV assignments cover exactly nodes across exactly the given agents.
func waitAssigned(t *testing.T, c *api.Client, agents []*runningAgent, nodes []string) map[string]assignment {
	t.Helper()
	var got map[string]assignment
	waitFor(t, 15*time.Second, func() error {
		got, _ = kvAssignments(t, c)
		if len(got) != len(agents) {
			return fmt.Errorf("%d assignment keys, want %d", len(got), len(agents))
		}
		var all []string
		for _, a := range agents {
			as, ok := got[a.serviceID]
			if !ok {
				return fmt.Errorf("no key for %s", a.serviceID)
			}
			all = append(all, as.all()...)
			// The worker applied it: the runner has exactly these nodes.
			if have, want := sorted(a.runner.assignedNodes()), sorted(as.all()); !slices.Equal(have, want) {
				return fmt.Errorf("%s runs %v, assigned %v", a.serviceID, have, want)
			}
		}
		if !slices.Equal(sorted(all), sorted(nodes)) {
			return fmt.Errorf("assigned %v, want %v", sorted(all), nodes)
		}
		return nil
	})
	return got
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

func TestLeaderElectionAndAssignment(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	nodes := []string{"ext-1", "ext-2", "ext-3", "ext-4", "ext-5", "ext-6", "ext-7"}
	for i, n := range nodes {
		registerExternalNode(t, srv.Client, n, i%3 == 0)
	}

	var agents []*runningAgent
	for i := 0; i < 3; i++ {
		agents = append(agents, startAgent(t, testConfig(srv)))
		before, _ := kvAssignments(t, srv.Client)
		got := waitAssigned(t, srv.Client, agents, nodes)
		if i > 0 {
			if m, limit := moved(before, got), (len(nodes)+i)/(i+1)+1; m > limit {
				t.Errorf("instance %d joining moved %d nodes, limit %d", i+1, m, limit)
			}
		}
		if l := leaders(agents); len(l) != 1 {
			t.Fatalf("%d leaders among %d instances", len(l), len(agents))
		}
	}

	// Nothing changes: the KV keys are not rewritten.
	_, idxBefore := kvAssignments(t, srv.Client)
	registerExternalNode(t, srv.Client, "ext-2", false) // same node again: a catalog write without a change
	time.Sleep(time.Second)                             // the point of the test: give the leader time to (not) write
	_, idxAfter := kvAssignments(t, srv.Client)
	for id, i := range idxBefore {
		if idxAfter[id] != i {
			t.Errorf("assignment of %s rewritten without a change (ModifyIndex %d -> %d)", id, i, idxAfter[id])
		}
	}

	// A node joins: it is assigned, nothing else moves.
	before, _ := kvAssignments(t, srv.Client)
	registerExternalNode(t, srv.Client, "ext-0", false)
	nodes = append(nodes, "ext-0")
	got := waitAssigned(t, srv.Client, agents, nodes)
	if m := moved(before, got); m != 0 {
		t.Errorf("a new node moved %d others", m)
	}

	// The leader shuts down: another takes over quickly (lock released, not expired) and its nodes move.
	leader := leaders(agents)[0]
	start := time.Now()
	if err := leader.stop(t); err != nil {
		t.Fatal(err)
	}
	rest := slices.DeleteFunc(slices.Clone(agents), func(a *runningAgent) bool { return a == leader })
	waitFor(t, 10*time.Second, func() error {
		if len(leaders(rest)) != 1 {
			return errNotYet
		}
		return nil
	})
	handover := time.Since(start)
	t.Logf("leader handover after graceful shutdown: %s", handover)
	if handover > 3*time.Second {
		t.Errorf("handover took %s", handover)
	}
	waitAssigned(t, srv.Client, rest, nodes)
}

func TestCheckConsulVersions(t *testing.T) {
	for _, tc := range []struct {
		versions []string
		ok       bool
	}{
		{nil, false},
		{[]string{"1.4.1"}, true},
		{[]string{"1.22.7", "1.22.7"}, true},
		{[]string{"1.10.0-beta1"}, true},
		{[]string{"1.18.2+ent"}, true},
		{[]string{"1.4.0"}, false},
		{[]string{"1.22.0", "1.0.0"}, false},
		{[]string{"not-a-version"}, false},
		{[]string{""}, false},
	} {
		err := checkConsulVersions(tc.versions)
		if (err == nil) != tc.ok {
			t.Errorf("%v: err = %v, want ok=%v", tc.versions, err, tc.ok)
		}
	}
	err := checkConsulVersions([]string{"1.22.0", "1.0.0"})
	if err == nil || !strings.Contains(err.Error(), "(1.22.0, 1.0.0)") || !strings.Contains(err.Error(), "https://www.consul.io/docs/upgrading.html") {
		t.Errorf("incompatible message = %v", err)
	}
}

// fakeConsul serves just enough of Consul's API for the startup checks.
func fakeConsul(t *testing.T, agentVersion string, serverVersions []string, status429 *atomic.Int32) *httptest.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/status/leader", func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, `"127.0.0.1:8300"`) })
	mux.HandleFunc("/v1/agent/self", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, `{"Config":{"Version":%q}}`, agentVersion)
	})
	mux.HandleFunc("/v1/catalog/service/consul", func(w http.ResponseWriter, r *http.Request) {
		if status429 != nil && status429.Add(-1) >= 0 {
			w.WriteHeader(http.StatusTooManyRequests)
			return
		}
		var parts []string
		for _, v := range serverVersions {
			parts = append(parts, fmt.Sprintf(`{"ServiceMeta":{"version":%q}}`, v))
		}
		fmt.Fprintf(w, "[%s]", strings.Join(parts, ","))
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}

func TestVerifyConsulCompatibility(t *testing.T) {
	for _, tc := range []struct {
		name    string
		agent   string
		servers []string
		n429    int
		wantErr string
	}{
		{"good", "1.22.7", []string{"1.22.7"}, 0, ""},
		{"bad agent", "1.0.0", []string{"1.22.7"}, 0, "is incompatible"},
		{"bad server", "1.22.7", []string{"1.2.0"}, 0, "is incompatible"},
		{"no server meta", "1.22.7", nil, 0, ""},
		{"rate limited then ok", "1.22.7", []string{"1.22.7"}, 2, ""},
		{"unparseable", "garbage", nil, 0, "unable to parse Consul version"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var n atomic.Int32
			n.Store(int32(tc.n429))
			fake := fakeConsul(t, tc.agent, tc.servers, &n)
			cfg := DefaultConfig()
			cfg.HTTPAddr = fake.Listener.Addr().String()
			cfg.RetryInterval = 40 * time.Millisecond
			a, err := NewAgent(cfg, hclog.NewNullLogger(), AgentOptions{})
			if err != nil {
				t.Fatal(err)
			}
			err = a.verifyConsulCompatibility(t.Context())
			if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
		})
	}
}

// TestLeaderCrashFailover kills the leader without any cleanup (as SIGKILL would) and measures how
// long until the survivor leads and owns the dead instance's nodes: bounded by the session/TTL-check
// expiry plus the lock delay. Parallel: the bound leaves two seconds of slack with other tests
// running.
func TestLeaderCrashFailover(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	nodes := []string{"n1", "n2", "n3", "n4"}
	for _, n := range nodes {
		registerExternalNode(t, srv.Client, n, false)
	}
	crashCfg := testConfig(srv)
	crasher := startAgentOpts(t, crashCfg, AgentOptions{crashOnStop: true})
	waitLeader(t, crasher, 10*time.Second)
	survivor := startAgent(t, testConfig(srv))
	waitAssigned(t, srv.Client, []*runningAgent{crasher, survivor}, nodes)

	start := time.Now()
	if err := crasher.stop(t); err != nil {
		t.Fatal(err)
	}
	waitLeader(t, survivor, 20*time.Second)
	tookLock := time.Since(start)
	waitAssigned(t, srv.Client, []*runningAgent{survivor}, nodes)
	reassigned := time.Since(start)
	// The bound: the dead instance's TTL check (AgentTTL) or session (2 x SessionTTL) expires, then
	// the lock delay runs.
	bound := max(crashCfg.AgentTTL, 2*crashCfg.SessionTTL) + crashCfg.LockDelay + time.Second
	t.Logf("crash failover: lock taken after %s, nodes reassigned after %s (bound %s)", tookLock, reassigned, bound)
	if reassigned > bound {
		t.Errorf("failover took %s, bound %s", reassigned, bound)
	}
}

func TestAgentShutdownWithConsulGone(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	ra := startAgent(t, testConfig(srv))
	waitLeader(t, ra, 10*time.Second)
	_ = srv.Stop() // consul exits non-zero on interrupt; only its absence matters here
	start := time.Now()
	if err := ra.stop(t); err != nil {
		t.Fatalf("Run = %v", err)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Fatalf("shutdown with Consul gone took %s", el)
	}
}
