package main

import (
	"context"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// needIPv6Loopback skips the test when this machine has no IPv6 loopback (containers often run
// with IPv6 disabled), saying why.
func needIPv6Loopback(t *testing.T) {
	t.Helper()
	ln, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback on this machine (listening on [::1]:0: %v)", err)
	}
	ln.Close()
}

// plainTarget serves HTTP/1.1 and cleartext HTTP/2 (h2c) on host (a loopback address) and returns
// its host:port; it answers HTTP, TCP and H2PING checks.
func plainTarget(t *testing.T, host string) string {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) })}
	srv.Protocols = new(http.Protocols)
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetUnencryptedHTTP2(true)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ln)
	}()
	t.Cleanup(func() {
		_ = srv.Close()
		<-done
	})
	return ln.Addr().String()
}

// ipv6Check is one check definition against a target on ::1 and the output it passes with.
type ipv6Check struct {
	id   string
	def  checkDefinition
	want string
	tls  bool // the run handshakes, so it records the certificate's expiry
}

// ipv6Checks starts one target per check kind on ::1 and returns a passing definition of every kind
// (TLS ones with TLSSkipVerify: the target's certificate is self-signed).
func ipv6Checks(t *testing.T, src *certSource) []ipv6Check {
	t.Helper()
	plain := plainTarget(t, "::1")
	secure := tlsTarget(t, "::1", src)
	grpcPlain := grpcHealthServerAt(t, "[::1]:0")
	grpcTLS := grpcHealthServerAt(t, "[::1]:0", grpc.Creds(credentials.NewTLS(src.serverConfig())))
	udp, _ := udpServerAt(t, "::1", false)
	if !strings.HasPrefix(plain, "[::1]:") {
		t.Fatalf("target address %q is not on ::1", plain)
	}
	return []ipv6Check{
		{"http", checkDefinition{HTTP: "http://" + plain + "/health"}, "HTTP GET http://" + plain + "/health: 200 OK Output: ok", false},
		{"https", checkDefinition{HTTP: "https://" + secure + "/health", TLSSkipVerify: true}, "HTTP GET https://" + secure + "/health: 200 OK Output: ok", true},
		{"tcp", checkDefinition{TCP: plain}, "TCP connect " + plain + ": Success", false},
		{"tcp-tls", checkDefinition{TCP: secure, TCPUseTLS: true, TLSSkipVerify: true}, "TCP+TLS connect " + secure + ": Success", true},
		{"udp", checkDefinition{UDP: udp}, "UDP connect " + udp + ": Success", false},
		{"grpc", checkDefinition{GRPC: grpcPlain + "/up"}, "gRPC check " + grpcPlain + "/up: success", false},
		{"grpc-tls", checkDefinition{GRPC: grpcTLS, GRPCUseTLS: true, TLSSkipVerify: true}, "gRPC check " + grpcTLS + ": success", true},
		{"h2ping", checkDefinition{H2PING: plain}, "HTTP2 ping was successful", false},
		{"h2ping-tls", checkDefinition{H2PING: secure, H2PingUseTLS: true, TLSSkipVerify: true}, "HTTP2 ping was successful", true},
	}
}

// Every check kind runs against targets on ::1, and fails cleanly against closed ports there.
func TestProbeIPv6(t *testing.T) {
	needIPv6Loopback(t)
	src, expiry := newCertSource(t, time.Now().Add(30*24*time.Hour))
	p := newProbeBuilder(nil)
	for _, c := range ipv6Checks(t, src) {
		t.Run(c.id, func(t *testing.T) {
			probe, err := p.newProbe(&c.def, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			var run probeRun
			status, out := probe(context.Background(), &run)
			gotExpiry := run.certExpiry
			if status != statusPassing || out != c.want {
				t.Fatalf("got (%s, %q), want passing %q", status, out, c.want)
			}
			if c.tls != gotExpiry.Equal(expiry) {
				t.Fatalf("certificate expiry %v, want %v (tls %v)", gotExpiry, expiry, c.tls)
			}
		})
	}
	closedTCP := closedTCPAddrAt(t, "::1")
	closedUDP := closedUDPAddrAt(t, "::1")
	for name, d := range map[string]checkDefinition{
		"tcp closed":  {TCP: closedTCP},
		"http closed": {HTTP: "http://" + closedTCP + "/"},
		"udp closed":  {UDP: closedUDP},
	} {
		t.Run(name, func(t *testing.T) {
			if status, out := runWith(t, p, &d, 2*time.Second); status != statusCritical || !strings.Contains(out, "connection refused") {
				t.Fatalf("got (%s, %q), want critical with connection refused", status, out)
			}
		})
	}
}

// TestAgentIPv6 runs the whole agent against external nodes at ::1: the leader assigns them, every
// check kind on ::1 turns passing in the catalog, and the nodes are probed, one by ICMPv6 (unless this
// machine allows no ICMP sockets) and one by a TCP connect to [::1]:port, passing with coordinates.
func TestAgentIPv6(t *testing.T) {
	t.Parallel()
	needIPv6Loopback(t)
	srv := newTestConsul(t)
	c := srv.Client
	cfg := testConfig(srv)
	probed := []string{"v6-tcp"}
	meta := map[string]string{"external-node": "true"}
	pingType, whyNot := icmpPingTypeAt("udp6", "ip6:ipv6-icmp", "::1")
	if pingType != "" {
		cfg.PingType = pingType
		meta["external-probe"] = "true"
		probed = append(probed, "v6-icmp")
	} else {
		t.Logf("v6-icmp is not pinged: %s", whyNot)
	}
	src, _ := newCertSource(t, time.Now().Add(30*24*time.Hour))
	checks := ipv6Checks(t, src)
	port, _ := tcpAcceptor(t, "::1")

	for _, ch := range checks {
		registerNodeCheck(t, c, "v6-icmp", "::1", meta, "v6-svc", catalogRegisterCheck{CheckID: ch.id, Name: ch.id,
			Status: statusCritical, Definition: withTiming(ch.def, time.Second, 2*time.Second)})
	}
	registerProbeNode(t, c, "v6-tcp", "::1", map[string]string{probePortMetaKey: strconv.Itoa(port)})
	startAgent(t, cfg)

	for _, ch := range checks {
		crWaitCheck(t, c, "v6-icmp", ch.id, 20*time.Second, func(got *catalogCheck) error {
			return crStatus(statusPassing, ch.want)(got)
		})
	}
	for _, node := range probed {
		waitNodeCheck(t, c, node, api.HealthPassing)
		waitCoordinate(t, c, node)
	}
	t.Logf("ping_type %q", pingType)
}

// withTiming sets a definition's interval and timeout.
func withTiming(d checkDefinition, interval, timeout time.Duration) checkDefinition {
	d.Interval, d.Timeout = durationField(interval), durationField(timeout)
	return d
}
