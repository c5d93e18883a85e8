package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/armon/go-metrics"
	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-uuid"
)

// AgentOptions carries what main (or a test) hands the agent besides the config.
type AgentOptions struct {
	// ConfigPaths are re-read on SIGHUP.
	ConfigPaths []string
	// Banner receives the startup banner; nil or log_json suppresses it.
	Banner io.Writer

	// crashOnStop makes Run return without releasing the lock or deregistering, as after SIGKILL;
	// tests use it to measure failover.
	crashOnStop bool
}

// Agent is one consul-esm instance: it registers itself with Consul, competes for leadership,
// follows its own assignment and runs the checks and probes of the nodes assigned to it.
// Every goroutine it starts is owned by Run and has returned when Run returns.
type Agent struct {
	logger hclog.Logger
	opts   AgentOptions

	cfgMu sync.RWMutex
	cfg   *Config

	client     *api.Client
	consulHTTP *http.Client // underneath client; Run closes its idle connections when it returns
	consulAddr string
	serviceID  string
	ttlCheckID string

	// enterprise is set when the local agent reports a "+ent" version: health queries then use the
	// wildcard namespace and writes carry each check's namespace.
	enterprise atomic.Bool

	runner    *CheckRunner
	monitor   *NodeMonitor
	status    *agentStatus
	beats     atomic.Uint64 // agentless heartbeats that Consul accepted (heartbeat.go)
	telemetry *telemetry

	shutdownOnce sync.Once
	shutdownCtx  context.Context
	shutdownStop context.CancelFunc
}

// alreadyExistsError is register's answer while a live-looking registration holds our service ID;
// startup waits for it to expire.
type alreadyExistsError struct{ serviceID string }

func (e *alreadyExistsError) Error() string {
	return fmt.Sprintf("ESM instance with service id '%s' is already registered with Consul", e.serviceID)
}

// takeoverPoll is how often startup looks again at a live-looking registration with our service ID.
const takeoverPoll = time.Second

// shutdownBudget bounds every Consul call made while shutting down, so the process exits promptly
// even when Consul is unreachable.
const shutdownBudget = 4 * time.Second

// NewAgent builds an agent from a validated config. It does not contact Consul.
func NewAgent(cfg *Config, logger hclog.Logger, opts AgentOptions) (*Agent, error) {
	if cfg.InstanceID == "" {
		id, err := uuid.GenerateUUID()
		if err != nil {
			return nil, fmt.Errorf("generating instance_id: %w", err)
		}
		cfg.InstanceID = id
	}
	client, httpClient, err := newConsulClientHTTP(cfg)
	if err != nil {
		return nil, err
	}
	a := &Agent{
		logger:     logger,
		opts:       opts,
		cfg:        cfg,
		client:     client,
		consulHTTP: httpClient,
		consulAddr: cfg.APIConfig().Address,
		serviceID:  cfg.Service + ":" + cfg.InstanceID,
		status:     newAgentStatus(),
	}
	a.ttlCheckID = a.serviceID + ":agent-ttl"
	tlsCfg, err := cfg.HTTPSTLSConfig()
	if err != nil {
		return nil, err
	}
	if a.telemetry, err = newTelemetry(cfg, logger); err != nil {
		return nil, err
	}
	a.runner = newCheckRunner(a, tlsCfg)
	a.monitor = newNodeMonitor(a)
	if err := a.telemetry.registerCheckCollector(a.runner); err != nil {
		a.telemetry.Close()
		return nil, fmt.Errorf("registering per-check metrics: %w", err)
	}
	return a, nil
}

// newConsulClientHTTP builds the API client and returns the HTTP client it uses. The ACL token
// travels as a client header rather than in the client config so SIGHUP can rotate it without
// rebuilding the client.
func newConsulClientHTTP(cfg *Config) (*api.Client, *http.Client, error) {
	token, err := resolveToken(cfg)
	if err != nil {
		return nil, nil, err
	}
	conf := cfg.APIConfig()
	conf.Token, conf.TokenFile = "", ""
	client, err := api.NewClient(conf) // sets conf.HttpClient to the client it uses
	if err != nil {
		return nil, nil, fmt.Errorf("creating Consul API client for %q: %w", conf.Address, err)
	}
	setClientToken(client, token)
	// The API client keeps this *http.Client, so wrapping its transport now covers every request.
	conf.HttpClient.Transport = &streamingTransport{base: conf.HttpClient.Transport}
	return client, conf.HttpClient, nil
}

func setClientToken(client *api.Client, token string) {
	h := http.Header{}
	if token != "" {
		h.Set("X-Consul-Token", token)
	}
	client.SetHeaders(h)
}

// config returns the current configuration; SIGHUP may swap it.
func (a *Agent) config() *Config {
	a.cfgMu.RLock()
	defer a.cfgMu.RUnlock()
	return a.cfg
}

func (a *Agent) kvPath() string { return a.config().KVPath }

// shutdownContext is the context for cleanup calls made after Run's context ended; all of them
// share one deadline.
func (a *Agent) shutdownContext() context.Context {
	a.shutdownOnce.Do(func() {
		a.shutdownCtx, a.shutdownStop = context.WithTimeout(context.Background(), shutdownBudget)
	})
	return a.shutdownCtx
}

