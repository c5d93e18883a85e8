package main

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/armon/go-metrics"
	"github.com/hashicorp/consul/api"
)

const (
	// writeBatchWindow is how long the writer collects status changes before it flushes them, unless
	// a full transaction's worth (maxTxnOps) is pending first. It keeps a burst of changes (a target
	// going down takes many checks with it) to a few transactions at a cost of a few milliseconds.
	writeBatchWindow = 10 * time.Millisecond

	// streamBatchWindow replaces writeBatchWindow while changes keep coming (the last flush started
	// less than streamingAfter ago): in a spreading outage changes trickle in at a few per
	// millisecond and a 10 ms window would send a transaction for every one or two of them. An
	// isolated change still goes out after writeBatchWindow.
	streamBatchWindow = 200 * time.Millisecond
	streamingAfter    = time.Second

	// writeAttempts bounds how often a batch is re-read and retried after a stale-index conflict.
	writeAttempts = 3

	// recoveringWriteTimeout bounds each write attempt after one failed to reach Consul (see
	// attemptContext).
	recoveringWriteTimeout = time.Second

	// nodeReadParallelism bounds the concurrent consistent reads of one flush.
	nodeReadParallelism = 8

	// finalFlushBudget bounds the flush of changes still pending at shutdown.
	finalFlushBudget = time.Second
)

var (
	checkTxnKey      = []string{"check", "txn"}
	writeFailuresKey = []string{"esm", "consul", "write_failures"}
	writeRefusedKey  = []string{"esm", "checks", "write_refused"}
)

// statusWriter is what the runner needs of a writer: write a check's wanted status and output
// (checkState.wantStatus/wantOutput, read when the write happens, so the latest wins), now or after
// a delay, or forget a delayed write. The runner calls them with its states lock held.
type statusWriter interface {
	enqueue(st *checkState)
	deferWrite(st *checkState, d time.Duration)
	cancelDefer(st *checkState)
}

// checkWriter writes check status to the catalog. Changes are collected for writeBatchWindow (or
// streamBatchWindow while they keep coming, or until maxTxnOps are pending) and flushed by one
// goroutine as one transaction of CAS operations. (Flushing several batches at once was measured
// slower against a CPU-bound Consul; the README has the figures.)
// The first attempt is optimistic: it uses the runner's own copy of each check, whose ModifyIndex is
// kept current by the blocking health query and by the indexes our own transactions return, so a
// burst of changes costs one request per maxTxnOps checks instead of a read per node plus a write (the
// original's consistent-read-then-write was 2 requests per change). Because only Status and Output
// are changed on that copy and the CAS fails if anything changed since, an operator's edit (Notes,
// Name, definition) is never overwritten: a stale-index conflict re-reads the nodes consistently and
// retries the whole batch (a transaction is atomic, so nothing of it landed), and any other failure
// reverts the whole batch so the next probe result tries again — never a silent loss.
//
// It also owns the deferred output-only writes (check_update_interval): a heap of due times with
// lazy cancellation through checkState.deferN.
type checkWriter struct {
	env writerEnv

	mu        sync.Mutex
	pending   []*checkState
	firstAt   time.Time // when the oldest pending change was queued
	lastFlush time.Time // when the last batch was taken
	deferred  timeHeap[deferEntry]
	wake      chan struct{}

	// afterRead, when set (tests), runs between the consistent read and the write of every attempt.
	afterRead func()

	// recovering is set when a write failed to reach Consul, until one succeeds (writer goroutine only).
	recovering bool

	txns     atomic.Uint64 // transactions sent (tests)
	maxOps   atomic.Int64  // largest transaction sent (tests)
	failures atomic.Uint64 // check writes given up (/health)
	refused  atomic.Uint64 // of those, refused by Consul as such (/health)
}

func newCheckWriter(env writerEnv) *checkWriter {
	return &checkWriter{env: env, wake: make(chan struct{}, 1)}
}

// batchWindow is writeBatchWindow, except in agentless mode where batch_flush_interval sets it (as
// in the original, to spare the servers that serve every request there); 0 flushes each change at once.
func batchWindow(cfg *Config) time.Duration {
	if cfg.EnableAgentless {
		return cfg.BatchFlushInterval
	}
	return writeBatchWindow
}

