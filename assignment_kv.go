package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/armon/go-metrics"
	"github.com/hashicorp/consul/api"
)

var assignmentOversizeKey = []string{"esm", "agents", "assignment_oversize"}

// errDeposed ends a term whose assignment write found <kv>leader no longer held by its session: a
// successor may already have read KV, so nothing more may be written.
var errDeposed = errors.New("leader lock no longer held by our session (assignment write refused)")

// errAssignmentConflict is an assignment write that lost a compare-and-set: the key changed since the
// leader read it. The watch of <kv>agents/ brings the change, and the next round rewrites from there.
var errAssignmentConflict = errors.New("assignment key changed since it was read")

// storedKey is one <kv>agents/<serviceID> key as the leader last read it.
type storedKey struct {
	value []byte
	index uint64 // ModifyIndex: the compare-and-set guard of its rewrite
}

// leaderWork keeps <kv>agents/ equal to the desired assignment until ctx (the leadership term) ends:
// it recomputes the assignment when the external nodes or the healthy instances change, and it
// watches <kv>agents/ itself, so a key deleted, overwritten, malformed or rolled back is rewritten
// within one watch round. It returns errDeposed when a write finds the lock lost.
func (a *Agent) leaderWork(ctx context.Context, sess string) error {
	ctx, cancel := context.WithCancel(ctx)
	// Deferred LIFO: the watchers are cancelled before they are waited for.
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	nodesCh := make(chan []externalNode, 1)
	instCh := make(chan []string, 1)
	kvCh := make(chan map[string]storedKey, 1)
	for _, watch := range []func(){
		func() { a.watchExternalNodes(ctx, nodesCh) },
		func() { a.watchInstances(ctx, instCh) },
		func() { a.watchAssignmentKeys(ctx, kvCh) },
	} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			watch()
		}()
	}

	var (
		nodes     []externalNode
		insts     []string
		haveNodes bool
		haveInsts bool
		// stored is what the watch last read; nil while a write of ours is not yet seen there, so
		// the next round diffs against KV as it is, not as we assume it is.
		stored  map[string]storedKey
		desired map[string]assignment
		retry   <-chan time.Time
	)
	for {
		select {
		case <-ctx.Done():
			return nil
		case nodes = <-nodesCh:
			haveNodes = true
		case insts = <-instCh:
			haveInsts = true
			metrics.SetGauge([]string{"esm", "agents", "healthy"}, float32(len(insts)))
		case stored = <-kvCh:
		case <-retry:
			retry = nil
		}
		if !haveNodes || !haveInsts || stored == nil || retry != nil {
			continue
		}
		base := desired
		if base == nil {
			base = decodeStored(stored) // a new leader starts from what its predecessor wrote
		}
		next := assign(nodes, insts, base)
		wrote, err := a.syncAssignments(ctx, sess, next, stored)
		switch {
		case ctx.Err() != nil:
			return nil
		case errors.Is(err, errDeposed):
			return err
		case errors.Is(err, errAssignmentConflict):
			stored = nil
		case err != nil:
			a.status.failed(err)
			a.logger.Error("Error writing state to KV store", "error", err)
			retry = time.After(a.config().RetryInterval)
		case len(wrote) > 0:
			stored = nil
			a.status.contact()
			if desired != nil && equalAssignments(desired, next) {
				a.logger.Warn("Rewrote assignment keys that differed from the leader's assignment", "keys", wrote)
			} else {
				a.logger.Info("Rebalanced external nodes across ESM instances", "nodes", len(nodes), "instances", len(next))
			}
		}
		if err == nil || errors.Is(err, errAssignmentConflict) {
			desired = next
		}
	}
}

func equalAssignments(x, y map[string]assignment) bool {
	return maps.EqualFunc(x, y, assignment.equal)
}

func decodeStored(stored map[string]storedKey) map[string]assignment {
	out := make(map[string]assignment, len(stored))
	for id, k := range stored {
		if as, err := decodeAssignment(k.value); err == nil {
			out[id] = as
		}
	}
	return out
}

