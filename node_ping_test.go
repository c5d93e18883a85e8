package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"golang.org/x/net/icmp"
)

// icmpPingType returns a ping_type that works on this machine, or skips the test saying why none
// does.
func icmpPingType(t *testing.T) string {
	t.Helper()
	pingType, whyNot := icmpPingTypeAt("udp4", "ip4:icmp", "127.0.0.1")
	if pingType == "" {
		t.Skip(whyNot)
	}
	return pingType
}

// icmpPingTypeAt finds the ping_type that works for one address family, given the unprivileged and
// raw ICMP networks to try on the loopback address addr; "" and the reason when neither does.
func icmpPingTypeAt(udpNet, rawNet, addr string) (pingType, whyNot string) {
	c, udpErr := icmp.ListenPacket(udpNet, addr)
	if udpErr == nil {
		c.Close()
		return "udp", ""
	}
	c, rawErr := icmp.ListenPacket(rawNet, addr)
	if rawErr == nil {
		c.Close()
		return "socket", ""
	}
	rng, _ := os.ReadFile("/proc/sys/net/ipv4/ping_group_range")
	return "", fmt.Sprintf("cannot send real ICMP pings here: unprivileged ICMP sockets are refused (net.ipv4.ping_group_range=%q does not cover gid %d: %v) "+
		"and raw ICMP sockets need root or CAP_NET_RAW (%v)", strings.Join(strings.Fields(string(rng)), " "), os.Getgid(), udpErr, rawErr)
}

// TestNodeProbeRealPing runs the whole agent with the real pinger: the leader assigns the probe
// node, the node monitor pings 127.0.0.1, marks it passing and writes its coordinate.
func TestNodeProbeRealPing(t *testing.T) {
	t.Parallel()
	pingType := icmpPingType(t)
	srv := newTestConsul(t)
	cfg := testConfig(srv)
	cfg.PingType = pingType
	ra := startAgent(t, cfg)
	registerExternalNode(t, srv.Client, "ext-real", true)

	waitNodeCheck(t, srv.Client, "ext-real", api.HealthPassing)
	waitCoordinate(t, srv.Client, "ext-real")
	if n, up := ra.monitor.Stats(); n != 1 || up != 1 {
		t.Fatalf("Stats() = %d nodes, %d reachable; want 1, 1", n, up)
	}
	logs := ra.logs.String()
	if !strings.Contains(logs, "[DEBUG] consul-esm.probes: Updated coordinates") {
		t.Fatalf("no DEBUG 'Updated coordinates' line in:\n%s", logs)
	}
	if strings.Contains(logs, "[INFO]  consul-esm.probes: Updated coordinates") {
		t.Fatal("'Updated coordinates' logged at INFO (original issue #214)")
	}
	for _, want := range []string{"Now running probes for external nodes: count=1", "Fetched nodes from catalog: count=1"} {
		if !strings.Contains(logs, want) {
			t.Errorf("log lacks %q", want)
		}
	}
	t.Logf("ping_type %q", pingType)
}

// TestNodeProbePermissionError checks the not-permitted path of the real pinger: one clear error
// naming the sysctl, logged once, and no node marked critical for our own misconfiguration.
func TestNodeProbePermissionError(t *testing.T) {
	t.Parallel()
	if c, err := icmp.ListenPacket("udp4", "127.0.0.1"); err == nil {
		c.Close()
		rng, _ := os.ReadFile("/proc/sys/net/ipv4/ping_group_range")
		t.Skipf("unprivileged ICMP is permitted here (net.ipv4.ping_group_range=%q covers gid %d), so the not-permitted path cannot be exercised",
			strings.Join(strings.Fields(string(rng)), " "), os.Getgid())
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, err := icmpPinger{}.Ping(ctx, "127.0.0.1")
	var perm *pingPermissionError
	if !errors.As(err, &perm) {
		t.Fatalf("Ping error = %v, want a pingPermissionError", err)
	}
	for _, want := range []string{"net.ipv4.ping_group_range", `sudo sysctl -w net.ipv4.ping_group_range="0 2147483647"`, `ping_type "socket"`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}

	srv := newTestConsul(t)
	cfg := probeTestConfig(srv)
	cfg.PingType = "udp"
	registerProbeNode(t, srv.Client, "perm-1", "127.0.0.1", nil)
	registerProbeNode(t, srv.Client, "perm-2", "127.0.0.1", nil)
	r := startMonitor(t, cfg, nil)
	r.nm.SetNodes([]string{"perm-1", "perm-2"})
	// Several rounds of pings, each refused.
	waitFor(t, 10*time.Second, func() error {
		if n := strings.Count(r.logs.String(), "ICMP ping is not permitted"); n != 1 {
			return fmt.Errorf("%d 'not permitted' lines", n)
		}
		return nil
	})
	start := time.Now()
	waitFor(t, 5*time.Second, func() error {
		if time.Since(start) < 5*cfg.NodeProbeInterval {
			return errNotYet
		}
		return nil
	})
	logs := r.logs.String()
	if n := strings.Count(logs, "ICMP ping is not permitted"); n != 1 {
		t.Fatalf("'not permitted' logged %d times, want once:\n%s", n, logs)
	}
	if strings.Contains(logs, "could not ping node") {
		t.Fatal("a local permission problem was reported as an unreachable node")
	}
	for _, n := range []string{"perm-1", "perm-2"} {
		if hc, err := nodeHealthCheck(srv.Client, n); err != nil || hc != nil {
			t.Fatalf("%s: check %+v (err %v) written although no ping could be sent", n, hc, err)
		}
	}
}

// tcpAcceptor listens on host (a loopback address) and closes every connection it accepts, as a
// service that is up but says nothing. stop closes the listener (idempotent; also at cleanup).
func tcpAcceptor(t *testing.T, host string) (port int, stop func()) {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.Close()
		}
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			_ = ln.Close()
			<-done
		})
	}
	t.Cleanup(stop)
	return ln.Addr().(*net.TCPAddr).Port, stop
}

