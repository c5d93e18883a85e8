package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
)

// Names and texts of the self-registration are the original's, so dashboards and ACLs keep working.
const (
	ttlCheckName  = "Consul External Service Monitor Alive"
	ttlCheckNotes = "This check is periodically updated as long as the agent is alive."
)

func readTokenFile(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("reading token file %q: %w", path, err)
	}
	return strings.TrimSpace(string(b)), nil
}

func (a *Agent) writeOptions(ctx context.Context) *api.WriteOptions {
	wo := &api.WriteOptions{}
	if p := a.partition(); p != "" {
		wo.Partition = p
	}
	return wo.WithContext(ctx)
}

func (a *Agent) queryOptions(ctx context.Context) *api.QueryOptions {
	q := &api.QueryOptions{}
	if p := a.partition(); p != "" {
		q.Partition = p
	}
	return q.WithContext(ctx)
}

// partition is the configured admin partition, or "" for the default one (which requests omit).
func (a *Agent) partition() string {
	p := a.config().Partition
	if strings.EqualFold(p, "default") {
		return ""
	}
	return p
}

// register refuses to start while another live instance owns our service ID, and takes the ID over
// when its earlier registration is dead (TTL check critical or missing).
func (a *Agent) register(ctx context.Context) error {
	if a.config().EnableAgentless {
		return a.registerAgentless(ctx)
	}
	svc, _, err := a.client.Agent().Service(a.serviceID, a.queryOptions(ctx))
	if err == nil && svc != nil {
		alive, err := a.ttlCheckPassing(ctx)
		if err != nil {
			return fmt.Errorf("checking existing registration of %q: %w", a.serviceID, err)
		}
		if alive {
			return &alreadyExistsError{serviceID: a.serviceID}
		}
		a.logger.Warn("Taking over registration of a dead instance with the same service id", "service_id", a.serviceID)
	}
	if err := a.registerService(ctx); err != nil {
		return err
	}
	a.logger.Debug("Registered ESM service with Consul")
	return nil
}

func (a *Agent) ttlCheckPassing(ctx context.Context) (bool, error) {
	checks, err := a.client.Agent().ChecksWithFilterOpts(fmt.Sprintf("CheckID == %q", a.ttlCheckID), a.queryOptions(ctx))
	if err != nil {
		return false, err
	}
	c, ok := checks[a.ttlCheckID]
	return ok && c.Status == api.HealthPassing, nil
}

// registerService registers the service and its TTL check in one request, the check passing from the
// start so peers see this instance as healthy at once.
func (a *Agent) registerService(ctx context.Context) error {
	cfg := a.config()
	reg := &api.AgentServiceRegistration{
		ID:        a.serviceID,
		Name:      cfg.Service,
		Meta:      map[string]string{"external-source": "consul-esm"},
		Partition: a.partition(),
		Check: &api.AgentServiceCheck{
			CheckID:                        a.ttlCheckID,
			Name:                           ttlCheckName,
			Notes:                          ttlCheckNotes,
			TTL:                            cfg.AgentTTL.String(),
			Status:                         api.HealthPassing,
			DeregisterCriticalServiceAfter: cfg.DeregisterAfter.String(),
		},
	}
	if cfg.Tag != "" {
		reg.Tags = []string{cfg.Tag}
	}
	opts := api.ServiceRegisterOpts{}.WithContext(ctx)
	if err := a.client.Agent().ServiceRegisterOpts(reg, opts); err != nil {
		a.status.failed(err)
		return fmt.Errorf("registering service %q: %w", a.serviceID, err)
	}
	a.status.contact()
	return nil
}

// keepRegistered refreshes the TTL check and restores the registration when it was lost (agent
// restarted without its data, or an operator deregistered the service). A failed refresh is retried
// at the refresh pace, not backed off, and at once when any other call succeeds again: the TTL keeps
// running, and the first refresh after the agent is reachable must land before it expires, or the
// leader takes this instance's nodes away (and gives them back a moment later, each move restarting
// their checks). The failure streak is logged once.
func (a *Agent) keepRegistered(ctx context.Context) {
	if a.config().EnableAgentless {
		a.keepRegisteredAgentless(ctx)
		return
	}
	failing := false
	timer := time.NewTimer(a.config().TTLRefreshInterval)
	defer timer.Stop()
	var recovered chan struct{} // armed while failing
	for {
		early := false
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		case <-recovered:
			early = true
		}
		// A refresh hung on an unreachable agent must not hold back the next one.
		rctx, cancel := context.WithTimeout(ctx, a.config().AgentTTL/2)
		err := a.refreshRegistration(rctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		a.status.setTTLCurrent(err == nil)
		timer.Reset(a.config().TTLRefreshInterval)
		if err == nil {
			if failing {
				a.logger.Info("Agent TTL check refreshed again")
			}
			failing, recovered = false, nil
			continue
		}
		a.status.failed(err)
		if !failing {
			a.logger.Warn("Failed to refresh agent TTL check (will retry)", "error", err)
		}
		failing = true
		// An early retry that failed waits for the timer: in a partial outage other calls keep
		// succeeding, and each would otherwise trigger another attempt at once.
		recovered = nil
		if !early {
			recovered = a.status.recovered
		}
	}
}

// refreshRegistration passes the TTL check, re-registering the service when the agent no longer knows it.
func (a *Agent) refreshRegistration(ctx context.Context) error {
	err := a.client.Agent().UpdateTTLOpts(a.ttlCheckID, "", api.HealthPassing, a.queryOptions(ctx))
	if err == nil {
		a.status.contact()
		a.status.setRegistered(true)
		return nil
	}
	if !isNotFound(err) {
		return err
	}
	a.logger.Warn("Service registration was lost, reregistering")
	a.status.setRegistered(false)
	if err := a.registerService(ctx); err != nil {
		return fmt.Errorf("reregistering: %w", err)
	}
	a.status.setRegistered(true)
	return nil
}

// isNotFound reports a 404 from Consul, or the agent's "does not have associated TTL" answer for a
// check it no longer knows.
func isNotFound(err error) bool {
	var se api.StatusError
	if errors.As(err, &se) && se.Code == 404 {
		return true
	}
	return strings.Contains(err.Error(), "does not have associated TTL") || strings.Contains(err.Error(), "Unknown check")
}

// deregister removes the service (and with it the TTL check) within the shutdown budget.
func (a *Agent) deregister() {
	if a.config().EnableAgentless {
		a.deregisterAgentless()
		return
	}
	ctx := a.shutdownContext()
	opts := a.queryOptions(ctx)
	start := time.Now()
	if err := a.client.Agent().ServiceDeregisterOpts(a.serviceID, opts); err != nil {
		a.logger.Warn("Failed to deregister service", "error", err, "elapsed", time.Since(start))
		return
	}
	a.status.setRegistered(false)
}
