package main

import (
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestWriterTakeBatch covers when a batch goes out and what it carries: the short window for an
// isolated change, the longer one while changes keep coming, full transactions at once, the cap on
// concurrent flushes, and a check already being written held back rather than written twice at once.
func TestWriterTakeBatch(t *testing.T) {
	now := time.Now()
	states := func(n int) []*checkState {
		out := make([]*checkState, n)
		for i := range out {
			out[i] = &checkState{key: fmt.Sprint(i)}
		}
		return out
	}
	cases := []struct {
		name      string
		pending   int
		age       time.Duration // of the oldest pending change
		sinceLast time.Duration // since the last batch was taken
		flushes   int
		busy      []int // pending indexes already in flight
		wantTake  int
		wantWait  time.Duration // when nothing is taken; -1 = until woken
	}{
		{"nothing pending", 0, 0, time.Hour, 0, nil, 0, -1},
		{"isolated change waits the short window", 1, 4 * time.Millisecond, time.Hour, 0, nil, 0, 6 * time.Millisecond},
		{"isolated change goes after it", 1, writeBatchWindow, time.Hour, 0, nil, 1, 0},
		{"streaming changes wait longer", 3, writeBatchWindow, 500 * time.Millisecond, 0, nil, 0, streamBatchWindow - writeBatchWindow},
		{"streaming changes go after the long window", 3, streamBatchWindow, 500 * time.Millisecond, 0, nil, 3, 0},
		{"quiet again after streamingAfter", 2, writeBatchWindow, streamingAfter, 0, nil, 2, 0},
		{"a full transaction goes at once", maxTxnOps + 5, 0, 0, 0, nil, maxTxnOps, 0},
		{"at most maxTxnOps", 3 * maxTxnOps, time.Second, time.Hour, 0, nil, maxTxnOps, 0},
		{"flush cap reached", 5, time.Second, time.Hour, maxConcurrentFlushes, nil, 0, -1},
		{"busy checks held back", 4, time.Second, time.Hour, 1, []int{0, 2}, 2, 0},
		{"only busy checks", 2, time.Second, time.Hour, 1, []int{0, 1}, 0, -1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w := &checkWriter{window: writeBatchWindow, inFlight: make(map[*checkState]struct{})}
			w.pending = states(tc.pending)
			all := append([]*checkState(nil), w.pending...)
			w.firstAt = now.Add(-tc.age)
			w.lastFlush = now.Add(-tc.sinceLast)
			w.flushes = tc.flushes
			for _, i := range tc.busy {
				w.inFlight[all[i]] = struct{}{}
			}
			batch, wait := w.takeBatch(now)
			if len(batch) != tc.wantTake {
				t.Fatalf("took %d, want %d", len(batch), tc.wantTake)
			}
			if tc.wantTake == 0 && wait != tc.wantWait {
				t.Fatalf("wait %v, want %v", wait, tc.wantWait)
			}
			if len(batch)+len(w.pending) != tc.pending {
				t.Fatalf("%d taken + %d left != %d pending", len(batch), len(w.pending), tc.pending)
			}
			for _, st := range batch {
				for _, i := range tc.busy {
					if st == all[i] {
						t.Fatalf("check %s taken while in flight", st.key)
					}
				}
				if _, ok := w.inFlight[st]; !ok {
					t.Fatalf("taken check %s not marked in flight", st.key)
				}
			}
			if tc.wantTake > 0 && (w.flushes != tc.flushes+1 || !w.lastFlush.Equal(now)) {
				t.Fatalf("flushes %d, lastFlush %v after taking a batch", w.flushes, w.lastFlush)
			}
			// What is left keeps its order.
			pos := make(map[*checkState]int, len(all))
			for i, st := range all {
				pos[st] = i
			}
			for i := 1; i < len(w.pending); i++ {
				if pos[w.pending[i-1]] > pos[w.pending[i]] {
					t.Fatalf("pending reordered: %s before %s", w.pending[i-1].key, w.pending[i].key)
				}
			}
		})
	}
}

// TestWriterSlowFlushDoesNotBlockOthers: while one transaction hangs (a slow Consul round trip,
// emulated between read and write), another check's status change still reaches the catalog.
func TestWriterSlowFlushDoesNotBlockOthers(t *testing.T) {
	srv := newTestConsul(t)
	c := srv.Client
	tg := crNewTarget(t)
	crRegister(t, c, "cw-slow", "", crHTTPCheck("slow", tg.URL+"/slow", 200*time.Millisecond))
	crRegister(t, c, "cw-fast", "", crHTTPCheck("fast", tg.URL+"/fast", 200*time.Millisecond))

	release := make(chan struct{})
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) })
	var holding atomic.Bool
	tg.handle = func(w http.ResponseWriter, r *http.Request) bool {
		// /fast fails only once the slow flush hangs, so its change comes after.
		if r.URL.Path == "/fast" && holding.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return true
		}
		return false
	}
	r := crStart(t, srv, nil, func(r *CheckRunner) {
		r.writer.afterRead = func() {
			if holding.CompareAndSwap(false, true) { // the first flush: the slow check's first write
				<-release
			}
		}
	})
	r.SetNodes([]string{"cw-slow"})
	waitFor(t, 10*time.Second, func() error {
		if !holding.Load() {
			return errNotYet
		}
		return nil
	})
	r.SetNodes([]string{"cw-slow", "cw-fast"})
	crWaitCheck(t, c, "cw-fast", "fast", 10*time.Second, crStatus(statusCritical, "503"))
	once.Do(func() { close(release) })
	crWaitCheck(t, c, "cw-slow", "slow", 10*time.Second, crStatus(statusPassing, "200 OK"))
}
