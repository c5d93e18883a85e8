package main

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/hashicorp/consul/api"
	version "github.com/hashicorp/go-version"
)

// minConsulVersion is the oldest Consul the check writes (txn CAS on checks) work with.
const minConsulVersion = ">= 1.4.1"

const incompatibleTemplate = `Consul ESM version %s is incompatible with the running versions of the local Consul agent or Consul servers (%s), please refer to the documentation to safely upgrade Consul or change to a version of ESM that is compatible.

https://www.consul.io/docs/upgrading.html`

// verifyConsulCompatibility checks the local agent's and every server's version against
// minConsulVersion once at startup. Rate limiting (429) on the server lookup is retried.
func (a *Agent) verifyConsulCompatibility(ctx context.Context) error {
	self, err := a.client.Agent().Self()
	if err != nil {
		return fmt.Errorf("unable to check version compatibility with Consul agent: %w", err)
	}
	agentVer, ok := self["Config"]["Version"].(string)
	if !ok || agentVer == "" {
		return errors.New("unable to check version compatibility with Consul agent")
	}
	versions := []string{agentVer}
	a.enterprise.Store(strings.Contains(agentVer, "+ent"))
	if a.enterprise.Load() {
		a.logger.Debug("Consul Enterprise detected, using wildcard namespace for health checks")
	} else {
		a.logger.Debug("Consul CE detected, using default namespace for health checks")
	}

	b := newBackoff(a.config().RetryInterval/4, a.config().RetryInterval)
	var servers []*api.CatalogService
	for {
		servers, _, err = a.client.Catalog().Service("consul", "", (&api.QueryOptions{}).WithContext(ctx))
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if !strings.Contains(err.Error(), "429") {
			return fmt.Errorf("unable to check version compatibility with Consul servers: %w", err)
		}
		a.logger.Warn("Failed to query for Consul server versions (will retry)", "error", err)
		if !sleepCtx(ctx, b.next()) {
			return ctx.Err()
		}
	}
	found := false
	for _, s := range servers {
		if v := s.ServiceMeta["version"]; v != "" {
			versions = append(versions, v)
			found = true
		}
	}
	if !found {
		a.logger.Warn("unable to determine Consul server version, check for compatibility; requires " + minConsulVersion)
	}
	if err := checkConsulVersions(versions); err != nil {
		a.logger.Error("Incompatible Consul versions")
		return err
	}
	if a.config().EnableAgentless {
		if err := checkAgentlessVersions(versions[1:]); err != nil {
			return err
		}
	}
	a.logger.Debug("Consul agent and all servers are running compatible versions with ESM")
	return nil
}

// checkConsulVersions returns an error naming every version when any is older than the floor or
// cannot be parsed. Prerelease suffixes are dropped; "+ent" build metadata is accepted.
func checkConsulVersions(versions []string) error {
	if len(versions) == 0 {
		return errors.New("no Consul versions")
	}
	ok, err := versionsSatisfy(versions, minConsulVersion)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf(incompatibleTemplate, Version, strings.Join(versions, ", "))
	}
	return nil
}

// checkAgentlessVersions requires servers that drive session-type checks; without them an agentless
// instance's own check would stay critical and no peer would ever assign it work.
func checkAgentlessVersions(servers []string) error {
	ok, err := versionsSatisfy(servers, agentlessMinServer)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("enable_agentless needs Consul servers %s (session checks); found %s", agentlessMinServer, strings.Join(servers, ", "))
	}
	return nil
}

// versionsSatisfy reports whether every version meets the constraint, ignoring prerelease suffixes.
func versionsSatisfy(versions []string, constraint string) (bool, error) {
	c := version.MustConstraints(version.NewConstraint(constraint))
	for _, raw := range versions {
		s := raw
		if i := strings.IndexByte(s, '-'); i >= 0 {
			s = s[:i]
		}
		v, err := version.NewVersion(s)
		if err != nil {
			return false, fmt.Errorf("unable to parse Consul version %q: %w", raw, err)
		}
		if !c.Check(v) {
			return false, nil
		}
	}
	return true, nil
}
