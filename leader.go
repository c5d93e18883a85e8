package main

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/armon/go-metrics"
	"github.com/hashicorp/consul/api"
)

// lockFlagValue marks <kv>leader as a lock key, the same magic value api.Lock uses, so ours and the
// original's instances contend for one lock during a rolling upgrade.
const lockFlagValue = 0x2ddccbc058a50c18

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
	var abandoned string
	for ctx.Err() == nil {
		if abandoned != "" {
			if _, err := a.client.Session().Destroy(abandoned, a.writeOptions(ctx)); err == nil {
				abandoned = ""
			}
		}
		// A session made while our own TTL check is critical in the agent but not yet in the catalog
		// (Consul just came back) dies at the next sync, after leading on a view in which the
		// peers' checks are as stale as ours.
		if !a.status.waitTTLCurrent(ctx) {
			return
		}
		a.logger.Info("Trying to obtain leadership...")
		sess, err := a.createLeaderSession(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			a.logger.Error("Error trying to create leader lock (will retry)", "error", err)
			sleepCtx(ctx, b.next())
			continue
		}
		err = a.leaderTerm(ctx, sess)
		if !a.releaseLeaderLock(ctx, sess) {
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

func (a *Agent) createLeaderSession(ctx context.Context) (string, error) {
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
	id, _, err := a.client.Session().Create(entry, a.writeOptions(ctx))
	if err != nil {
		return "", fmt.Errorf("creating leader session: %w", err)
	}
	return id, nil
}

// leaderTerm holds the session alive, acquires the lock and leads until the term ends.
func (a *Agent) leaderTerm(ctx context.Context, sess string) error {
	// Deferred calls run last-in first-out: the term's goroutines are cancelled first and then
	// waited for. The other order waits forever whenever the term ends while ctx is still alive
	// (session invalidated, lock lost), leaving leader work running without the lock.
	var wg sync.WaitGroup
	defer wg.Wait()
	termCtx, cancel := context.WithCancel(ctx)
	defer cancel()

	renewErr := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		renewErr <- a.renewSession(termCtx, sess)
	}()

	acquired := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		acquired <- a.acquireLock(termCtx, sess)
	}()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case err := <-renewErr:
		return fmt.Errorf("leader session: %w", err)
	case err := <-acquired:
		if err != nil {
			return err
		}
	}

	a.logger.Info("Obtained leadership")
	a.status.leader.Store(true)
	metrics.SetGauge([]string{"esm", "agent", "isLeader"}, 1)
	defer func() {
		a.status.leader.Store(false)
		metrics.SetGauge([]string{"esm", "agent", "isLeader"}, 0)
		metrics.SetGauge([]string{"esm", "agents", "healthy"}, 0)
		a.reportOversize(nil)
	}()

	// Both goroutines may report; two slots keep the second from blocking wg.Wait.
	lost := make(chan error, 2)
	wg.Add(2)
	go func() {
		defer wg.Done()
		lost <- a.monitorLock(termCtx, sess)
	}()
	go func() {
		defer wg.Done()
		if err := a.leaderWork(termCtx, sess); err != nil {
			lost <- err
		}
	}()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case err := <-renewErr:
		a.logger.Warn("Lost leadership", "reason", err)
	case err := <-lost:
		a.logger.Warn("Lost leadership", "reason", err)
	}
	return errLeadershipLost
}

// renewSession renews the session every TTL/2 until ctx ends. It gives up once the session is gone or
// no renewal succeeded for a whole TTL, because by then Consul may have invalidated it.
func (a *Agent) renewSession(ctx context.Context, sess string) error {
	ttl := a.config().SessionTTL
	lastOK := time.Now()
	for {
		if !sleepCtx(ctx, ttl/2) {
			return ctx.Err()
		}
		entry, _, err := a.client.Session().Renew(sess, a.writeOptions(ctx))
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case err == nil && entry == nil:
			return errors.New("session was invalidated")
		case err == nil:
			lastOK = time.Now()
			a.status.contact()
		case time.Since(lastOK) >= ttl:
			return fmt.Errorf("renewing session: %w", err)
		default:
			a.status.failed(err)
		}
	}
}

// acquireLock blocks until the session holds <kv>leader or ctx ends.
func (a *Agent) acquireLock(ctx context.Context, sess string) error {
	key := a.leaderKey()
	kv := a.client.KV()
	var idx uint64
	b := newBackoff(250*time.Millisecond, a.config().RetryInterval)
	for {
		q := a.queryOptions(ctx)
		q.WaitIndex, q.WaitTime = idx, a.config().QueryWaitTime
		pair, meta, err := kv.Get(key, q)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			a.status.failed(err)
			idx = 0
			sleepCtx(ctx, b.next())
			continue
		}
		a.status.contact()
		if pair != nil && pair.Session == sess {
			return nil
		}
		if pair == nil || pair.Session == "" {
			ok, _, err := kv.Acquire(&api.KVPair{Key: key, Flags: lockFlagValue, Session: sess}, a.writeOptions(ctx))
			if err != nil {
				return fmt.Errorf("acquiring %q: %w", key, err)
			}
			if ok {
				return nil
			}
			// Refused while the lock-delay of a previous holder's session runs: poll until it ends.
			if !sleepCtx(ctx, lockRetryWait(a.config().LockDelay)) {
				return ctx.Err()
			}
			idx = 0
			continue
		}
		b.reset()
		idx = meta.LastIndex
	}
}

