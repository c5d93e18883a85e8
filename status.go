package main

import (
	"context"
	"sync/atomic"
	"time"
)

// agentStatus is what /health reports; every field is safe for concurrent use.
type agentStatus struct {
	registered  atomic.Bool
	leader      atomic.Bool
	lastContact atomic.Int64 // unix nanos of the last successful Consul call
	consulErr   atomic.Pointer[string]
	// assignmentErr is set while this instance leads and cannot write an instance's assignment.
	assignmentErr atomic.Pointer[string]

	// recovered is signalled when a call succeeds after a failure: Consul is reachable again.
	recovered chan struct{}
	// ttlCurrent is false from a failed TTL refresh until the next successful one; ttlRefreshed is
	// signalled on each success (agent mode).
	ttlCurrent   atomic.Bool
	ttlRefreshed chan struct{}
}

func newAgentStatus() *agentStatus {
	s := &agentStatus{recovered: make(chan struct{}, 1), ttlRefreshed: make(chan struct{}, 1)}
	s.ttlCurrent.Store(true)
	return s
}

// setTTLCurrent records the outcome of a TTL refresh.
func (s *agentStatus) setTTLCurrent(ok bool) {
	s.ttlCurrent.Store(ok)
	if ok {
		wake(s.ttlRefreshed)
	}
}

// waitTTLCurrent blocks until the last TTL refresh succeeded; false when ctx ended first.
func (s *agentStatus) waitTTLCurrent(ctx context.Context) bool {
	for !s.ttlCurrent.Load() {
		select {
		case <-ctx.Done():
			return false
		case <-s.ttlRefreshed:
		}
	}
	return true
}

func (s *agentStatus) setRegistered(v bool) { s.registered.Store(v) }

func (s *agentStatus) setAssignmentErr(msg *string) { s.assignmentErr.Store(msg) }

func (s *agentStatus) contact() {
	s.lastContact.Store(time.Now().UnixNano())
	if s.consulErr.Swap(nil) != nil {
		wake(s.recovered)
	}
}

func (s *agentStatus) failed(err error) {
	msg := err.Error()
	s.consulErr.Store(&msg)
}
