package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/armon/go-metrics"
	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/serf/coordinate"
	probing "github.com/prometheus-community/pro-bing"
)

// The node-level check's ID, name and outputs are the original's: dashboards, alerts and ACL
// policies written against them keep working after a binary swap. The check runner never runs
// externalNodeHealth: only the node monitor writes it.
const (
	externalNodeHealthCheckID = "externalNodeHealth"
	externalCheckName         = "External Node Status"
	nodeAliveOutput           = "Node alive or reachable"
	nodeCriticalOutput        = "Node not live or unreachable"

	// segmentMetaKey is the node meta key Consul uses for a node's network segment.
	segmentMetaKey = "consul-network-segment"

	// probePortMetaKey names a TCP port in a probe node's meta: the node is then probed by a TCP
	// connect to that port instead of an ICMP echo, for networks that drop ICMP (upstream issue
	// #111). It wins over node_probe_port.
	probePortMetaKey = "external-probe-port"

	// localCoordTTL bounds how stale the cached coordinate of the local agent may be. Vivaldi
	// coordinates drift slowly, so re-reading /v1/agent/self for every ping (as the original did)
	// only added load.
	localCoordTTL = 30 * time.Second
	// localCoordRetry spaces out retries after /v1/agent/self failed, so a Consul outage does not
	// turn every ping into a failing request.
	localCoordRetry = 5 * time.Second
	// minCoordMove is the smallest coordinate change worth writing.
	minCoordMove = time.Millisecond
	// minProbeTick bounds the scheduler's tick rate; with many nodes one tick starts several pings.
	minProbeTick = 5 * time.Millisecond
	// prefetchTimeout bounds the one-off reads that seed the state of newly assigned nodes.
	prefetchTimeout = 10 * time.Second
	// bulkPrefetchMin is how many nodes must arrive at once before their current checks and
	// coordinates are read with one list request each; for fewer, a per-node read (or one
	// redundant write) is cheaper than listing every external node.
	bulkPrefetchMin = 16
	// maxConsulCalls bounds the monitor's concurrent Consul requests. Pings are cheap and run in
	// parallel; their writes queue here instead of opening a connection each, which would churn
	// connections and hit Consul's per-client connection limit (http_max_conns_per_client, 200)
	// when thousands of nodes change state at once. A ping whose write waits here keeps its
	// node's in-flight mark, so a backlog slows probing rather than piling up goroutines.
	maxConsulCalls = 8
)

// pinger sends one ICMP echo request to addr and returns the round-trip time. ctx carries the
// timeout. The monitor's default is icmpPinger; tests set NodeMonitor.pinger before Run to inject
// failures.
type pinger interface {
	Ping(ctx context.Context, addr string) (time.Duration, error)
}

// NodeMonitor pings the probe nodes assigned to this instance (external nodes with
// external-probe=true), by ICMP or, where a port is configured, by a TCP connect, and keeps their
// node-level health in the catalog: it writes the externalNodeHealth check, records the
// first-failure time at <kv>probes/<node>, reaps nodes that stay unreachable for
// node_reconnect_timeout, and updates their network coordinates.
//
// One scheduler goroutine spreads the pings evenly over node_probe_interval; every ping runs in its
// own goroutine, at most one per node. A blocking catalog watch keeps node addresses and
// ModifyIndexes current. Per-node state (debounce, failure marker, cached coordinate) lives in
// memory for as long as the node stays assigned, so reassignments keep the state of the nodes
// that stay and Consul sees one write per status change instead of one read and write per ping.
type NodeMonitor struct {
	agent  *Agent
	logger hclog.Logger

	// pinger sends the ICMP pings and tcpPinger the TCP connects (probePortMetaKey,
	// node_probe_port); set them before Run (tests inject failures through them).
	pinger    pinger
	tcpPinger pinger

	// changed wakes the scheduler after SetNodes; wakeWatch wakes the catalog watch, which idles
	// while there is nothing to probe. Both hold at most one pending signal.
	changed   chan struct{}
	wakeWatch chan struct{}

	mu       sync.Mutex
	state    map[string]*nodeState  // per assigned node; replaced (not mutated) when a node leaves
	gen      uint64                 // bumped whenever the assigned set changes
	catalog  map[string]*nodeRecord // external probe nodes as last read from the catalog
	inflight map[string]struct{}    // nodes with a ping goroutine running
	catIndex bool                   // catalog has been read at least once

	// permissionLogged keeps the "ping not permitted" error to one log line per outage.
	permissionLogged atomic.Bool

	// consulSlots is the semaphore of maxConsulCalls.
	consulSlots chan struct{}

	local localCoordCache
}

// nodeRecord is what probing needs from a catalog node.
type nodeRecord struct {
	ID          string
	Address     string
	Segment     string
	ModifyIndex uint64
	// ProbePort is the port of probePortMetaKey (0: none); BadProbePort holds the meta value when it
	// is not a port, and the node is then not probed at all (see probeTarget).
	ProbePort    int
	BadProbePort string
}

// nodeState is the monitor's memory of one assigned node. Every field is guarded by NodeMonitor.mu.
type nodeState struct {
	// reachable is the result of the last ping that counted (for Stats).
	reachable bool
	// lastStatus/lastWrite debounce the externalNodeHealth writes; lastStatus "" forces a write.
	lastStatus string
	lastWrite  time.Time
	// kvKnown says marker mirrors <kv>probes/<node>; false means read it before deciding.
	kvKnown bool
	marker  failureMarker
	// coord is the node's coordinate as last read from or written to Consul, valid when
	// coordKnown (nil then means Consul has none).
	coord      *api.CoordinateEntry
	coordKnown bool
}

