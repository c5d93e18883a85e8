package main

// The reaper: DeregisterCriticalServiceAfter for the checks this instance runs.

import (
	"context"
	"time"

	"github.com/hashicorp/consul/api"
)

// defaultReapInterval is how often the reaper looks when reap_interval is not set.
const defaultReapInterval = 30 * time.Second

// reapLoop runs reapOnce every reap_interval until ctx ends.
func (r *CheckRunner) reapLoop(ctx context.Context) {
	interval := r.agent.config().ReapInterval
	if interval <= 0 {
		interval = defaultReapInterval
	}
	every(ctx, interval, r.reapOnce)
}

// reapTarget is a service to deregister, with what the log line reports about it.
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
