package main

import (
	"slices"
	"testing"
	"time"
)

// TestHandleResult covers what a result asks of the writer, with a fake writer: a status change
// past the threshold is written at once, the first output of a (re)started check at once, a later
// output-only change deferred by check_update_interval (or written at once with 0), and an
// unchanged result not at all.
func TestHandleResult(t *testing.T) {
	const P, C = statusPassing, statusCritical
	type result struct{ status, output string }
	for _, tc := range []struct {
		name       string
		interval   time.Duration
		critical   int
		results    []result
		wantWrites []fakeWrite
		wantDefer  bool
	}{
		{"first output at once, later output deferred", time.Minute, 0,
			[]result{{P, "a"}, {P, "b"}},
			[]fakeWrite{{"n1/c", P, "a"}}, true},
		{"unchanged result writes nothing", time.Minute, 0,
			[]result{{P, "a"}, {P, "a"}},
			[]fakeWrite{{"n1/c", P, "a"}}, false},
		{"check_update_interval 0 writes every output", 0, 0,
			[]result{{P, "a"}, {P, "b"}},
			[]fakeWrite{{"n1/c", P, "a"}, {"n1/c", P, "b"}}, false},
		{"status change at once, with its output", time.Minute, 0,
			[]result{{P, "a"}, {C, "down"}},
			[]fakeWrite{{"n1/c", P, "a"}, {"n1/c", C, "down"}}, false},
		{"held back by the threshold", time.Minute, 1,
			[]result{{C, "down"}, {C, "down"}},
			[]fakeWrite{{"n1/c", C, "down"}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newFakeStatusWriter()
			r := fakeRunner(t, func(c *Config) {
				c.CheckUpdateInterval = tc.interval
				c.PassingThreshold, c.CriticalThreshold = 0, tc.critical
			}, w)
			task := heldTask(r, &catalogCheck{Node: "n1", CheckID: "c", Status: P, ModifyIndex: 5,
				Definition: checkDefinition{HTTP: "http://127.0.0.1:1/"}})
			for _, res := range tc.results {
				r.handleResult(task, res.status, res.output)
			}
			r.mu.Lock()
			defer r.mu.Unlock()
			if !slices.Equal(w.writes, tc.wantWrites) {
				t.Errorf("writes %v, want %v", w.writes, tc.wantWrites)
			}
			if d, ok := w.defers["n1/c"]; ok != tc.wantDefer || (ok && d != tc.interval) {
				t.Errorf("deferred %v (%v), want %v (%v)", ok, d, tc.wantDefer, tc.interval)
			}
		})
	}
}

// TestHandleResultPerCheckThresholds: a check's own thresholds override the global ones, including
// the warning step.
func TestHandleResultPerCheckThresholds(t *testing.T) {
	const P, F = statusPassing, statusCritical
	for _, tc := range []struct {
		name    string
		def     checkDefinition
		results []string
		want    []string // wanted status after each result
	}{
		{"global thresholds 0: every change at once", checkDefinition{}, []string{F, P, F}, []string{F, P, F}},
		{"FailuresBeforeCritical 2", checkDefinition{FailuresBeforeCritical: 2},
			[]string{F, F, P, F, F, F}, []string{P, P, P, P, F, F}},
		{"FailuresBeforeWarning 1 then critical at 3", checkDefinition{FailuresBeforeWarning: 1, FailuresBeforeCritical: 3},
			[]string{F, F, F, F}, []string{P, statusWarning, statusWarning, F}},
		{"SuccessBeforePassing 1", checkDefinition{SuccessBeforePassing: 1},
			[]string{F, P, P}, []string{F, F, P}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := fakeRunner(t, func(c *Config) { c.PassingThreshold, c.CriticalThreshold = 0, 0 }, newFakeStatusWriter())
			task := heldTask(r, &catalogCheck{Node: "n", CheckID: "c", Status: P, Definition: tc.def})
			st := task.st
			for i, res := range tc.results {
				r.handleResult(task, res, "out")
				r.mu.Lock()
				got := st.wantStatus
				r.mu.Unlock()
				if got != tc.want[i] {
					t.Fatalf("after result %d (%s): status %s, want %s", i+1, res, got, tc.want[i])
				}
			}
		})
	}
}
