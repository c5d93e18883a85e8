package main

import "testing"

// TestThresholdStateUpdate pins the anti-flapping rule (README semantics, DESIGN.md quirk 1) and the
// per-check warning step, without Consul.
func TestThresholdStateUpdate(t *testing.T) {
	const P, W, C = statusPassing, statusWarning, statusCritical
	noWarn := func(pass, crit int) thresholds { return thresholds{passing: pass, critical: crit, warning: -1} }
	cases := []struct {
		name        string
		limits      thresholds
		start       string
		results     []string
		wantStatus  []string // status shown after each result
		wantCounter []int
		wantWrite   []bool
	}{
		{"threshold 0 changes at once", noWarn(0, 0), P, []string{C, P, C},
			[]string{C, P, C}, []int{0, 0, 0}, []bool{true, true, true}},
		{"critical threshold 3 needs the 4th net failure", noWarn(0, 3), P, []string{C, C, C, C},
			[]string{P, P, P, C}, []int{1, 2, 3, 0}, []bool{false, false, false, true}},
		{"a pass in between decrements", noWarn(0, 3), P, []string{C, C, C, P, C, C},
			[]string{P, P, P, P, P, C}, []int{1, 2, 3, 2, 3, 0}, []bool{false, false, false, false, false, true}},
		{"counter floors at 0", noWarn(0, 1), P, []string{P, P, C, P, P, C, C},
			[]string{P, P, P, P, P, P, C}, []int{0, 0, 1, 0, 0, 1, 0}, []bool{false, false, false, false, false, false, true}},
		{"passing threshold guards recovery", noWarn(2, 0), C, []string{P, C, P, P, P},
			[]string{C, C, C, C, P}, []int{1, 0, 1, 2, 0}, []bool{false, false, false, false, true}},
		{"warning counts as not critical", noWarn(1, 1), C, []string{W, W},
			[]string{C, W}, []int{1, 0}, []bool{false, true}},
		{"passing to warning is immediate", noWarn(5, 5), P, []string{W, P},
			[]string{W, P}, []int{0, 0}, []bool{true, true}},
		{"critical threshold does not gate recovery", noWarn(0, 2), C, []string{P},
			[]string{P}, []int{0}, []bool{true}},
		{"warning step before critical", thresholds{passing: 0, critical: 3, warning: 1}, P, []string{C, C, C, C},
			[]string{P, W, W, C}, []int{1, 2, 3, 0}, []bool{false, true, false, true}},
		{"warning step only from passing", thresholds{passing: 0, critical: 3, warning: 0}, W, []string{C, C},
			[]string{W, W}, []int{1, 2}, []bool{false, false}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			th := thresholdState{limits: tc.limits, status: tc.start}
			for i, res := range tc.results {
				status, write := th.update(res)
				if status != tc.wantStatus[i] || th.counter != tc.wantCounter[i] || write != tc.wantWrite[i] {
					t.Fatalf("after result %d (%s): status %s counter %d write %v, want %s %d %v",
						i+1, res, status, th.counter, write, tc.wantStatus[i], tc.wantCounter[i], tc.wantWrite[i])
				}
				if th.status != status {
					t.Fatalf("after result %d: state shows %s, update returned %s", i+1, th.status, status)
				}
			}
		})
	}
}

// TestThresholdsFor pins how a check's own thresholds override the global ones.
func TestThresholdsFor(t *testing.T) {
	set := &runnerSettings{passingThreshold: 2, criticalThreshold: 4}
	for _, tc := range []struct {
		name string
		def  checkDefinition
		want thresholds
	}{
		{"global", checkDefinition{}, thresholds{2, 4, -1}},
		{"own passing and critical", checkDefinition{SuccessBeforePassing: 1, FailuresBeforeCritical: 6}, thresholds{1, 6, -1}},
		{"warning below critical", checkDefinition{FailuresBeforeWarning: 3}, thresholds{2, 4, 3}},
		{"warning not below critical is ignored", checkDefinition{FailuresBeforeWarning: 4}, thresholds{2, 4, -1}},
	} {
		if got := set.thresholdsFor(&tc.def); got != tc.want {
			t.Errorf("%s: got %+v, want %+v", tc.name, got, tc.want)
		}
	}
}
