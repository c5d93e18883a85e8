package main

// threshold for the side the result is on (critical_threshold to go critical, passing_threshold to
// leave critical), after which the counter restarts. With threshold 0 every change goes through at
// once. passing and warning are the same side, so a change between them goes through at once.
func thresholdStep(counter int, current, result string, passingThreshold, criticalThreshold int) (int, bool) {
	if (result == statusCritical) == (current == statusCritical) {
		return max(counter-1, 0), result != current
	}
	counter++
	threshold := passingThreshold
	if result == statusCritical {
		threshold = criticalThreshold
	}
	if counter > threshold {
		return 0, true
	}
	return counter, false
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

func (th thresholds) forStatus(status string) int {
	if status == statusCritical {
		return th.critical
	}
	return th.passing
}

// warnsFirst reports whether a held-back critical result should turn a passing check warning.
func (th thresholds) warnsFirst(current, result string, counter int) bool {
	return th.warning >= 0 && result == statusCritical && current == statusPassing && counter > th.warning
}

// handleResult decides what a result means for the catalog: a status change (past the threshold) is
// written at once; an output-only change at once for the first result of a (re)started check or
