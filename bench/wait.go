package main

import (
	"context"
	"errors"
	"time"
)

var (
	errTimeout = errors.New("timed out")
	errStalled = errors.New("stalled: no progress")
)

// pollUntil calls cond every tick until it returns true, ctx ends or the deadline passes.
func pollUntil(ctx context.Context, deadline time.Time, tick time.Duration, cond func() (bool, error)) error {
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return errTimeout
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// waitProgress polls count every 100ms until it reaches want. It returns errStalled when the count
// has not grown for stall, and errTimeout after hardCap: a slow consul-esm is measured to the end,
// a stuck one is not waited for.
func waitProgress(ctx context.Context, want int, stall, hardCap time.Duration, count func() (int, error)) error {
	last, lastAt := -1, time.Now()
	return pollUntil(ctx, time.Now().Add(hardCap), 100*time.Millisecond, func() (bool, error) {
		n, err := count()
		if err != nil || n >= want {
			return err == nil, err
		}
		if now := time.Now(); n > last {
			last, lastAt = n, now
		} else if now.Sub(lastAt) > stall {
			return false, errStalled
		}
		return false, nil
	})
}

// sleepCtx sleeps for d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
