package main

import (
	"context"
	"time"
)

// sleepCtx waits for d or until ctx ends; it reports whether the full wait elapsed.
func sleepCtx(ctx context.Context, d time.Duration) bool { return sleepUnlessWoken(ctx, d, nil) }

// every runs fn every d until ctx ends; the first run is d after the call.
func every(ctx context.Context, d time.Duration, fn func(ctx context.Context)) {
	tick := time.NewTicker(d)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			fn(ctx)
		}
	}
}

// backoff doubles a wait from min to max; reset() after a success.
type backoff struct {
	min, max, cur time.Duration
}

func newBackoff(min, max time.Duration) *backoff {
	if max < min {
		max = min
	}
	return &backoff{min: min, max: max}
}

// next advances and returns the wait to use now.
func (b *backoff) next() time.Duration {
	switch {
	case b.cur == 0:
		b.cur = b.min
	case b.cur < b.max:
		b.cur *= 2
		if b.cur > b.max {
			b.cur = b.max
		}
	}
	return b.cur
}

func (b *backoff) current() time.Duration {
	if b.cur == 0 {
		return b.next()
	}
	return b.cur
}

func (b *backoff) reset() { b.cur = 0 }
