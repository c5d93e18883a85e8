package main

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

func TestNextWaitIndex(t *testing.T) {
	for _, tc := range []struct {
		name           string
		prev, got, out uint64
	}{
		{"first answer", 0, 10, 10},
		{"moved on", 10, 12, 12},
		{"unchanged after the wait time", 12, 12, 12},
		{"went backwards: start over", 12, 5, 0},
		{"zero after a wait: start over", 12, 0, 0},
		{"zero without a wait: never wait on 0", 0, 0, 1},
		{"answer after waiting on 1", 1, 9, 9},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := nextWaitIndex(tc.prev, tc.got); got != tc.out {
				t.Errorf("nextWaitIndex(%d, %d) = %d, want %d", tc.prev, tc.got, got, tc.out)
			}
		})
	}
}

// offlineAgent is an Agent with no Consul behind it, for loops whose Consul calls a test fakes.
func offlineAgent() *Agent {
	return &Agent{logger: hclog.NewNullLogger(), cfg: DefaultConfig(), status: newAgentStatus()}
}

// TestBlockingQueryRounds drives blockingQuery with a scripted fetch and checks the index and wait
// time each round asks for: the index-reset rule, the restart from 0 after an error, and the end.
func TestBlockingQueryRounds(t *testing.T) {
	a := offlineAgent()
	errFetch := errors.New("connection refused")
	errDone := errors.New("done")
	steps := []struct {
		ret      uint64
		err      error
		wantWait uint64
	}{
		{ret: 10, wantWait: 0},
		{ret: 12, wantWait: 10},
		{ret: 12, wantWait: 12},
		{ret: 5, wantWait: 12}, // backwards
		{ret: 7, wantWait: 0},
		{err: errFetch, wantWait: 7},
		{ret: 0, wantWait: 0}, // after an error: from 0, and a zero answer ...
		{ret: 9, wantWait: 1}, // ... is not waited on
		{ret: 0, wantWait: 9},
		{err: endQuery(errDone), wantWait: 0},
	}
	round := 0
	err := blockingQuery(context.Background(), a, "test query", newBackoff(time.Millisecond, time.Millisecond), func(q *api.QueryOptions) (uint64, error) {
		if round >= len(steps) {
			t.Fatalf("round %d after the loop should have ended", round)
		}
		s := steps[round]
		if q.WaitIndex != s.wantWait {
			t.Errorf("round %d waited on index %d, want %d", round, q.WaitIndex, s.wantWait)
		}
		if q.WaitTime != a.config().QueryWaitTime {
			t.Errorf("round %d wait time %s, want %s", round, q.WaitTime, a.config().QueryWaitTime)
		}
		round++
		return s.ret, s.err
	})
	if !errors.Is(err, errDone) {
		t.Errorf("blockingQuery returned %v, want the error given to endQuery", err)
	}
	if round != len(steps) {
		t.Errorf("ran %d rounds, want %d", round, len(steps))
	}
}

func TestBlockingQueryEnds(t *testing.T) {
	a := offlineAgent()
	t.Run("endQuery(nil) returns nil", func(t *testing.T) {
		err := blockingQuery(context.Background(), a, "", nil, func(*api.QueryOptions) (uint64, error) {
			return 0, endQuery(nil)
		})
		if err != nil {
			t.Errorf("got %v, want nil", err)
		}
	})
	t.Run("ctx ended returns ctx's error", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		err := blockingQuery(ctx, a, "", nil, func(*api.QueryOptions) (uint64, error) {
			cancel()
			return 0, errors.New("context canceled underneath")
		})
		if !errors.Is(err, context.Canceled) {
			t.Errorf("got %v, want context.Canceled", err)
		}
	})
	t.Run("a failed query is reported, a success clears it", func(t *testing.T) {
		a := offlineAgent()
		n := 0
		err := blockingQuery(context.Background(), a, "", newBackoff(time.Millisecond, time.Millisecond), func(*api.QueryOptions) (uint64, error) {
			n++
			switch n {
			case 1:
				return 0, errors.New("boom")
			case 2:
				if a.status.consulErr.Load() == nil {
					t.Error("a failed query left /health without an error")
				}
				return 3, nil
			}
			if a.status.consulErr.Load() != nil {
				t.Error("a successful query left the error on /health")
			}
			return 0, endQuery(nil)
		})
		if err != nil {
			t.Fatal(err)
		}
	})
}