// failureMarker mirrors <kv>probes/<node>.
type failureMarker struct {
	exists bool
	since  time.Time // first failure
	index  uint64    // ModifyIndex of the key, for check-and-set
	// restart makes the next failure start the clock afresh instead of reaping: set when the node
	// was re-registered (an operator says it exists) or when the stored time cannot be decoded.
	restart bool
}

// localCoordCache holds the local agent's coordinate. mu is held across the fetch, so concurrent
// pings wait for one request instead of each sending their own.
type localCoordCache struct {
	mu      sync.Mutex
	coord   *coordinate.Coordinate
	fetched time.Time
	retryAt time.Time
	err     error
}

func newNodeMonitor(a *Agent) *NodeMonitor {
	return &NodeMonitor{
		agent:       a,
		logger:      a.logger.Named("probes"),
		pinger:      icmpPinger{privileged: func() bool { return a.config().PingType == "socket" }},
		tcpPinger:   tcpPinger{dial: (&net.Dialer{KeepAlive: -1}).DialContext},
		changed:     make(chan struct{}, 1),
		wakeWatch:   make(chan struct{}, 1),
		consulSlots: make(chan struct{}, maxConsulCalls),
		state:       map[string]*nodeState{},
		catalog:     map[string]*nodeRecord{},
		inflight:    map[string]struct{}{},
	}
}

// SetNodes replaces the set of nodes to ping. It takes effect at once: nodes that left are no
// longer probed (a ping still in flight for one is discarded), new nodes are probed within one
// interval, and nodes that stay keep their debounce and failure state.
func (nm *NodeMonitor) SetNodes(nodes []string) {
	want := slices.Clone(nodes)
	slices.Sort(want)
	want = slices.Compact(want)

	nm.mu.Lock()
	next := make(map[string]*nodeState, len(want))
	changed := len(want) != len(nm.state)
	for _, n := range want {
		st, ok := nm.state[n]
		if !ok {
			st = &nodeState{}
			changed = true
		}
		next[n] = st
	}
	if changed {
		nm.state = next
		nm.gen++
	}
	nm.mu.Unlock()

	if !changed {
		return
	}
	nm.logger.Info("Now running probes for external nodes", "count", len(want))
	wake(nm.changed)
	wake(nm.wakeWatch)
}

// Stats reports how many nodes this instance probes and how many answered their last ping.
func (nm *NodeMonitor) Stats() (nodes int, reachable int) {
	nm.mu.Lock()
	defer nm.mu.Unlock()
	for _, st := range nm.state {
		if st.reachable {
			reachable++
		}
	}
	return len(nm.state), reachable
}

// Run probes until ctx ends and returns once the catalog watch and every ping goroutine have.
func (nm *NodeMonitor) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		nm.watchCatalog(ctx)
	}()
	nm.schedule(ctx, &wg)
	wg.Wait()
}

// probeCycle is the scheduler's round-robin order. Changes keep the order of the nodes that stay
// and put newcomers at random places, so a reassignment neither restarts the cycle nor bunches
// the new nodes' pings together.
type probeCycle struct {
	order []string
	next  int
}

func (c *probeCycle) sync(want map[string]*nodeState) {
	kept := c.order[:0]
	present := make(map[string]bool, len(c.order))
	for i, n := range c.order {
		if _, ok := want[n]; !ok {
			if i < c.next {
				c.next--
			}
			continue
		}
		kept = append(kept, n)
		present[n] = true
	}
	c.order = kept
	var newcomers []string
	for n := range want {
		if !present[n] {
			newcomers = append(newcomers, n)
		}
	}
	if len(newcomers) > max(len(kept), 64) {
		// Mostly new nodes (startup, takeover): one shuffle instead of a quadratic run of inserts.
		c.order = append(c.order, newcomers...)
		rand.Shuffle(len(c.order), func(i, j int) { c.order[i], c.order[j] = c.order[j], c.order[i] })
		c.next = 0
		return
	}
	for _, n := range newcomers {
		at := rand.IntN(len(c.order) + 1)
		c.order = slices.Insert(c.order, at, n)
		if at < c.next {
			c.next++
		}
	}
	if c.next >= len(c.order) {
		c.next = 0
	}
}

func (c *probeCycle) take() string {
	n := c.order[c.next]
	c.next = (c.next + 1) % len(c.order)
	return n
}

