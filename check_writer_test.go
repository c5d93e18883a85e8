package main

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// TestWriterTakeBatch covers when a batch goes out and what it carries: the short window for an
// isolated change, the longer one while changes keep coming, and full transactions at once.
func TestWriterTakeBatch(t *testing.T) {
	now := time.Now()
	states := func(n int) []*checkState {
		out := make([]*checkState, n)
		for i := range out {
			out[i] = &checkState{key: fmt.Sprint(i)}
		}
		return out
	}
	cases := []struct {
		name      string
		pending   int
		age       time.Duration // of the oldest pending change
		sinceLast time.Duration // since the last batch was taken
		wantTake  int
		wantWait  time.Duration // when nothing is taken; -1 = until woken
	}{
		{"nothing pending", 0, 0, time.Hour, 0, -1},
		{"isolated change waits the short window", 1, 4 * time.Millisecond, time.Hour, 0, 6 * time.Millisecond},
		{"isolated change goes after it", 1, writeBatchWindow, time.Hour, 1, 0},
		{"streaming changes wait longer", 3, writeBatchWindow, 500 * time.Millisecond, 0, streamBatchWindow - writeBatchWindow},
		{"streaming changes go after the long window", 3, streamBatchWindow, 500 * time.Millisecond, 3, 0},
		{"quiet again after streamingAfter", 2, writeBatchWindow, streamingAfter, 2, 0},
		{"a full transaction goes at once", maxTxnOps + 5, 0, 0, maxTxnOps, 0},
		{"at most maxTxnOps", 3 * maxTxnOps, time.Second, time.Hour, maxTxnOps, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w := &checkWriter{env: writerEnv{window: writeBatchWindow}}
			w.pending = states(tc.pending)
			all := append([]*checkState(nil), w.pending...)
			w.firstAt = now.Add(-tc.age)
			w.lastFlush = now.Add(-tc.sinceLast)
			batch, wait := w.takeBatch(now)
			if len(batch) != tc.wantTake {
				t.Fatalf("took %d, want %d", len(batch), tc.wantTake)
			}
			if tc.wantTake == 0 && wait != tc.wantWait {
				t.Fatalf("wait %v, want %v", wait, tc.wantWait)
			}
			if len(batch)+len(w.pending) != tc.pending {
				t.Fatalf("%d taken + %d left != %d pending", len(batch), len(w.pending), tc.pending)
			}
			for i, st := range batch {
				if st != all[i] {
					t.Fatalf("batch[%d] is check %s, want the oldest pending first", i, st.key)
				}
			}
			if tc.wantTake > 0 && !w.lastFlush.Equal(now) {
				t.Fatalf("lastFlush %v after taking a batch", w.lastFlush)
			}
			// What is left keeps its order.
			pos := make(map[*checkState]int, len(all))
			for i, st := range all {
				pos[st] = i
			}
			for i := 1; i < len(w.pending); i++ {
				if pos[w.pending[i-1]] > pos[w.pending[i]] {
					t.Fatalf("pending reordered: %s before %s", w.pending[i-1].key, w.pending[i].key)
				}
			}
		})
	}

	// batch_flush_interval (agentless) is kept: 0 writes every change at once even while they
	// stream, and a window longer than streamBatchWindow is not shortened.
	for _, tc := range []struct {
		window, age time.Duration
		wantTake    int
		wantWait    time.Duration
	}{
		{0, 0, 1, 0},
		{500 * time.Millisecond, 300 * time.Millisecond, 0, 200 * time.Millisecond},
	} {
		w := &checkWriter{env: writerEnv{window: tc.window}, pending: states(1), firstAt: now.Add(-tc.age), lastFlush: now}
		batch, wait := w.takeBatch(now)
		if len(batch) != tc.wantTake || (tc.wantTake == 0 && wait != tc.wantWait) {
			t.Errorf("window %v: took %d, wait %v; want %d, %v", tc.window, len(batch), wait, tc.wantTake, tc.wantWait)
		}
	}
}

