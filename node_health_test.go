package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

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

// TestNodeProbeFailureAndReap drives failures through an injected pinger: the first failure writes
// critical plus the gob-encoded first-failure time; once node_reconnect_timeout has passed the next
// failure reaps node and marker together, despite the 1h write debounce. A marker left by an
// earlier instance is honoured (survives restarts and failover).
func TestNodeProbeFailureAndReap(t *testing.T) {
	t.Parallel()
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
	t.Parallel()
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

// TestNodeProbeReapCAS: the reap is a check-and-set on the node's ModifyIndex as seen when its ping
// started, so a node re-registered meanwhile survives and its failure clock restarts.
func TestNodeProbeReapCAS(t *testing.T) {
	t.Parallel()
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