// schedule starts one ping per node per node_probe_interval, evenly spaced, until ctx ends.
func (nm *NodeMonitor) schedule(ctx context.Context, wg *sync.WaitGroup) {
	var (
		cycle  probeCycle
		gen    uint64
		ticker *time.Ticker
		tickC  <-chan time.Time
		period time.Duration
		// budget is the pings owed: n per interval of elapsed time. Counting time rather than
		// ticks keeps the rate when a busy machine makes the ticker drop ticks.
		budget   float64
		lastTick time.Time
	)
	defer func() {
		if ticker != nil {
			ticker.Stop()
		}
	}()
	for {
		nm.mu.Lock()
		g := nm.gen
		nm.mu.Unlock()
		if g != gen {
			gen = g
			nm.applyAssignment(ctx, &cycle)
			if len(cycle.order) == 0 {
				nm.logger.Debug("No nodes to probe, waiting for an assignment")
			}
		}

		n := len(cycle.order)
		interval := nm.agent.config().NodeProbeInterval
		if n == 0 || interval <= 0 {
			if ticker != nil {
				ticker.Stop()
				ticker, tickC, period, budget = nil, nil, 0, 0
			}
		} else if want := max(interval/time.Duration(n), minProbeTick); want != period {
			if ticker == nil {
				ticker = time.NewTicker(want)
			} else {
				ticker.Reset(want)
			}
			// Time before the change was owed at the old rate: carrying it over at the new one
			// would fire a burst when one node becomes thousands.
			tickC, period, lastTick, budget = ticker.C, want, time.Now(), min(budget, 1)
		}

		select {
		case <-ctx.Done():
			return
		case <-nm.changed:
		case now := <-tickC:
			budget += float64(n) * float64(now.Sub(lastTick)) / float64(interval)
			lastTick = now
			// At most one round at once, however long the stall; the tolerance absorbs timer
			// jitter, which would otherwise skip a tick now and then.
			budget = min(budget, float64(n))
			for ; budget > 0.98; budget-- {
				nm.launch(ctx, wg, cycle.take())
			}
		}
	}
}

// applyAssignment brings the cycle in line with the assigned set and seeds the state of the new
// nodes with a few list requests, so that taking over many nodes (startup, failover, rebalance)
// costs a handful of reads instead of a read and a write per node. The failure markers are always
// listed; the nodes' current externalNodeHealth checks and coordinates only when many nodes
// arrive at once.
func (nm *NodeMonitor) applyAssignment(ctx context.Context, cycle *probeCycle) {
	nm.mu.Lock()
	cycle.sync(nm.state)
	var fresh []string
	for n, st := range nm.state {
		if !st.kvKnown {
			fresh = append(fresh, n)
		}
	}
	nm.mu.Unlock()
	if len(fresh) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, prefetchTimeout)
	defer cancel()
	nm.prefetchMarkers(ctx, fresh)
	if len(fresh) >= bulkPrefetchMin {
		nm.prefetchChecks(ctx, fresh)
		if !nm.agent.config().DisableCoordinateUpdates {
			nm.prefetchCoordinates(ctx, fresh)
		}
	}
}

// seed applies f to the state of each node in names that is still assigned.
func (nm *NodeMonitor) seed(names []string, f func(name string, st *nodeState)) {
	nm.mu.Lock()
	defer nm.mu.Unlock()
	for _, n := range names {
		if st, ok := nm.state[n]; ok {
			f(n, st)
		}
	}
}

func (nm *NodeMonitor) prefetchMarkers(ctx context.Context, fresh []string) {
	prefix := nm.agent.kvPath() + "probes/"
	pairs, _, err := nm.agent.client.KV().List(prefix, nm.agent.queryOptions(ctx))
	if err != nil {
		// Not fatal: each new node reads its own key before its first status write.
		if ctx.Err() == nil {
			nm.logger.Warn("could not read critical status of new nodes", "error", err)
		}
		return
	}
	byNode := make(map[string]*api.KVPair, len(pairs))
	for _, kv := range pairs {
		byNode[strings.TrimPrefix(kv.Key, prefix)] = kv
	}
	nm.seed(fresh, func(n string, st *nodeState) {
		// A probe may have read the key itself meanwhile; its view is at least as new.
		if !st.kvKnown {
			st.marker, st.kvKnown = nm.decodeMarker(n, byNode[n]), true
		}
	})
}

// prefetchChecks seeds the debounce with the checks already in Consul, so a node whose status is
// unchanged is not rewritten just because this instance is new to it. The first refresh of such
// a node comes a full refresh interval later, like that of a node we wrote ourselves.
func (nm *NodeMonitor) prefetchChecks(ctx context.Context, fresh []string) {
	q := nm.agent.queryOptions(ctx)
	q.Filter = fmt.Sprintf("CheckID == %q", externalNodeHealthCheckID)
	q.AllowStale = nm.agent.config().StaleReadNodes
	checks, _, err := nm.agent.client.Health().State(api.HealthAny, q)
	if err != nil {
		if ctx.Err() == nil {
			nm.logger.Debug("could not read current checks of new nodes; they will be rewritten", "error", err)
		}
		return
	}
	byNode := make(map[string]*api.HealthCheck, len(checks))
	for _, hc := range checks {
		byNode[hc.Node] = hc
	}
	now := time.Now()
	nm.seed(fresh, func(n string, st *nodeState) {
		hc := byNode[n]
		if hc == nil || st.lastStatus != "" || hc.Name != externalCheckName {
			return
		}
		if (hc.Status == api.HealthPassing && hc.Output == nodeAliveOutput) ||
			(hc.Status == api.HealthCritical && hc.Output == nodeCriticalOutput) {
			st.lastStatus, st.lastWrite = hc.Status, now
		}
	})
}

// prefetchCoordinates seeds the nodes' coordinates from one list of the datacenter's coordinates.
func (nm *NodeMonitor) prefetchCoordinates(ctx context.Context, fresh []string) {
	entries, _, err := nm.agent.client.Coordinate().Nodes(nm.agent.queryOptions(ctx))
	if err != nil {
		if ctx.Err() == nil {
			nm.logger.Debug("could not list coordinates; new nodes read their own", "error", err)
		}
		return
	}
	byNode := make(map[string]*api.CoordinateEntry, len(entries))
	for _, e := range entries {
		if _, dup := byNode[e.Node]; !dup {
			byNode[e.Node] = e
		}
	}
	nm.seed(fresh, func(n string, st *nodeState) {
		if !st.coordKnown {
			st.coord, st.coordKnown = byNode[n], true
		}
	})
}