// Run connects to Consul, registers this instance and runs until ctx is cancelled, then cleans up:
// leadership released, service deregistered. It returns an error only for fatal startup problems.
func (a *Agent) Run(ctx context.Context) error {
	defer a.telemetry.Close()
	// Every request has returned by then; idle keep-alive connections (and their two goroutines
	// each) would otherwise outlive Run until the transport's idle timeout.
	defer a.consulHTTP.CloseIdleConnections()
	a.logger.Info("Connecting to Consul", "address", a.consulAddr)
	metrics.SetGauge([]string{"esm", "agent", "isLeader"}, 0)

	// loopCtx lets a failed startup stop the loops already running; it ends with ctx otherwise.
	loopCtx, stopLoops := context.WithCancel(ctx)
	defer stopLoops()
	var wg sync.WaitGroup
	start := func(name string, f func(context.Context)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f(loopCtx)
			a.logger.Trace("loop stopped", "loop", name)
		}()
	}
	// The HTTP server starts first so /health answers (503) while the instance waits for Consul.
	start("http", a.runHTTP)

	if err := a.startup(ctx); err != nil || ctx.Err() != nil {
		stopLoops()
		wg.Wait()
		if err == nil && a.status.registered.Load() && !a.opts.crashOnStop {
			a.deregister()
		}
		return err
	}
	start("ttl", a.keepRegistered)
	start("leader", a.leaderLoop)
	start("assignment", a.watchAssignment)
	start("checks", a.runner.Run)
	start("probes", a.monitor.Run)

	<-ctx.Done()
	wg.Wait()
	if a.opts.crashOnStop {
		return nil
	}
	a.deregister()
	if a.shutdownStop != nil {
		a.shutdownStop()
	}
	return nil
}

// startup waits for a cluster leader, checks versions and registers. Problems Consul may resolve
// (no leader yet, ACL system not bootstrapped, a token not yet valid) are retried with backoff; an
// incompatible version or a live duplicate instance ID is fatal. A cancelled ctx returns nil.
func (a *Agent) startup(ctx context.Context) error {
	if err := a.waitForLeader(ctx); err != nil {
		return nil
	}
	b := newBackoff(500*time.Millisecond, a.config().RetryInterval)
	for {
		err := a.verifyConsulCompatibility(ctx)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return nil
		}
		if !isRetryable(err) {
			return err
		}
		a.status.failed(err)
		a.logger.Error("Unable to check Consul versions (will retry)", "error", err)
		sleepCtx(ctx, b.next())
	}
	a.printBanner()
	b.reset()
	waiting := false
	for {
		err := a.register(ctx)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return nil
		}
		var exists *alreadyExistsError
		if errors.As(err, &exists) {
			// Usually our own previous process, crashed moments ago: its TTL check passes until it
			// expires. Exiting would only make a supervisor restart us into the same answer until
			// it gives up, so wait for the registration to die and take it over.
			if !waiting {
				a.logger.Warn("Waiting for the registration with this service id to expire before taking it over",
					"error", err, "service_id", a.serviceID)
				waiting = true
			}
			sleepCtx(ctx, takeoverPoll)
			continue
		}
		if !isRetryable(err) {
			return err
		}
		a.logger.Error("Failed to register ESM service (will retry)", "error", err)
		sleepCtx(ctx, b.next())
	}
	a.status.setRegistered(true)
	return nil
}

// isRetryable tells transient Consul failures (transport errors, 5xx, 429, ACL denials an operator can
// fix with SIGHUP) from answers that will not change.
func isRetryable(err error) bool {
	var se api.StatusError
	if errors.As(err, &se) {
		return se.Code >= 500 || se.Code == 429 || se.Code == 403 || se.Code == 401
	}
	msg := err.Error()
	for _, permanent := range []string{"is incompatible", "unable to parse Consul version", "enable_agentless needs"} {
		if strings.Contains(msg, permanent) {
			return false
		}
	}
	return true
}

// waitForLeader blocks until the cluster has a leader, retrying with backoff.
func (a *Agent) waitForLeader(ctx context.Context) error {
	b := newBackoff(500*time.Millisecond, a.config().RetryInterval)
	for {
		leader, err := a.client.Status().LeaderWithQueryOptions((&api.QueryOptions{}).WithContext(ctx))
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case err != nil:
			a.logger.Error("error getting leader status, will retry", "time", b.next(), "error", err)
		case leader == "":
			a.logger.Info("waiting for cluster to elect a leader before starting, will retry", "time", b.next())
		default:
			a.status.contact()
			return nil
		}
		if !sleepCtx(ctx, b.current()) {
			return ctx.Err()
		}
	}
}

func (a *Agent) printBanner() {
	cfg := a.config()
	if a.opts.Banner == nil || cfg.LogJSON {
		return
	}
	dc := "(default)"
	if cfg.Datacenter != "" {
		dc = fmt.Sprintf("%q", cfg.Datacenter)
	}
	fmt.Fprintf(a.opts.Banner, `Consul ESM running!
            Datacenter: %s
             Partition: %q
               Service: %q
           Service Tag: %q
            Service ID: %q
Node Reconnect Timeout: %q
   Disable coordinates: %v
        Statsd address: %q
         Metrix prefix: %q

Log data will now stream in as it occurs:

`, dc, cfg.Partition, cfg.Service, cfg.Tag, a.serviceID, cfg.NodeReconnectTimeout.String(),
		cfg.DisableCoordinateUpdates, cfg.Telemetry.StatsdAddr, cfg.Telemetry.MetricsPrefix)
}

// Reload re-reads the config files (SIGHUP) and applies what can change at runtime.
func (a *Agent) Reload() {
	a.reloadConfig()
}
