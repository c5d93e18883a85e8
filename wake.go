package main

// wake leaves a wake-up in a one-slot channel without blocking. The channel's receiver treats a
// wake-up as "look again", never as a count: several wakes before it looks collapse into one.
func wake(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}