// enqueue schedules a write of st's wanted status and output. The flush reads them when it runs, so
// a check queued twice is written once with its latest state. Caller holds env.states.
func (w *checkWriter) enqueue(st *checkState) {
	w.cancelDefer(st) // the write carries the latest output anyway
	if st.removed || st.queued {
		return
	}
	st.queued = true
	w.mu.Lock()
	if len(w.pending) == 0 {
		w.firstAt = time.Now()
	}
	w.pending = append(w.pending, st)
	n := len(w.pending)
	w.mu.Unlock()
	if n == 1 || n >= maxTxnOps {
		wake(w.wake)
	}
}

// deferWrite schedules a write of st after d unless one is already scheduled; the write then carries
// whatever output is latest. Caller holds env.states.
func (w *checkWriter) deferWrite(st *checkState, d time.Duration) {
	if st.removed || st.queued || !st.deferAt.IsZero() {
		return
	}
	st.deferN++
	st.deferAt = time.Now().Add(d)
	w.mu.Lock()
	top := w.deferred.push(st.deferAt, deferEntry{st: st, n: st.deferN})
	w.mu.Unlock()
	if top {
		wake(w.wake)
	}
}

// cancelDefer drops st's deferred write, if any; its heap entry is skipped when it comes due.
// Caller holds env.states.
func (w *checkWriter) cancelDefer(st *checkState) {
	if !st.deferAt.IsZero() {
		st.deferAt = time.Time{}
		st.deferN++
	}
}

// loop flushes batches and promotes due deferred writes until ctx ends, then makes one bounded
// attempt to write what is still pending.
func (w *checkWriter) loop(ctx context.Context) {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var due []deferEntry
	for {
		now := time.Now()
		w.mu.Lock()
		due = due[:0]
		for at, ok := w.deferred.peek(); ok && !at.After(now); at, ok = w.deferred.peek() {
			due = append(due, w.deferred.pop())
		}
		w.mu.Unlock()
		if len(due) > 0 {
			w.promote(due)
			continue
		}

		w.mu.Lock()
		batch, wait := w.takeBatch(now)
		if at, ok := w.deferred.peek(); ok {
			if d := at.Sub(now); wait < 0 || d < wait {
				wait = d
			}
		}
		w.mu.Unlock()

		if batch != nil {
			w.flush(ctx, batch)
			continue
		}
		if !waitWake(ctx, timer, wait, w.wake) {
			w.finalFlush()
			return
		}
	}
}

// takeBatch takes up to maxTxnOps pending checks once the oldest has waited out the batch window or a
// full transaction's worth is pending; otherwise it returns how long to wait (-1: until woken).
// Caller holds w.mu.
func (w *checkWriter) takeBatch(now time.Time) (batch []*checkState, wait time.Duration) {
	n := len(w.pending)
	if n == 0 {
		return nil, -1
	}
	window := w.env.window
	if window > 0 && now.Sub(w.lastFlush) < streamingAfter {
		window = max(window, streamBatchWindow)
	}
	if age := now.Sub(w.firstAt); n < maxTxnOps && age < window {
		return nil, window - age
	}
	take := min(n, maxTxnOps)
	batch = make([]*checkState, take)
	copy(batch, w.pending)
	w.pending = append(w.pending[:0], w.pending[take:]...)
	w.lastFlush = now
	// firstAt stays: whatever is left has waited at least as long and goes next.
	return batch, -1
}

// promote queues the deferred writes that came due and are still current.
func (w *checkWriter) promote(due []deferEntry) {
	w.env.states.Lock()
	defer w.env.states.Unlock()
	for _, e := range due {
		if e.n == e.st.deferN && !e.st.deferAt.IsZero() {
			e.st.deferAt = time.Time{}
			w.enqueue(e.st)
		}
	}
}

