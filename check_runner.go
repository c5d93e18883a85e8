package main

import (
	"context"
	"crypto/tls"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
)

const (
	// defaultCheckInterval applies to definitions without an Interval; running them in a busy loop
	// was the original's issue #35.
	defaultCheckInterval = 30 * time.Second

	// minCheckInterval is the floor for intervals; shorter ones are raised with a warning.
	minCheckInterval = time.Second

	// takeoverSpread is how soon a check started after the first assignment runs (see startTask).
	takeoverSpread = 500 * time.Millisecond
)

// runnerSettings are the config values the runner reads on every result; Reload swaps them.
type runnerSettings struct {
	passingThreshold    int
	criticalThreshold   int
	checkUpdateInterval time.Duration
	tlsExpiryWarning    time.Duration // 0: a certificate's expiry never changes a status
	perCheckMetrics     bool          // telemetry.per_check_metrics: record each run for /metrics
}

func settingsFrom(cfg *Config) *runnerSettings {
	return &runnerSettings{
		passingThreshold:    cfg.PassingThreshold,
		criticalThreshold:   cfg.CriticalThreshold,
		checkUpdateInterval: cfg.CheckUpdateInterval,
		tlsExpiryWarning:    cfg.TLSExpiryWarning,
		perCheckMetrics:     cfg.Telemetry.PerCheckMetrics,
	}
}

// CheckRunner runs the health checks of the external nodes assigned to this instance and writes their
// results to the catalog. Run starts five goroutines and returns only after all of them (and every
// worker they started) have returned:
//
//   - the loader follows /v1/health/state/any with a blocking query limited to our nodes
//     (check_load.go) and reconciles the running checks with it (check_reconcile.go);
//   - watchIndex notices a checks table that went back (snapshot restore) between loads (check_load.go);
//   - the scheduler keeps every running check in one min-heap ordered by its next run and hands due
//     checks to an elastic worker pool, so 10k checks cost a heap and a handful of goroutines rather
//     than 10k sleeping goroutines with their stacks (check_scheduler.go); each result passes the
//     thresholds (thresholds.go) and becomes a write or nothing (check_results.go);
//   - the writer batches status changes into CAS transactions (check_writer.go, check_catalog.go);
//   - the reaper deregisters services whose check stayed critical past DeregisterCriticalServiceAfter
//     (reaper.go).
//
// This file holds the runner's state and the glue: the assignment, starting and stopping checks.
//
// Lock order: mu before sched.mu and writer.mu; none of those is held while taking mu.
type CheckRunner struct {
	agent    *Agent
	logger   hclog.Logger
	prober   *probeBuilder
	settings atomic.Pointer[runnerSettings]

	// minInterval is the interval floor (minCheckInterval); tests lower it before Run.
	minInterval time.Duration

	// baseCtx parents every check's context; Run cancels it on shutdown so in-flight probes abort.
	baseCtx    context.Context
	baseCancel context.CancelFunc

	nodesMu      sync.Mutex
	nodes        []string
	nodesGen     uint64
	nodesChanged chan struct{}
	cancelQuery  context.CancelFunc // cancels the in-flight health query when the assignment changes

	mu          sync.Mutex
	states      map[string]*checkState     // running checks by key
	unsupported map[string]checkDefinition // checks left alone, so each is logged once
	lastCount   int

	sched *checkScheduler
	// writes is where results go to be written; the real writer in production, a fake in tests.
	writes statusWriter
	// writer is the real writer, run by Run; its counters feed /health.
	writer *checkWriter

	// known is the highest checks-table index this runner has seen Consul confirm (loads, our own
	// writes); a later answer below it means Consul's state went back. retakeNext asks the loader
	// to take the catalog's copy of every check on its next load.
	known      atomic.Uint64
	retakeNext atomic.Bool

	runs     atomic.Uint64 // completed probe runs (tests, throughput measurement)
	loads    atomic.Uint64 // successful health-state loads (tests)
	blocking atomic.Bool   // a blocking health-state query is in flight (tests)
}