// decodeMarker turns <kv>probes/<node> into a failureMarker. The value is the gob encoding of a
// time.Time, as the original writes it, so markers survive swapping binaries.
func (nm *NodeMonitor) decodeMarker(node string, kv *api.KVPair) failureMarker {
	if kv == nil {
		return failureMarker{}
	}
	m := failureMarker{exists: true, index: kv.ModifyIndex}
	if err := m.since.GobDecode(kv.Value); err != nil {
		// Reaping on a time we cannot read would be a guess; start the clock again instead.
		nm.logger.Warn("could not decode critical time for node, restarting it", "node", node, "error", err)
		m.restart = true
	}
	return m
}

// launch starts a ping of node unless one is still outstanding or the node is unknown to the
// catalog (not registered yet, or already gone).
func (nm *NodeMonitor) launch(ctx context.Context, wg *sync.WaitGroup, node string) {
	nm.mu.Lock()
	st, assigned := nm.state[node]
	rec := nm.catalog[node]
	_, busy := nm.inflight[node]
	switch {
	case !assigned:
		nm.mu.Unlock()
		return
	case rec == nil:
		loaded := nm.catIndex
		nm.mu.Unlock()
		if loaded {
			nm.logger.Debug("Node not in catalog, skipping probe", "node", node)
		}
		return
	case busy:
		nm.mu.Unlock()
		nm.logger.Warn("Error pinging node, last request still outstanding", "node", node, "nodeId", rec.ID)
		return
	}
	nm.inflight[node] = struct{}{}
	snapshot := *rec
	nm.mu.Unlock()

	wg.Add(1)
	go func() {
		defer wg.Done()
		defer func() {
			nm.mu.Lock()
			delete(nm.inflight, node)
			nm.mu.Unlock()
		}()
		nm.probe(ctx, node, st, snapshot)
	}()
}

// owns reports whether st is still the state of an assigned node; a ping that outlived its node's
// assignment must not write, as the node's new owner does.
func (nm *NodeMonitor) owns(node string, st *nodeState) bool {
	nm.mu.Lock()
	defer nm.mu.Unlock()
	return nm.state[node] == st
}

// consulCall runs f holding one of the maxConsulCalls slots; it returns ctx's error if ctx ends
// while waiting for one.
func (nm *NodeMonitor) consulCall(ctx context.Context, f func() error) error {
	select {
	case nm.consulSlots <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-nm.consulSlots }()
	return f()
}

// probe pings one node and records the outcome. rec is the catalog entry as it was when the ping
// started: the reap's check-and-set uses its ModifyIndex, so a node re-registered meanwhile
// survives.
func (nm *NodeMonitor) probe(ctx context.Context, node string, st *nodeState, rec nodeRecord) {
	cfg := nm.agent.config()
	if rec.BadProbePort != "" {
		return // logged when the catalog showed it; probing some other way would mislead
	}
	pinger, addr, icmp := nm.probeTarget(cfg, rec)
	pctx, cancel := context.WithTimeout(ctx, cfg.PingTimeout)
	rtt, err := pinger.Ping(pctx, addr)
	cancel()
	if ctx.Err() != nil {
		return
	}
	var perm *pingPermissionError
	if errors.As(err, &perm) {
		// Our own setup is broken, not the node: marking every node critical (and reaping them
		// all after node_reconnect_timeout) would turn a misconfiguration into an outage.
		if !nm.permissionLogged.Swap(true) {
			nm.logger.Error("Cannot probe external nodes: ICMP ping is not permitted", "error", perm)
		}
		return
	}
	if !nm.owns(node, st) {
		return
	}
	if icmp {
		// An ICMP ping went out, so the permission problem (if any) is over; a TCP connect says
		// nothing about it.
		nm.permissionLogged.Store(false)
	}
	if err != nil {
		nm.logger.Warn("could not ping node", "node", node, "error", err)
		nm.nodeFailed(ctx, node, st, rec)
		return
	}
	nm.nodeAlive(ctx, node, st)
	if !cfg.DisableCoordinateUpdates {
		if err := nm.updateCoordinate(ctx, node, st, rec, rtt); err != nil && ctx.Err() == nil {
			nm.logger.Warn("could not update coordinate for node", "node", node, "error", err)
		}
	}
}

// probeTarget picks how a node is probed: a TCP connect when its meta or node_probe_port names a
// port, an ICMP echo otherwise. Either way the outcome means the same (externalNodeHealth, failure
// markers, reaping) and the round trip moves the node's coordinate.
func (nm *NodeMonitor) probeTarget(cfg *Config, rec nodeRecord) (pg pinger, addr string, icmp bool) {
	port := rec.ProbePort
	if port == 0 {
		port = cfg.NodeProbePort
	}
	if port == 0 {
		return nm.pinger, rec.Address, true
	}
	return nm.tcpPinger, net.JoinHostPort(rec.Address, strconv.Itoa(port)), false
}

func (nm *NodeMonitor) markerKey(node string) string { return nm.agent.kvPath() + "probes/" + node }