// finalFlush writes status changes still pending at shutdown, within finalFlushBudget. Shutdown
// cancelled the loop's context, so it uses its own.
func (w *checkWriter) finalFlush() {
	w.mu.Lock()
	pending := w.pending
	w.pending = nil
	w.mu.Unlock()
	if len(pending) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), finalFlushBudget)
	defer cancel()
	for len(pending) > 0 {
		n := min(len(pending), maxTxnOps)
		w.flush(ctx, pending[:n])
		pending = pending[n:]
	}
}

// pendingWrite is one check's change as taken from its state when a flush attempt starts.
type pendingWrite struct {
	st                           *checkState
	node, ns, partition, checkID string
	status, output               string
	fresh                        *catalogCheck // the consistent read's copy
	index                        uint64        // ModifyIndex after our write (0: unknown)
	readErr                      error
	viaRegister                  bool
}

type nodeRef struct{ node, ns, partition string }

// flush writes batch. After a stale-index conflict the whole transaction (nothing of it landed) is
// retried with fresh reads; the rest of the batch was settled by the first attempt.
func (w *checkWriter) flush(ctx context.Context, batch []*checkState) {
	for attempt := 1; len(batch) > 0; attempt++ {
		ops := w.snapshot(batch, attempt == 1)
		if len(ops) == 0 {
			return
		}
		actx, cancel := w.attemptContext(ctx)
		batch = w.attempt(actx, ops, attempt == 1, attempt == writeAttempts)
		cancel()
		if len(batch) > 0 {
			metrics.IncrCounter([]string{"check", "txn", "retry"}, 1)
		}
	}
}

// attemptContext bounds an attempt by recoveringWriteTimeout while Consul is recovering (the last
// attempt failed to reach it): a server without a leader holds a write for up to rpc_hold_timeout
// (7 s) and lets it go on its own backoff, seconds after it has a leader again, and as the writer
// sends one transaction at a time every other check's write would wait behind it. Given up, the
// write is reverted and retried from the next result; if Consul applies it meanwhile, that retry's
// CAS finds the new index and re-reads. A working Consul answers in milliseconds, so the bound never
// applies to it.
func (w *checkWriter) attemptContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if !w.recovering {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, recoveringWriteTimeout)
}

// snapshot takes the current wanted state of each check in batch. The first snapshot of a batch
// takes its checks off the queue (so later changes queue them again); a retry must not, as the
// check may be queued again already and must stay in the queue exactly once. A check appears in a
// transaction at most once: a second CAS on it would always fail. Caller must not hold env.states.
func (w *checkWriter) snapshot(batch []*checkState, dequeue bool) []*pendingWrite {
	w.env.states.Lock()
	defer w.env.states.Unlock()
	ops := make([]*pendingWrite, 0, len(batch))
	seen := make(map[*checkState]bool, len(batch))
	for _, st := range batch {
		if dequeue {
			st.queued = false
		}
		if st.removed || seen[st] {
			continue
		}
		seen[st] = true
		c := st.check
		ops = append(ops, &pendingWrite{st: st, node: c.Node, ns: c.Namespace, partition: c.Partition,
			checkID: c.CheckID, status: st.wantStatus, output: st.wantOutput})
	}
	return ops
}

// attempt reads, writes and records one batch. It returns the checks of a transaction that hit a
// stale index and should be retried; on the last attempt such a transaction is reverted instead.
func (w *checkWriter) attempt(ctx context.Context, ops []*pendingWrite, optimistic, last bool) (retry []*checkState) {
	toRead := ops
	if optimistic {
		toRead = w.useLocalCopies(ops)
	}
	w.readNodes(ctx, toRead)
	if w.afterRead != nil {
		w.afterRead()
	}

	var txnOps api.TxnOps
	var inTxn []*pendingWrite
	for _, op := range ops {
		switch {
		case op.readErr != nil:
			w.recovering = true
			w.revert(op)
		case op.fresh == nil:
			// The check left the catalog; the next load stops it.
			w.gone(op)
		case op.fresh.Status == op.status && op.fresh.Output == op.output:
			op.index = op.fresh.ModifyIndex
			w.apply(op)
		case !txnPreservesDefinition(&op.fresh.Definition):
			op.viaRegister = true
		default:
			txnOps = append(txnOps, &api.TxnOp{Check: &api.CheckTxnOp{Verb: api.CheckCAS, Check: op.txnCheck()}})
			inTxn = append(inTxn, op)
		}
	}

	for _, op := range ops {
		if op.viaRegister {
			w.register(ctx, op)
		}
	}
	sizes := make([]int, len(txnOps))
	for i, op := range txnOps {
		sizes[i] = opSize(op)
	}
	for _, b := range txnBatches(sizes, maxTxnOps, 0) {
		retry = append(retry, w.send(ctx, txnOps[b[0]:b[1]], inTxn[b[0]:b[1]], last)...)
	}
	return retry
}

