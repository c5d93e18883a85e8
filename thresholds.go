package main

// thresholdState is one check's anti-flapping state (DESIGN.md quirk 1): probes report raw results,
// and update decides which status the catalog should show. It holds no lock and does no I/O; the
// runner keeps its fields in checkState and builds one per result, as a SIGHUP may change limits.
//
// The README's semantics, with ONE counter: a result on the other side of critical/not-critical
// from the current status increments the counter, one on the same side decrements it (floor 0),
// and the status changes when the counter exceeds the threshold for the side the result is on
// (critical to go critical, passing to leave critical), after which the counter restarts. With
// threshold 0 every change goes through at once. passing and warning are the same side, so a
// change between them goes through at once. With a warning step (FailuresBeforeWarning), a passing
// check whose held-back critical results exceed it shows warning meanwhile, and the counter
// carries on towards critical.
type thresholdState struct {
	limits  thresholds
	status  string // the status the catalog shows, or will once pending writes land
	counter int
}

// update applies one probe result. It returns the status to show and whether that is a change to
// write; a result held back by the threshold returns the current status and false.
func (t *thresholdState) update(result string) (status string, write bool) {
	current := t.status
	if (result == statusCritical) == (current == statusCritical) {
		t.counter = max(t.counter-1, 0)
		if result == current {
			return current, false
		}
		t.status = result
		return result, true
	}
	t.counter++
	if t.counter > t.limits.forStatus(result) {
		t.counter = 0
		t.status = result
		return result, true
	}
	if t.limits.warning >= 0 && result == statusCritical && current == statusPassing && t.counter > t.limits.warning {
		t.status = statusWarning
		return statusWarning, true
	}
	return current, false
}

// thresholds are the anti-flapping thresholds that apply to one check.
type thresholds struct {
	passing, critical int
	warning           int // -1: no warning step
}

// thresholdsFor returns the global thresholds, overridden by the check's own SuccessBeforePassing /
// FailuresBeforeCritical / FailuresBeforeWarning when its definition sets them.
func (s *runnerSettings) thresholdsFor(d *checkDefinition) thresholds {
	th := thresholds{passing: s.passingThreshold, critical: s.criticalThreshold, warning: -1}
	if d.SuccessBeforePassing > 0 {
		th.passing = d.SuccessBeforePassing
	}
	if d.FailuresBeforeCritical > 0 {
		th.critical = d.FailuresBeforeCritical
	}
	if d.FailuresBeforeWarning > 0 && d.FailuresBeforeWarning < th.critical {
		th.warning = d.FailuresBeforeWarning
	}
	return th
}

// forStatus is the count of opposite results a change to status must exceed.
func (th thresholds) forStatus(status string) int {
	if status == statusCritical {
		return th.critical
	}
	return th.passing
}
