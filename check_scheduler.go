package main

import (
	"context"
	"math/rand/v2"
	"slices"
	"sync"
	"time"
)

const (
	// minWorkers is the worker pool's floor; it grows beyond that only up to the number of running
	// checks, so the pool is never larger than goroutine-per-check would be, and idle workers exit.
	minWorkers        = 64
	workerIdleTimeout = 10 * time.Second
)

// checkScheduler runs tasks at their interval: one min-heap of next-run times, one timer, and an
// elastic pool of workers. A task is never run twice concurrently; if a run overruns its interval
// the missed slot is skipped rather than queued.
//
// Idle workers wait on a LIFO stack: the most recently idle worker gets the next task, so the ones
// at the bottom stay idle and exit after workerIdleTimeout, and the pool shrinks back to the real
// concurrency after a burst (a FIFO hand-off would keep every worker busy just often enough never
// to expire).
type checkScheduler struct {
	run func(*checkTask)

	mu      sync.Mutex
	heap    timeHeap[*checkTask] // by next run; moved keeps checkTask.index
	count   int                  // tasks added and not removed
	workers int
	idleWs  []chan *checkTask // idle workers' inboxes, most recently idle last
	wake    chan struct{}

	workerFree chan struct{} // a worker became idle or exited
	wg         sync.WaitGroup
	idle       time.Duration
}

func newCheckScheduler(run func(*checkTask)) *checkScheduler {
	return &checkScheduler{
		run:        run,
		heap:       timeHeap[*checkTask]{moved: func(t *checkTask, i int) { t.index = i }},
		wake:       make(chan struct{}, 1),
		workerFree: make(chan struct{}, 1),
		idle:       workerIdleTimeout,
	}
}

func (s *checkScheduler) add(t *checkTask, first time.Time) {
	s.mu.Lock()
	s.count++
	t.next = first
	top := s.heap.push(t.next, t)
	s.mu.Unlock()
	if top {
		wake(s.wake)
	}
}

func (s *checkScheduler) remove(t *checkTask) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if t.stopped {
		return
	}
	t.stopped = true
	s.count--
	if t.index >= 0 {
		s.heap.removeAt(t.index)
	}
}

// finished puts a task back after a run, at its next slot.
func (s *checkScheduler) finished(t *checkTask) {
	s.mu.Lock()
	if t.stopped {
		s.mu.Unlock()
		return
	}
	now := time.Now()
	t.next = t.next.Add(t.interval)
	if t.respread {
		t.respread = false
		t.next = now.Add(rand.N(t.interval))
	}
	if !t.next.After(now) {
		t.next = now.Add(t.interval)
	}
	top := s.heap.push(t.next, t)
	s.mu.Unlock()
	if top {
		wake(s.wake)
	}
}

// loop dispatches due tasks until ctx ends.
func (s *checkScheduler) loop(ctx context.Context) {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		s.mu.Lock()
		var due *checkTask
		wait := time.Duration(-1)
		if next, ok := s.heap.peek(); ok {
			if d := time.Until(next); d <= 0 {
				due = s.heap.pop()
			} else {
				wait = d
			}
		}
		s.mu.Unlock()
		if due != nil {
			if !s.dispatch(ctx, due) {
				return
			}
			continue
		}
		if !waitWake(ctx, timer, wait, s.wake) {
			return
		}
	}
}

// dispatch hands t to the most recently idle worker, starts a new one while below the cap
// (max(minWorkers, running checks): never more than goroutine-per-check would use), or waits.
func (s *checkScheduler) dispatch(ctx context.Context, t *checkTask) bool {
	for {
		s.mu.Lock()
		if n := len(s.idleWs); n > 0 {
			inbox := s.idleWs[n-1]
			s.idleWs[n-1] = nil
			s.idleWs = s.idleWs[:n-1]
			s.mu.Unlock()
			inbox <- t // buffered and empty: the worker is waiting for exactly this
			return true
		}
		if s.workers < max(minWorkers, s.count) {
			s.workers++
			s.wg.Add(1)
			s.mu.Unlock()
			go s.worker(ctx, t)
			return true
		}
		s.mu.Unlock()
		select {
		case <-s.workerFree:
		case <-ctx.Done():
			return false
		}
	}
}

func (s *checkScheduler) worker(ctx context.Context, t *checkTask) {
	defer s.wg.Done()
	inbox := make(chan *checkTask, 1)
	idle := time.NewTimer(s.idle)
	defer idle.Stop()
	for {
		s.run(t)
		idle.Reset(s.idle)
		s.mu.Lock()
		s.idleWs = append(s.idleWs, inbox)
		s.mu.Unlock()
		wake(s.workerFree)
		var stopping bool
		select {
		case t = <-inbox:
			continue
		case <-ctx.Done():
			stopping = true
		case <-idle.C:
		}
		s.mu.Lock()
		if i := slices.Index(s.idleWs, inbox); i >= 0 {
			s.idleWs = slices.Delete(s.idleWs, i, i+1)
		} else if !stopping {
			// Taken by dispatch just as the timer fired: the task is on its way.
			s.mu.Unlock()
			t = <-inbox
			continue
		}
		s.workers--
		s.mu.Unlock()
		wake(s.workerFree)
		return
	}
}

// wait returns once every worker has exited (after the loop's ctx ended).
func (s *checkScheduler) wait() { s.wg.Wait() }
