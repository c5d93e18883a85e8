package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/serf/coordinate"
)

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

// TestCoordinateLocalCache checks the cache of the local agent's coordinate against a fake
// /v1/agent/self: one read per localCoordTTL, a stale coordinate served while reads fail, and
// failed reads retried only after localCoordRetry.
func TestCoordinateLocalCache(t *testing.T) {
	t.Parallel()
	var (
		mu    sync.Mutex
		reads int
		fail  bool
	)
	want := coordinate.NewCoordinate(coordinate.DefaultConfig())
	want.Vec[0] = 0.25
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/agent/self" {
			http.NotFound(w, r)
			return
		}
		mu.Lock()
		reads++
		failing := fail
		mu.Unlock()
		if failing {
			http.Error(w, "agent unavailable", http.StatusInternalServerError)
			return
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"Coord": want})
	}))
	t.Cleanup(srv.Close)
	setFail := func(v bool) {
		mu.Lock()
		defer mu.Unlock()
		fail = v
	}
	readCount := func() int {
		mu.Lock()
		defer mu.Unlock()
		return reads
	}

	cfg := DefaultConfig()
	cfg.HTTPAddr = strings.TrimPrefix(srv.URL, "http://")
	nm := newMonitorAgent(t, cfg, nil).nm
	ctx := context.Background()
	age := func(d time.Duration) {
		nm.local.mu.Lock()
		defer nm.local.mu.Unlock()
		nm.local.fetched = nm.local.fetched.Add(-d)
		nm.local.retryAt = nm.local.retryAt.Add(-d)
	}

	for i := range 3 {
		got, err := nm.localCoordinate(ctx)
		if err != nil || got == nil || got.Vec[0] != want.Vec[0] {
			t.Fatalf("call %d: %v, %v; want the agent's coordinate", i, got, err)
		}
	}
	if n := readCount(); n != 1 {
		t.Fatalf("%d reads of /v1/agent/self within localCoordTTL, want 1", n)
	}

	// Expired, and the agent fails: the stale coordinate beats none, and the next read waits.
	setFail(true)
	age(localCoordTTL + time.Second)
	for i := range 2 {
		if got, err := nm.localCoordinate(ctx); err != nil || got == nil {
			t.Fatalf("call %d with failing agent: %v, %v; want the stale coordinate", i, got, err)
		}
	}
	if n := readCount(); n != 2 {
		t.Fatalf("%d reads, want 2: a failed read is retried only after localCoordRetry", n)
	}

	// The agent is back: after localCoordRetry the coordinate is read again.
	setFail(false)
	age(localCoordRetry)
	if _, err := nm.localCoordinate(ctx); err != nil {
		t.Fatal(err)
	}
	if n := readCount(); n != 3 {
		t.Fatalf("%d reads, want 3", n)
	}

	// Without any coordinate yet, a failure is the caller's error, and stays so until the retry.
	setFail(true)
	fresh := newMonitorAgent(t, cfg, nil).nm
	for i := range 2 {
		if got, err := fresh.localCoordinate(ctx); err == nil || !strings.Contains(err.Error(), "reading /v1/agent/self") {
			t.Fatalf("call %d: %v, %v; want the read error", i, got, err)
		}
	}
	if n := readCount(); n != 4 {
		t.Fatalf("%d reads, want 4", n)
	}
}
