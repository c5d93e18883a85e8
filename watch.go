package main

import (
	"context"
	"errors"
	"time"

	"github.com/hashicorp/consul/api"
)

// Every watch of Consul state is one blockingQuery loop, so every one follows Consul's rules for
// blocking queries: a wait time on every request, the index reset when it goes backwards, never a
// wait on index 0, and a backoff after errors.

// queryRetryMin is the first wait after a failed blocking query; it doubles up to retry_interval.
const queryRetryMin = 250 * time.Millisecond

// queryEnd carries the outcome of a loop that fetch ended (see endQuery).
type queryEnd struct{ err error }

func (e *queryEnd) Error() string {
	if e.err == nil {
		return "blocking query ended"
	}
	return e.err.Error()
}

// endQuery is what fetch returns to end its blockingQuery loop: blockingQuery then returns err,
// which is nil when the loop saw what it was waiting for.
func endQuery(err error) error { return &queryEnd{err: err} }

// blockingQuery runs fetch as a Consul blocking query until ctx ends or fetch ends the loop with
// endQuery, and returns ctx's error or the one given to endQuery.
//
// Each round hands fetch query options carrying the index to wait on and query_wait_time; fetch
// returns the X-Consul-Index of the response (0 starts the loop over, as an index gone back does). Any
// other error from fetch is a failed query: it is reported on /health, logged once per failure
// streak under errMsg (and again when a query succeeds; "" leaves logging to fetch), and retried
// from index 0 after retry's next wait (nil: queryRetryMin doubling up to retry_interval).
func blockingQuery(ctx context.Context, a *Agent, errMsg string, retry *backoff, fetch func(q *api.QueryOptions) (uint64, error)) error {
	if retry == nil {
		retry = newBackoff(queryRetryMin, a.config().RetryInterval)
	}
	var idx uint64
	failing := false
	for ctx.Err() == nil {
		q := a.queryOptions(ctx)
		q.WaitIndex, q.WaitTime = idx, a.config().QueryWaitTime
		next, err := fetch(q)
		if err != nil {
			if end, ok := errors.AsType[*queryEnd](err); ok {
				return end.err
			}
			if ctx.Err() != nil {
				break
			}
			a.status.failed(err)
			if !failing && errMsg != "" {
				a.logger.Warn(errMsg, "error", err)
			}
			failing = true
			idx = 0
			sleepCtx(ctx, retry.next())
			continue
		}
		if failing && errMsg != "" {
			a.logger.Info("Consul query recovered", "query", errMsg)
		}
		failing = false
		retry.reset()
		a.status.contact()
		idx = nextWaitIndex(idx, next)
	}
	return ctx.Err()
}

// nextWaitIndex is the index the next blocking query waits on, after a query that waited on prev
// answered with got. An index that went backwards means Consul's state was replaced (a snapshot
// restore, a rebuilt cluster): waiting on the old index could block past every change, so the loop
// starts over from 0, which does not block. A zero index from a query that did not wait either is
// taken as 1, since waiting on 0 returns at once and the loop would spin.
func nextWaitIndex(prev, got uint64) uint64 {
	switch {
	case got < prev:
		return 0
	case got == 0:
		return 1
	}
	return got
}

// sendLatest replaces whatever is waiting in a one-slot channel, so consumers only see the newest value.
func sendLatest[T any](ch chan T, v T) {
	for {
		select {
		case ch <- v:
			return
		default:
			select {
			case <-ch:
			default:
			}
		}
	}
}
