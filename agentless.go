package main

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
)

// Agentless mode (enable_agentless): there is no local agent to register with, so the instance
// registers a catalog node of its own and keeps its liveness check passing with a Consul session:
// Consul servers >= 1.21 flip a `session`-type check to passing while the named session exists and to
// critical when it is destroyed or expires.

// agentlessMinServer is the first Consul release whose servers drive session-type checks.
const agentlessMinServer = ">= 1.21.0"

func (a *Agent) agentlessNode() string        { return a.serviceID + ":node" }
func (a *Agent) sessionCheckID() string       { return a.serviceID + ":session-check" }
func (a *Agent) healthSessionName() string    { return a.serviceID + healthSessionSuffix }
func (a *Agent) healthSessionKey() string     { return a.kvPath() + a.serviceID + healthSessionSuffix }
func (a *Agent) agentlessNodeAddress() string { return "esm-" + a.serviceID }

// registerAgentless refuses a service ID whose session check is still passing (a live instance),
// and otherwise registers node, service and session check.
func (a *Agent) registerAgentless(ctx context.Context) error {
	cfg := a.config()
	svcs, _, err := a.client.Catalog().Service(cfg.Service, "", a.queryOptions(ctx))
	if err != nil {
		return fmt.Errorf("looking up existing registrations of %q: %w", cfg.Service, err)
	}
	for _, s := range svcs {
		if s.ServiceID != a.serviceID {
			continue
		}
		status, err := a.sessionCheckStatus(ctx)
		if err != nil {
			return fmt.Errorf("checking existing registration of %q: %w", a.serviceID, err)
		}
		if status == api.HealthPassing {
			return &alreadyExistsError{serviceID: a.serviceID}
		}
		a.logger.Warn("Taking over registration of a dead instance with the same service id", "service_id", a.serviceID)
	}
	return a.registerCatalog(ctx)
}

// sessionCheckStatus returns the session check's status, or "" when it does not exist.
func (a *Agent) sessionCheckStatus(ctx context.Context) (string, error) {
	checks, _, err := a.client.Health().Node(a.agentlessNode(), a.queryOptions(ctx))
	if err != nil {
		return "", err
	}
	for _, c := range checks {
		if c.CheckID == a.sessionCheckID() {
			return c.Status, nil
		}
	}
	return "", nil
}

// registerCatalog writes node, service and (when missing) the session check. An existing check keeps
// its status: rewriting it as critical would invalidate the live health session.
func (a *Agent) registerCatalog(ctx context.Context) error {
	cfg := a.config()
	status, err := a.sessionCheckStatus(ctx)
	if err != nil {
		a.status.failed(err)
		return fmt.Errorf("reading session check of %q: %w", a.agentlessNode(), err)
	}
	svc := &api.AgentService{
		ID:        a.serviceID,
		Service:   cfg.Service,
		Meta:      map[string]string{"external-source": "consul-esm"},
		Partition: a.partition(),
	}
	if cfg.Tag != "" {
		svc.Tags = []string{cfg.Tag}
	}
	reg := &api.CatalogRegistration{
		Node:      a.agentlessNode(),
		Address:   a.agentlessNodeAddress(),
		Service:   svc,
		Partition: a.partition(),
	}
	if status == "" {
		reg.Check = &api.AgentCheck{
			Node:    a.agentlessNode(),
			CheckID: a.sessionCheckID(),
			Name:    ttlCheckName,
			Status:  api.HealthCritical,
			Type:    "session",
			Definition: api.HealthCheckDefinition{
				SessionName:                            a.healthSessionName(),
				DeregisterCriticalServiceAfterDuration: cfg.DeregisterAfter,
			},
			Partition: a.partition(),
		}
	}
	if _, err := a.client.Catalog().Register(reg, a.writeOptions(ctx)); err != nil {
		a.status.failed(err)
		return fmt.Errorf("registering service %q in the catalog: %w", a.serviceID, err)
	}
	a.status.contact()
	a.logger.Debug("Registered ESM service with Consul")
	return nil
}