func lockRetryWait(lockDelay time.Duration) time.Duration {
	w := lockDelay / 8
	if w < 100*time.Millisecond {
		w = 100 * time.Millisecond
	}
	if w > 2*time.Second {
		w = 2 * time.Second
	}
	return w
}

// monitorLock returns when <kv>leader no longer belongs to sess. Errors are tolerated for half a
// session TTL: Consul cannot hand the lock to anyone else sooner than that.
func (a *Agent) monitorLock(ctx context.Context, sess string) error {
	key := a.leaderKey()
	var idx uint64
	var failingSince time.Time
	grace := a.config().SessionTTL / 2
	for {
		q := a.queryOptions(ctx)
		q.WaitIndex, q.WaitTime = idx, a.config().QueryWaitTime
		pair, meta, err := a.client.KV().Get(key, q)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			a.status.failed(err)
			if failingSince.IsZero() {
				failingSince = time.Now()
			} else if time.Since(failingSince) > grace {
				return fmt.Errorf("watching %q: %w", key, err)
			}
			sleepCtx(ctx, 250*time.Millisecond)
			continue
		}
		failingSince = time.Time{}
		a.status.contact()
		if pair == nil || pair.Session != sess {
			return errors.New("lock key no longer held by our session")
		}
		idx = meta.LastIndex
	}
}

// releaseLeaderLock releases the key and destroys the session so a peer can take over at once. It
// reports whether the session is gone.
func (a *Agent) releaseLeaderLock(ctx context.Context, sess string) bool {
	cctx := ctx
	if ctx.Err() != nil {
		if a.opts.crashOnStop {
			return true
		}
		cctx = a.shutdownContext()
	} else {
		var cancel context.CancelFunc
		cctx, cancel = context.WithTimeout(ctx, shutdownBudget)
		defer cancel()
	}
	_, _, err := a.client.KV().Release(&api.KVPair{Key: a.leaderKey(), Flags: lockFlagValue, Session: sess}, a.writeOptions(cctx))
	if err != nil {
		a.logger.Debug("Releasing leader lock failed", "error", err)
	}
	if _, err := a.client.Session().Destroy(sess, a.writeOptions(cctx)); err != nil {
		a.logger.Debug("Destroying leader session failed", "error", err)
		return false
	}
	return true
}

// watchExternalNodes sends the external node list whenever it changes.
func (a *Agent) watchExternalNodes(ctx context.Context, out chan []externalNode) {
	var last []externalNode
	first := true
	blockingWatch(ctx, a, "Error getting external node list", func(q *api.QueryOptions) (uint64, error) {
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
		sort.Slice(nodes, func(i, j int) bool { return nodes[i].Name < nodes[j].Name })
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
	blockingWatch(ctx, a, "[WARN] Error querying for health check info", func(q *api.QueryOptions) (uint64, error) {
		cfg := a.config()
		entries, meta, err := a.client.Health().Service(cfg.Service, cfg.Tag, true, q)
		if err != nil {
			return 0, err
		}
		ids := make([]string, 0, len(entries))
		for _, e := range entries {
			ids = append(ids, e.Service.ID)
		}
		sort.Strings(ids)
		ids = slices.Compact(ids)
		if first || !slices.Equal(ids, last) {
			first = false
			last = ids
			sendLatest(out, ids)
		}
		return meta.LastIndex, nil
	})
}

// blockingWatch runs fetch as a Consul blocking query (index + wait time) until ctx ends, backing off
// on errors and logging each failure streak once.
func blockingWatch(ctx context.Context, a *Agent, errMsg string, fetch func(q *api.QueryOptions) (uint64, error)) {
	var idx uint64
	b := newBackoff(250*time.Millisecond, a.config().RetryInterval)
	failing := false
	for ctx.Err() == nil {
		q := a.queryOptions(ctx)
		q.WaitIndex, q.WaitTime = idx, a.config().QueryWaitTime
		next, err := fetch(q)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			a.status.failed(err)
			if !failing {
				a.logger.Warn(errMsg, "error", err)
				failing = true
			}
			idx = 0
			sleepCtx(ctx, b.next())
			continue
		}
		if failing {
			a.logger.Info("Consul query recovered", "query", errMsg)
		}
		failing = false
		b.reset()
		a.status.contact()
		// An index going backwards means Consul's state was reset (snapshot restore): start over.
		if next < idx {
			next = 0
		}
		idx = next
	}
}

// sendLatest replaces whatever is waiting in a one-slot channel, so consumers only see the newest value.
func sendLatest[T any](ch chan T, v T) {
	for {
		select {
		case ch <- v:
			return
		default:
			select {
			case <-ch:
			default:
			}
		}
	}
}
