package main

import (
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// TestDiffChecks pins reconcile's decisions, as a pure function of the held checks and a list.
func TestDiffChecks(t *testing.T) {
	http := checkDefinition{HTTP: "http://127.0.0.1:1/", Interval: durationField(time.Second)}
	other := checkDefinition{HTTP: "http://127.0.0.1:2/", Interval: durationField(time.Second)}
	script := checkDefinition{ScriptArgs: []string{"true"}}
	cc := func(node, id string, index uint64, def checkDefinition) *catalogCheck {
		return &catalogCheck{Node: node, CheckID: id, Status: statusPassing, ModifyIndex: index, Definition: def}
	}
	held := func(c *catalogCheck) *checkState { return &checkState{key: c.checkKey(), check: c, def: c.Definition} }
	type step struct {
		op       reconcileOp
		key      string
		wentBack bool
	}
	for _, tc := range []struct {
		name   string
		held   []*catalogCheck
		list   []*catalogCheck
		asOf   uint64
		retake bool
		want   []step
	}{
		{"new check starts", nil, []*catalogCheck{cc("n1", "a", 5, http)}, 5, false,
			[]step{{reconcileAdd, "n1/a", false}}},
		{"unassigned node and duplicate ignored", nil,
			[]*catalogCheck{cc("n1", "a", 5, http), cc("n9", "a", 5, http), cc("n1", "a", 5, http)}, 5, false,
			[]step{{reconcileAdd, "n1/a", false}}},
		{"same index kept", []*catalogCheck{cc("n1", "a", 5, http)}, []*catalogCheck{cc("n1", "a", 5, http)}, 9, false,
			[]step{{reconcileKeep, "n1/a", false}}},
		{"newer copy, same definition refreshed", []*catalogCheck{cc("n1", "a", 5, http)}, []*catalogCheck{cc("n1", "a", 6, http)}, 9, false,
			[]step{{reconcileRefresh, "n1/a", false}}},
		{"newer copy, new definition restarted", []*catalogCheck{cc("n1", "a", 5, http)}, []*catalogCheck{cc("n1", "a", 6, other)}, 9, false,
			[]step{{reconcileRestart, "n1/a", false}}},
		{"older copy from an older state is a stale read", []*catalogCheck{cc("n1", "a", 20, http)}, []*catalogCheck{cc("n1", "a", 18, http)}, 19, false,
			[]step{{reconcileKeep, "n1/a", false}}},
		{"older copy from a state covering ours: went back", []*catalogCheck{cc("n1", "a", 20, http)}, []*catalogCheck{cc("n1", "a", 18, http)}, 25, false,
			[]step{{reconcileRefresh, "n1/a", true}}},
		{"older copy after a regression: went back", []*catalogCheck{cc("n1", "a", 20, http)}, []*catalogCheck{cc("n1", "a", 18, http)}, 19, true,
			[]step{{reconcileRefresh, "n1/a", true}}},
		{"missing checks dropped, in key order", []*catalogCheck{cc("n2", "b", 5, http), cc("n1", "b", 5, http)}, nil, 9, false,
			[]step{{reconcileDrop, "n1/b", false}, {reconcileDrop, "n2/b", false}}},
		{"unsupported: held one dropped, left alone", []*catalogCheck{cc("n1", "a", 5, http)}, []*catalogCheck{cc("n1", "a", 6, script)}, 9, false,
			[]step{{reconcileDrop, "n1/a", false}, {reconcileIgnore, "n1/a", false}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			states := map[string]*checkState{}
			for _, c := range tc.held {
				states[c.checkKey()] = held(c)
			}
			plan := diffChecks(states, tc.list, []string{"n1", "n2"}, tc.asOf, tc.retake)
			var got []step
			for _, s := range plan.steps {
				got = append(got, step{s.op, s.key, s.wentBack})
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("steps %v, want %v", got, tc.want)
			}
			if len(states) != len(tc.held) {
				t.Errorf("diffChecks changed the held checks")
			}
		})
	}
}

// TestDiffChecksCounts: the counts reconcile reports cover the assigned checks of the list.
func TestDiffChecksCounts(t *testing.T) {
	def := checkDefinition{HTTP: "http://127.0.0.1:1/"}
	list := []*catalogCheck{
		{Node: "n1", CheckID: "a", ServiceID: "web", Status: statusPassing, Definition: def},
		{Node: "n1", CheckID: "b", ServiceID: "web", Status: statusCritical, Definition: def},
		{Node: "n1", CheckID: "c", Status: statusPassing, Definition: def},
		{Node: "n3", CheckID: "d", ServiceID: "db", Status: statusPassing, Definition: def},
	}
	plan := diffChecks(nil, list, []string{"n1"}, 0, false)
	if len(plan.seen) != 3 || plan.passing != 2 || plan.services != 1 {
		t.Errorf("seen %d passing %d services %d, want 3 2 1", len(plan.seen), plan.passing, plan.services)
	}
}

// TestReconcileWithFakeWriter: a catalog copy an operator changed becomes the reference, restarts
// the counter and cancels a deferred output write, unless a write of ours is pending; a changed
// definition restarts the check with its first output written at once.
func TestReconcileWithFakeWriter(t *testing.T) {
	w := newFakeStatusWriter()
	r := fakeRunner(t, func(c *Config) { c.CheckUpdateInterval = time.Minute }, w)
	r.SetNodes([]string{"n1"})
	def := checkDefinition{HTTP: "http://127.0.0.1:1/", Interval: durationField(time.Hour)}
	check := func(index uint64, status, output string, d checkDefinition) []*catalogCheck {
		return []*catalogCheck{{Node: "n1", CheckID: "a", Status: status, Output: output, ModifyIndex: index, Definition: d}}
	}
	state := func() checkState {
		r.mu.Lock()
		defer r.mu.Unlock()
		return *r.states["n1/a"]
	}

	r.reconcile(check(10, statusPassing, "ok", def), 1)
	if st := state(); st.task == nil || !st.fresh || st.wantStatus != statusPassing {
		t.Fatalf("new check: task %v fresh %v want %s", st.task != nil, st.fresh, st.wantStatus)
	}
	first := state().task

	r.mu.Lock()
	r.states["n1/a"].counter = 2
	r.mu.Unlock()
	r.reconcile(check(11, statusCritical, "set by hand", def), 1)
	st := state()
	if st.wantStatus != statusCritical || st.wantOutput != "set by hand" || st.counter != 0 || st.task != first {
		t.Errorf("operator's change: want %s/%q counter %d same task %v", st.wantStatus, st.wantOutput, st.counter, st.task == first)
	}
	r.mu.Lock()
	cancels := w.cancels["n1/a"]
	r.mu.Unlock()
	if cancels == 0 {
		t.Errorf("operator's change did not cancel a deferred write")
	}

	r.mu.Lock()
	r.states["n1/a"].queued, r.states["n1/a"].wantStatus = true, statusPassing
	r.mu.Unlock()
	r.reconcile(check(12, statusWarning, "again", def), 1)
	if st := state(); st.wantStatus != statusPassing {
		t.Errorf("with our write pending the wanted status became %s", st.wantStatus)
	}

	changed := def
	changed.Interval = durationField(2 * time.Hour)
	r.reconcile(check(13, statusPassing, "ok", changed), 1)
	if st := state(); st.task == first || st.task == nil || !st.fresh || time.Duration(st.def.Interval) != 2*time.Hour {
		t.Errorf("definition change did not restart the check fresh")
	}

	r.reconcile(nil, 0)
	if _, checks, _ := r.Stats(); checks != 0 {
		t.Errorf("%d checks after reconciling to empty", checks)
	}
}

// TestCheckRunnerReconcile follows catalog changes through the blocking query: a changed
// definition restarts a check, a removed one stops, and an unsupported one is left alone.
func TestCheckRunnerReconcile(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	c := srv.Client

	t.Run("DefinitionChange", func(t *testing.T) {
		tg := crNewTarget(t)
		r := crStart(t, srv, nil, nil)
		chk := crHTTPCheck("svc-check", tg.URL+"/a", 200*time.Millisecond)
		crRegister(t, c, "cr-def", "svc", chk)
		r.SetNodes([]string{"cr-def"})
		waitFor(t, 10*time.Second, func() error {
			if tg.count("/a") < 2 {
				return errNotYet
			}
			return nil
		})

		// Unchanged definition (only Notes edited): the check keeps running, not restarted.
		r.mu.Lock()
		task := r.states["cr-def/svc/svc-check"].task
		r.mu.Unlock()
		cur, _ := crGetCheck(c, "cr-def", "svc-check")
		same := chk
		same.Status, same.Output, same.Notes = cur.Status, cur.Output, "edited notes"
		crRegister(t, c, "cr-def", "svc", same)
		waitFor(t, 10*time.Second, func() error {
			r.mu.Lock()
			defer r.mu.Unlock()
			st := r.states["cr-def/svc/svc-check"]
			if st.check.Notes != "edited notes" {
				return errors.New("notes edit not loaded yet")
			}
			if st.task != task {
				return errors.New("check restarted although its definition did not change")
			}
			return nil
		})
		if strings.Contains(r.logs.String(), "Updating HTTP check") {
			t.Fatalf("unchanged definition logged as updated:\n%s", r.logs)
		}

		// Changed path: restarted, the target sees the new path and no more of the old one.
		changed := chk
		changed.Definition.HTTP = tg.URL + "/b"
		crRegister(t, c, "cr-def", "svc", changed)
		waitFor(t, 10*time.Second, func() error {
			if tg.count("/b") < 1 {
				return errNotYet
			}
			return nil
		})
		crStopped(t, tg, "/a", "/b")
		if !strings.Contains(r.logs.String(), "Updating HTTP check") {
			t.Errorf("no 'Updating HTTP check' log line")
		}
	})

	t.Run("Removal", func(t *testing.T) {
		tg := crNewTarget(t)
		r := crStart(t, srv, nil, nil)
		crRegister(t, c, "cr-rm", "", crHTTPCheck("one", tg.URL+"/one", 150*time.Millisecond))
		crRegister(t, c, "cr-rm", "", crHTTPCheck("two", tg.URL+"/two", 150*time.Millisecond))
		crRegister(t, c, "cr-rm2", "", crHTTPCheck("three", tg.URL+"/three", 150*time.Millisecond))
		r.SetNodes([]string{"cr-rm", "cr-rm2"})
		crWaitRunning(t, r, 3)

		if _, err := c.Catalog().Deregister(&api.CatalogDeregistration{Node: "cr-rm", CheckID: "one"}, nil); err != nil {
			t.Fatal(err)
		}
		crWaitRunning(t, r, 2)
		crStopped(t, tg, "/one", "/two")

		// The last check of a node.
		if _, err := c.Catalog().Deregister(&api.CatalogDeregistration{Node: "cr-rm", CheckID: "two"}, nil); err != nil {
			t.Fatal(err)
		}
		crWaitRunning(t, r, 1)
		crStopped(t, tg, "/two", "/three")

		// The assignment empties.
		r.SetNodes(nil)
		crWaitRunning(t, r, 0)
		base := tg.count("/three")
		other := crNewTarget(t)
		r2 := crStart(t, srv, nil, nil)
		crRegister(t, c, "cr-rm3", "", crHTTPCheck("four", other.URL+"/four", 150*time.Millisecond))
		r2.SetNodes([]string{"cr-rm3"})
		waitFor(t, 10*time.Second, func() error {
			if other.count("/four") < 3 {
				return errNotYet
			}
			return nil
		})
		if n := tg.count("/three"); n != base {
			t.Fatalf("check kept running after the assignment emptied: %d requests, was %d", n, base)
		}
		if !strings.Contains(r.logs.String(), "Deleting check") || !strings.Contains(r.logs.String(), "Updated checks") {
			t.Errorf("missing reconcile log lines:\n%s", r.logs)
		}
	})

	t.Run("UnsupportedLoggedOnce", func(t *testing.T) {
		tg, _ := crOutputTarget(t) // its output changes every run, so loads keep coming
		crRegister(t, c, "cr-ttl", "", catalogRegisterCheck{CheckID: "ttl", Status: statusWarning, Output: "set by app",
			Definition: checkDefinition{TTL: durationField(time.Minute)}})
		// 20ms is below the runner's floor (50ms in tests): clamped, with a warning.
		crRegister(t, c, "cr-ttl", "", crHTTPCheck("busy", tg.URL+"/busy", 20*time.Millisecond))
		r := crStart(t, srv, nil, nil)
		r.SetNodes([]string{"cr-ttl"})
		waitFor(t, 15*time.Second, func() error {
			if n := r.loads.Load(); n < 3 {
				return fmt.Errorf("%d loads", n)
			}
			return nil
		})
		if n := strings.Count(r.logs.String(), "check is not a valid"); n != 1 {
			t.Fatalf("unsupported check logged %d times, want once:\n%s", n, r.logs)
		}
		ch, _ := crGetCheck(c, "cr-ttl", "ttl")
		if ch.Status != statusWarning || ch.Output != "set by app" {
			t.Fatalf("unsupported check was written: %q %q", ch.Status, ch.Output)
		}
		if _, checks, _ := r.Stats(); checks != 1 {
			t.Fatalf("running %d checks, want 1", checks)
		}
		if !strings.Contains(r.logs.String(), "Check interval too low: interval=20ms check=cr-ttl/busy") {
			t.Errorf("no 'Check interval too low' warning:\n%s", r.logs)
		}
	})
}

// crOutputTarget is a target whose output changes on every request ("n=<count>").
func crOutputTarget(t *testing.T) (*crTarget, *atomic.Int64) {
	tg := crNewTarget(t)
	var n atomic.Int64
	tg.handle = func(w http.ResponseWriter, _ *http.Request) bool {
		fmt.Fprintf(w, "n=%d", n.Add(1))
		return true
	}
	return tg, &n
}

func TestDefsEqual(t *testing.T) {
	base := checkDefinition{HTTP: "http://x", Header: map[string][]string{"A": {"1"}}, Interval: durationField(time.Second)}
	same := base
	same.Header = map[string][]string{"A": {"1"}}
	if !defsEqual(&base, &same) {
		t.Error("equal definitions differ")
	}
	empty1, empty2 := checkDefinition{Header: map[string][]string{}}, checkDefinition{}
	if !defsEqual(&empty1, &empty2) {
		t.Error("nil and empty headers must be equal")
	}
	added := base
	added.Header = map[string][]string{"A": {"1"}, "B": {"2"}}
	if defsEqual(&base, &added) || defsEqual(&added, &base) {
		t.Error("an added header must count as a change, both directions")
	}
	for name, mut := range map[string]func(*checkDefinition){
		"Body":             func(d *checkDefinition) { d.Body = "x" },
		"DisableRedirects": func(d *checkDefinition) { d.DisableRedirects = true },
		"OutputMaxSize":    func(d *checkDefinition) { d.OutputMaxSize = 10 },
		"Timeout":          func(d *checkDefinition) { d.Timeout = durationField(time.Second) },
		"TLSSkipVerify":    func(d *checkDefinition) { d.TLSSkipVerify = true },
		"Method":           func(d *checkDefinition) { d.Method = "POST" },
		"DCSA":             func(d *checkDefinition) { d.DeregisterCriticalServiceAfter = durationField(time.Minute) },
	} {
		d := base
		mut(&d)
		if defsEqual(&base, &d) {
			t.Errorf("%s change not detected", name)
		}
	}
}

// TestReconcileOlderCopy: a catalog copy older than the runner's is a stale read unless the state
// it came from covers the runner's index (then the catalog went back) or a regression was seen.
func TestReconcileOlderCopy(t *testing.T) {
	r := crStart(t, nil, nil, nil)
	r.SetNodes([]string{"n1"})
	check := func(index uint64, status string) *catalogCheck {
		return &catalogCheck{Node: "n1", CheckID: "a", Status: status, ModifyIndex: index,
			Definition: checkDefinition{HTTP: "http://127.0.0.1:1/", Interval: durationField(time.Hour)}}
	}
	status := func() string {
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.states["n1/a"].check.Status
	}
	for _, tc := range []struct {
		name   string
		asOf   uint64
		retake bool
		want   string
	}{
		{"stale read (state before our index)", 19, false, statusPassing},
		{"state covers our index: the catalog went back", 25, false, statusCritical},
		{"regression seen", 19, true, statusCritical},
	} {
		r.reconcile([]*catalogCheck{check(20, statusPassing)}, 1)
		r.reconcileAt([]*catalogCheck{check(18, statusCritical)}, 1, tc.asOf, tc.retake)
		if got := status(); got != tc.want {
			t.Errorf("%s: runner holds %s, want %s", tc.name, got, tc.want)
		}
		r.reconcile(nil, 0)
	}
}
