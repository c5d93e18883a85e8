package main

import (
	"container/heap"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net/url"
	"reflect"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/armon/go-metrics"
	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

const (
	// defaultCheckInterval applies to definitions without an Interval; running them in a busy loop
	// was the original's issue #35.
	defaultCheckInterval = 30 * time.Second

	// minCheckInterval is the floor for intervals; shorter ones are raised with a warning.
	minCheckInterval = time.Second

	// maxFilterNodes and maxFilterURLBytes bound the server-side filter expression that limits the
	// health query to our own nodes. Beyond them the query falls back to the node-meta filter alone
	// and filters on our side: a request line longer than ~8 KiB is refused by common proxies, and
	// Consul evaluates every OR term against every check in the cluster.
	maxFilterNodes    = 200
	maxFilterURLBytes = 6000

	// minLoadGap is the shortest time between two health-state queries. Every check write anywhere
	// in the cluster (our own included) wakes the blocking query, so without a gap a busy cluster
	// would make every instance download its checks continuously. The gap grows with the number of
	// checks (one more second per thousand, up to maxLoadGap) because each load re-decodes them
	// all. A new assignment is always fetched at once.
	minLoadGap = time.Second
	maxLoadGap = 10 * time.Second

	// takeoverSpread is how soon a check started after the first assignment runs (see startTask).
	takeoverSpread = 500 * time.Millisecond

	// minWorkers is the worker pool's floor; it grows beyond that only up to the number of running
	// checks, so the pool is never larger than goroutine-per-check would be, and idle workers exit.
	minWorkers        = 64
	workerIdleTimeout = 10 * time.Second
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
// results to the catalog. Run starts four goroutines and returns only after all of them (and every
// worker they started) have returned:
//
//   - the loader follows /v1/health/state/any with a blocking query limited to our nodes and
//     reconciles the running checks with it (reconcile);
//   - the scheduler keeps every running check in one min-heap ordered by its next run and hands due
//     checks to an elastic worker pool, so 10k checks cost a heap and a handful of goroutines rather
//     than 10k sleeping goroutines with their stacks;
//   - the writer batches status changes into CAS transactions (check_writer.go);
//   - the reaper deregisters services whose check stayed critical past DeregisterCriticalServiceAfter.
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

	sched  *checkScheduler
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
	kind     string
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
	running  bool
	stopped  bool
	respread bool // the next run goes to a random point of the following interval (see startTask)
}

// catalogCheck is a health check as /v1/health/* returns it. The definition is decoded into our own
// checkDefinition so no field (UDP, H2PING, DisableRedirects, OutputMaxSize, Body, ...) is lost,
// which api.HealthCheckDefinition would drop.
type catalogCheck struct {
	Node        string
	CheckID     string
	Name        string
	Status      string
	Notes       string
	Output      string
	ServiceID   string
	ServiceName string
	ServiceTags []string
	Type        string
	Namespace   string `json:",omitempty"`
	Partition   string `json:",omitempty"`
	ExposedPort int
	PeerName    string `json:",omitempty"`
	Definition  checkDefinition
	CreateIndex uint64
	ModifyIndex uint64
}

// checkKey is the check's identity: <node>/<serviceID>/<checkID>, or <node>/<checkID> for node
// checks (the original's "hash"), prefixed with the namespace outside the default one.
func (c *catalogCheck) checkKey() string {
	var k string
	if c.ServiceID != "" {
		k = c.Node + "/" + c.ServiceID + "/" + c.CheckID
	} else {
		k = c.Node + "/" + c.CheckID
	}
	if c.Namespace != "" && c.Namespace != "default" {
		k = c.Namespace + "/" + k
	}
	return k
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
	r.writer = newCheckWriter(r)
	return r
}

// SetNodes replaces the set of nodes whose checks this instance runs. The checks of nodes that left
// the set stop at once, without waiting for a health query: those nodes have a new owner, and
// while Consul cannot be queried both would run and write them. A changed set also cancels the
// in-flight health query so the new set is loaded at once.
func (r *CheckRunner) SetNodes(nodes []string) {
	nodes = slices.Clone(nodes)
	sort.Strings(nodes)
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

// Nodes returns the current node set.
func (r *CheckRunner) Nodes() []string {
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

// waitWake blocks until wake is signalled, wait has passed (wait < 0: no deadline) or ctx ends, and
// reports false when ctx ended. timer is the caller's, reused across calls.
func waitWake(ctx context.Context, timer *time.Timer, wait time.Duration, wake <-chan struct{}) bool {
	if wait >= 0 {
		timer.Reset(wait)
	} else {
		timer.Stop()
	}
	select {
	case <-ctx.Done():
		return false
	case <-wake:
	case <-timer.C:
	}
	return true
}

// ---------------------------------------------------------------------------------------------
// Loading

// loadLoop keeps the running checks in line with the catalog until ctx ends.
func (r *CheckRunner) loadLoop(ctx context.Context) {
	var (
		idx          uint64
		gen          uint64 // assignment generation idx belongs to
		emptiedGen   uint64 // generation already reconciled to empty
		failing      bool
		lastStart    time.Time
		hadChecks    int
		retry        = newBackoff(250*time.Millisecond, r.agent.config().RetryInterval)
		errMsg       = "Error querying for health check info"
		fetchAndUpd  = []string{"esm", "checks", "fetch_and_update", "duration"}
		nodesMonitor = []string{"esm", "nodes", "monitored"}
	)
	for ctx.Err() == nil {
		r.nodesMu.Lock()
		nodes, curGen := r.nodes, r.nodesGen
		qctx, cancel := context.WithCancel(ctx)
		r.cancelQuery = cancel
		r.nodesMu.Unlock()

		if curGen != gen {
			// A new assignment starts a fresh, non-blocking query and skips the load gap.
			gen, idx, lastStart = curGen, 0, time.Time{}
		}
		retake := r.retakeNext.Swap(false)
		if retake {
			idx, lastStart = 0, time.Time{}
		}
		if len(nodes) == 0 {
			cancel()
			metrics.SetGauge(nodesMonitor, 0)
			if curGen != emptiedGen {
				emptiedGen = curGen
				r.reconcile(nil, 0)
			}
			select {
			case <-ctx.Done():
			case <-r.nodesChanged:
			}
			continue
		}
		if gap := r.loadGap(hadChecks) - time.Since(lastStart); !lastStart.IsZero() && gap > 0 {
			if !r.waitAssignment(ctx, gap) {
				cancel()
				continue // new assignment or shutdown
			}
		}
		lastStart = time.Now()
		r.blocking.Store(idx > 0)
		known := r.known.Load() // before the query: all of it is in any state the query can see
		checks, meta, arrived, err := r.fetchChecks(qctx, nodes, idx)
		r.blocking.Store(false)
		reassigned := qctx.Err() != nil && ctx.Err() == nil
		cancel()
		if ctx.Err() != nil {
			return
		}
		if reassigned {
			continue
		}
		if err != nil {
			r.agent.status.failed(err)
			if !failing {
				r.logger.Warn(errMsg, "error", err)
				failing = true
			}
			idx = 0
			if retake {
				r.retakeNext.Store(true)
			}
			r.waitAssignment(ctx, retry.next())
			continue
		}
		if failing {
			r.logger.Info("Consul query recovered", "query", errMsg)
			failing = false
		}
		retry.reset()
		r.agent.status.contact()
		if meta.LastIndex < known && !r.agent.config().StaleReadNodes {
			// (A stale read may lag our own writes; watchIndex asks the leader instead.)
			retake = true
		}
		if retake {
			r.logger.Warn("Consul's index went backwards (snapshot restore?), taking the catalog's copy of every check",
				"index", meta.LastIndex, "known", known)
			r.known.Store(meta.LastIndex)
		} else {
			r.raiseKnown(meta.LastIndex)
		}
		metrics.SetGauge(nodesMonitor, float32(len(nodes)))
		r.reconcileAt(checks, len(nodes), meta.LastIndex, retake)
		r.loads.Add(1)
		hadChecks = len(checks)
		if !arrived.IsZero() {
			metrics.MeasureSince(fetchAndUpd, arrived)
		}
		idx = meta.LastIndex
	}
}

// raiseKnown records that Consul confirmed index.
func (r *CheckRunner) raiseKnown(index uint64) {
	for {
		cur := r.known.Load()
		if index <= cur || r.known.CompareAndSwap(cur, index) {
			return
		}
	}
}

// indexProbeGap is the pause before watchIndex's next probe: half the shortest interval among the
// held checks, so a regression is noticed within one interval of any check, at a cost that follows
// the checks (10 s checks: one request per 5 s). It is never under half the interval floor; zero
// means no check is held, so there is nothing to protect and no request to send. A check added
// with a shorter interval than any before is covered from the next probe on.
func (r *CheckRunner) indexProbeGap() time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	var shortest time.Duration
	for _, st := range r.states {
		if t := st.task; t != nil && (shortest == 0 || t.interval < shortest) {
			shortest = t.interval
		}
	}
	if shortest == 0 {
		return 0
	}
	return max(shortest, r.minInterval) / 2
}

// watchIndex notices a regression of Consul's state the loader cannot see: after a snapshot
// restore the checks table may be back at an index at or below the one the loader waits on, and
// its blocking query then returns only at its wait time (45 s). A check whose result does not
// change would keep the restored status meanwhile. It asks for the table's index (an empty
// node's checks: a tiny answer carrying it) and, when it is below what Consul had confirmed before
// the request was sent, makes the loader take the catalog's copies at once.
func (r *CheckRunner) watchIndex(ctx context.Context) {
	idle := r.minInterval / 2
	t := time.NewTimer(idle)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		gap := r.indexProbeGap()
		if gap == 0 {
			t.Reset(idle)
			continue
		}
		t.Reset(gap)
		known := r.known.Load()
		q := r.agent.queryOptions(ctx)
		q.Namespace = r.namespaceWildcard() // the loads' scope, so the indexes compare
		_, meta, err := r.agent.client.Health().Node(indexProbeNode, q)
		if err != nil || meta.LastIndex >= known || r.retakeNext.Load() {
			continue
		}
		r.logger.Debug("Checks table index below the known one", "index", meta.LastIndex, "known", known)
		r.retakeNext.Store(true)
		r.nodesMu.Lock()
		if r.cancelQuery != nil {
			r.cancelQuery()
		}
		r.nodesMu.Unlock()
		wake(r.nodesChanged)
	}
}

// indexProbeNode is the node watchIndex asks about; whether it exists does not matter, the answer
// carries the index of the whole checks table either way.
const indexProbeNode = "consul-esm-index-probe"

// loadGap is the pause between loads for a given number of checks (see minLoadGap).
func (r *CheckRunner) loadGap(checks int) time.Duration {
	return min(minLoadGap+time.Duration(checks/1000)*time.Second, maxLoadGap)
}

// waitAssignment sleeps for d; it returns false early when the assignment changes or ctx ends.
func (r *CheckRunner) waitAssignment(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-r.nodesChanged:
		return false // the caller re-reads the assignment
	case <-t.C:
		return true
	}
}