// closedTCPPort is a loopback port nothing listens on.
func closedTCPPort(t *testing.T) string {
	t.Helper()
	_, port, err := net.SplitHostPort(closedTCPAddr(t))
	if err != nil {
		t.Fatal(err)
	}
	return port
}

func TestNodeProbeTarget(t *testing.T) {
	icmpFake, tcpFake := newFakePinger(), newFakePinger()
	nm := &NodeMonitor{pinger: icmpFake, tcpPinger: tcpFake}
	cases := []struct {
		name       string
		rec        nodeRecord
		globalPort int
		wantTCP    bool
		wantAddr   string
	}{
		{"icmp by default", nodeRecord{Address: "192.0.2.1"}, 0, false, "192.0.2.1"},
		{"meta port", nodeRecord{Address: "192.0.2.1", ProbePort: 443}, 0, true, "192.0.2.1:443"},
		{"global port", nodeRecord{Address: "192.0.2.1"}, 22, true, "192.0.2.1:22"},
		{"meta wins over global", nodeRecord{Address: "192.0.2.1", ProbePort: 443}, 22, true, "192.0.2.1:443"},
		{"ipv6 icmp", nodeRecord{Address: "2001:db8::1"}, 0, false, "2001:db8::1"},
		{"ipv6 tcp", nodeRecord{Address: "2001:db8::1", ProbePort: 443}, 0, true, "[2001:db8::1]:443"},
		{"host name", nodeRecord{Address: "billing.example.com"}, 8443, true, "billing.example.com:8443"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pg, addr, icmp := nm.probeTarget(&Config{NodeProbePort: tc.globalPort}, tc.rec)
			isTCP := pg == pinger(tcpFake)
			if isTCP != tc.wantTCP || icmp == tc.wantTCP || addr != tc.wantAddr {
				t.Fatalf("got (tcp=%v, icmp=%v, %q), want tcp=%v %q", isTCP, icmp, addr, tc.wantTCP, tc.wantAddr)
			}
		})
	}
}

func TestNodeProbeRecordPort(t *testing.T) {
	for _, tc := range []struct {
		meta     string
		wantPort int
		wantBad  string
	}{
		{"443", 443, ""},
		{"65535", 65535, ""},
		{"0", 0, "0"},
		{"65536", 0, "65536"},
		{"https", 0, "https"},
		{"", 0, ""},
	} {
		meta := map[string]string{}
		if tc.meta != "" {
			meta[probePortMetaKey] = tc.meta
		}
		rec := recordOf(&api.Node{Node: "n", Address: "192.0.2.1", Meta: meta})
		if rec.ProbePort != tc.wantPort || rec.BadProbePort != tc.wantBad {
			t.Errorf("meta %q: port %d bad %q, want %d %q", tc.meta, rec.ProbePort, rec.BadProbePort, tc.wantPort, tc.wantBad)
		}
	}
}

