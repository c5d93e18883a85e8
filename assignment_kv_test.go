package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// TestLeaderRewritesDriftedAssignments: whatever happens to a key under <kv>agents/ (deleted,
// overwritten, malformed, rolled back), the leader puts the desired assignment back within one
// watch round, and the instance runs its nodes again.
func TestLeaderRewritesDriftedAssignments(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	nodes := []string{"n1", "n2", "n3", "n4"}
	for _, n := range nodes {
		registerExternalNode(t, srv.Client, n, false)
	}
	first := startAgent(t, testConfig(srv))
	waitLeader(t, first, 10*time.Second)
	second := startAgent(t, testConfig(srv))
	agents := []*runningAgent{first, second}
	want := waitAssigned(t, srv.Client, agents, nodes)
	key := "consul-esm/agents/" + second.serviceID
	rolledBack := assignment{Nodes: nodes} // what the key held before the second instance joined

	for _, tc := range []struct {
		name  string
		drift func() error
	}{
		{"deleted", func() error { _, err := srv.Client.KV().Delete(key, nil); return err }},
		{"overwritten", func() error { return putKV(srv.Client, key, `{"Nodes":["n1"],"Probes":[]}`) }},
		{"malformed", func() error { return putKV(srv.Client, key, `{"Nodes":`) }},
		{"rolled back", func() error { return putKV(srv.Client, key, string(rolledBack.encode())) }},
	} {
		start := time.Now()
		if err := tc.drift(); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 5*time.Second, func() error {
			got, _ := kvAssignments(t, srv.Client)
			if as, ok := got[second.serviceID]; !ok || !as.equal(want[second.serviceID]) {
				return fmt.Errorf("key %s holds %+v, want %+v", key, as, want[second.serviceID])
			}
			return nil
		})
		took := time.Since(start)
		waitAssigned(t, srv.Client, agents, nodes)
		t.Logf("key %s: rewritten after %s", tc.name, took)
		if took > 2*time.Second {
			t.Errorf("key %s: rewritten after %s, want within one watch round", tc.name, took)
		}
	}
	if !strings.Contains(first.logs.String(), "Rewrote assignment keys that differed from the leader's assignment") {
		t.Error("the leader did not log the rewrite")
	}
}

// TestAssignmentWriteNeedsTheLeaderLock: an assignment transaction from a session that does not hold
// <kv>leader (a leader deposed while paused) fails as a whole and changes nothing.
func TestAssignmentWriteNeedsTheLeaderLock(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	ra := startAgent(t, testConfig(srv))
	waitLeader(t, ra, 10*time.Second)
	waitFor(t, 10*time.Second, func() error {
		if got, _ := kvAssignments(t, srv.Client); len(got) != 1 {
			return errNotYet
		}
		return nil
	})
	_, before := kvAssignments(t, srv.Client)

	stale, _, err := srv.Client.Session().Create(&api.SessionEntry{TTL: "10s", Behavior: api.SessionBehaviorDelete}, nil)
	if err != nil {
		t.Fatal(err)
	}
	desired := map[string]assignment{"consul-esm:stale-leader": {Nodes: []string{"ghost"}}}
	wrote, err := ra.syncAssignments(context.Background(), stale, desired, nil)
	if !errors.Is(err, errDeposed) || len(wrote) != 0 {
		t.Fatalf("write from a session without the lock: wrote %v, err %v; want errDeposed", wrote, err)
	}
	after, idx := kvAssignments(t, srv.Client)
	if _, ok := after["consul-esm:stale-leader"]; ok || len(idx) != len(before) {
		t.Fatalf("the deposed write landed: %v", after)
	}
}

// TestWorkerKeepsAssignmentOnMalformedKey: with no leader to repair it, a malformed key leaves the
// instance running its last valid assignment, and the problem is logged once, not on every round.
func TestWorkerKeepsAssignmentOnMalformedKey(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	holdLeaderLock(t, srv.Client)
	cfg := testConfig(srv)
	cfg.QueryWaitTime = 300 * time.Millisecond
	ra := startAgent(t, cfg)
	key := "consul-esm/agents/" + ra.serviceID
	if err := putKV(srv.Client, key, `{"Nodes":["n1","n2"],"Probes":[]}`); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() error {
		if got := ra.runner.assignedNodes(); !slices.Equal(got, []string{"n1", "n2"}) {
			return fmt.Errorf("runner has %v", got)
		}
		return nil
	})
	if err := putKV(srv.Client, key, `not json`); err != nil {
		t.Fatal(err)
	}
	// The point: several blocking rounds (QueryWaitTime) pass over the malformed key.
	time.Sleep(4 * cfg.QueryWaitTime)
	if n := strings.Count(ra.logs.String(), "Error deserializing node list"); n != 1 {
		t.Errorf("malformed key logged %d times, want once", n)
	}
	if got := ra.runner.assignedNodes(); !slices.Equal(got, []string{"n1", "n2"}) {
		t.Fatalf("after a malformed key the runner has %v, want the last valid assignment", got)
	}
}