// ensureMarker reads <kv>probes/<node> unless its state is already known.
func (nm *NodeMonitor) ensureMarker(ctx context.Context, node string, st *nodeState) bool {
	nm.mu.Lock()
	known := st.kvKnown
	nm.mu.Unlock()
	if known {
		return true
	}
	var kv *api.KVPair
	err := nm.consulCall(ctx, func() (err error) {
		kv, _, err = nm.agent.client.KV().Get(nm.markerKey(node), nm.agent.queryOptions(ctx))
		return err
	})
	if err != nil {
		if ctx.Err() == nil {
			nm.agent.status.failed(err)
			nm.logger.Warn("could not get critical status for node", "node", node, "error", err)
		}
		return false
	}
	m := nm.decodeMarker(node, kv)
	nm.mu.Lock()
	st.marker, st.kvKnown = m, true
	nm.mu.Unlock()
	return true
}

// needsWrite is the debounce: a status is rewritten only when it changed or when the last write
// is older than the refresh interval (which also repairs a check someone deleted).
func (st *nodeState) needsWrite(status string, now time.Time, refresh time.Duration) bool {
	return st.lastStatus != status || now.Sub(st.lastWrite) >= refresh
}

func (nm *NodeMonitor) checkOp(node, status, output string) *api.TxnOp {
	return &api.TxnOp{Check: &api.CheckTxnOp{Verb: api.CheckSet, Check: api.HealthCheck{
		Node:      node,
		CheckID:   externalNodeHealthCheckID,
		Name:      externalCheckName,
		Status:    status,
		Output:    output,
		Partition: nm.agent.partition(),
	}}}
}

// nodeAlive marks the node passing and clears its failure marker, in one transaction.
func (nm *NodeMonitor) nodeAlive(ctx context.Context, node string, st *nodeState) {
	if !nm.ensureMarker(ctx, node, st) {
		return
	}
	now := time.Now()
	nm.mu.Lock()
	st.reachable = true
	m := st.marker
	write := m.exists || st.needsWrite(api.HealthPassing, now, nm.agent.config().NodeHealthRefreshInterval)
	nm.mu.Unlock()
	if !write {
		return
	}

	var ops api.TxnOps
	if m.exists {
		ops = append(ops, &api.TxnOp{KV: &api.KVTxnOp{
			Verb: api.KVDeleteCAS, Key: nm.markerKey(node), Index: m.index, Partition: nm.agent.partition(),
		}})
	}
	ops = append(ops, nm.checkOp(node, api.HealthPassing, nodeAliveOutput))
	metrics.IncrCounter([]string{"coord", "txn"}, 1)
	_, ok, _ := nm.txn(ctx, node, ops)

	nm.mu.Lock()
	defer nm.mu.Unlock()
	if !ok {
		// Most likely the marker changed under us (another instance during a rebalance): re-read.
		st.kvKnown = false
		return
	}
	st.marker = failureMarker{}
	st.lastStatus, st.lastWrite = api.HealthPassing, now
}

// nodeFailed marks the node critical, starting its failure clock on the first failure, and reaps
// it once the clock passes node_reconnect_timeout. The reap check runs on every failed ping,
// independent of the write debounce, so a node is reaped within one probe interval of its timeout.
func (nm *NodeMonitor) nodeFailed(ctx context.Context, node string, st *nodeState, rec nodeRecord) {
	if !nm.ensureMarker(ctx, node, st) {
		return
	}
	cfg := nm.agent.config()
	now := time.Now()
	nm.mu.Lock()
	st.reachable = false
	m := st.marker
	startClock := !m.exists || m.restart
	reap := !startClock && now.Sub(m.since) > cfg.NodeReconnectTimeout
	write := startClock || st.needsWrite(api.HealthCritical, now, cfg.NodeHealthRefreshInterval)
	nm.mu.Unlock()

	if reap {
		nm.reap(ctx, node, st, rec, m, cfg.NodeReconnectTimeout)
		return
	}
	if !write {
		return
	}

	var ops api.TxnOps
	if startClock {
		value, err := now.UTC().GobEncode()
		if err != nil {
			nm.logger.Warn("error updating node", "node", node, "error", fmt.Errorf("encoding critical time: %w", err))
			return
		}
		// check-and-set: index 0 creates the key only if absent; otherwise it must be the version
		// we know, so two instances briefly probing the same node cannot reset each other's clock.
		ops = append(ops, &api.TxnOp{KV: &api.KVTxnOp{
			Verb: api.KVCAS, Key: nm.markerKey(node), Value: value, Index: m.index, Partition: nm.agent.partition(),
		}})
	}
	ops = append(ops, nm.checkOp(node, api.HealthCritical, nodeCriticalOutput))
	metrics.IncrCounter([]string{"coord", "txn"}, 1)
	resp, ok, _ := nm.txn(ctx, node, ops)

	nm.mu.Lock()
	defer nm.mu.Unlock()
	if !ok {
		st.kvKnown = false
		return
	}
	if startClock {
		st.marker = failureMarker{exists: true, since: now}
		if len(resp.Results) > 0 && resp.Results[0].KV != nil {
			st.marker.index = resp.Results[0].KV.ModifyIndex
		} else {
			// Without the new index the next check-and-set would fail; read the key again.
			st.kvKnown = false
		}
	}
	st.lastStatus, st.lastWrite = api.HealthCritical, now
}

