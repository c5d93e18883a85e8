package main

import (
	"bytes"
	"context"

	"github.com/hashicorp/consul/api"
)

// assignmentKey is where the leader writes this instance's share of the external nodes.
func (a *Agent) assignmentKey() string { return a.kvPath() + "agents/" + a.serviceID }

// watchAssignment follows <kv>agents/<serviceID> and hands the node set to the check runner and the
// probe set to the node monitor. A missing or empty key stops all work: a leader that removed this
// instance's key has given its nodes to someone else. A malformed value is not an assignment: the
// last valid one stays in force (the leader rewrites the key within one watch round) and each
// distinct bad value is logged once.
func (a *Agent) watchAssignment(ctx context.Context) {
	var last, bad []byte
	applied := false
	_ = blockingQuery(ctx, a, "Error querying for node watch list", nil, func(q *api.QueryOptions) (uint64, error) {
		pair, meta, err := a.client.KV().Get(a.assignmentKey(), q)
		if err != nil {
			return 0, err
		}
		var value []byte
		if pair != nil {
			value = pair.Value
		}
		if applied && bytes.Equal(value, last) {
			return meta.LastIndex, nil
		}
		as, err := decodeAssignment(value)
		if err != nil {
			if bad == nil || !bytes.Equal(value, bad) {
				a.logger.Error("Error deserializing node list, skipping update", "error", err)
				bad = value
			}
			return meta.LastIndex, nil
		}
		last, bad, applied = value, nil, true
		a.runner.SetNodes(as.all())
		a.monitor.SetNodes(as.Probes)
		return meta.LastIndex, nil
	})
}