// TestWriterIsolatesOversizedCheck: a check whose status write is larger than Consul accepts in a
// transaction (a 600 KiB Body) is written alone, refused alone, logged once and counted, while its
// neighbours on the same node turn passing as if it were not there.
func TestWriterIsolatesOversizedCheck(t *testing.T) {
	// Serial: it reads esm_checks_write_refused, which goes through go-metrics' global sink, and
	// every NewAgent in a parallel test replaces that sink.
	srv := newTestConsul(t)
	tg := crNewTarget(t)
	const node, neighbours = "big-node", 20
	interval := 200 * time.Millisecond
	big := crHTTPCheck("big", tg.URL+"/big", interval)
	big.Definition.Body = strings.Repeat("x", 600<<10)
	crRegister(t, srv.Client, node, "", big)
	for i := 0; i < neighbours; i++ {
		crRegister(t, srv.Client, node, "", crHTTPCheck(fmt.Sprintf("small-%d", i), tg.URL+"/small", interval))
	}
	r := crStart(t, srv, func(c *Config) {
		c.Telemetry.PrometheusRetentionTime = time.Minute
		c.Telemetry.DisableHostname = true
	}, nil)
	start := time.Now()
	r.SetNodes([]string{node})

	for i := 0; i < neighbours; i++ {
		crWaitCheck(t, srv.Client, node, fmt.Sprintf("small-%d", i), 5*time.Second, crStatus(statusPassing, "200 OK"))
	}
	t.Logf("all %d neighbours passing after %s", neighbours, time.Since(start))
	waitFor(t, 5*time.Second, func() error {
		if n := tg.count("/big"); n < 10 {
			return fmt.Errorf("big probed %d times", n)
		}
		return nil
	})
	if c, _ := crGetCheck(srv.Client, node, "big"); c == nil || c.Status != statusCritical {
		t.Fatalf("big check = %+v, want it left critical (its write cannot land)", c)
	}
	logs := r.logs.String()
	if n := strings.Count(logs, "Consul refused the status write of a check"); n != 1 {
		t.Errorf("refusal logged %d times, want once", n)
	}
	if !strings.Contains(logs, "too large") {
		t.Error("the log does not give Consul's reason")
	}
	if v, _, ok := gatherCounter(t, r.agent.telemetry, "esm_checks_write_refused"); !ok || v < 2 {
		t.Errorf("esm_checks_write_refused = %v (found %v), want every refused write counted", v, ok)
	}
}

// TestWriterDoesNotResurrectReapedNode: a node check written through /v1/catalog/register (its
// definition has DisableRedirects, which the txn endpoint would drop) whose node is deregistered
// between the writer's read and its write must not leave the node re-created without its address.
func TestWriterDoesNotResurrectReapedNode(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	tg := crNewTarget(t)
	check := crHTTPCheck("nc", tg.URL+"/nc", 200*time.Millisecond)
	check.Definition.DisableRedirects = true
	crRegister(t, srv.Client, "reaped-node", "", check)
	var reaped atomic.Bool
	r := crStart(t, srv, nil, func(r *CheckRunner) {
		r.writer.afterRead = func() {
			if reaped.Swap(true) {
				return
			}
			_, _ = srv.Client.Catalog().Deregister(&api.CatalogDeregistration{Node: "reaped-node"}, nil)
		}
	})
	r.SetNodes([]string{"reaped-node"})
	waitFor(t, 10*time.Second, func() error {
		if !reaped.Load() {
			return errNotYet
		}
		return nil
	})
	// The point: give the write that raced the deregistration time to land (and anything else).
	time.Sleep(time.Second)
	node, _, err := srv.Client.Catalog().Node("reaped-node", nil)
	if err != nil {
		t.Fatal(err)
	}
	if node != nil && node.Node != nil {
		t.Fatalf("the deregistered node came back: %+v (checks: %d)", node.Node, len(node.Services))
	}
	if !strings.Contains(r.logs.String(), "removed the node the write re-created") {
		t.Errorf("the removal was not logged:\n%s", r.logs)
	}
}

