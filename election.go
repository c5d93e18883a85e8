package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/consul/api"
)

// lockFlagValue marks <kv>leader as a lock key, the same magic value api.Lock uses, so ours and the
// original's instances contend for one lock during a rolling upgrade.
const lockFlagValue = 0x2ddccbc058a50c18

// term is one leadership term: the time during which a session holds the leader key. campaign
// starts it.
//
// It owns one goroutine (and the key watch that goroutine runs), which follows the key from the
// moment campaign won it until the key is no longer held by the session, the session is no longer
// refreshed, the ctx given to campaign ends, or Close. Done's channel closes when that goroutine
// has returned: from then on this instance must not act as the leader. Close resigns (releases the
// key); the session itself stays the caller's.
type term struct {
	*lifetime // following the key: Done closes when leadership is lost, Err says why
	agent     *Agent
	sess      *session
	key       string
}

// campaign blocks until sess holds key, and returns the term that then begins. It fails when ctx
// ends, when sess stops being refreshed first ("leader session: ..."), or when Consul refuses an
// acquire outright. A failed campaign may still have won the key (the answer to a granted acquire
// lost): the caller releases it with releaseLock, or destroys the session.
func campaign(ctx context.Context, a *Agent, sess *session, key string) (*term, error) {
	actx, cancel := context.WithCancel(ctx)
	acquired := make(chan error, 1)
	go func() { acquired <- acquireLock(actx, a, sess.ID(), key) }()
	var err error
	select {
	case <-ctx.Done():
		err = ctx.Err()
	case <-sess.Done():
		err = fmt.Errorf("leader session: %w", sess.Err())
	case err = <-acquired:
		cancel()
		if err != nil {
			return nil, err
		}
		return startTerm(ctx, a, sess, key), nil
	}
	cancel()
	<-acquired
	return nil, err
}

func startTerm(ctx context.Context, a *Agent, sess *session, key string) *term {
	t := &term{agent: a, sess: sess, key: key}
	t.lifetime = startLifetime(ctx, func(ctx context.Context) error {
		return sess.run(ctx, func(ctx context.Context) error { return monitorLock(ctx, a, sess.ID(), key) })
	})
	return t
}

// Close stops following the key and resigns: the key is released (not left to the session's
// destruction, which would impose the lock delay on the next leader). With ctx already ended it
// only stops following the key and returns ctx's error.
func (t *term) Close(ctx context.Context) error {
	t.stop()
	if err := ctx.Err(); err != nil {
		return err
	}
	return releaseLock(ctx, t.agent, t.sess.ID(), t.key)
}

// releaseLock releases key if sess holds it; otherwise Consul changes nothing.
func releaseLock(ctx context.Context, a *Agent, sess, key string) error {
	_, _, err := a.client.KV().Release(&api.KVPair{Key: key, Flags: lockFlagValue, Session: sess}, a.writeOptions(ctx))
	return err
}

// acquireLock blocks until the session sess holds key or ctx ends.
func acquireLock(ctx context.Context, a *Agent, sess, key string) error {
	kv := a.client.KV()
	return blockingQuery(ctx, a, "", nil, func(q *api.QueryOptions) (uint64, error) {
		pair, meta, err := kv.Get(key, q)
		if err != nil {
			return 0, err
		}
		a.status.contact() // also for the rounds fetch ends, which blockingQuery does not count
		if pair != nil && pair.Session == sess {
			return 0, endQuery(nil)
		}
		if pair != nil && pair.Session != "" {
			return meta.LastIndex, nil
		}
		ok, _, err := kv.Acquire(&api.KVPair{Key: key, Flags: lockFlagValue, Session: sess}, a.writeOptions(ctx))
		if err != nil {
			return 0, endQuery(fmt.Errorf("acquiring %q: %w", key, err))
		}
		if ok {
			return 0, endQuery(nil)
		}
		// Refused while the lock-delay of a previous holder's session runs: poll until it ends.
		if !sleepCtx(ctx, lockRetryWait(a.config().LockDelay)) {
			return 0, endQuery(ctx.Err())
		}
		return 0, nil
	})
}

func lockRetryWait(lockDelay time.Duration) time.Duration {
	w := lockDelay / 8
	if w < 100*time.Millisecond {
		w = 100 * time.Millisecond
	}
	if w > 2*time.Second {
		w = 2 * time.Second
	}
	return w
}

// monitorLock returns when key no longer belongs to the session sess, or ctx ends. Errors are
// tolerated for half a session TTL: Consul cannot hand the lock to anyone else sooner than that.
func monitorLock(ctx context.Context, a *Agent, sess, key string) error {
	var failingSince time.Time
	grace := a.config().SessionTTL / 2
	retry := newBackoff(queryRetryMin, queryRetryMin)
	return blockingQuery(ctx, a, "", retry, func(q *api.QueryOptions) (uint64, error) {
		pair, meta, err := a.client.KV().Get(key, q)
		if err != nil {
			if ctx.Err() != nil {
				return 0, err // shutting down: not a failure to count against the grace
			}
			if failingSince.IsZero() {
				failingSince = time.Now()
			} else if time.Since(failingSince) > grace {
				a.status.failed(err)
				return 0, endQuery(fmt.Errorf("watching %q: %w", key, err))
			}
			return 0, err
		}
		failingSince = time.Time{}
		if pair == nil || pair.Session != sess {
			a.status.contact()
			return 0, endQuery(errors.New("lock key no longer held by our session"))
		}
		return meta.LastIndex, nil
	})
}
