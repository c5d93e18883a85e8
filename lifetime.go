package main

import "context"

// lifetime is what a value kept alive by one goroutine of its own (a session's renewal, a
// leadership term) shows its owner: Done's channel closes when that goroutine has returned, and
// Err is then why. The goroutine is started by startLifetime and stopped by stop.
type lifetime struct {
	cancel context.CancelFunc // ends the ctx the goroutine runs under
	done   chan struct{}
	err    error // the goroutine's result; written before done closes
}

// startLifetime runs fn in a goroutine under a ctx derived from ctx; fn's return ends the lifetime.
func startLifetime(ctx context.Context, fn func(ctx context.Context) error) *lifetime {
	lctx, cancel := context.WithCancel(ctx)
	l := &lifetime{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(l.done)
		l.err = fn(lctx)
	}()
	return l
}

// Done returns a channel that closes when the goroutine has returned.
func (l *lifetime) Done() <-chan struct{} { return l.done }

// Err is why the lifetime ended; nil until Done's channel has closed.
func (l *lifetime) Err() error {
	select {
	case <-l.done:
		return l.err
	default:
		return nil
	}
}

// stop ends the goroutine's ctx and waits for it to return.
func (l *lifetime) stop() {
	l.cancel()
	<-l.done
}
