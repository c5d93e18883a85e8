package main

// node_ping.go owns what a single ping of a node does: the choice between an ICMP echo (pro-bing)
// and a TCP connect, both pingers, and the error that names a broken ICMP permission setup.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	probing "github.com/prometheus-community/pro-bing"
)

// probePortMetaKey names a TCP port in a probe node's meta: the node is then probed by a TCP
// connect to that port instead of an ICMP echo, for networks that drop ICMP (upstream issue
// #111). It wins over node_probe_port.
const probePortMetaKey = "external-probe-port"

// pinger sends one liveness probe (an ICMP echo or a TCP connect) to addr and returns the
// round-trip time. ctx carries the timeout. The monitor's defaults are icmpPinger and tcpPinger;
// tests set NodeMonitor.pinger or tcpPinger before Run to inject failures.
type pinger interface {
	Ping(ctx context.Context, addr string) (time.Duration, error)
}

// probeTarget picks how a node is probed: a TCP connect when its meta or node_probe_port names a
// port, an ICMP echo otherwise. Either way the outcome means the same (externalNodeHealth, failure
// markers, reaping) and the round trip moves the node's coordinate.
func (nm *NodeMonitor) probeTarget(cfg *Config, rec nodeRecord) (pg pinger, addr string, icmp bool) {
	port := rec.ProbePort
	if port == 0 {
		port = cfg.NodeProbePort
	}
	if port == 0 {
		return nm.pinger, rec.Address, true
	}
	return nm.tcpPinger, net.JoinHostPort(rec.Address, strconv.Itoa(port)), false
}

// icmpPinger pings with pro-bing. privileged is read per ping, so a reload that changes ping_type
// applies to the next ping.
type icmpPinger struct {
	privileged func() bool
}

// defaultPingTimeout applies when the caller's context has no deadline.
const defaultPingTimeout = 5 * time.Second

func (ip icmpPinger) Ping(ctx context.Context, addr string) (time.Duration, error) {
	timeout := defaultPingTimeout
	if d, ok := ctx.Deadline(); ok {
		timeout = time.Until(d)
	}
	if timeout <= 0 {
		return 0, fmt.Errorf("ping to %q timed out", addr)
	}
	privileged := ip.privileged != nil && ip.privileged()
	pg := probing.New(addr)
	pg.Count = 1
	pg.Timeout = timeout
	pg.ResolveTimeout = timeout
	pg.RecordRtts, pg.RecordTTLs = false, false
	pg.SetLogger(probing.NoopLogger{})
	pg.SetPrivileged(privileged)
	// OnSetup runs once the socket is open: an error before it is about opening the socket (our
	// permissions), an error after it is about reaching the node (e.g. a firewall's EPERM on send).
	opened := false
	pg.OnSetup = func() { opened = true }

	err := pg.RunWithContext(ctx)
	switch {
	case err != nil && !opened && errors.Is(err, os.ErrPermission):
		return 0, &pingPermissionError{privileged: privileged, err: err}
	case errors.Is(err, context.DeadlineExceeded):
		return 0, fmt.Errorf("ping to %q timed out", addr)
	case err != nil:
		return 0, fmt.Errorf("pinging %q: %w", addr, err)
	}
	stats := pg.Statistics()
	if stats.PacketsRecv == 0 {
		return 0, fmt.Errorf("ping to %q timed out", addr)
	}
	return stats.MaxRtt, nil
}

// tcpPinger probes a node with a TCP connect, for networks that drop ICMP. The round trip is the
// time the connect takes (SYN to SYN-ACK), which is one network round trip like an ICMP echo. Only a
// completed connect counts as alive: a refused connection may come from a firewall or load balancer
// in front of the node as easily as from the node, so the port must be one the node listens on.
type tcpPinger struct {
	dial dialFunc
}

func (tp tcpPinger) Ping(ctx context.Context, addr string) (time.Duration, error) {
	start := time.Now()
	conn, err := tp.dial(ctx, "tcp", addr)
	if err != nil {
		if ctx.Err() != nil {
			return 0, fmt.Errorf("TCP connect to %q timed out", addr)
		}
		return 0, fmt.Errorf("TCP connect to %q: %w", addr, err)
	}
	rtt := time.Since(start)
	_ = conn.Close()
	return rtt, nil
}

// pingPermissionError means this process may not open the ICMP socket ping_type asks for. It says
// what to change, because the kernel's "permission denied" alone sends people searching (original
// issue #24).
type pingPermissionError struct {
	privileged bool
	err        error
}

func (e *pingPermissionError) Error() string {
	if e.privileged {
		return fmt.Sprintf(`ping_type "socket" sends raw ICMP, which needs root or the CAP_NET_RAW capability; `+
			`grant it (e.g. setcap cap_net_raw+ep on the binary) or use ping_type "udp" with the sysctl `+
			`net.ipv4.ping_group_range covering this process's group (sudo sysctl -w net.ipv4.ping_group_range="0 2147483647"): %v`, e.err)
	}
	current := "unknown"
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ping_group_range"); err == nil {
		current = strings.Join(strings.Fields(string(b)), " ")
	}
	return fmt.Sprintf(`ping_type "udp" needs unprivileged ICMP sockets, which the kernel allows only to the groups `+
		`in the sysctl net.ipv4.ping_group_range (now %q; this process's group is %d); allow them with `+
		`sudo sysctl -w net.ipv4.ping_group_range="0 2147483647" (or use ping_type "socket" as root or with CAP_NET_RAW): %v`,
		current, os.Getgid(), e.err)
}

func (e *pingPermissionError) Unwrap() error { return e.err }