// checkState is everything the runner knows about one catalog check. It outlives restarts of the
// check (a changed definition), so the anti-flapping counter and critical-since survive
// reconciliations. All fields are guarded by CheckRunner.mu.
type checkState struct {
	key string
	// check is the newest catalog copy: from a load, or from our own confirmed write. Its Status and
	// Output are what the catalog says.
	check *catalogCheck
	// wantStatus/wantOutput are what the catalog should say after pending writes land.
	wantStatus, wantOutput string
	counter                int
	criticalSince          time.Time
	// def is the definition of the current incarnation (also when its probe could not be built).
	def  checkDefinition
	task *checkTask
	// fresh makes the next output-only change be written at once: the first result of a (re)started
	// check, or after a failed write was reverted.
	fresh   bool
	queued  bool      // waiting in the writer's batch
	deferAt time.Time // a deferred output-only write is due then (zero: none)
	deferN  uint64    // generation of the deferral; bumping it cancels the one in the writer's heap
	removed bool
	reaped  bool // service deregistered by the reaper; cleared when the check is seen again
	refused bool // Consul refused its last write as such (logged once); cleared by a write that lands
}

// checkTask is one incarnation of a running check: a definition, the probe built once for it and its
// place in the scheduler. A definition change replaces the task, never mutates it.
type checkTask struct {
	st       *checkState
	probe    probeFunc
	interval time.Duration
	ctx      context.Context
	cancel   context.CancelFunc

	// certExpiry is the Unix time at which the certificate of the last run that completed a TLS
	// handshake expires (0: none yet). It is per incarnation, so a definition that drops TLS drops
	// its expiry series; the telemetry collector reads it at scrape time.
	certExpiry atomic.Int64
	// lastLatency (ns) and lastStatus (statusCode) describe the last run; written only with
	// telemetry.per_check_metrics, read by the telemetry collector.
	lastLatency atomic.Int64
	lastStatus  atomic.Int32
	// run collects what the current run observed; runs of one task never overlap.
	run probeRun

	// guarded by checkScheduler.mu
	next     time.Time
	index    int // position in the heap, -1 when not in it
	stopped  bool
	respread bool // the next run goes to a random point of the following interval (see startTask)
}

func newCheckRunner(a *Agent, tlsCfg *tls.Config) *CheckRunner {
	r := &CheckRunner{
		agent:        a,
		logger:       a.logger,
		prober:       newProbeBuilder(tlsCfg),
		minInterval:  minCheckInterval,
		nodesChanged: make(chan struct{}, 1),
		states:       make(map[string]*checkState),
		unsupported:  make(map[string]checkDefinition),
	}
	if r.logger == nil {
		r.logger = hclog.NewNullLogger()
	}
	r.baseCtx, r.baseCancel = context.WithCancel(context.Background())
	r.settings.Store(settingsFrom(a.config()))
	r.sched = newCheckScheduler(r.runTask)
	r.writer = newCheckWriter(writerEnv{
		logger:    r.logger,
		catalog:   agentCatalog{a},
		status:    a.status,
		states:    &r.mu,
		settings:  r.settings.Load,
		confirmed: r.raiseKnown,
		window:    batchWindow(a.config()),
	})
	r.writes = r.writer
	return r
}

// SetNodes replaces the set of nodes whose checks this instance runs. The checks of nodes that left
// the set stop at once, without waiting for a health query: those nodes have a new owner, and
// while Consul cannot be queried both would run and write them. A changed set also cancels the
// in-flight health query so the new set is loaded at once.
func (r *CheckRunner) SetNodes(nodes []string) {
	nodes = slices.Clone(nodes)
	slices.Sort(nodes)
	nodes = slices.Compact(nodes)
	r.nodesMu.Lock()
	if slices.Equal(nodes, r.nodes) && r.nodesGen > 0 {
		r.nodesMu.Unlock()
		return
	}
	r.nodes = nodes
	r.nodesGen++
	if r.cancelQuery != nil {
		r.cancelQuery()
	}
	r.nodesMu.Unlock()
	r.dropUnassigned(nodes)
	wake(r.nodesChanged)
}

