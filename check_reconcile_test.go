package main

import (
	"slices"
	"testing"
	"time"
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
