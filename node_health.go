package main

// node_health.go owns the node-failure state machine: the externalNodeHealth check writes (with
// their debounce), the first-failure marker at <kv>probes/<node>, and the decision to reap a node
// that stayed unreachable for node_reconnect_timeout.
//
// A ping that answers makes the node passing and deletes its marker. The first failed ping makes
// it critical and writes the marker (the failure clock starts); later failures keep it critical,
// and the first one after node_reconnect_timeout reaps node and marker in one transaction. A
// re-registration of the node restarts the clock. Marker writes and the reap are check-and-sets, so
// instances briefly probing the same node during a rebalance cannot reset each other's clock, and a
// node re-registered during its last ping is not reaped.

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/armon/go-metrics"
	"github.com/hashicorp/consul/api"
)

// The node-level check's ID, name and outputs are the original's: dashboards, alerts and ACL
// policies written against them keep working after a binary swap. The check runner never runs
// externalNodeHealth: only the node monitor writes it.
const (
	externalNodeHealthCheckID = "externalNodeHealth"
	externalCheckName         = "External Node Status"
	nodeAliveOutput           = "Node alive or reachable"
	nodeCriticalOutput        = "Node not live or unreachable"
)

// failureMarker mirrors <kv>probes/<node>.
type failureMarker struct {
	exists bool
	since  time.Time // first failure
	index  uint64    // ModifyIndex of the key, for check-and-set
	// restart makes the next failure start the clock afresh instead of reaping: set when the node
	// was re-registered (an operator says it exists) or when the stored time cannot be decoded.
	restart bool
}

// prefetchMarkers seeds the failure markers of new nodes from one list of <kv>probes/.
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
	if _, ok := nm.writeNodeHealth(ctx, node, st, ops); !ok {
		return
	}
	nm.mu.Lock()
	defer nm.mu.Unlock()
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
	resp, ok := nm.writeNodeHealth(ctx, node, st, ops)
	if !ok {
		return
	}
	nm.mu.Lock()
	defer nm.mu.Unlock()
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

// writeNodeHealth sends a node's externalNodeHealth write (with its marker ops) as one transaction.
// When it does not land, the marker most likely changed under us (another instance during a
// rebalance): what st knows of it is dropped, so the next ping reads it again.
func (nm *NodeMonitor) writeNodeHealth(ctx context.Context, node string, st *nodeState, ops api.TxnOps) (*api.TxnResponse, bool) {
	metrics.IncrCounter([]string{"coord", "txn"}, 1)
	resp, ok, _ := nm.txn(ctx, node, ops)
	if !ok {
		nm.mu.Lock()
		st.kvKnown = false
		nm.mu.Unlock()
	}
	return resp, ok
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
