package main

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
)

// observer watches the catalog status of every bench check directly on Consul (not through the
// proxy), with one blocking query on /v1/health/node/<node> per node. Consul wakes such a query only
// when that node's checks change, so the cost of watching follows the number of changes, not the
// number of checks (one blocking query on /v1/health/state/critical would return the whole list on
// every write during a mass outage). The time of a change is when the query returned.
type observer struct {
	client *api.Client
	lay    layout
	wait   time.Duration

	mu     sync.Mutex
	checks []checkState

	ready       atomic.Int64 // nodes whose first query returned
	changes     atomic.Int64 // status transitions seen
	firstWrites atomic.Int64 // checks written at least once since the observer started
	wg          sync.WaitGroup
}

// checkState is what the observer knows about one check.
type checkState struct {
	seen       bool
	baseIndex  uint64 // ModifyIndex at the first observation (the registration)
	status     string
	firstWrite time.Time
	events     []statusEvent
}

// statusEvent is a status transition seen in the catalog.
type statusEvent struct {
	At     time.Time
	Status string
}

func newObserver(client *api.Client, l layout) *observer {
	return &observer{client: client, lay: l, wait: time.Minute, checks: make([]checkState, l.total())}
}

// start launches one watcher per node; they stop when ctx ends (wait with stop).
func (o *observer) start(ctx context.Context) {
	first := make(chan struct{}, 32) // at most 32 first (non-blocking) queries at once
	for i := 0; i < o.lay.nodes; i++ {
		o.wg.Add(1)
		go func() {
			defer o.wg.Done()
			o.watchNode(ctx, i, first)
		}()
	}
}

// stop waits for the watchers after their context was cancelled.
func (o *observer) stop() { o.wg.Wait() }

// waitReady waits until every node has been read once.
func (o *observer) waitReady(ctx context.Context, timeout time.Duration) error {
	return pollUntil(ctx, time.Now().Add(timeout), 50*time.Millisecond, func() (bool, error) {
		return o.ready.Load() == int64(o.lay.nodes), nil
	})
}

func (o *observer) watchNode(ctx context.Context, i int, first chan struct{}) {
	node := o.lay.nodeName(i)
	var index uint64
	for ctx.Err() == nil {
		if index == 0 {
			select {
			case first <- struct{}{}:
			case <-ctx.Done():
				return
			}
		}
		q := (&api.QueryOptions{WaitIndex: index, WaitTime: o.wait}).WithContext(ctx)
		checks, meta, err := o.client.Health().Node(node, q)
		if index == 0 {
			<-first
		}
		if err != nil {
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond):
			}
			continue
		}
		o.record(i, checks, time.Now())
		if index == 0 {
			o.ready.Add(1)
		}
		index = meta.LastIndex
	}
}

// record applies one node's checks as seen at time at.
func (o *observer) record(node int, checks api.HealthChecks, at time.Time) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, c := range checks {
		j, ok := parseCheckID(c.CheckID)
		if !ok || j >= o.lay.perNode {
			continue
		}
		st := &o.checks[node*o.lay.perNode+j]
		if !st.seen {
			st.seen, st.baseIndex, st.status = true, c.ModifyIndex, c.Status
			continue
		}
		if st.firstWrite.IsZero() && c.ModifyIndex != st.baseIndex {
			st.firstWrite = at
			o.firstWrites.Add(1)
		}
		if c.Status != st.status {
			st.status = c.Status
			st.events = append(st.events, statusEvent{at, c.Status})
			o.changes.Add(1)
		}
	}
}

// firstWriteStatus returns how many checks have been written once and when the last of them was.
func (o *observer) firstWriteStatus() (written int, last time.Time) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for i := range o.checks {
		if fw := o.checks[i].firstWrite; !fw.IsZero() {
			written++
			if fw.After(last) {
				last = fw
			}
		}
	}
	return written, last
}

// statusChanges is the number of transitions seen so far.
func (o *observer) statusChanges() int64 { return o.changes.Load() }

// reached returns, for each check index in idx, when it was first seen in a state matching want at
// or after since[k] (zero time when not yet).
func (o *observer) reached(idx []int, since []time.Time, want func(status string) bool) []time.Time {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := make([]time.Time, len(idx))
	for k, i := range idx {
		for _, ev := range o.checks[i].events {
			if !ev.At.Before(since[k]) && want(ev.Status) {
				out[k] = ev.At
				break
			}
		}
	}
	return out
}

// countStatus counts the checks in idx whose current status matches want.
func (o *observer) countStatus(idx []int, want func(string) bool) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	n := 0
	for _, i := range idx {
		if want(o.checks[i].status) {
			n++
		}
	}
	return n
}

func isCritical(s string) bool { return s == api.HealthCritical }
func isPassing(s string) bool  { return s == api.HealthPassing }
