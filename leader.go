package main

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/armon/go-metrics"
	"github.com/hashicorp/consul/api"
)

// The leader loop: each round creates a session (session.go), campaigns with it for <kv>leader
// (election.go), does the leader's work until the term ends, and resigns. The watches the leader
// works from (external nodes, healthy instances) are here too; the assignment it writes is in
// assignment.go and assignment_kv.go.

// errLeadershipLost ends a leadership term.
var errLeadershipLost = errors.New("leadership lost")

func (a *Agent) leaderKey() string { return a.kvPath() + "leader" }

// leaderLoop competes for the leader lock until ctx ends. A term lasts until the lock or its session
// is lost; leader work stops at once when it ends, and the lock is released (not left to expire) so a
// peer takes over without waiting out the session TTL.
func (a *Agent) leaderLoop(ctx context.Context) {
	b := newBackoff(time.Second, a.config().RetryInterval)
	// abandoned is a session whose release failed (Consul unreachable when the term ended). Until it
	// is destroyed it may still hold the lock, keeping every instance from leading until it expires.
	var abandoned *session
	for ctx.Err() == nil {
		if abandoned != nil {
			if err := abandoned.Close(ctx); err == nil {
				abandoned = nil
			}
		}
		// A session made while our own TTL check is critical in the agent but not yet in the catalog
		// (Consul just came back) dies at the next sync, after leading on a view in which the
		// peers' checks are as stale as ours.
		if !a.status.waitTTLCurrent(ctx) {
			return
		}
		a.logger.Info("Trying to obtain leadership...")
		sess, err := newSession(ctx, a, a.leaderSessionEntry())
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			a.logger.Error("Error trying to create leader lock (will retry)", "error", fmt.Errorf("creating leader session: %w", err))
			sleepCtx(ctx, b.next())
			continue
		}
		t, err := campaign(ctx, a, sess, a.leaderKey())
		if err == nil {
			err = a.lead(ctx, sess, t)
		}
		if !a.resign(ctx, sess, t) {
			abandoned = sess
		}
		switch {
		case ctx.Err() != nil:
			return
		case errors.Is(err, errLeadershipLost):
			b.reset()
		case err != nil:
			a.logger.Error("Error trying to get leader lock (will retry)", "error", err)
			sleepCtx(ctx, b.next())
		}
	}
}

// leaderSessionEntry describes the session that holds the leader lock.
func (a *Agent) leaderSessionEntry() *api.SessionEntry {
	cfg := a.config()
	entry := &api.SessionEntry{
		Name:      "Consul API Lock",
		TTL:       cfg.SessionTTL.String(),
		LockDelay: cfg.LockDelay,
		Behavior:  api.SessionBehaviorRelease,
		// Binding the session to our TTL check as well as serfHealth ends leadership of an instance
		// that stopped heartbeating, not only of one whose agent died.
		Checks: []string{"serfHealth", a.ttlCheckID},
	}
	if cfg.EnableAgentless {
		// No agent, no serfHealth: the session lives on our own node and dies with its session check.
		entry.Name = "consul-esm leader lock"
		entry.Node = a.agentlessNode()
		entry.Checks = nil
		entry.NodeChecks = []string{a.sessionCheckID()}
	}
	return entry
}

// lead does the leader's work until the term ends, and returns errLeadershipLost then (ctx's error
// when ctx ended). The work has stopped when it returns.
func (a *Agent) lead(ctx context.Context, sess *session, t *term) error {
	// Deferred calls run last-in first-out: the work is cancelled first and then waited for. The
	// other order waits forever whenever the term ends while ctx is still alive (session
	// invalidated, lock lost), leaving leader work running without the lock.
	var wg sync.WaitGroup
	defer wg.Wait()
	workCtx, cancel := context.WithCancel(ctx)
	defer cancel()

	a.logger.Info("Obtained leadership")
	a.status.leader.Store(true)
	metrics.SetGauge([]string{"esm", "agent", "isLeader"}, 1)
	defer func() {
		a.status.leader.Store(false)
		metrics.SetGauge([]string{"esm", "agent", "isLeader"}, 0)
		metrics.SetGauge([]string{"esm", "agents", "healthy"}, 0)
		a.reportOversize(nil)
	}()

	deposed := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := a.leaderWork(workCtx, sess.ID()); err != nil {
			deposed <- err
		}
	}()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.Done():
		a.logger.Warn("Lost leadership", "reason", t.Err())
	case err := <-deposed:
		a.logger.Warn("Lost leadership", "reason", err)
	}
	return errLeadershipLost
}

// resign releases the leader key and destroys the session so a peer can take over at once; t is nil
// when the campaign failed. It reports whether the session is gone.
func (a *Agent) resign(ctx context.Context, sess *session, t *term) bool {
	cctx := ctx
	if ctx.Err() != nil {
		if a.opts.crashOnStop {
			// As after SIGKILL, nothing is released: with ctx ended, Close only stops the goroutines.
			if t != nil {
				_ = t.Close(ctx)
			}
			_ = sess.Close(ctx)
			return true
		}
		cctx = a.shutdownContext()
	} else {
		var cancel context.CancelFunc
		cctx, cancel = context.WithTimeout(ctx, shutdownBudget)
		defer cancel()
	}
	var err error
	if t != nil {
		err = t.Close(cctx)
	} else {
		// A campaign that failed may have lost the answer to an acquire Consul granted.
		err = releaseLock(cctx, a, sess.ID(), a.leaderKey())
	}
	if err != nil {
		a.logger.Debug("Releasing leader lock failed", "error", err)
	}
	if err := sess.Close(cctx); err != nil {
		a.logger.Debug("Destroying leader session failed", "error", err)
		return false
	}
	return true
}

// watchExternalNodes sends the external node list whenever it changes.
func (a *Agent) watchExternalNodes(ctx context.Context, out chan []externalNode) {
	var last []externalNode
	first := true
	_ = blockingQuery(ctx, a, "Error getting external node list", nil, func(q *api.QueryOptions) (uint64, error) {
		q.NodeMeta = a.config().NodeMeta
		q.AllowStale = a.config().StaleReadNodes
		list, meta, err := a.client.Catalog().Nodes(q)
		if err != nil {
			return 0, err
		}
		nodes := make([]externalNode, 0, len(list))
		for _, n := range list {
			nodes = append(nodes, externalNode{Name: n.Node, Probe: n.Meta["external-probe"] == "true"})
		}
		slices.SortFunc(nodes, func(x, y externalNode) int { return strings.Compare(x.Name, y.Name) })
		if first || !slices.Equal(nodes, last) {
			first = false
			last = nodes
			a.logger.Info("Updating external node list", "items", len(nodes))
			sendLatest(out, nodes)
		}
		return meta.LastIndex, nil
	})
}

// watchInstances sends the sorted service IDs of passing ESM instances whenever they change.
func (a *Agent) watchInstances(ctx context.Context, out chan []string) {
	var last []string
	first := true
	_ = blockingQuery(ctx, a, "[WARN] Error querying for health check info", nil, func(q *api.QueryOptions) (uint64, error) {
		cfg := a.config()
		entries, meta, err := a.client.Health().Service(cfg.Service, cfg.Tag, true, q)
		if err != nil {
			return 0, err
		}
		ids := make([]string, 0, len(entries))
		for _, e := range entries {
			ids = append(ids, e.Service.ID)
		}
		slices.Sort(ids)
		ids = slices.Compact(ids)
		if first || !slices.Equal(ids, last) {
			first = false
			last = ids
			sendLatest(out, ids)
		}
		return meta.LastIndex, nil
	})
}
