package main

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
)

// Agentless failure detection in seconds. An agentless instance has no agent to run a TTL check: its
// liveness is a session, which Consul invalidates only up to twice its TTL after the last renewal,
// and never below the servers' session_ttl_min (10 s by default). So agentless instances also
// heartbeat: every instance_ttl_refresh each re-acquires its own <kv><service-id>:health-session key,
// which moves the key's ModifyIndex, and every instance watches its peers' keys. A peer whose key
// stood still while the watcher completed enough heartbeats of its own to span instance_ttl is dead:
// the watcher destroys the sessions on the peer's node. That turns its session check critical (the
// leader reassigns its nodes at once) and, through the session check the leader lock is bound to,
// frees the lock if it led.
//
// Staleness is counted in the watcher's own heartbeats, not in wall-clock time: a watcher that was
// stalled, or a Consul that accepts no writes, produces no heartbeats of its own and so judges nobody.

// healthSessionSuffix ends every health-session key: <kv><service-id>:health-session.
const healthSessionSuffix = ":health-session"

// heartbeatTracker decides which peers missed their heartbeats. It holds no Consul state, so it is
// table-tested on its own.
type heartbeatTracker struct {
	limit uint64 // own heartbeats a peer may see go by without one of its own
	peers map[string]peerBeat
}

// peerBeat is a peer's key index as last seen, and the watcher's own heartbeat count at that time.
type peerBeat struct {
	index, ownAt uint64
}

func newHeartbeatTracker(cfg *Config) *heartbeatTracker {
	// ceil(instance_ttl / instance_ttl_refresh): as long as an agent-mode TTL check would wait.
	limit := uint64((cfg.AgentTTL + cfg.TTLRefreshInterval - 1) / cfg.TTLRefreshInterval)
	return &heartbeatTracker{limit: limit, peers: map[string]peerBeat{}}
}

// observe takes a listing of peer key indexes (peer service ID -> ModifyIndex); own is the watcher's
// heartbeat count now. A peer missing from the listing is forgotten.
func (h *heartbeatTracker) observe(indexes map[string]uint64, own uint64) {
	for id := range h.peers {
		if _, ok := indexes[id]; !ok {
			delete(h.peers, id)
		}
	}
	for id, idx := range indexes {
		if p, ok := h.peers[id]; !ok || p.index != idx {
			h.peers[id] = peerBeat{index: idx, ownAt: own}
		}
	}
}

// restart gives every peer a fresh allowance: the watcher could not see their keys for a while, so
// it cannot tell whether they changed.
func (h *heartbeatTracker) restart(own uint64) {
	for id, p := range h.peers {
		p.ownAt = own
		h.peers[id] = p
	}
}

// stale returns the peers whose key did not change during limit of the watcher's heartbeats, and
// forgets them (a peer that comes back changes its key and is watched again).
func (h *heartbeatTracker) stale(own uint64) []string {
	var out []string
	for id, p := range h.peers {
		if own >= p.ownAt+h.limit {
			out = append(out, id)
			delete(h.peers, id)
		}
	}
	return out
}

// heartbeat re-acquires the health-session key every instance_ttl_refresh and counts each success in
// a.beats. The value is the count so far: Consul skips a write that changes nothing, and the index
// would not move. It returns when ctx ends or when the key is no longer ours.
func (a *Agent) heartbeat(ctx context.Context, sess string) error {
	for sleepCtx(ctx, a.config().TTLRefreshInterval) {
		value := strconv.AppendUint(nil, a.beats.Load()+1, 10)
		ok, _, err := a.client.KV().Acquire(&api.KVPair{Key: a.healthSessionKey(), Flags: lockFlagValue, Session: sess, Value: value}, a.writeOptions(ctx))
		switch {
		case ctx.Err() != nil:
		case err != nil:
			a.status.failed(err)
		case !ok:
			return errors.New("health-session key held by another session")
		default:
			a.status.contact()
			a.beats.Add(1)
		}
	}
	return ctx.Err()
}

// watchHeartbeats follows the health-session keys of this service's instances and ends the sessions
// of any peer that missed its heartbeats, until ctx ends.
func (a *Agent) watchHeartbeats(ctx context.Context) {
	prefix := a.kvPath() + a.config().Service + ":"
	listings := make(chan map[string]uint64, 1)
	failed := make(chan struct{}, 1)
	// Deferred LIFO: the watch is cancelled before it is waited for.
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wg.Add(1)
	go func() {
		defer wg.Done()
		a.watchHeartbeatKeys(ctx, prefix, listings, failed)
	}()
	tracker := newHeartbeatTracker(a.config())
	tick := time.NewTicker(a.config().TTLRefreshInterval / 2)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case indexes := <-listings:
			tracker.observe(indexes, a.beats.Load())
		case <-failed:
			tracker.restart(a.beats.Load())
		case <-tick.C:
		}
		for _, id := range tracker.stale(a.beats.Load()) {
			a.endInstance(ctx, id)
		}
	}
}

// watchHeartbeatKeys lists the health-session keys under prefix with a blocking query and sends each
// listing (peer service ID -> ModifyIndex) to listings, and a signal to failed when a query fails.
func (a *Agent) watchHeartbeatKeys(ctx context.Context, prefix string, listings chan map[string]uint64, failed chan struct{}) {
	_ = blockingQuery(ctx, a, "Error watching instance heartbeats", nil, func(q *api.QueryOptions) (uint64, error) {
		pairs, meta, err := a.client.KV().List(prefix, q)
		if err != nil {
			sendLatest(failed, struct{}{})
			return 0, err
		}
		indexes := map[string]uint64{}
		for _, p := range pairs {
			id, ok := strings.CutSuffix(strings.TrimPrefix(p.Key, a.kvPath()), healthSessionSuffix)
			// Only a key holding a heartbeat count is judged: the original's agentless instances
			// hold the same key (empty) but never heartbeat, and must be left alone.
			if _, err := strconv.ParseUint(string(p.Value), 10, 64); err != nil {
				continue
			}
			if ok && id != a.serviceID && p.Session != "" {
				indexes[id] = p.ModifyIndex
			}
		}
		sendLatest(listings, indexes)
		return meta.LastIndex, nil
	})
}

// endInstance destroys every session on a dead agentless instance's node.
func (a *Agent) endInstance(ctx context.Context, serviceID string) {
	node := serviceID + ":node"
	a.logger.Warn("Instance missed its heartbeats, ending its sessions", "service_id", serviceID)
	sessions, _, err := a.client.Session().Node(node, a.queryOptions(ctx))
	if err != nil {
		a.logger.Warn("Failed to list the sessions of a dead instance", "node", node, "error", err)
		return
	}
	for _, s := range sessions {
		if _, err := a.client.Session().Destroy(s.ID, a.writeOptions(ctx)); err != nil {
			a.logger.Warn("Failed to end a session of a dead instance", "session", s.ID, "error", fmt.Errorf("destroying: %w", err))
		}
	}
}
