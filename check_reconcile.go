package main

// Reconciling the running checks with a load: diffChecks decides (a pure function), reconcileAt
// acts on its plan.

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
	plan := diffChecks(r.states, checks, r.assignedNodes(), asOf, retake)
	var added, updated, removed, found int
	for _, s := range plan.steps {
		st := r.states[s.key]
		switch s.op {
		case reconcileDrop:
			logf("Deleting check", "checkHash", s.key)
			r.dropState(st)
			removed++
			continue
		case reconcileIgnore:
			if old, ok := r.unsupported[s.key]; !ok || !defsEqual(&old, &s.check.Definition) {
				r.unsupported[s.key] = s.check.Definition
				r.logger.Warn("check is not a valid HTTP, TCP, UDP, GRPC or H2PING check, leaving it alone", "checkHash", s.key, "reason", s.why)
			}
			continue
		}
		delete(r.unsupported, s.key)
		c := s.check
		switch s.op {
		case reconcileAdd:
			st = &checkState{key: s.key, check: c, wantStatus: c.Status, wantOutput: c.Output}
			if c.Status == statusCritical {
				// Already critical when first seen: count from now, so a restarted ESM still reaps.
				st.criticalSince = time.Now()
			}
			r.states[s.key] = st
			if r.startTask(st, c, logf) {
				logf("Added "+strings.ToUpper(s.kind)+" check", "checkHash", s.key)
				added++
			}
		case reconcileKeep:
			found++
		case reconcileRefresh, reconcileRestart:
			if s.wentBack {
				// The catalog went back: its output is as old as its status, so write the next at once.
				st.fresh = true
			}
			r.refreshCatalog(st, c)
			if s.op == reconcileRefresh {
				found++
				continue
			}
			logf("Updating "+strings.ToUpper(s.kind)+" check", "checkHash", s.key)
			r.stopTask(st)
			r.startTask(st, c, logf)
			updated++
		}
	}
	for key := range r.unsupported {
		if _, ok := plan.seen[key]; !ok {
			delete(r.unsupported, key)
		}
	}
	count, passing := len(plan.seen), plan.passing
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
	metrics.SetGauge([]string{"esm", "services", "monitored"}, float32(plan.services))
}

// reconcileOp is what reconcile does with one check.
type reconcileOp uint8

const (
	reconcileKeep    reconcileOp = iota // held, and the list's copy is not newer than ours
	reconcileAdd                        // not held: start it
	reconcileRefresh                    // a newer copy with the same definition: record it
	reconcileRestart                    // a newer copy with another definition: record it, restart
	reconcileDrop                       // held, but gone from the list or no longer runnable
	reconcileIgnore                     // not runnable (unsupported): leave it alone
)

// reconcileStep is one check's part of a reconcilePlan.
type reconcileStep struct {
	op       reconcileOp
	key      string
	check    *catalogCheck // the list's copy; nil when the check is gone from the list
	kind     string        // the check's kind (add, refresh, restart)
	why      string        // why it is not runnable (ignore)
	wentBack bool          // refresh, restart: our copy is newer, but the list's is the truth
}

// reconcilePlan is what diffChecks found: the steps, in list order and then the drops of held
// checks missing from the list by key, and the counts reconcile reports.
type reconcilePlan struct {
	steps    []reconcileStep
	seen     map[string]struct{} // keys of the list's checks on assigned nodes
	passing  int                 // of those, passing in the list
	services int                 // distinct node/service pairs among them
}

// diffChecks compares the held checks with checks, a complete list read at index asOf, and says
// what to do with each. It only reads held. Checks on nodes not in assigned (sorted) are not ours,
// and a key listed twice counts once. A copy older than ours is normally a stale read and kept
// out; it is the truth when asOf covers our copy's index or retake says the catalog went back.
func diffChecks(held map[string]*checkState, checks []*catalogCheck, assigned []string, asOf uint64, retake bool) reconcilePlan {
	plan := reconcilePlan{seen: make(map[string]struct{}, len(checks))}
	services := make(map[string]struct{})
	for _, c := range checks {
		if _, ok := slices.BinarySearch(assigned, c.Node); !ok {
			continue
		}
		key := c.checkKey()
		if _, dup := plan.seen[key]; dup {
			continue
		}
		plan.seen[key] = struct{}{}
		if c.Status == statusPassing {
			plan.passing++
		}
		if c.ServiceID != "" {
			services[c.Node+"/"+c.ServiceID] = struct{}{}
		}
		kind, why := c.Definition.kind()
		st := held[key]
		step := reconcileStep{key: key, check: c, kind: kind}
		switch {
		case kind == "":
			if st != nil {
				plan.steps = append(plan.steps, reconcileStep{op: reconcileDrop, key: key, check: c})
			}
			step.op, step.kind, step.why = reconcileIgnore, "", why
		case st == nil:
			step.op = reconcileAdd
		case c.ModifyIndex == st.check.ModifyIndex ||
			(c.ModifyIndex < st.check.ModifyIndex && !retake && st.check.ModifyIndex > asOf):
			// Not newer than what we know (a stale read, or our own write already recorded).
			step.op = reconcileKeep
		default:
			step.wentBack = c.ModifyIndex < st.check.ModifyIndex
			step.op = reconcileRestart
			if defsEqual(&st.def, &c.Definition) {
				step.op = reconcileRefresh
			}
		}
		plan.steps = append(plan.steps, step)
	}
	var gone []string
	for key := range held {
		if _, ok := plan.seen[key]; !ok {
			gone = append(gone, key)
		}
	}
	slices.Sort(gone)
	for _, key := range gone {
		plan.steps = append(plan.steps, reconcileStep{op: reconcileDrop, key: key})
	}
	plan.services = len(services)
	return plan
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
		r.writes.cancelDefer(st)
	}
}

// defsEqual reports whether two definitions would run the same check. Every field counts, so a
// field added to checkDefinition later is compared too; nil and empty collections are equal.
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
