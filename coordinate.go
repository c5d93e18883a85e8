package main

// coordinate.go owns the serf network coordinates of probe nodes: moving a node's coordinate by
// each measured round trip, seeding the coordinates of newly assigned nodes, and the cache of the
// local agent's own coordinate.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/serf/coordinate"
)

const (
	// segmentMetaKey is the node meta key Consul uses for a node's network segment.
	segmentMetaKey = "consul-network-segment"

	// localCoordTTL bounds how stale the cached coordinate of the local agent may be. Vivaldi
	// coordinates drift slowly, so re-reading /v1/agent/self for every ping (as the original did)
	// only added load.
	localCoordTTL = 30 * time.Second
	// localCoordRetry spaces out retries after /v1/agent/self failed, so a Consul outage does not
	// turn every ping into a failing request.
	localCoordRetry = 5 * time.Second
	// minCoordMove is the smallest coordinate change worth writing.
	minCoordMove = time.Millisecond
)

// localCoordCache holds the local agent's coordinate. mu is held across the fetch, so concurrent
// pings wait for one request instead of each sending their own.
type localCoordCache struct {
	mu      sync.Mutex
	coord   *coordinate.Coordinate
	fetched time.Time
	retryAt time.Time
	err     error
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