// reap deletes a node that has been unreachable for too long, together with its failure marker,
// in one transaction. The node delete is a check-and-set on the ModifyIndex seen when the ping
// started: if the node was re-registered meanwhile, nothing is deleted and its clock restarts.
func (nm *NodeMonitor) reap(ctx context.Context, node string, st *nodeState, rec nodeRecord, m failureMarker, timeout time.Duration) {
	nm.logger.Info("reaping node has been failed for too long", "node", node, "failureTimeout", timeout.String())
	part := nm.agent.partition()
	ops := api.TxnOps{
		{KV: &api.KVTxnOp{Verb: api.KVDeleteCAS, Key: nm.markerKey(node), Index: m.index, Partition: part}},
		{Node: &api.NodeTxnOp{Verb: api.NodeDeleteCAS, Node: api.Node{
			ID: rec.ID, Node: node, ModifyIndex: rec.ModifyIndex, Partition: part,
		}}},
	}
	_, ok, err := nm.txn(ctx, node, ops)
	if ok {
		nm.mu.Lock()
		st.marker, st.lastStatus, st.reachable = failureMarker{}, "", false
		if cur := nm.catalog[node]; cur != nil && cur.ModifyIndex == rec.ModifyIndex {
			delete(nm.catalog, node) // until the watch catches up, don't probe a deleted node
		}
		nm.mu.Unlock()
		nm.logger.Info("Reaped failed external node", "node", node)
		return
	}
	if err != nil {
		return // transport error, already logged: the next failed ping retries
	}

	// Rolled back: find out which check-and-set failed.
	var cn *api.CatalogNode
	err = nm.consulCall(ctx, func() (err error) {
		cn, _, err = nm.agent.client.Catalog().Node(node, nm.agent.queryOptions(ctx))
		return err
	})
	if err != nil {
		if ctx.Err() == nil {
			nm.logger.Warn("error updating node", "node", node, "error", fmt.Errorf("reading node after failed reap: %w", err))
		}
		return
	}
	switch {
	case cn == nil || cn.Node == nil:
		// Someone else deleted it already; only our marker is left to clean up.
		nm.mu.Lock()
		delete(nm.catalog, node)
		nm.mu.Unlock()
		del := api.TxnOps{{KV: &api.KVTxnOp{Verb: api.KVDeleteCAS, Key: nm.markerKey(node), Index: m.index, Partition: part}}}
		_, ok, _ := nm.txn(ctx, node, del)
		nm.mu.Lock()
		if ok {
			st.marker = failureMarker{}
		} else {
			st.kvKnown = false
		}
		nm.mu.Unlock()
	case cn.Node.ModifyIndex != rec.ModifyIndex:
		nm.logger.Info("Not reaping node: it was re-registered while being probed", "node", node,
			"seenIndex", rec.ModifyIndex, "currentIndex", cn.Node.ModifyIndex)
		nm.mu.Lock()
		if cur := nm.catalog[node]; cur == nil || cur.ModifyIndex < cn.Node.ModifyIndex {
			nm.catalog[node] = recordOf(cn.Node)
		}
		st.reRegistered()
		nm.mu.Unlock()
	default:
		// The node is as we saw it, so the marker changed: read it again.
		nm.mu.Lock()
		st.kvKnown = false
		nm.mu.Unlock()
	}
}

// reRegistered is called (under NodeMonitor.mu) when the node's catalog entry changed: the check is
// rewritten at the next probe, since a re-registration may have dropped it (original issue #119),
// and the failure clock restarts, since someone just declared that the node exists.
func (st *nodeState) reRegistered() {
	st.lastStatus = ""
	if st.marker.exists {
		st.marker.restart = true
	}
}

// txn applies ops and logs failures. It returns the response, whether the transaction was
// applied, and the transport error if the request itself failed.
func (nm *NodeMonitor) txn(ctx context.Context, node string, ops api.TxnOps) (*api.TxnResponse, bool, error) {
	var (
		ok   bool
		resp *api.TxnResponse
	)
	err := nm.consulCall(ctx, func() (err error) {
		ok, resp, _, err = nm.agent.client.Txn().Txn(ops, nm.agent.queryOptions(ctx))
		return err
	})
	if err != nil {
		if ctx.Err() == nil {
			nm.agent.status.failed(err)
			nm.logger.Warn("error updating node", "node", node, "error", fmt.Errorf("transaction failed: %w", err))
		}
		return nil, false, err
	}
	nm.agent.status.contact()
	if !ok {
		nm.logger.Warn("error updating node", "node", node, "error", "transaction rolled back: "+txnErrors(resp))
		return resp, false, nil
	}
	return resp, true, nil
}

// watchCatalog keeps nm.catalog in step with the catalog's external probe nodes. It idles while no
// node is assigned, so instances without probe nodes hold no extra blocking query.
func (nm *NodeMonitor) watchCatalog(ctx context.Context) {
	blockingWatch(ctx, nm.agent, "Error querying for node list", func(q *api.QueryOptions) (uint64, error) {
		if !nm.waitForNodes(ctx) {
			return 0, ctx.Err()
		}
		cfg := nm.agent.config()
		// Only probe nodes are pinged, so ask for just those: Consul ANDs the meta filters.
		q.NodeMeta = make(map[string]string, len(cfg.NodeMeta)+1)
		for k, v := range cfg.NodeMeta {
			q.NodeMeta[k] = v
		}
		q.NodeMeta["external-probe"] = "true"
		q.AllowStale = cfg.StaleReadNodes
		list, meta, err := nm.agent.client.Catalog().Nodes(q)
		if err != nil {
			return 0, fmt.Errorf("listing external nodes: %w", err)
		}
		nm.setCatalog(list)
		return meta.LastIndex, nil
	})
}