// TestNodeProbeTCP: nodes with external-probe-port are probed by a TCP connect (passing with a
// coordinate while the port accepts, critical with a failure marker once it does not, reaped after
// node_reconnect_timeout), nodes without it keep ICMP, and a meta value that is no port gets the node
// an error line and no probe at all.
func TestNodeProbeTCP(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	c := srv.Client
	cfg := probeTestConfig(srv)
	cfg.NodeReconnectTimeout = 5 * time.Second
	upPort, stopUp := tcpAcceptor(t, "127.0.0.1")
	registerProbeNode(t, c, "tcp-up", "127.0.0.1", map[string]string{probePortMetaKey: strconv.Itoa(upPort)})
	registerProbeNode(t, c, "tcp-closed", "127.0.0.1", map[string]string{probePortMetaKey: closedTCPPort(t)})
	registerProbeNode(t, c, "tcp-bad", "127.0.0.1", map[string]string{probePortMetaKey: "https"})
	registerProbeNode(t, c, "icmp-node", "127.0.0.4", nil)
	fp := newFakePinger() // ICMP: every address answers
	r := startMonitor(t, cfg, fp)
	r.nm.SetNodes([]string{"tcp-up", "tcp-closed", "tcp-bad", "icmp-node"})

	// First the node that gets reaped, while it still exists: the coordinate below can take seconds.
	waitNodeCheck(t, c, "tcp-closed", api.HealthCritical)
	if _, _, ok := readMarker(t, c, cfg, "tcp-closed"); !ok {
		t.Fatal("no failure marker for tcp-closed")
	}
	waitNodeCheck(t, c, "tcp-up", api.HealthPassing)
	waitCoordinate(t, c, "tcp-up")
	waitNodeCheck(t, c, "icmp-node", api.HealthPassing)
	if n := fp.callCount("127.0.0.1"); n != 0 {
		t.Fatalf("%d ICMP pings to the TCP-probed nodes' address", n)
	}
	if fp.callCount("127.0.0.4") == 0 {
		t.Fatal("the node without external-probe-port was not pinged")
	}
	waitFor(t, 10*time.Second, func() error {
		if nodeExists(t, c, "tcp-closed") {
			return errors.New("tcp-closed not reaped yet")
		}
		return nil
	})
	logs := r.logs.String()
	for _, want := range []string{
		`could not ping node: node=tcp-closed error="TCP connect to \"127.0.0.1:`,
		"connect: connection refused",
		"reaping node has been failed for too long: node=tcp-closed",
		"Not probing node: invalid node meta external-probe-port, want a port between 1 and 65535: node=tcp-bad value=https",
	} {
		if !strings.Contains(logs, want) {
			t.Errorf("log lacks %q", want)
		}
	}
	if n := strings.Count(logs, "node=tcp-bad value=https"); n != 1 {
		t.Errorf("invalid meta logged %d times, want once", n)
	}
	if hc, err := nodeHealthCheck(c, "tcp-bad"); err != nil || hc != nil {
		t.Fatalf("tcp-bad has check %+v (err %v); a node with an invalid port must not be probed", hc, err)
	}

	// The service behind the port goes away while the host still answers ICMP: TCP liveness says so.
	stopUp()
	waitNodeCheck(t, c, "tcp-up", api.HealthCritical)
}

// TestNodeProbeTCPGlobalPort: node_probe_port probes every node without the meta by TCP, and a
// reload back to 0 returns them to ICMP.
func TestNodeProbeTCPGlobalPort(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	c := srv.Client
	port, _ := tcpAcceptor(t, "127.0.0.1")
	cfg := probeTestConfig(srv)
	cfg.NodeProbePort = port
	registerProbeNode(t, c, "global-tcp", "127.0.0.1", nil)
	fp := newFakePinger()
	fp.set("127.0.0.1", func(context.Context, int) (time.Duration, error) { return 0, pingDown("127.0.0.1") })
	r := startMonitor(t, cfg, fp)
	r.nm.SetNodes([]string{"global-tcp"})

	waitNodeCheck(t, c, "global-tcp", api.HealthPassing)
	waitCoordinate(t, c, "global-tcp")
	if n := fp.callCount("127.0.0.1"); n != 0 {
		t.Fatalf("%d ICMP pings with node_probe_port set", n)
	}

	loaded := *r.a.config()
	loaded.NodeProbePort = 0
	plan, err := planReload(r.a.config(), &loaded)
	if err != nil {
		t.Fatal(err)
	}
	r.a.applyReload(plan)
	if !slices.Contains(plan.changed, "node_probe_port") {
		t.Fatalf("reload did not see node_probe_port change: %v", plan.changed)
	}
	waitNodeCheck(t, c, "global-tcp", api.HealthCritical) // ICMP, which the fake pinger fails
	if fp.callCount("127.0.0.1") == 0 {
		t.Fatal("no ICMP ping after node_probe_port was reloaded to 0")
	}
}