// TestCheckWriterConsul covers what Consul decides about our writes: a CAS conflict with an
// operator's edit is re-read and retried, or reverted as a whole, and a burst of changes is
// batched into few transactions.
func TestCheckWriterConsul(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	c := srv.Client

	t.Run("CASNotClobbered", func(t *testing.T) {
		tg := crNewTarget(t)
		var once atomic.Bool
		var hookErr atomic.Pointer[string]
		crRegister(t, c, "cr-cas", "api", crHTTPCheck("cas", tg.URL+"/cas", 200*time.Millisecond))
		r := crStart(t, srv, nil, func(r *CheckRunner) {
			// Between the writer's consistent read and its txn, an operator edits the check.
			r.writer.afterRead = func() {
				if once.Swap(true) {
					return
				}
				cur, err := crGetCheck(c, "cr-cas", "cas")
				if err != nil || cur == nil {
					msg := fmt.Sprint("reading check in hook: ", err)
					hookErr.Store(&msg)
					return
				}
				edit := crHTTPCheck("cas", tg.URL+"/cas", 200*time.Millisecond)
				edit.Status, edit.Output, edit.Notes = cur.Status, cur.Output, "operator was here"
				crRegister(t, c, "cr-cas", "api", edit)
			}
		})
		r.SetNodes([]string{"cr-cas"})
		got := crWaitCheck(t, c, "cr-cas", "cas", 10*time.Second, crStatus(statusPassing, "200 OK"))
		if msg := hookErr.Load(); msg != nil {
			t.Fatal(*msg)
		}
		if !once.Load() {
			t.Fatal("hook never ran")
		}
		if got.Notes != "operator was here" {
			t.Fatalf("operator's edit overwritten: notes %q", got.Notes)
		}
		if !strings.Contains(r.logs.String(), "retrying the batch") {
			t.Errorf("stale index did not cause a re-read:\n%s", r.logs)
		}
	})

	t.Run("CASRevertedThenRetried", func(t *testing.T) {
		// The check changes between read and write on every attempt: the transaction is reverted as a
		// whole after the last retry, and the next probe result tries again.
		tg := crNewTarget(t)
		var edits atomic.Int32
		crRegister(t, c, "cr-cas2", "", crHTTPCheck("cas2", tg.URL+"/cas2", 200*time.Millisecond))
		r := crStart(t, srv, nil, func(r *CheckRunner) {
			r.writer.afterRead = func() {
				n := edits.Add(1)
				if n > writeAttempts {
					return
				}
				cur, err := crGetCheck(c, "cr-cas2", "cas2")
				if err != nil || cur == nil {
					return
				}
				edit := crHTTPCheck("cas2", tg.URL+"/cas2", 200*time.Millisecond)
				edit.Status, edit.Output, edit.Notes = cur.Status, cur.Output, fmt.Sprintf("edit %d", n)
				crRegister(t, c, "cr-cas2", "", edit)
			}
		})
		r.SetNodes([]string{"cr-cas2"})
		got := crWaitCheck(t, c, "cr-cas2", "cas2", 10*time.Second, crStatus(statusPassing, "200 OK"))
		if want := fmt.Sprintf("edit %d", writeAttempts); got.Notes != want {
			t.Fatalf("notes %q, want the operator's last edit %q", got.Notes, want)
		}
		if !strings.Contains(r.logs.String(), "Error(s) returned from txn when updating check status in Consul") {
			t.Errorf("no txn failure logged:\n%s", r.logs)
		}
		if r.writer.failures.Load() == 0 {
			t.Error("write failure not counted")
		}
	})

	t.Run("Batching", func(t *testing.T) {
		const n = 150
		tg := crNewTarget(t)
		var nodes []string
		for i := range n {
			node := fmt.Sprintf("cr-batch-%d", i%5)
			if i < 5 {
				nodes = append(nodes, node)
			}
			chk := crHTTPCheck(fmt.Sprintf("b%d", i), tg.URL+"/b", 300*time.Millisecond)
			chk.Status = statusPassing
			crRegister(t, c, node, "", chk)
		}
		r := crStart(t, srv, nil, nil)
		r.SetNodes(nodes)
		crWaitRunning(t, r, n)
		// Every check's first result writes its output; then the target fails and all go critical.
		waitFor(t, 10*time.Second, func() error {
			if runs := r.runs.Load(); runs < n {
				return fmt.Errorf("%d runs", runs)
			}
			return nil
		})
		tg.code.Store(http.StatusInternalServerError)
		start, txns0 := time.Now(), r.writer.txns.Load()
		waitFor(t, 10*time.Second, func() error {
			var list []*catalogCheck
			q := &api.QueryOptions{RequireConsistent: true, Filter: `Status == "critical" and Node matches "^cr-batch-"`}
			if _, err := c.Raw().Query("/v1/health/state/any", &list, q); err != nil {
				return err
			}
			if len(list) != n {
				return fmt.Errorf("%d of %d critical", len(list), n)
			}
			return nil
		})
		txns := r.writer.txns.Load() - txns0
		t.Logf("%d status changes in %d transactions (largest %d ops), all in the catalog after %s",
			n, txns, r.writer.maxOps.Load(), time.Since(start).Round(time.Millisecond))
		if txns >= n/2 {
			t.Errorf("%d transactions for %d changes: not batched", txns, n)
		}
		if m := r.writer.maxOps.Load(); m > maxTxnOps {
			t.Errorf("a transaction had %d ops, limit %d", m, maxTxnOps)
		}
	})
}

