package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"
)

// devConsul is a `consul agent -dev` on 127.0.0.1, started fresh for each run so that every binary
// meets the same empty server.
type devConsul struct {
	proc     *process
	httpAddr string
	client   *api.Client // direct, not through the counting proxy
}

const consulNodeName = "bench-consul"

// startConsul starts a dev Consul with its HTTP, serf LAN and server ports on free loopback ports
// (DNS, gRPC, HTTPS and serf WAN off) and waits until it has a leader and has registered itself.
// A port taken between choosing and binding it makes Consul exit; then it tries again.
func startConsul(ctx context.Context, bin, dir string) (*devConsul, error) {
	var lastErr error
	for attempt := 1; attempt <= 3; attempt++ {
		c, err := tryStartConsul(ctx, bin, dir, attempt)
		if err == nil {
			return c, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		lastErr = err
	}
	return nil, lastErr
}

func tryStartConsul(ctx context.Context, bin, dir string, attempt int) (*devConsul, error) {
	ports, err := freeLoopbackPorts(3)
	if err != nil {
		return nil, err
	}
	// Blocking queries of the harness's node watchers and of consul-esm all come from 127.0.0.1; the
	// default of 200 connections per client address is far too low. Consul refuses a value above
	// its file descriptor limit.
	maxConns := 16000
	var rl syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl) == nil && rl.Max < 17000 {
		maxConns = int(rl.Max) / 2
	}
	conf := map[string]any{
		"node_name":            consulNodeName,
		"bind_addr":            "127.0.0.1",
		"client_addr":          "127.0.0.1",
		"advertise_addr":       "127.0.0.1",
		"log_level":            "warn",
		"disable_update_check": true,
		"ports": map[string]int{
			"http": ports[0], "serf_lan": ports[1], "server": ports[2],
			"dns": -1, "grpc": -1, "grpc_tls": -1, "https": -1, "serf_wan": -1,
		},
		"limits": map[string]any{"http_max_conns_per_client": maxConns},
	}
	data, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return nil, err
	}
	confPath := filepath.Join(dir, "consul.json")
	if err := os.WriteFile(confPath, data, 0o644); err != nil {
		return nil, fmt.Errorf("writing consul config: %w", err)
	}
	logPath := filepath.Join(dir, fmt.Sprintf("consul-%d.log", attempt))
	proc, err := startProcess("consul", logPath, bin, "agent", "-dev", "-config-file", confPath)
	if err != nil {
		return nil, err
	}
	c := &devConsul{proc: proc, httpAddr: fmt.Sprintf("127.0.0.1:%d", ports[0])}
	c.client, err = api.NewClient(&api.Config{Address: c.httpAddr, Transport: newTransport()})
	if err != nil {
		c.stop()
		return nil, fmt.Errorf("consul client: %w", err)
	}
	if err := c.waitReady(ctx, 60*time.Second); err != nil {
		c.stop()
		return nil, err
	}
	return c, nil
}

// waitReady waits for a raft leader and for the agent's own node in the catalog (consul-esm
// registers its service on this agent and needs it in sync).
func (c *devConsul) waitReady(ctx context.Context, timeout time.Duration) error {
	err := pollUntil(ctx, time.Now().Add(timeout), 100*time.Millisecond, func() (bool, error) {
		if c.proc.exited() {
			return false, c.proc.exitError()
		}
		leader, err := c.client.Status().Leader()
		if err != nil || leader == "" {
			return false, nil
		}
		node, _, err := c.client.Catalog().Node(consulNodeName, nil)
		return err == nil && node != nil, nil
	})
	if errors.Is(err, errTimeout) {
		return fmt.Errorf("consul at %s not ready after %s; last log lines:\n%s", c.httpAddr, timeout, c.proc.logTail(15))
	}
	return err
}

// stop shuts Consul down (SIGTERM, then SIGKILL after 10s).
func (c *devConsul) stop() error { return c.proc.stop(syscall.SIGTERM, 10*time.Second) }