// send writes one transaction and records the outcome of each of its checks. It returns the
// checks to retry after a stale-index conflict (not on the last attempt). A transaction Consul
// refuses as such (too large for its txn_max_req_len) is split into single checks, so only the
// check that cannot be written fails, and that one is reported once (writeRefused).
func (w *checkWriter) send(ctx context.Context, txnOps api.TxnOps, inTxn []*pendingWrite, last bool) (retry []*checkState) {
	metrics.IncrCounter(checkTxnKey, 1)
	w.txns.Add(1)
	if n := int64(len(txnOps)); n > w.maxOps.Load() {
		w.maxOps.Store(n) // only the writer goroutine stores
	}
	ok, resp, err := w.env.catalog.txn(ctx, txnOps)
	w.recovering = err != nil && !txnRefused(err)
	switch {
	case err != nil && txnRefused(err) && len(txnOps) > 1:
		for i := range txnOps {
			retry = append(retry, w.send(ctx, txnOps[i:i+1], inTxn[i:i+1], last)...)
		}
		return retry
	case err != nil && txnRefused(err):
		w.writeRefused(inTxn[0], err)
		return nil
	case err != nil:
		w.env.status.failed(err)
		w.env.logger.Warn("Error updating check status in Consul", "checks", len(inTxn), "error", err)
		for _, op := range inTxn {
			w.revert(op)
		}
		return nil
	case !ok:
		stale := false
		if resp != nil {
			for _, e := range resp.Errors {
				if strings.Contains(e.What, "index is stale") {
					stale = true
				}
			}
		}
		if stale && !last {
			w.env.logger.Debug("Check changed in the catalog since it was read, retrying the batch", "checks", len(inTxn))
			retry = make([]*checkState, len(inTxn))
			for i, op := range inTxn {
				retry[i] = op.st
			}
			return retry
		}
		w.env.logger.Warn("Error(s) returned from txn when updating check status in Consul", "checks", len(inTxn), "errors", txnErrors(resp))
		for _, op := range inTxn {
			w.revert(op)
		}
		return nil
	}
	w.env.status.contact()
	for i, op := range inTxn {
		if resp != nil && i < len(resp.Results) && resp.Results[i] != nil && resp.Results[i].Check != nil &&
			resp.Results[i].Check.CheckID == op.checkID {
			op.index = resp.Results[i].Check.ModifyIndex
		}
		w.apply(op)
	}
	return nil
}

// writeRefused gives up on a write Consul refuses to accept at all. It is logged once per check
// (until one of its writes succeeds) and counted in esm.checks.write_refused; the check's next
// result tries again, alone, so its neighbours never wait on it.
func (w *checkWriter) writeRefused(op *pendingWrite, err error) {
	metrics.IncrCounter(writeRefusedKey, 1)
	w.refused.Add(1)
	w.env.states.Lock()
	first := !op.st.refused
	op.st.refused = true
	w.env.states.Unlock()
	if first {
		w.env.logger.Warn("Consul refused the status write of a check (other checks are not held back)",
			"checkID", op.checkID, "node", op.node, "error", err)
	}
	w.revert(op)
}