// fetchChecks runs one (blocking) health-state query and returns the checks on nodes, without the
// prober's externalNodeHealth checks.
func (r *CheckRunner) fetchChecks(ctx context.Context, nodes []string, idx uint64) ([]*catalogCheck, *api.QueryMeta, time.Time, error) {
	cfg := r.agent.config()
	q := r.agent.queryOptions(ctx)
	q.WaitIndex, q.WaitTime = idx, cfg.QueryWaitTime
	q.NodeMeta = cfg.NodeMeta
	q.AllowStale = cfg.StaleReadNodes
	if ns := r.namespaceWildcard(); ns != "" {
		r.logger.Debug("checking for services in all namespaces")
		q.Namespace = ns
	}
	if f, ok := nodeFilterExpr(nodes); ok {
		q.Filter = f
	}
	var (
		out     []*catalogCheck
		arrived time.Time
	)
	// The body is decoded one check at a time as it arrives (see withStreamBody), and a check we
	// already hold at this or a newer ModifyIndex is not kept twice: a load of an unchanged
	// assignment then allocates only short-lived garbage instead of a second copy of every check.
	q = q.WithContext(withStreamBody(q.Context(), func(body io.Reader) error {
		arrived = time.Now()
		var err error
		out, err = r.decodeChecks(body, nodes)
		return err
	}))
	meta, err := r.agent.client.Raw().Query("/v1/health/state/any", &struct{}{}, q)
	if err != nil {
		return nil, nil, time.Time{}, fmt.Errorf("querying health checks of %d nodes: %w", len(nodes), err)
	}
	return out, meta, arrived, nil
}

