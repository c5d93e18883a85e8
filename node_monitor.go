package main

// node_monitor.go owns NodeMonitor: its per-node memory, the scheduler that spreads pings over
// node_probe_interval, the probe cycle (one ping, then its outcome handed to node_health.go and
// coordinate.go), the assignment (SetNodes) and the catalog watch that keeps addresses and
// ModifyIndexes current.

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

const (
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
//
// What one ping does is in node_ping.go, the failure state machine (externalNodeHealth, failure
// markers, reaping) in node_health.go, and the coordinate updates in coordinate.go.
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

	// mu guards state, gen, catalog, inflight, catIndex and the fields of every nodeState.
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

// watchCatalog keeps nm.catalog in step with the catalog's external probe nodes. It idles while no
// node is assigned, so instances without probe nodes hold no extra blocking query.
func (nm *NodeMonitor) watchCatalog(ctx context.Context) {
	_ = blockingQuery(ctx, nm.agent, "Error querying for node list", nil, func(q *api.QueryOptions) (uint64, error) {
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
		if err != nil || port < 1 || port > maxPort {
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
