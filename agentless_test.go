package main

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

func agentlessConfig(srv *testConsul) *Config {
	cfg := testConfig(srv)
	cfg.EnableAgentless = true
	cfg.Tag = "test"
	return cfg
}

// sessionCheck returns the agentless instance's own node check, or nil.
func sessionCheck(t *testing.T, c *api.Client, a *runningAgent) *api.HealthCheck {
	t.Helper()
	checks, _, err := c.Health().Node(a.agentlessNode(), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, ch := range checks {
		if ch.CheckID == a.sessionCheckID() {
			return ch
		}
	}
	return nil
}

func TestAgentlessRegistrationLifecycle(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	ra := startAgent(t, agentlessConfig(srv))
	id := ra.serviceID

	waitFor(t, 15*time.Second, func() error {
		node, _, err := srv.Client.Catalog().Node(ra.agentlessNode(), nil)
		if err != nil || node == nil {
			return fmt.Errorf("node: %v", err)
		}
		if node.Node.Address != "esm-"+id {
			return fmt.Errorf("node address %q", node.Node.Address)
		}
		svc, ok := node.Services[id]
		if !ok || svc.Service != "consul-esm" || !slices.Equal(svc.Tags, []string{"test"}) || svc.Meta["external-source"] != "consul-esm" {
			return fmt.Errorf("service = %+v", svc)
		}
		check := sessionCheck(t, srv.Client, ra)
		if check == nil || check.Type != "session" || check.Name != ttlCheckName || check.ServiceID != "" {
			return fmt.Errorf("session check = %+v", check)
		}
		if check.Definition.SessionName != id+":health-session" {
			return fmt.Errorf("session name %q", check.Definition.SessionName)
		}
		// Consul >= 1.21 turns the check passing while the health session lives.
		if check.Status != api.HealthPassing {
			return fmt.Errorf("session check %s: %s", check.Status, check.Output)
		}
		return nil
	})
	// Healthy means the instance is seen as a passing ESM instance and leads.
	waitFor(t, 10*time.Second, func() error {
		entries, _, err := srv.Client.Health().Service("consul-esm", "test", true, nil)
		if err != nil || len(entries) != 1 {
			return fmt.Errorf("passing instances %d, %v", len(entries), err)
		}
		if !ra.status.leader.Load() {
			return errNotYet
		}
		return nil
	})

	// An operator removes the service: the keeper restores it without flapping the session check.
	if _, err := srv.Client.Catalog().Deregister(&api.CatalogDeregistration{Node: ra.agentlessNode(), ServiceID: id}, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() error {
		node, _, err := srv.Client.Catalog().Node(ra.agentlessNode(), nil)
		if err != nil || node == nil || node.Services[id] == nil {
			return errNotYet
		}
		return nil
	})
	if c := sessionCheck(t, srv.Client, ra); c == nil || c.Status != api.HealthPassing {
		t.Fatalf("session check after re-registration: %+v", c)
	}

	if err := ra.stop(t); err != nil {
		t.Fatal(err)
	}
	node, _, err := srv.Client.Catalog().Node(ra.agentlessNode(), nil)
	if err != nil || node != nil {
		t.Fatalf("agentless node left behind after shutdown: %+v, %v", node, err)
	}
	sessions, _, err := srv.Client.Session().List(nil)
	if err != nil || len(sessions) != 0 {
		t.Fatalf("sessions left behind: %+v, %v", sessions, err)
	}
}

func TestAgentlessTwoInstancesShareWork(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	nodes := []string{"a1", "a2", "a3"}
	for i, n := range nodes {
		registerExternalNode(t, srv.Client, n, i == 1)
	}
	target := newFlipTarget(t)
	for _, n := range nodes {
		registerHTTPCheck(t, srv.Client, n, "", n+"-http", target.URL, 200*time.Millisecond)
	}
	allChecks := func(want string) func() error {
		return func() error {
			for _, n := range nodes {
				checks, _, err := srv.Client.Health().Node(n, nil)
				if err != nil {
					return err
				}
				for _, c := range checks {
					if c.CheckID == n+"-http" && c.Status != want {
						return fmt.Errorf("%s is %s, want %s", c.CheckID, c.Status, want)
					}
				}
			}
			return nil
		}
	}
	first := startAgent(t, agentlessConfig(srv))
	second := startAgent(t, agentlessConfig(srv))
	agents := []*runningAgent{first, second}
	waitAssigned(t, srv.Client, agents, nodes)
	// Check writes work in agentless mode (batched by batch_flush_interval).
	waitFor(t, 15*time.Second, allChecks(api.HealthPassing))
	target.healthy.Store(false)
	waitFor(t, 15*time.Second, allChecks(api.HealthCritical))
	if l := leaders(agents); len(l) != 1 {
		t.Fatalf("%d leaders", len(l))
	}
	// Each instance holds its health session and a leader-lock session (the follower's waits for the
	// lock), each bound to its own node's session check.
	sessions, _, err := srv.Client.Session().List(nil)
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]int{}
	for _, s := range sessions {
		names[s.Name]++
		if wantCheck := s.Node[:len(s.Node)-len(":node")] + ":session-check"; !slices.Equal(s.NodeChecks, []string{wantCheck}) {
			t.Errorf("session %q on %s bound to %v", s.Name, s.Node, s.NodeChecks)
		}
	}
	if names["consul-esm leader lock"] != 2 || names[first.healthSessionName()] != 1 || names[second.healthSessionName()] != 1 {
		t.Fatalf("sessions = %v", names)
	}

	// The leader leaves: the other takes over and all nodes.
	leader := leaders(agents)[0]
	if err := leader.stop(t); err != nil {
		t.Fatal(err)
	}
	rest := slices.DeleteFunc(slices.Clone(agents), func(a *runningAgent) bool { return a == leader })
	waitAssigned(t, srv.Client, rest, nodes)
	waitFor(t, 10*time.Second, func() error {
		if len(leaders(rest)) != 1 {
			return errNotYet
		}
		return nil
	})
}

func TestAgentlessVersionFloor(t *testing.T) {
	if err := checkAgentlessVersions([]string{"1.22.7", "1.21.0"}); err != nil {
		t.Fatal(err)
	}
	err := checkAgentlessVersions([]string{"1.22.7", "1.20.1"})
	if err == nil || err.Error() != "enable_agentless needs Consul servers >= 1.21.0 (session checks); found 1.22.7, 1.20.1" {
		t.Fatalf("err = %v", err)
	}
}