// holdLeaderLock takes <kv>leader with a session of the test's own, so no instance leads and the
// test writes the assignments itself.
func holdLeaderLock(t *testing.T, c *api.Client) {
	t.Helper()
	sess, _, err := c.Session().Create(&api.SessionEntry{TTL: "60s", LockDelay: time.Millisecond}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = c.Session().Destroy(sess, nil) })
	ok, _, err := c.KV().Acquire(&api.KVPair{Key: "consul-esm/leader", Flags: lockFlagValue, Session: sess}, nil)
	if err != nil || !ok {
		t.Fatalf("acquiring the leader lock: %v, %v", ok, err)
	}
}

func putKV(c *api.Client, key, value string) error {
	_, err := c.KV().Put(&api.KVPair{Key: key, Value: []byte(value)}, nil)
	return err
}

// TestAssignmentOf50kNodes: 50,000 nodes with realistic names fit 5 instances (each share written
// in a transaction of its own), and one instance alone gets a clear error naming the limit on
// /health and in a metric instead of a silent retry loop. Serial: it reads a metric through the
// go-metrics global.
func TestAssignmentOf50kNodes(t *testing.T) {
	if testing.Short() {
		t.Skip("registers 50,000 nodes")
	}
	srv := newTestConsul(t)
	names := make([]string, 50000)
	ops := make(api.TxnOps, len(names))
	for i := range names {
		names[i] = fmt.Sprintf("web-server-%06d.dc1.example.com", i)
		ops[i] = &api.TxnOp{Node: &api.NodeTxnOp{Verb: api.NodeSet, Node: api.Node{
			Node: names[i], Address: "127.0.0.1", Meta: map[string]string{"external-node": "true"}}}}
	}
	txnInBatches(t, srv.Client, ops)

	cfg := testConfig(srv)
	cfg.ClientAddress = "127.0.0.1:0"
	cfg.Telemetry.PrometheusRetentionTime = time.Minute
	cfg.Telemetry.DisableHostname = true
	first := startAgent(t, cfg)
	base := waitHTTPBase(t, first)
	health := func() healthReport {
		t.Helper()
		_, body := httpGet(t, base+"/health")
		var r healthReport
		_ = json.Unmarshal([]byte(body), &r)
		return r
	}
	waitFor(t, 30*time.Second, func() error {
		if r := health(); !strings.Contains(r.AssignmentError, fmt.Sprint(maxTxnBytes)) || !strings.Contains(r.AssignmentError, "txn_max_req_len") {
			return fmt.Errorf("assignment_error = %q", r.AssignmentError)
		}
		if v, _, _ := gatherGauge(t, first.telemetry, "esm_agents_assignment_oversize"); v != 1 {
			return fmt.Errorf("esm_agents_assignment_oversize = %v", v)
		}
		return nil
	})

	if n := strings.Count(first.logs.String(), "Assignment too large to write"); n != 1 {
		t.Errorf("the oversize assignment was logged %d times, want once", n)
	}

	start := time.Now()
	agents := []*runningAgent{first}
	for i := 0; i < 4; i++ {
		agents = append(agents, startAgent(t, testConfig(srv)))
	}
	waitFor(t, 60*time.Second, func() error {
		got, _ := kvAssignments(t, srv.Client)
		total := 0
		for _, a := range agents {
			as := got[a.serviceID]
			if len(as.Nodes) != len(names)/len(agents) {
				return fmt.Errorf("%s assigned %d nodes", a.serviceID, len(as.Nodes))
			}
			if n := len(a.runner.assignedNodes()); n != len(as.Nodes) {
				return fmt.Errorf("%s runs %d nodes, assigned %d", a.serviceID, n, len(as.Nodes))
			}
			total += len(as.Nodes)
		}
		if total != len(names) {
			return fmt.Errorf("%d nodes assigned", total)
		}
		return nil
	})
	t.Logf("50,000 nodes written and applied over 5 instances %s after they started", time.Since(start))
	if r := health(); r.AssignmentError != "" {
		t.Errorf("assignment_error still set: %q", r.AssignmentError)
	}
}

// txnInBatches applies ops in transactions of at most maxTxnOps, txnSetupConcurrency at a time: the
// ops are independent, and one round trip after the other is most of a 50,000-node setup.
func txnInBatches(t testing.TB, c *api.Client, ops api.TxnOps) {
	t.Helper()
	const txnSetupConcurrency = 4
	chunks := slices.Collect(slices.Chunk(ops, maxTxnOps))
	errs := make([]error, len(chunks))
	sem := make(chan struct{}, txnSetupConcurrency)
	var wg sync.WaitGroup
	for i, chunk := range chunks {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			ok, resp, _, err := c.Txn().Txn(chunk, nil)
			if err != nil || !ok {
				errs[i] = fmt.Errorf("transaction: %v %s", err, txnErrors(resp))
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
}