func (nm *NodeMonitor) waitForNodes(ctx context.Context) bool {
	for {
		nm.mu.Lock()
		n := len(nm.state)
		nm.mu.Unlock()
		if n > 0 {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-nm.wakeWatch:
		}
	}
}

func recordOf(n *api.Node) *nodeRecord {
	rec := &nodeRecord{ID: n.ID, Address: n.Address, Segment: n.Meta[segmentMetaKey], ModifyIndex: n.ModifyIndex}
	if v, ok := n.Meta[probePortMetaKey]; ok {
		port, err := strconv.Atoi(v)
		if err != nil || port < 1 || port > 65535 {
			rec.BadProbePort = v
		} else {
			rec.ProbePort = port
		}
	}
	return rec
}

// setCatalog replaces the catalog view. A changed ModifyIndex means the node was re-registered or
// edited, which resets its debounce and failure clock (see reRegistered).
func (nm *NodeMonitor) setCatalog(list []*api.Node) {
	next := make(map[string]*nodeRecord, len(list))
	for _, n := range list {
		next[n.Node] = recordOf(n)
	}
	nm.mu.Lock()
	prev := nm.catalog
	changed := !nm.catIndex || len(next) != len(nm.catalog)
	for name, rec := range next {
		old, ok := nm.catalog[name]
		switch {
		case !ok:
			changed = true
		case *old != *rec:
			changed = true
			if old.ModifyIndex != rec.ModifyIndex {
				if st := nm.state[name]; st != nil {
					st.reRegistered()
				}
			}
		}
	}
	nm.catalog, nm.catIndex = next, true
	nm.mu.Unlock()
	for name, rec := range next {
		if rec.BadProbePort != "" && (prev[name] == nil || *prev[name] != *rec) {
			// Not probed rather than probed by ICMP or marked critical: a typo must not get a node
			// reaped after node_reconnect_timeout.
			nm.logger.Error("Not probing node: invalid node meta "+probePortMetaKey+", want a port between 1 and 65535",
				"node", name, "value", rec.BadProbePort)
		}
	}
	if changed {
		nm.logger.Info("Fetched nodes from catalog", "count", len(list))
	}
}

// updateCoordinate moves the node's network coordinate by the measured RTT, treating the external
// node as the serf client and the local agent as the peer it pinged.
func (nm *NodeMonitor) updateCoordinate(ctx context.Context, node string, st *nodeState, rec nodeRecord, rtt time.Duration) error {
	local, err := nm.localCoordinate(ctx)
	if err != nil {
		return fmt.Errorf("could not retrieve local agent's coordinate info: %w", err)
	}

	nm.mu.Lock()
	entry, known := st.coord, st.coordKnown
	nm.mu.Unlock()
	if !known {
		// Read once per assignment; afterwards our last write is the freshest copy, since only the
		// node's owner writes it.
		var entries []*api.CoordinateEntry
		err := nm.consulCall(ctx, func() (err error) {
			entries, _, err = nm.agent.client.Coordinate().Node(node, nm.agent.queryOptions(ctx))
			return err
		})
		var se api.StatusError
		switch {
		case errors.As(err, &se) && se.Code == 404: // no coordinate yet
		case err != nil:
			return fmt.Errorf("error getting coordinate for node %q: %w", node, err)
		case len(entries) > 0:
			// External nodes live in one segment, so the first entry is the node's.
			entry = entries[0]
		}
	}

	seed, segment, existed := coordinate.NewCoordinate(coordinate.DefaultConfig()), rec.Segment, false
	if entry != nil && entry.Coord != nil {
		seed, segment, existed = entry.Coord, entry.Segment, true
	}
	client, err := coordinate.NewClient(coordinate.DefaultConfig())
	if err != nil {
		return fmt.Errorf("creating coordinate client: %w", err)
	}
	if err := client.SetCoordinate(seed); err != nil {
		return fmt.Errorf("invalid coordinate for node %q: %w", node, err)
	}
	next, err := client.Update("local", local, rtt)
	if err != nil {
		return fmt.Errorf("error updating coordinate for node %q: %w", node, err)
	}

	dist := seed.DistanceTo(next)
	if existed && dist <= minCoordMove {
		nm.logger.Trace("Skipped update for coordinates", "node", node, "distanceFromPreviousCoord", dist)
		nm.mu.Lock()
		st.coord, st.coordKnown = entry, true
		nm.mu.Unlock()
		return nil
	}
	upd := &api.CoordinateEntry{Node: node, Segment: segment, Partition: nm.agent.partition(), Coord: next}
	err = nm.consulCall(ctx, func() error {
		_, err := nm.agent.client.Coordinate().Update(upd, nm.agent.writeOptions(ctx))
		return err
	})
	if err != nil {
		return fmt.Errorf("error applying coordinate update for node %q: %w", node, err)
	}
	nm.mu.Lock()
	st.coord, st.coordKnown = upd, true
	nm.mu.Unlock()
	// DEBUG, not INFO: one line per node per interval drowned everything else (original issue #214).
	nm.logger.Debug("Updated coordinates", "node", node, "distanceFromPreviousCoord", dist)
	return nil
}

