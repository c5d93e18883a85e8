package main

import (
	"context"
	"crypto/tls"
	"sync"
)

// CheckRunner runs the health checks of the nodes assigned to this instance. (Placeholder until the
// check runner lands: it records the assignment so the lifecycle can be tested.)
type CheckRunner struct {
	agent *Agent
	mu    sync.Mutex
	nodes []string
}

func newCheckRunner(a *Agent, _ *tls.Config) *CheckRunner { return &CheckRunner{agent: a} }

// SetNodes replaces the set of nodes whose checks this instance runs.
func (r *CheckRunner) SetNodes(nodes []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.nodes = nodes
}

// Nodes returns the current node set.
func (r *CheckRunner) Nodes() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.nodes...)
}

// Run runs until ctx ends.
func (r *CheckRunner) Run(ctx context.Context) { <-ctx.Done() }