// decodeChecks reads a JSON array of health checks and returns those on nodes (sorted), without the
// prober's externalNodeHealth checks. A check already held at the same ModifyIndex is returned as
// the held copy, which reconcile treats as unchanged; an older one is returned as decoded, for
// reconcileAt to tell a stale read from a catalog that went back.
func (r *CheckRunner) decodeChecks(body io.Reader, nodes []string) ([]*catalogCheck, error) {
	dec := json.NewDecoder(body)
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	if tok == nil { // null: no checks
		return nil, nil
	}
	if d, ok := tok.(json.Delim); !ok || d != '[' {
		return nil, fmt.Errorf("health checks: want a JSON array, got %v", tok)
	}
	var out []*catalogCheck
	var c catalogCheck
	for dec.More() {
		c = catalogCheck{} // Decode merges into maps and slices, so start from zero every time
		if err := dec.Decode(&c); err != nil {
			return nil, err
		}
		if c.CheckID == "" || c.CheckID == externalNodeHealthCheckID {
			continue
		}
		if _, ok := slices.BinarySearch(nodes, c.Node); !ok {
			continue
		}
		if held := r.heldCopy(&c); held != nil {
			out = append(out, held)
			continue
		}
		kept := c
		out = append(out, &kept)
	}
	if _, err := dec.Token(); err != nil { // the closing ]
		return nil, err
	}
	return out, nil
}

