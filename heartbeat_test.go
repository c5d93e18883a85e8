package main

import (
	"slices"
	"testing"
)

// TestHeartbeatTracker: a peer is stale only after it was seen heartbeating and then missed as many
// of the watcher's own heartbeats as instance_ttl spans; a watcher that could not watch restarts
// every allowance.
func TestHeartbeatTracker(t *testing.T) {
	cfg := DefaultConfig() // instance_ttl 7s / refresh 1.5s: 5 beats
	type step struct {
		own     uint64
		list    map[string]uint64 // nil: no listing at this step
		restart bool
		stale   []string
	}
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"beating peer goes silent", []step{
			{own: 0, list: map[string]uint64{"b": 10}},
			{own: 1, list: map[string]uint64{"b": 11}},
			{own: 5},
			{own: 6, stale: []string{"b"}},
			{own: 7}, // reported once
		}},
		{"a peer that never beat after it was first seen", []step{
			{own: 3, list: map[string]uint64{"b": 10}},
			{own: 7},
			{own: 8, stale: []string{"b"}},
		}},
		{"a peer that keeps beating is alive", []step{
			{own: 0, list: map[string]uint64{"b": 1}},
			{own: 4, list: map[string]uint64{"b": 2}},
			{own: 8, list: map[string]uint64{"b": 3}},
			{own: 12, list: map[string]uint64{"b": 4}},
		}},
		{"watch failure restarts allowances", []step{
			{own: 0, list: map[string]uint64{"b": 1}},
			{own: 1, list: map[string]uint64{"b": 2}},
			{own: 5, restart: true},
			{own: 9},
			{own: 10, stale: []string{"b"}},
		}},
		{"a peer gone from the listing is forgotten", []step{
			{own: 0, list: map[string]uint64{"b": 1}},
			{own: 1, list: map[string]uint64{"b": 2}},
			{own: 2, list: map[string]uint64{}},
			{own: 20},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHeartbeatTracker(cfg)
			if h.limit != 5 {
				t.Fatalf("limit %d, want 5 (7s / 1.5s rounded up)", h.limit)
			}
			for i, s := range tc.steps {
				if s.list != nil {
					h.observe(s.list, s.own)
				}
				if s.restart {
					h.restart(s.own)
				}
				got := h.stale(s.own)
				slices.Sort(got)
				if !slices.Equal(got, s.stale) {
					t.Fatalf("step %d (own %d): stale %v, want %v", i, s.own, got, s.stale)
				}
			}
		})
	}
}
