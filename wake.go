package main

import (
	"context"
	"time"
)

// The one-slot wake-up channel, used by every loop that sleeps until something changes: wake
// signals it, waitWake waits on it with a timer the loop reuses (the scheduler and the writer, which
// wait thousands of times), sleepUnlessWoken with a one-off timer and tells a full wait from a wake.

// wake leaves a wake-up in a one-slot channel without blocking. The channel's receiver treats a
// wake-up as "look again", never as a count: several wakes before it looks collapse into one.
func wake(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// waitWake blocks until wake is signalled, wait has passed (wait < 0: no deadline) or ctx ends, and
// reports false when ctx ended. timer is the caller's, reused across calls.
func waitWake(ctx context.Context, timer *time.Timer, wait time.Duration, wake <-chan struct{}) bool {
	if wait >= 0 {
		timer.Reset(wait)
	} else {
		timer.Stop()
	}
	select {
	case <-ctx.Done():
		return false
	case <-wake:
	case <-timer.C:
	}
	return true
}

// sleepUnlessWoken waits for d, until ctx ends or until a wake-up arrives on wake (nil: never);
// it reports whether the full wait elapsed.
func sleepUnlessWoken(ctx context.Context, d time.Duration, wake <-chan struct{}) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-wake:
		return false
	case <-t.C:
		return true
	}
}
