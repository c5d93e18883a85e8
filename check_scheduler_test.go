package main

import (
	"fmt"
	"runtime"
	"testing"
	"time"
)

// TestCheckRunnerGoroutinesAfterChurn starts, restarts and stops 1,000 checks and verifies that
// every goroutine is gone once Run returned.
func TestCheckRunnerGoroutinesAfterChurn(t *testing.T) {
	tg := crNewTarget(t)
	before := runtime.NumGoroutine()

	// A short idle timeout lets the pool drain while the runner still runs.
	r := crStart(t, nil, nil, func(r *CheckRunner) { r.sched.idle = 300 * time.Millisecond })
	// The synthetic nodes are not in any Consul (the agent points at 127.0.0.1:1): every write of the
	// even checks fails and is reverted, which churns the writer too.
	r.SetNodes(crSyntheticNodes)
	r.reconcile(crSyntheticChecks(1000, tg.URL+"/a", 10, 0), 10)
	waitFor(t, 15*time.Second, func() error {
		if n := tg.count("/a"); n < 1000 {
			return fmt.Errorf("%d runs of /a", n)
		}
		return nil
	})
	mid := runtime.NumGoroutine()
	r.sched.mu.Lock()
	t.Logf("workers while running 1000 checks: %d", r.sched.workers)
	r.sched.mu.Unlock()

	// Every definition changes: 1,000 restarts.
	r.reconcile(crSyntheticChecks(1000, tg.URL+"/b", 11, 0), 10)
	waitFor(t, 15*time.Second, func() error {
		if n := tg.count("/b"); n < 1000 {
			return fmt.Errorf("%d runs of /b", n)
		}
		return nil
	})
	// Half removed, half new.
	r.reconcile(crSyntheticChecks(1000, tg.URL+"/b", 12, 500), 10)
	if _, checks, _ := r.Stats(); checks != 1000 {
		t.Fatalf("running %d checks, want 1000", checks)
	}
	r.reconcile(nil, 0)
	if _, checks, _ := r.Stats(); checks != 0 {
		t.Fatalf("running %d checks after emptying, want 0", checks)
	}
	r.sched.mu.Lock()
	queued, count := r.sched.heap.Len(), r.sched.count
	r.sched.mu.Unlock()
	if queued != 0 || count != 0 {
		t.Fatalf("scheduler still holds %d tasks (count %d)", queued, count)
	}
	waitFor(t, 10*time.Second, func() error {
		r.sched.mu.Lock()
		defer r.sched.mu.Unlock()
		if r.sched.workers != 0 || len(r.sched.idleWs) != 0 {
			return fmt.Errorf("%d workers (%d idle) left with no checks", r.sched.workers, len(r.sched.idleWs))
		}
		return nil
	})
	if r.writer.failures.Load() == 0 {
		t.Error("the writes to the unreachable Consul were not counted as failures")
	}

	t.Logf("goroutines: before %d, while running 1000 checks %d", before, mid)
	r.stop()
	// Server-side connection goroutines of the target end asynchronously after the last run closed its
	// connection; the slack covers the API client's idle keep-alive connections.
	waitFor(t, 10*time.Second, func() error {
		if n := runtime.NumGoroutine(); n > before+10 {
			return fmt.Errorf("%d goroutines, %d before", n, before)
		}
		return nil
	})
}
