package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/consul/api"
)

// session is a Consul session this instance keeps alive: the leader lock's (leader.go) or, in
// agentless mode, the health session that keeps the instance's session check passing.
//
// It owns one goroutine, started by newSession, which renews the session every half TTL until
// Close, until the ctx given to newSession ends, or until renewing gives up: Consul no longer knows
// the session, or no renewal succeeded for a whole TTL (by then Consul may have invalidated it).
// Done's channel closes when that goroutine has returned; from then on nothing refreshes the
// session, so whatever it holds must be treated as lost. Destroying the session is the owner's
// decision, made with Close.
type session struct {
	*lifetime // the renewal: Done closes when it stopped, Err says why
	agent     *Agent
	id        string
}

// newSession creates the session entry describes and starts renewing it until ctx ends.
func newSession(ctx context.Context, a *Agent, entry *api.SessionEntry) (*session, error) {
	id, _, err := a.client.Session().Create(entry, a.writeOptions(ctx))
	if err != nil {
		return nil, err
	}
	s := &session{agent: a, id: id}
	ttl := a.config().SessionTTL
	s.lifetime = startLifetime(ctx, func(ctx context.Context) error { return s.renew(ctx, ttl) })
	return s, nil
}

// ID is the session's Consul ID, for the KV operations made under it.
func (s *session) ID() string { return s.id }

// run runs fn until it returns, or until the session is no longer refreshed: fn's ctx is then
// cancelled and, once fn has returned, the session's error is returned instead of fn's. Work that
// only makes sense while the session lives (following the lock it holds, heartbeating on its key)
// runs through it.
func (s *session) run(ctx context.Context, fn func(ctx context.Context) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- fn(ctx) }()
	select {
	case <-s.Done():
		cancel()
		<-done
		return s.Err()
	case err := <-done:
		return err
	}
}

// Close stops the renewal and destroys the session, which releases every key it holds. With ctx
// already ended it only stops the renewal and returns ctx's error: the session is then left to
// expire on its TTL, as a crashed process's would. Close may be called again to retry the destroy.
func (s *session) Close(ctx context.Context) error {
	s.stop()
	if err := ctx.Err(); err != nil {
		return err
	}
	_, err := s.agent.client.Session().Destroy(s.id, s.agent.writeOptions(ctx))
	return err
}

// renew renews the session every ttl/2 until ctx ends. It gives up once the session is gone or no
// renewal succeeded for a whole ttl, because by then Consul may have invalidated it.
func (s *session) renew(ctx context.Context, ttl time.Duration) error {
	a := s.agent
	lastOK := time.Now()
	for {
		if !sleepCtx(ctx, ttl/2) {
			return ctx.Err()
		}
		entry, _, err := a.client.Session().Renew(s.id, a.writeOptions(ctx))
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case err == nil && entry == nil:
			return errors.New("session was invalidated")
		case err == nil:
			lastOK = time.Now()
			a.status.contact()
		case time.Since(lastOK) >= ttl:
			return fmt.Errorf("renewing session: %w", err)
		default:
			a.status.failed(err)
		}
	}
}