// localCoordinate returns the local agent's coordinate (the server's in agentless mode), cached
// for localCoordTTL.
func (nm *NodeMonitor) localCoordinate(ctx context.Context) (*coordinate.Coordinate, error) {
	c := &nm.local
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	if c.coord != nil && now.Sub(c.fetched) < localCoordTTL {
		return c.coord, nil
	}
	if now.Before(c.retryAt) {
		if c.coord != nil {
			return c.coord, nil
		}
		return nil, c.err
	}
	var self struct{ Coord *coordinate.Coordinate }
	// No partition parameter: /v1/agent/self describes the agent itself.
	err := nm.consulCall(ctx, func() error {
		_, err := nm.agent.client.Raw().Query("/v1/agent/self", &self, (&api.QueryOptions{}).WithContext(ctx))
		return err
	})
	switch {
	case err != nil:
		err = fmt.Errorf("reading /v1/agent/self: %w", err)
	case self.Coord == nil:
		err = errors.New("/v1/agent/self has no coordinate")
	case !self.Coord.IsValid():
		err = errors.New("/v1/agent/self returned an invalid coordinate")
	}
	if err != nil {
		c.err, c.retryAt = err, now.Add(localCoordRetry)
		if c.coord != nil {
			return c.coord, nil // a slightly stale coordinate beats none
		}
		return nil, err
	}
	c.coord, c.fetched, c.err = self.Coord, now, nil
	return c.coord, nil
}

// icmpPinger pings with pro-bing. privileged is read per ping, so a reload that changes ping_type
// applies to the next ping.
type icmpPinger struct {
	privileged func() bool
}

// defaultPingTimeout applies when the caller's context has no deadline.
const defaultPingTimeout = 5 * time.Second

func (ip icmpPinger) Ping(ctx context.Context, addr string) (time.Duration, error) {
	timeout := defaultPingTimeout
	if d, ok := ctx.Deadline(); ok {
		timeout = time.Until(d)
	}
	if timeout <= 0 {
		return 0, fmt.Errorf("ping to %q timed out", addr)
	}
	privileged := ip.privileged != nil && ip.privileged()
	pg := probing.New(addr)
	pg.Count = 1
	pg.Timeout = timeout
	pg.ResolveTimeout = timeout
	pg.RecordRtts, pg.RecordTTLs = false, false
	pg.SetLogger(probing.NoopLogger{})
	pg.SetPrivileged(privileged)
	// OnSetup runs once the socket is open: an error before it is about opening the socket (our
	// permissions), an error after it is about reaching the node (e.g. a firewall's EPERM on send).
	opened := false
	pg.OnSetup = func() { opened = true }

	err := pg.RunWithContext(ctx)
	switch {
	case err != nil && !opened && errors.Is(err, os.ErrPermission):
		return 0, &pingPermissionError{privileged: privileged, err: err}
	case errors.Is(err, context.DeadlineExceeded):
		return 0, fmt.Errorf("ping to %q timed out", addr)
	case err != nil:
		return 0, fmt.Errorf("pinging %q: %w", addr, err)
	}
	stats := pg.Statistics()
	if stats.PacketsRecv == 0 {
		return 0, fmt.Errorf("ping to %q timed out", addr)
	}
	return stats.MaxRtt, nil
}

// tcpPinger probes a node with a TCP connect, for networks that drop ICMP. The round trip is the
// time the connect takes (SYN to SYN-ACK), which is one network round trip like an ICMP echo. Only a
// completed connect counts as alive: a refused connection may come from a firewall or load balancer
// in front of the node as easily as from the node, so the port must be one the node listens on.
type tcpPinger struct {
	dial dialFunc
}

func (tp tcpPinger) Ping(ctx context.Context, addr string) (time.Duration, error) {
	start := time.Now()
	conn, err := tp.dial(ctx, "tcp", addr)
	if err != nil {
		if ctx.Err() != nil {
			return 0, fmt.Errorf("TCP connect to %q timed out", addr)
		}
		return 0, fmt.Errorf("TCP connect to %q: %w", addr, err)
	}
	rtt := time.Since(start)
	_ = conn.Close()
	return rtt, nil
}

// pingPermissionError means this process may not open the ICMP socket ping_type asks for. It says
// what to change, because the kernel's "permission denied" alone sends people searching (original
// issue #24).
type pingPermissionError struct {
	privileged bool
	err        error
}

func (e *pingPermissionError) Error() string {
	if e.privileged {
		return fmt.Sprintf(`ping_type "socket" sends raw ICMP, which needs root or the CAP_NET_RAW capability; `+
			`grant it (e.g. setcap cap_net_raw+ep on the binary) or use ping_type "udp" with the sysctl `+
			`net.ipv4.ping_group_range covering this process's group (sudo sysctl -w net.ipv4.ping_group_range="0 2147483647"): %v`, e.err)
	}
	current := "unknown"
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ping_group_range"); err == nil {
		current = strings.Join(strings.Fields(string(b)), " ")
	}
	return fmt.Sprintf(`ping_type "udp" needs unprivileged ICMP sockets, which the kernel allows only to the groups `+
		`in the sysctl net.ipv4.ping_group_range (now %q; this process's group is %d); allow them with `+
		`sudo sysctl -w net.ipv4.ping_group_range="0 2147483647" (or use ping_type "socket" as root or with CAP_NET_RAW): %v`,
		current, os.Getgid(), e.err)
}

func (e *pingPermissionError) Unwrap() error { return e.err }