// keepRegisteredAgentless holds the health session (which keeps the session check passing) and
// restores the catalog registration when it is lost.
func (a *Agent) keepRegisteredAgentless(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Add(2)
	go func() {
		defer wg.Done()
		a.holdHealthSession(ctx)
	}()
	go func() {
		defer wg.Done()
		a.watchHeartbeats(ctx)
	}()
	for sleepCtx(ctx, a.config().KeeperInterval) {
		svcs, _, err := a.client.Catalog().Service(a.config().Service, "", a.queryOptions(ctx))
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			a.status.failed(err)
			a.logger.Warn("Failed to check services (will retry)", "error", err)
			continue
		}
		a.status.contact()
		found := false
		for _, s := range svcs {
			found = found || (s.ServiceID == a.serviceID && s.Node == a.agentlessNode())
		}
		if found {
			a.status.setRegistered(true)
			continue
		}
		a.status.setRegistered(false)
		a.logger.Warn("Service registration was lost, re-registering")
		if err := a.registerCatalog(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			a.logger.Warn("Failed to reregister service (will retry)", "error", err)
			continue
		}
		a.status.setRegistered(true)
	}
}

// holdHealthSession keeps a session named <serviceID>:health-session alive, holding the lock key of
// the same name as the original does, until ctx ends; then destroys it so the check turns critical.
func (a *Agent) holdHealthSession(ctx context.Context) {
	b := newBackoff(time.Second, a.config().RetryInterval)
	for ctx.Err() == nil {
		a.logger.Info("Agent: Trying to obtain health check session...")
		sess, err := newSession(ctx, a, &api.SessionEntry{
			Name:       a.healthSessionName(),
			Node:       a.agentlessNode(),
			TTL:        a.config().SessionTTL.String(),
			Behavior:   api.SessionBehaviorRelease,
			NodeChecks: []string{a.sessionCheckID()},
			LockDelay:  time.Nanosecond, // no lock delay on our own per-instance key
		})
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			a.status.failed(err)
			a.logger.Error("Agent: Error trying to create session lock (will retry)", "error", err)
			sleepCtx(ctx, b.next())
			continue
		}
		// The value is a heartbeat count from the start (heartbeat.go), which marks the key as ours.
		ok, _, err := a.client.KV().Acquire(&api.KVPair{Key: a.healthSessionKey(), Flags: lockFlagValue, Session: sess.ID(),
			Value: strconv.AppendUint(nil, a.beats.Load(), 10)}, a.writeOptions(ctx))
		if err != nil || !ok {
			if ctx.Err() == nil {
				a.logger.Error("Agent: Error trying to get session lock (will retry)", "error", err)
			}
			a.destroySession(ctx, sess)
			sleepCtx(ctx, b.next())
			continue
		}
		a.logger.Info("Agent: Obtained lock")
		b.reset()
		// Heartbeat on the key until the heartbeat fails or the session is no longer refreshed.
		err = sess.run(ctx, func(ctx context.Context) error { return a.heartbeat(ctx, sess.ID()) })
		if ctx.Err() == nil {
			a.logger.Warn("Agent: Lost the lock", "error", err)
		}
		a.destroySession(ctx, sess)
	}
}

// destroySession releases what the session holds; during shutdown it uses the shutdown budget.
func (a *Agent) destroySession(ctx context.Context, sess *session) {
	cctx := ctx
	if ctx.Err() != nil {
		if a.opts.crashOnStop {
			_ = sess.Close(ctx) // ctx has ended: Close only stops the renewal, as a crash would
			return
		}
		cctx = a.shutdownContext()
	}
	if err := sess.Close(cctx); err != nil {
		a.logger.Debug("Destroying session failed", "session", sess.ID(), "error", err)
	}
}

// deregisterAgentless removes the fabricated node, which takes the service and the session check with
// it (the original left node and check behind on every restart).
func (a *Agent) deregisterAgentless() {
	ctx := a.shutdownContext()
	dereg := &api.CatalogDeregistration{Node: a.agentlessNode(), Partition: a.partition()}
	if _, err := a.client.Catalog().Deregister(dereg, a.writeOptions(ctx)); err != nil {
		a.logger.Warn("Failed to deregister service", "error", err)
		return
	}
	a.status.setRegistered(false)
}