// heldCopy returns the runner's copy of c when it is at c's index.
func (r *CheckRunner) heldCopy(c *catalogCheck) *catalogCheck {
	key := c.checkKey()
	r.mu.Lock()
	defer r.mu.Unlock()
	if st := r.states[key]; st != nil && c.ModifyIndex == st.check.ModifyIndex {
		return st.check
	}
	return nil
}

// nodeFilterExpr builds the server-side filter that limits a health query to nodes (sorted), or
// reports that the set is too large or has names that cannot be quoted safely.
func nodeFilterExpr(nodes []string) (string, bool) {
	if len(nodes) == 0 || len(nodes) > maxFilterNodes {
		return "", false
	}
	var b strings.Builder
	b.WriteString(`CheckID != "` + externalNodeHealthCheckID + `" and (`)
	for i, n := range nodes {
		if strings.ContainsAny(n, "\"\\`") || strings.ContainsFunc(n, func(c rune) bool { return c < 0x20 || c == 0x7f }) {
			return "", false
		}
		if i > 0 {
			b.WriteString(" or ")
		}
		b.WriteString(`Node == "`)
		b.WriteString(n)
		b.WriteByte('"')
	}
	b.WriteByte(')')
	s := b.String()
	if len(url.QueryEscape(s)) > maxFilterURLBytes {
		return "", false
	}
	return s, true
}

// namespaceWildcard returns "*" on Consul Enterprise (detected at startup from the agent's version),
// so one query covers every namespace, and "" on CE, which rejects namespaces.
func (r *CheckRunner) namespaceWildcard() string {
	if r.agent.enterprise.Load() {
		return "*"
	}
	return ""
}

// ---------------------------------------------------------------------------------------------
// Reconciliation

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
	assigned := r.Nodes()
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
func (r *CheckRunner) startTask(st *checkState, c *catalogCheck, kind string, logf func(string, ...any)) bool {
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
	t := &checkTask{st: st, kind: kind, probe: probe, interval: interval, ctx: ctx, cancel: cancel, index: -1}
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
	r.writer.cancelDefer(st)
}

// dropState forgets a check that left the catalog or our assignment. Caller holds mu.
func (r *CheckRunner) dropState(st *checkState) {
	r.stopTask(st)
	st.removed = true
	delete(r.states, st.key)
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

// ---------------------------------------------------------------------------------------------
// Results and thresholds

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

// thresholdStep applies one result to the anti-flapping counter, with the README's semantics: a
// result on the other side of critical/not-critical from the current status increments the counter,
// one on the same side decrements it (floor 0), and the status changes when the counter exceeds the
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
// with check_update_interval 0, otherwise deferred by check_update_interval.
func (r *CheckRunner) handleResult(t *checkTask, status, output string) {
	set := r.settings.Load()
	r.mu.Lock()
	defer r.mu.Unlock()
	st := t.st
	if st.task != t || st.removed {
		return // restarted or stopped meanwhile
	}
	th := set.thresholdsFor(&st.def)
	counter, change := thresholdStep(st.counter, st.wantStatus, status, th.passing, th.critical)
	st.counter = counter
	if status != st.wantStatus {
		if !change && th.warnsFirst(st.wantStatus, status, counter) {
			// FailuresBeforeWarning reached while FailuresBeforeCritical is not: the check shows
			// warning meanwhile; the counter carries on towards critical.
			st.wantStatus, st.wantOutput = statusWarning, output
			st.fresh = false
			r.writer.enqueue(st)
			return
		}
		if !change {
			r.logger.Debug("Check status change held back by threshold", "checkHash", st.key,
				"status", status, "current", st.wantStatus, "counter", counter, "threshold", th.forStatus(status))
			return
		}
		st.wantStatus, st.wantOutput = status, output
		st.fresh = false
		r.writer.enqueue(st)
		return
	}
	if output == st.wantOutput {
		st.fresh = false
		return
	}
	st.wantOutput = output
	if st.fresh || set.checkUpdateInterval <= 0 {
		st.fresh = false
		r.writer.enqueue(st)
		return
	}
	r.writer.deferWrite(st, set.checkUpdateInterval)
}

// ---------------------------------------------------------------------------------------------
// DeregisterCriticalServiceAfter

func (r *CheckRunner) reapLoop(ctx context.Context) {
	interval := r.agent.config().ReapInterval
	if interval <= 0 {
		interval = 30 * time.Second
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			r.reapOnce(ctx)
		}
	}
}

