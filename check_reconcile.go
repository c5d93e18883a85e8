package main

import (
	"maps"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/armon/go-metrics"
)

// reconcile makes the running checks match checks (the complete list for our nodes): new checks
// start, checks whose definition changed restart, missing ones stop — also when checks is empty.
func (r *CheckRunner) reconcile(checks []*catalogCheck, nodeCount int) {
	r.reconcileAt(checks, nodeCount, 0, false)
}

// reconcileAt is reconcile for checks read from Consul's state at index asOf. A copy older than
// ours is normally a stale read (or a load that started before our write): ours stays. It is the
// catalog's truth when asOf covers our copy's index, since that state contains every write up to
// asOf unless the state went back, or when retake says the state went back (snapshot restore).
func (r *CheckRunner) reconcileAt(checks []*catalogCheck, nodeCount int, asOf uint64, retake bool) {
	defer metrics.MeasureSince([]string{"checks", "update"}, time.Now())
	type logLine struct {
		msg  string
		args []any
	}
	var logs []logLine
	logf := func(msg string, args ...any) { logs = append(logs, logLine{msg, args}) }

	r.mu.Lock()
	// A load that started before the assignment shrank must not restart what SetNodes stopped;
	// reading the set under mu orders this against SetNodes' dropUnassigned.
	assigned := r.assignedNodes()
	seen := make(map[string]struct{}, len(checks))
	var added, updated, removed, found, passing int
	services := make(map[string]struct{})
	for _, c := range checks {
		if _, ok := slices.BinarySearch(assigned, c.Node); !ok {
			continue
		}
		key := c.checkKey()
		if _, dup := seen[key]; dup {
			continue
		}
		seen[key] = struct{}{}
		if c.Status == statusPassing {
			passing++
		}
		if c.ServiceID != "" {
			services[c.Node+"/"+c.ServiceID] = struct{}{}
		}
		kind, why := c.Definition.kind()
		st := r.states[key]
		if kind == "" {
			if st != nil {
				logf("Deleting check", "checkHash", key)
				r.dropState(st)
				removed++
			}
			if old, ok := r.unsupported[key]; !ok || !defsEqual(&old, &c.Definition) {
				r.unsupported[key] = c.Definition
				r.logger.Warn("check is not a valid HTTP, TCP, UDP, GRPC or H2PING check, leaving it alone", "checkHash", key, "reason", why)
			}
			continue
		}
		delete(r.unsupported, key)
		if st == nil {
			st = &checkState{key: key, check: c, wantStatus: c.Status, wantOutput: c.Output}
			if c.Status == statusCritical {
				// Already critical when first seen: count from now, so a restarted ESM still reaps.
				st.criticalSince = time.Now()
			}
			r.states[key] = st
			if r.startTask(st, c, kind, logf) {
				logf("Added "+strings.ToUpper(kind)+" check", "checkHash", key)
				added++
			}
			continue
		}
		if c.ModifyIndex == st.check.ModifyIndex ||
			(c.ModifyIndex < st.check.ModifyIndex && !retake && st.check.ModifyIndex > asOf) {
			// Not newer than what we know (a stale read, or our own write already recorded).
			found++
			continue
		}
		if c.ModifyIndex < st.check.ModifyIndex {
			// The catalog went back: its output is as old as its status, so write the next at once.
			st.fresh = true
		}
		r.refreshCatalog(st, c)
		if defsEqual(&st.def, &c.Definition) {
			found++
			continue
		}
		logf("Updating "+strings.ToUpper(kind)+" check", "checkHash", key)
		r.stopTask(st)
		r.startTask(st, c, kind, logf)
		updated++
	}
	for key, st := range r.states {
		if _, ok := seen[key]; !ok {
			logf("Deleting check", "checkHash", key)
			r.dropState(st)
			removed++
		}
	}
	for key := range r.unsupported {
		if _, ok := seen[key]; !ok {
			delete(r.unsupported, key)
		}
	}
	count := len(seen)
	countChanged := count != r.lastCount
	r.lastCount = count
	r.mu.Unlock()

	for _, l := range logs {
		switch {
		case strings.HasPrefix(l.msg, "Updating"):
			r.logger.Info(l.msg, l.args...)
		case strings.HasPrefix(l.msg, "Check interval"):
			r.logger.Warn(l.msg, l.args...)
		default:
			r.logger.Debug(l.msg, l.args...)
		}
	}
	if added+updated+removed > 0 {
		r.logger.Info("Updated checks", "count", count, "found", found, "added", added, "updated", updated, "removed", removed)
	}
	if countChanged {
		r.logger.Info("Health check counts changed", "healthChecks", count, "nodes", nodeCount)
	}
	metrics.SetGauge([]string{"esm", "checks", "count"}, float32(count))
	metrics.SetGauge([]string{"esm", "checks", "healthy"}, float32(passing))
	metrics.SetGauge([]string{"esm", "checks", "unhealthy"}, float32(count-passing))
	metrics.SetGauge([]string{"esm", "services", "monitored"}, float32(len(services)))
}

// refreshCatalog records a newer catalog copy. A status or output that differs from what we last
// knew was written by someone else (an operator, a re-registration): unless a write of ours is
// pending, the catalog becomes the new reference and the counter restarts. Caller holds mu.
func (r *CheckRunner) refreshCatalog(st *checkState, c *catalogCheck) {
	old := st.check
	st.check = c
	st.reaped = false
	if c.Status == statusCritical {
		if st.criticalSince.IsZero() {
			st.criticalSince = time.Now()
		}
	} else {
		st.criticalSince = time.Time{}
	}
	if (c.Status != old.Status || c.Output != old.Output) && !st.queued {
		st.wantStatus, st.wantOutput = c.Status, c.Output
		st.counter = 0
		r.writer.cancelDefer(st)
	}
}

// startTask builds the probe for c and schedules its first run. It reports false when the probe
// cannot be built. Caller holds mu.
//
// The checks of the first assignment start at random points within one interval, as Consul
// staggers its own, so a starting instance does not probe everything at once. A check started later
// (taken over from a peer that died or left, or restarted by a definition change) runs within
// takeoverSpread instead: failover is over only when the survivors run the dead instance's checks,
// and an interval of 10 s or more would dominate it. Its second run lands at a random point of the
// following interval, which spreads the schedule out again.

func defsEqual(a, b *checkDefinition) bool {
	if !maps.EqualFunc(a.Header, b.Header, func(x, y []string) bool { return slices.Equal(x, y) }) ||
		!slices.Equal(a.ScriptArgs, b.ScriptArgs) {
		return false
	}
	x, y := *a, *b
	x.Header, y.Header = nil, nil
	x.ScriptArgs, y.ScriptArgs = nil, nil
	return reflect.DeepEqual(x, y)
}
