package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestCheckLoad covers the health-state query: the server-side node filter and its fallback,
// and a new assignment cancelling the blocking query in flight.
func TestCheckLoad(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	c := srv.Client

	t.Run("FilterFallback", func(t *testing.T) {
		crRegister(t, c, "cr-f1", "", crHTTPCheck("f1", "http://127.0.0.1:1/", time.Hour))
		crRegister(t, c, "cr-f1", "", catalogRegisterCheck{CheckID: externalNodeHealthCheckID, Status: statusPassing})
		crRegister(t, c, "cr-f2", "", crHTTPCheck("f2", "http://127.0.0.1:1/", time.Hour))
		r := crStart(t, srv, nil, nil)
		for _, nodes := range [][]string{{"cr-f1"}, {"cr-f1", `we"ird`}} {
			slices.Sort(nodes)
			_, useFilter := nodeFilterExpr(nodes)
			checks, _, _, err := r.fetchChecks(context.Background(), nodes, 0)
			if err != nil {
				t.Fatal(err)
			}
			if len(checks) != 1 || checks[0].CheckID != "f1" {
				var ids []string
				for _, ch := range checks {
					ids = append(ids, ch.Node+"/"+ch.CheckID)
				}
				t.Fatalf("nodes %q (server-side filter %v): got %v, want only cr-f1/f1", nodes, useFilter, ids)
			}
		}
	})

	t.Run("NewAssignmentCancelsQuery", func(t *testing.T) {
		crRegister(t, c, "cr-as1", "", crHTTPCheck("a1", "http://127.0.0.1:1/", time.Hour))
		crRegister(t, c, "cr-as2", "", crHTTPCheck("a2", "http://127.0.0.1:1/", time.Hour))
		r := crStart(t, srv, func(cfg *Config) { cfg.QueryWaitTime = time.Minute }, nil)
		r.SetNodes([]string{"cr-as1"})
		crWaitRunning(t, r, 1)
		waitFor(t, 10*time.Second, func() error {
			if !r.blocking.Load() {
				return errors.New("no blocking query in flight")
			}
			return nil
		})
		start := time.Now()
		r.SetNodes([]string{"cr-as1", "cr-as2"})
		crWaitRunning(t, r, 2)
		if d := time.Since(start); d > 3*time.Second {
			t.Fatalf("new assignment took %s to load", d)
		}
	})
}

func TestNodeFilterExpr(t *testing.T) {
	got, ok := nodeFilterExpr([]string{"a", "b-1"})
	want := `CheckID != "externalNodeHealth" and (Node == "a" or Node == "b-1")`
	if !ok || got != want {
		t.Fatalf("got %q %v, want %q", got, ok, want)
	}
	if _, ok := nodeFilterExpr([]string{`x"y`}); ok {
		t.Error("a node name with a quote must fall back to client-side filtering")
	}
	many := make([]string, maxFilterNodes+1)
	for i := range many {
		many[i] = fmt.Sprintf("n%d", i)
	}
	if _, ok := nodeFilterExpr(many); ok {
		t.Error("more than maxFilterNodes nodes must fall back")
	}
	if _, ok := nodeFilterExpr([]string{strings.Repeat("x", maxFilterURLBytes)}); ok {
		t.Error("an over-long filter must fall back")
	}
}

// TestDecodeChecks covers the streaming decode of a health-state body: filtering, malformed
// bodies, per-check fields not leaking into the next check, and held copies reused.
func TestDecodeChecks(t *testing.T) {
	r := crStart(t, nil, nil, nil)
	nodes := []string{"n1", "n2"}
	cases := []struct {
		name    string
		body    string
		want    []string // Node/CheckID of the checks returned
		wantErr bool
	}{
		{"null", `null`, nil, false},
		{"empty", `[]`, nil, false},
		{"filtered", `[{"Node":"n1","CheckID":"a"},{"Node":"other","CheckID":"b"},{"Node":"n2","CheckID":"externalNodeHealth"},null,{"Node":"n2","CheckID":"c"}]`, []string{"n1/a", "n2/c"}, false},
		{"object", `{"Node":"n1"}`, nil, true},
		{"truncated", `[{"Node":"n1","CheckID":"a"},{"Node":"n1"`, nil, true},
		{"garbage", `[{"Node":"n1","CheckID":"a"}, nonsense]`, nil, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := r.decodeChecks(strings.NewReader(tc.body), nodes)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			var keys []string
			for _, c := range got {
				keys = append(keys, c.Node+"/"+c.CheckID)
			}
			if !tc.wantErr && !slices.Equal(keys, tc.want) {
				t.Fatalf("got %v, want %v", keys, tc.want)
			}
		})
	}

	// One check's header map and tags must not show up in the next one's (json.Decode merges into
	// a reused value).
	got, err := r.decodeChecks(strings.NewReader(`[
		{"Node":"n1","CheckID":"a","ServiceTags":["x","y"],"Definition":{"HTTP":"http://127.0.0.1:1/","Header":{"X-A":["1"]}}},
		{"Node":"n1","CheckID":"b","Definition":{"HTTP":"http://127.0.0.1:1/"}}]`), nodes)
	if err != nil || len(got) != 2 {
		t.Fatalf("got %d checks, err %v", len(got), err)
	}
	if len(got[1].ServiceTags) != 0 || len(got[1].Definition.Header) != 0 || len(got[0].Definition.Header["X-A"]) != 1 {
		t.Fatalf("fields leaked between checks: %+v / %+v", got[0], got[1])
	}

	// Once running, a check at the same ModifyIndex comes back as the runner's own copy, a newer or
	// an older one as the fresh decode (reconcileAt decides whether an older one is a stale read).
	held := &catalogCheck{Node: "n1", CheckID: "a", Status: statusPassing, ModifyIndex: 7,
		Definition: checkDefinition{HTTP: "http://127.0.0.1:1/", Interval: durationField(time.Hour)}}
	r.SetNodes(nodes)
	r.reconcile([]*catalogCheck{held}, 1)
	for _, tc := range []struct {
		index uint64
		same  bool
	}{{6, false}, {7, true}, {8, false}} {
		body := fmt.Sprintf(`[{"Node":"n1","CheckID":"a","Status":"passing","ModifyIndex":%d,"Definition":{"HTTP":"http://127.0.0.1:1/","Interval":"1h"}}]`, tc.index)
		got, err := r.decodeChecks(strings.NewReader(body), nodes)
		if err != nil || len(got) != 1 {
			t.Fatalf("index %d: %d checks, err %v", tc.index, len(got), err)
		}
		if (got[0] == held) != tc.same {
			t.Errorf("index %d: held copy returned %v, want %v", tc.index, got[0] == held, tc.same)
		}
	}
}