// useLocalCopies sets each op's base copy to the runner's own when that copy can be CAS-written
// through a transaction, and returns the ops that still need a consistent read: checks written
// through /v1/catalog/register (no CAS there, so the read is their only guard) and checks whose
// index is unknown.
func (w *checkWriter) useLocalCopies(ops []*pendingWrite) (toRead []*pendingWrite) {
	w.env.states.Lock()
	defer w.env.states.Unlock()
	for _, op := range ops {
		c := op.st.check
		if c == nil || c.ModifyIndex == 0 || !txnPreservesDefinition(&c.Definition) {
			toRead = append(toRead, op)
			continue
		}
		cp := *c
		op.fresh = &cp
	}
	return toRead
}

// readNodes does one consistent read per distinct node (and namespace/partition) of ops, a few in
// parallel, and attaches each check's fresh copy (nil when gone) or the read error.
func (w *checkWriter) readNodes(ctx context.Context, ops []*pendingWrite) {
	groups := make(map[nodeRef][]*pendingWrite)
	for _, op := range ops {
		ref := nodeRef{op.node, op.ns, op.partition}
		groups[ref] = append(groups[ref], op)
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, nodeReadParallelism)
	for ref, group := range groups {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			checks, err := w.env.catalog.nodeChecks(ctx, ref)
			if err != nil && ctx.Err() == nil {
				w.env.logger.Warn("Error retrieving existing node entry, reverting check updates for node",
					"node", ref.node, "checks", len(group), "error", err)
			}
			for _, op := range group {
				op.fresh, op.readErr = nil, err
				for _, c := range checks {
					if c.CheckID == op.checkID {
						op.fresh = c
						break
					}
				}
			}
		}()
	}
	wg.Wait()
}

// apply records a confirmed catalog state (written by us, or already there).
func (w *checkWriter) apply(op *pendingWrite) {
	w.env.states.Lock()
	defer w.env.states.Unlock()
	st := op.st
	if st.removed {
		return
	}
	old := op.fresh.Status
	c := *op.fresh
	c.Status, c.Output = op.status, op.output
	if op.index > 0 {
		c.ModifyIndex = op.index
	}
	if c.ModifyIndex < st.check.ModifyIndex {
		c.ModifyIndex = st.check.ModifyIndex
	}
	st.check = &c
	st.refused = false
	w.env.confirmed(c.ModifyIndex)
	if c.Status == statusCritical {
		if st.criticalSince.IsZero() {
			st.criticalSince = time.Now()
		}
	} else {
		st.criticalSince = time.Time{}
	}
	if old != op.status || op.fresh.Output != op.output {
		w.env.logger.Debug("Updated check status in catalog", "checkID", c.CheckID, "node", c.Node, "old", old, "new", op.status)
	}
}

// revert gives up on a write: the wanted state falls back to the catalog's, so the next result is
// judged against what Consul really says. The counter is left one result short of the threshold
// and the next output is written at once, so a lasting change is retried on the very next result.
func (w *checkWriter) revert(op *pendingWrite) {
	metrics.IncrCounter(writeFailuresKey, 1)
	w.failures.Add(1)
	set := w.env.settings()
	w.env.states.Lock()
	defer w.env.states.Unlock()
	st := op.st
	if st.removed || st.wantStatus != op.status || st.wantOutput != op.output {
		return // superseded by a newer result, which is queued already
	}
	st.wantStatus, st.wantOutput = st.check.Status, st.check.Output
	st.counter = 0
	if (op.status == statusCritical) != (st.check.Status == statusCritical) {
		st.counter = set.thresholdsFor(&st.def).forStatus(op.status)
	}
	st.fresh = true
}

// gone handles a check missing from the consistent read: nothing to write, and the wanted state
// falls back so nothing is retried until the next load removes the check.
func (w *checkWriter) gone(op *pendingWrite) {
	w.env.states.Lock()
	defer w.env.states.Unlock()
	st := op.st
	if st.removed || st.wantStatus != op.status || st.wantOutput != op.output {
		return
	}
	w.env.logger.Debug("Check no longer in the catalog, not writing its status", "checkID", op.checkID, "node", op.node)
	st.wantStatus, st.wantOutput = st.check.Status, st.check.Output
}

// deferEntry is a deferred output write; n must still equal st.deferN when it comes due.
type deferEntry struct {
	st *checkState
	n  uint64
}