type reapTarget struct {
	node, serviceID, namespace, partition string
	checkID                               string
	critical, timeout                     time.Duration
}

// reapOnce deregisters every service with a check critical (in the catalog) for longer than its
// DeregisterCriticalServiceAfter, once per node and service. Node checks never reap.
func (r *CheckRunner) reapOnce(ctx context.Context) {
	now := time.Now()
	var targets []reapTarget
	seen := make(map[string]bool)
	r.mu.Lock()
	for _, st := range r.states {
		c := st.check
		if st.task == nil || st.reaped || c.ServiceID == "" || c.Status != statusCritical || st.criticalSince.IsZero() {
			continue
		}
		timeout := time.Duration(st.def.DeregisterCriticalServiceAfter)
		if timeout <= 0 || now.Sub(st.criticalSince) <= timeout {
			continue
		}
		id := c.Partition + "/" + c.Namespace + "/" + c.Node + "/" + c.ServiceID
		if seen[id] {
			continue
		}
		seen[id] = true
		targets = append(targets, reapTarget{node: c.Node, serviceID: c.ServiceID, namespace: c.Namespace,
			partition: c.Partition, checkID: c.CheckID, critical: now.Sub(st.criticalSince), timeout: timeout})
	}
	r.mu.Unlock()

	for _, t := range targets {
		wo := r.agent.writeOptions(ctx)
		dereg := &api.CatalogDeregistration{Node: t.node, ServiceID: t.serviceID, Namespace: t.namespace, Partition: t.partition}
		if dereg.Partition == "" {
			dereg.Partition = wo.Partition
		}
		if _, err := r.agent.client.Catalog().Deregister(dereg, wo); err != nil {
			if ctx.Err() != nil {
				return
			}
			r.logger.Warn("Failed to deregister critical service", "node", t.node, "serviceID", t.serviceID, "error", err)
			continue
		}
		r.logger.Info("agent has been critical for too long, deregistered service", "checkID", t.checkID,
			"nodeID", t.node, "serviceID", t.serviceID, "duration", t.critical, "timeout", t.timeout)
		// Mark the service's checks so the next passes do not repeat the call before the next load
		// drops them.
		r.mu.Lock()
		for _, st := range r.states {
			c := st.check
			if c.Node == t.node && c.ServiceID == t.serviceID && c.Namespace == t.namespace && c.Partition == t.partition {
				st.reaped = true
			}
		}
		r.mu.Unlock()
	}
}

// ---------------------------------------------------------------------------------------------
// Scheduling

// checkScheduler runs tasks at their interval: one min-heap of next-run times, one timer, and an
// elastic pool of workers. A task is never run twice concurrently; if a run overruns its interval
// the missed slot is skipped rather than queued.
//
// Idle workers wait on a LIFO stack: the most recently idle worker gets the next task, so the ones
// at the bottom stay idle and exit after workerIdleTimeout, and the pool shrinks back to the real
// concurrency after a burst (a FIFO hand-off would keep every worker busy just often enough never
// to expire).
type checkScheduler struct {
	run func(*checkTask)

	mu      sync.Mutex
	heap    taskHeap
	count   int // tasks added and not removed
	workers int
	idleWs  []chan *checkTask // idle workers' inboxes, most recently idle last
	wake    chan struct{}

	workerFree chan struct{} // a worker became idle or exited
	wg         sync.WaitGroup
	idle       time.Duration
}

func newCheckScheduler(run func(*checkTask)) *checkScheduler {
	return &checkScheduler{
		run:        run,
		wake:       make(chan struct{}, 1),
		workerFree: make(chan struct{}, 1),
		idle:       workerIdleTimeout,
	}
}