// watchAssignmentKeys sends the <kv>agents/<serviceID> keys (deeper keys are not ours) after every
// change, and after every blocking round, which is harmless: an unchanged KV diffs to nothing.
func (a *Agent) watchAssignmentKeys(ctx context.Context, out chan map[string]storedKey) {
	prefix := a.kvPath() + "agents/"
	var lastIndex uint64
	_ = blockingQuery(ctx, a, "Error querying for assignments", nil, func(q *api.QueryOptions) (uint64, error) {
		pairs, meta, err := a.client.KV().List(prefix, q)
		if err != nil {
			return 0, err
		}
		if meta.LastIndex == lastIndex {
			return meta.LastIndex, nil
		}
		lastIndex = meta.LastIndex
		keys := make(map[string]storedKey, len(pairs))
		for _, p := range pairs {
			id := strings.TrimPrefix(p.Key, prefix)
			if id == "" || strings.Contains(id, "/") {
				continue
			}
			keys[id] = storedKey{value: p.Value, index: p.ModifyIndex}
		}
		sendLatest(out, keys)
		return meta.LastIndex, nil
	})
}

// syncAssignments writes every key of desired that stored lacks or holds with other content, and
// deletes stored keys of instances no longer desired. Every write is guarded twice: a check-session
// op on <kv>leader (a deposed leader's write fails, so it cannot overwrite its successor's), and a
// compare-and-set on the key's index as read (an edit made since is not overwritten blindly but seen
// by the next round). Transactions are bounded by ops and bytes; an instance's share too large for
// one transaction is not sent but reported on /health and in esm.agents.assignment_oversize. It
// returns the instance IDs whose keys it wrote or deleted.
func (a *Agent) syncAssignments(ctx context.Context, sess string, desired map[string]assignment, stored map[string]storedKey) ([]string, error) {
	prefix := a.kvPath() + "agents/"
	var (
		ops      api.TxnOps
		ids      []string
		sizes    []int
		oversize []string
	)
	guard := &api.TxnOp{KV: &api.KVTxnOp{Verb: api.KVCheckSession, Key: a.leaderKey(), Session: sess}}
	reserved := opSize(guard) + 1
	add := func(id string, op *api.TxnOp) {
		size := opSize(op)
		if reserved+2+size > maxTxnBytes {
			oversize = append(oversize, fmt.Sprintf("%s (%d bytes)", id, size))
			return
		}
		ops, ids, sizes = append(ops, op), append(ids, id), append(sizes, size)
	}
	for _, id := range slices.Sorted(maps.Keys(desired)) {
		cur, ok := stored[id]
		if ok {
			if as, err := decodeAssignment(cur.value); err == nil && as.equal(desired[id]) {
				continue
			}
		}
		add(id, &api.TxnOp{KV: &api.KVTxnOp{Verb: api.KVCAS, Key: prefix + id, Value: desired[id].encode(), Index: cur.index}})
	}
	for _, id := range slices.Sorted(maps.Keys(stored)) {
		if _, ok := desired[id]; !ok {
			add(id, &api.TxnOp{KV: &api.KVTxnOp{Verb: api.KVDeleteCAS, Key: prefix + id, Index: stored[id].index}})
		}
	}
	a.reportOversize(oversize)

	var wrote []string
	for _, b := range txnBatches(sizes, maxTxnOps-1, reserved) {
		txn := append(api.TxnOps{guard}, ops[b[0]:b[1]]...)
		ok, resp, _, err := a.client.Txn().Txn(txn, a.queryOptions(ctx))
		if err != nil {
			return wrote, fmt.Errorf("writing assignments of %s: %w", strings.Join(ids[b[0]:b[1]], ", "), err)
		}
		if !ok {
			if resp != nil && slices.ContainsFunc(resp.Errors, func(e *api.TxnError) bool { return e.OpIndex == 0 }) {
				return wrote, fmt.Errorf("%w: %s", errDeposed, txnErrors(resp))
			}
			a.logger.Debug("Assignment key changed while being rewritten; retrying from the new value", "errors", txnErrors(resp))
			return wrote, errAssignmentConflict
		}
		wrote = append(wrote, ids[b[0]:b[1]]...)
	}
	slices.Sort(wrote)
	return wrote, nil
}

// reportOversize publishes (and logs once per change) the instances whose assignment cannot be
// written because it does not fit one transaction.
func (a *Agent) reportOversize(oversize []string) {
	metrics.SetGauge(assignmentOversizeKey, float32(len(oversize)))
	if len(oversize) == 0 {
		a.status.setAssignmentErr(nil)
		return
	}
	msg := fmt.Sprintf("assignment of %s exceeds the %d bytes one Consul transaction may carry "+
		"(txn_max_req_len is 512 KiB by default; values are base64-encoded in a transaction): "+
		"run more ESM instances", strings.Join(oversize, ", "), maxTxnBytes)
	if prev := a.status.assignmentErr.Load(); prev == nil || *prev != msg {
		a.logger.Error("Assignment too large to write", "error", msg)
	}
	a.status.setAssignmentErr(&msg)
}