// dropUnassigned stops the checks of nodes not in nodes (sorted).
func (r *CheckRunner) dropUnassigned(nodes []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	removed := 0
	for _, st := range r.states {
		if _, ok := slices.BinarySearch(nodes, st.check.Node); !ok {
			r.dropState(st)
			removed++
		}
	}
	if removed > 0 {
		r.logger.Info("Stopped the checks of nodes no longer assigned", "removed", removed, "count", len(r.states))
	}
}

// assignedNodes returns the current node set.
func (r *CheckRunner) assignedNodes() []string {
	r.nodesMu.Lock()
	defer r.nodesMu.Unlock()
	return slices.Clone(r.nodes)
}

// SetTLS replaces the https_* TLS settings used by HTTPS, TCP+TLS, gRPC and H2PING checks (SIGHUP).
func (r *CheckRunner) SetTLS(tlsCfg *tls.Config) { r.prober.setTLS(tlsCfg) }

// Reload applies the thresholds and check_update_interval of a re-read config (SIGHUP). Counters
// are kept; an output write already deferred keeps its due time.
func (r *CheckRunner) Reload(cfg *Config) { r.settings.Store(settingsFrom(cfg)) }

// Stats reports the assigned node count, the running checks and how many of them are passing in the
// catalog, for /health.
func (r *CheckRunner) Stats() (nodes, checks, passing int) {
	r.nodesMu.Lock()
	nodes = len(r.nodes)
	r.nodesMu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, st := range r.states {
		checks++
		if st.check.Status == statusPassing {
			passing++
		}
	}
	return nodes, checks, passing
}

// WriteStats returns how many check writes were given up since start, and how many of those Consul
// refused as such (for /health).
func (r *CheckRunner) WriteStats() (failures, refused uint64) {
	return r.writer.failures.Load(), r.writer.refused.Load()
}

// Run runs the checks until ctx ends. It may be called once.
func (r *CheckRunner) Run(ctx context.Context) {
	var wg sync.WaitGroup
	start := func(f func(context.Context)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f(ctx)
		}()
	}
	start(r.sched.loop)
	start(r.loadLoop)
	start(r.writer.loop)
	start(r.reapLoop)
	start(r.watchIndex)
	<-ctx.Done()
	r.baseCancel()
	wg.Wait()
	r.sched.wait()
	r.mu.Lock()
	for key, st := range r.states {
		r.stopTask(st)
		st.removed = true
		delete(r.states, key)
	}
	r.mu.Unlock()
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
func (r *CheckRunner) startTask(st *checkState, c *catalogCheck, logf func(string, ...any)) bool {
	def := c.Definition
	st.def = def
	interval := time.Duration(def.Interval)
	if interval <= 0 {
		interval = defaultCheckInterval
	}
	if interval < r.minInterval {
		logf("Check interval too low", "interval", interval, "check", st.key)
		interval = r.minInterval
	}
	timeout := time.Duration(def.Timeout)
	if timeout <= 0 {
		timeout = defaultCheckTimeout
	}
	probe, err := r.prober.newProbe(&def, timeout)
	if err != nil {
		// kind() accepted it, so this is a malformed target; leave it alone like an unsupported one.
		r.logger.Warn("Cannot run check", "checkHash", st.key, "error", err)
		st.task = nil
		return false
	}
	ctx, cancel := context.WithCancel(r.baseCtx)
	t := &checkTask{st: st, probe: probe, interval: interval, ctx: ctx, cancel: cancel, index: -1}
	st.task = t
	st.fresh = true
	spread := interval
	if r.loads.Load() > 0 {
		spread = min(interval, takeoverSpread)
		t.respread = true
	}
	r.sched.add(t, time.Now().Add(rand.N(spread)))
	return true
}

// stopTask stops the running incarnation and its pending output write. Caller holds mu.
func (r *CheckRunner) stopTask(st *checkState) {
	if st.task == nil {
		return
	}
	r.sched.remove(st.task)
	st.task.cancel()
	st.task = nil
	r.writes.cancelDefer(st)
}

// dropState forgets a check that left the catalog or our assignment. Caller holds mu.
func (r *CheckRunner) dropState(st *checkState) {
	r.stopTask(st)
	st.removed = true
	delete(r.states, st.key)
}