func (s *checkScheduler) add(t *checkTask, first time.Time) {
	s.mu.Lock()
	s.count++
	t.next = first
	heap.Push(&s.heap, t)
	top := t.index == 0
	s.mu.Unlock()
	if top {
		wake(s.wake)
	}
}

func (s *checkScheduler) remove(t *checkTask) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if t.stopped {
		return
	}
	t.stopped = true
	s.count--
	if t.index >= 0 {
		heap.Remove(&s.heap, t.index)
	}
}

// finished puts a task back after a run, at its next slot.
func (s *checkScheduler) finished(t *checkTask) {
	s.mu.Lock()
	t.running = false
	if t.stopped {
		s.mu.Unlock()
		return
	}
	now := time.Now()
	t.next = t.next.Add(t.interval)
	if t.respread {
		t.respread = false
		t.next = now.Add(rand.N(t.interval))
	}
	if !t.next.After(now) {
		t.next = now.Add(t.interval)
	}
	heap.Push(&s.heap, t)
	top := t.index == 0
	s.mu.Unlock()
	if top {
		wake(s.wake)
	}
}

// loop dispatches due tasks until ctx ends.
func (s *checkScheduler) loop(ctx context.Context) {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		s.mu.Lock()
		var due *checkTask
		wait := time.Duration(-1)
		if len(s.heap) > 0 {
			if d := time.Until(s.heap[0].next); d <= 0 {
				due = heap.Pop(&s.heap).(*checkTask)
				due.running = true
			} else {
				wait = d
			}
		}
		s.mu.Unlock()
		if due != nil {
			if !s.dispatch(ctx, due) {
				return
			}
			continue
		}
		if !waitWake(ctx, timer, wait, s.wake) {
			return
		}
	}
}

// dispatch hands t to the most recently idle worker, starts a new one while below the cap
// (max(minWorkers, running checks): never more than goroutine-per-check would use), or waits.
func (s *checkScheduler) dispatch(ctx context.Context, t *checkTask) bool {
	for {
		s.mu.Lock()
		if n := len(s.idleWs); n > 0 {
			inbox := s.idleWs[n-1]
			s.idleWs[n-1] = nil
			s.idleWs = s.idleWs[:n-1]
			s.mu.Unlock()
			inbox <- t // buffered and empty: the worker is waiting for exactly this
			return true
		}
		if s.workers < max(minWorkers, s.count) {
			s.workers++
			s.wg.Add(1)
			s.mu.Unlock()
			go s.worker(ctx, t)
			return true
		}
		s.mu.Unlock()
		select {
		case <-s.workerFree:
		case <-ctx.Done():
			return false
		}
	}
}

func (s *checkScheduler) worker(ctx context.Context, t *checkTask) {
	defer s.wg.Done()
	inbox := make(chan *checkTask, 1)
	idle := time.NewTimer(s.idle)
	defer idle.Stop()
	for {
		s.run(t)
		idle.Reset(s.idle)
		s.mu.Lock()
		s.idleWs = append(s.idleWs, inbox)
		s.mu.Unlock()
		wake(s.workerFree)
		var stopping bool
		select {
		case t = <-inbox:
			continue
		case <-ctx.Done():
			stopping = true
		case <-idle.C:
		}
		s.mu.Lock()
		if i := slices.Index(s.idleWs, inbox); i >= 0 {
			s.idleWs = slices.Delete(s.idleWs, i, i+1)
		} else if !stopping {
			// Taken by dispatch just as the timer fired: the task is on its way.
			s.mu.Unlock()
			t = <-inbox
			continue
		}
		s.workers--
		s.mu.Unlock()
		wake(s.workerFree)
		return
	}
}

// wait returns once every worker has exited (after the loop's ctx ended).
func (s *checkScheduler) wait() { s.wg.Wait() }

// taskHeap orders tasks by next run time (container/heap).
type taskHeap []*checkTask

func (h taskHeap) Len() int           { return len(h) }
func (h taskHeap) Less(i, j int) bool { return h[i].next.Before(h[j].next) }
func (h taskHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index = i
	h[j].index = j
}
func (h *taskHeap) Push(x any) {
	t := x.(*checkTask)
	t.index = len(*h)
	*h = append(*h, t)
}
func (h *taskHeap) Pop() any {
	old := *h
	n := len(old)
	t := old[n-1]
	old[n-1] = nil
	t.index = -1
	*h = old[:n-1]
	return t
}