// TestCheckRunnerShrinkStopsAtOnce: nodes taken out of the assignment stop being checked at once,
// also while Consul cannot be queried (their new owner runs them already; two owners writing the
// same checks is what the assignment exists to prevent).
func TestCheckRunnerShrinkStopsAtOnce(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	proxy := newFaultProxy(t, srv.HTTPAddr)
	tg := crNewTarget(t)
	interval := 100 * time.Millisecond
	crRegister(t, srv.Client, "shrink-keep", "", crHTTPCheck("keep", tg.URL+"/keep", interval))
	crRegister(t, srv.Client, "shrink-gone", "", crHTTPCheck("gone", tg.URL+"/gone", interval))
	r := crStart(t, srv, func(c *Config) { c.HTTPAddr = proxy.Listener.Addr().String() }, nil)
	r.SetNodes([]string{"shrink-gone", "shrink-keep"})
	crWaitRunning(t, r, 2)
	waitFor(t, 5*time.Second, func() error {
		if tg.count("/gone") < 2 {
			return errNotYet
		}
		return nil
	})

	proxy.mode.Store(fault500)
	r.SetNodes([]string{"shrink-keep"})
	if _, checks, _ := r.Stats(); checks != 1 {
		t.Errorf("running %d checks right after the assignment shrank, want 1", checks)
	}
	crStopped(t, tg, "/gone", "/keep")
}

// TestCheckRunnerConvergesAfterSnapshotRestore: a snapshot restore brings back an old status with a
// lower ModifyIndex than the runner's copy. The runner must take the catalog's copy, so a target
// whose result does not change is written again within two intervals.
func TestCheckRunnerConvergesAfterSnapshotRestore(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	tg := crNewTarget(t)
	tg.code.Store(http.StatusInternalServerError)
	interval := time.Second
	crRegister(t, srv.Client, "restore-node", "", crHTTPCheck("c", tg.URL+"/c", interval))
	r := crStart(t, srv, nil, nil)
	r.SetNodes([]string{"restore-node"})
	crWaitCheck(t, srv.Client, "restore-node", "c", 10*time.Second, crStatus(statusCritical, "500"))

	snap, _, err := srv.Client.Snapshot().Save(nil)
	if err != nil {
		t.Fatal(err)
	}
	data, err := io.ReadAll(snap)
	snap.Close()
	if err != nil {
		t.Fatal(err)
	}
	tg.code.Store(http.StatusOK)
	crWaitCheck(t, srv.Client, "restore-node", "c", 10*time.Second, crStatus(statusPassing, "200 OK"))
	if err := srv.Client.Snapshot().Restore(nil, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	restored := time.Now()
	if c, err := crGetCheck(srv.Client, "restore-node", "c"); err != nil || c == nil || c.Status != statusCritical {
		t.Fatalf("after the restore the check is %+v (%v), want the snapshot's critical", c, err)
	}
	crWaitCheck(t, srv.Client, "restore-node", "c", 10*time.Second, crStatus(statusPassing, "200 OK"))
	took := time.Since(restored)
	t.Logf("passing again %s after the snapshot restore", took)
	if took > 2*interval {
		t.Errorf("status converged %s after the restore, want within two intervals (%s)", took, 2*interval)
	}
}

// TestIndexProbeGap: the regression probe follows the shortest held interval (half of it), never
// goes under half the interval floor, and sends nothing while no check is held.
func TestIndexProbeGap(t *testing.T) {
	for _, tc := range []struct {
		name      string
		intervals []time.Duration
		want      time.Duration
	}{
		{"no checks", nil, 0},
		{"one 10s check", []time.Duration{10 * time.Second}, 5 * time.Second},
		{"shortest wins", []time.Duration{30 * time.Second, 4 * time.Second, time.Minute}, 2 * time.Second},
		{"floor", []time.Duration{200 * time.Millisecond}, 500 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &CheckRunner{minInterval: time.Second, states: map[string]*checkState{}}
			for i, iv := range tc.intervals {
				st := &checkState{key: fmt.Sprint(i)}
				st.task = &checkTask{st: st, interval: iv}
				r.states[st.key] = st
			}
			r.states["stopped"] = &checkState{key: "stopped"} // held but not running: no interval
			if got := r.indexProbeGap(); got != tc.want {
				t.Errorf("indexProbeGap() = %s, want %s", got, tc.want)
			}
		})
	}
}