// TestWriterOutputDeferral runs the real writer against a fake catalog (check_update_interval,
// DESIGN.md quirk 4): the first result of a started check is written at once, later output-only
// changes wait out the interval, and the deferred write carries the latest output, not the one
// that started the deferral.
func TestWriterOutputDeferral(t *testing.T) {
	const interval = time.Second
	c := &catalogCheck{Node: "n1", CheckID: "c", Status: statusPassing, ModifyIndex: 7,
		Definition: checkDefinition{HTTP: "http://127.0.0.1:1/"}}
	catalog := newFakeCatalog(c)
	r := fakeCatalogRunner(t, func(cfg *Config) { cfg.CheckUpdateInterval = interval }, catalog)
	task := heldTask(r, c)
	lastOutput := func() string {
		ws := catalog.writes()
		if len(ws) == 0 {
			return ""
		}
		return ws[len(ws)-1].output
	}

	r.handleResult(task, statusPassing, "first")
	waitFor(t, 5*time.Second, func() error {
		if got := lastOutput(); got != "first" {
			return fmt.Errorf("catalog output %q, want the first result's", got)
		}
		return nil
	})
	deferredAt := time.Now()
	r.handleResult(task, statusPassing, "second")
	r.handleResult(task, statusPassing, "third")
	waitFor(t, 5*time.Second, func() error {
		if got := lastOutput(); got != "third" {
			return fmt.Errorf("catalog output %q, want the latest result's", got)
		}
		return nil
	})
	if waited := time.Since(deferredAt); waited < interval {
		t.Errorf("deferred output written after %v, before check_update_interval %v", waited, interval)
	}
	want := []fakeWrite{{"n1/c", statusPassing, "first"}, {"n1/c", statusPassing, "third"}}
	if got := catalog.writes(); !slices.Equal(got, want) {
		t.Errorf("writes %v, want %v", got, want)
	}

	// A status change does not wait: it goes at once, with its output.
	r.handleResult(task, statusCritical, "down")
	start := time.Now()
	waitFor(t, 5*time.Second, func() error {
		if got := lastOutput(); got != "down" {
			return fmt.Errorf("catalog output %q, want the status change's", got)
		}
		return nil
	})
	if took := time.Since(start); took >= interval {
		t.Errorf("status change written after %v, want it before check_update_interval", took)
	}
}
