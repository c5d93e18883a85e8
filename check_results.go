package main

// What a probe run turns into: metrics, the certificate-expiry verdict, and a write (now or
// deferred) or nothing.

import (
	"fmt"
	"time"

	"github.com/armon/go-metrics"
)

// Pre-built metric keys and labels, so a probe run allocates nothing for telemetry here.
var (
	resultsKey   = []string{"esm", "checks", "results"}
	latencyKey   = []string{"esm", "checks", "latency"}
	resultLabels = map[string][]metrics.Label{
		statusPassing:  {{Name: "status", Value: statusPassing}},
		statusWarning:  {{Name: "status", Value: statusWarning}},
		statusCritical: {{Name: "status", Value: statusCritical}},
	}
)

// runTask runs one probe on a worker and hands the result on.
func (r *CheckRunner) runTask(t *checkTask) {
	start := time.Now()
	t.run = probeRun{}
	status, output := t.probe(t.ctx, &t.run)
	elapsed := time.Since(start)
	certExpiry := t.run.certExpiry
	if t.ctx.Err() == nil { // a stopped check's last result is dropped
		r.runs.Add(1)
		set := r.settings.Load()
		if !certExpiry.IsZero() {
			t.certExpiry.Store(certExpiry.Unix())
			status, output = certExpiryVerdict(status, output, certExpiry, start, set.tlsExpiryWarning)
		}
		if set.perCheckMetrics {
			t.lastLatency.Store(int64(elapsed))
			t.lastStatus.Store(statusCode(status))
		}
		if l, ok := resultLabels[status]; ok {
			metrics.IncrCounterWithLabels(resultsKey, 1, l)
		}
		metrics.AddSample(latencyKey, float32(elapsed)/float32(time.Millisecond))
		r.handleResult(t, status, output)
	}
	r.sched.finished(t)
}

// certExpiryVerdict turns a passing result into a warning while the run's certificate expires within
// window (tls_expiry_warning; 0 disables it), with an output that names the expiry date first. The
// output carries the date, not the time left, so it does not change from run to run. Warning and
// critical results stand: they already say more than the certificate would.
func certExpiryVerdict(status, output string, expiry, now time.Time, window time.Duration) (string, string) {
	if window <= 0 || status != statusPassing || expiry.Sub(now) > window {
		return status, output
	}
	verb := "expires"
	if !expiry.After(now) {
		verb = "expired"
	}
	out := fmt.Sprintf("TLS certificate %s %s (tls_expiry_warning %s). %s", verb, expiry.UTC().Format(time.RFC3339), window, output)
	return statusWarning, truncateOutput(out, defaultOutputMaxSize)
}

// handleResult decides what a result means for the catalog: a status change (past the threshold) is
// written at once; an output-only change at once for the first result of a (re)started check or
// with check_update_interval 0, otherwise deferred by check_update_interval.
func (r *CheckRunner) handleResult(t *checkTask, status, output string) {
	set := r.settings.Load()
	r.mu.Lock()
	defer r.mu.Unlock()
	st := t.st
	if st.task != t || st.removed {
		return // restarted or stopped meanwhile
	}
	th := thresholdState{limits: set.thresholdsFor(&st.def), status: st.wantStatus, counter: st.counter}
	next, write := th.update(status)
	st.counter = th.counter
	if write {
		st.wantStatus, st.wantOutput = next, output
		st.fresh = false
		r.writes.enqueue(st)
		return
	}
	if status != st.wantStatus {
		r.logger.Debug("Check status change held back by threshold", "checkHash", st.key,
			"status", status, "current", st.wantStatus, "counter", th.counter, "threshold", th.limits.forStatus(status))
		return
	}
	if output == st.wantOutput {
		st.fresh = false
		return
	}
	st.wantOutput = output
	if st.fresh || set.checkUpdateInterval <= 0 {
		st.fresh = false
		r.writes.enqueue(st)
		return
	}
	r.writes.deferWrite(st, set.checkUpdateInterval)
}
