package main

import (
	"context"
	"sync"
)

// NodeProber pings the probe nodes assigned to this instance. (Placeholder until probing lands.)
type NodeProber struct {
	agent *Agent
	mu    sync.Mutex
	nodes []string
}

func newNodeProber(a *Agent) *NodeProber { return &NodeProber{agent: a} }

// SetNodes replaces the set of nodes to ping.
func (p *NodeProber) SetNodes(nodes []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.nodes = nodes
}

// Nodes returns the current probe set.
func (p *NodeProber) Nodes() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.nodes...)
}

// Run runs until ctx ends.
func (p *NodeProber) Run(ctx context.Context) { <-ctx.Done() }
