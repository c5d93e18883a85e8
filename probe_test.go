package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"
)

// Helpers shared by the probe tests (probe_*_test.go), and the tests of the probe builder itself.

// runProbe builds and runs one probe with a fresh probe builder.
func runProbe(t *testing.T, d *checkDefinition, timeout time.Duration) (string, string) {
	t.Helper()
	p := newProbeBuilder(nil)
	return runWith(t, p, d, timeout)
}

func runWith(t *testing.T, p *probeBuilder, d *checkDefinition, timeout time.Duration) (string, string) {
	t.Helper()
	probe, err := p.newProbe(d, timeout)
	if err != nil {
		t.Fatalf("newProbe: %v", err)
	}
	return probe(context.Background(), nil)
}

// closedTCPAddr returns a loopback address nothing listens on.
func closedTCPAddr(t *testing.T) string {
	t.Helper()
	return closedTCPAddrAt(t, "127.0.0.1")
}

// closedTCPAddrAt is a TCP host:port on host (a loopback address) nothing listens on.
func closedTCPAddrAt(t *testing.T, host string) string {
	t.Helper()
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

func closedUDPAddr(t *testing.T) string {
	t.Helper()
	return closedUDPAddrAt(t, "127.0.0.1")
}

// closedUDPAddrAt is a UDP host:port on host (a loopback address) nothing listens on.
func closedUDPAddrAt(t *testing.T, host string) string {
	t.Helper()
	c, err := net.ListenPacket("udp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	addr := c.LocalAddr().String()
	c.Close()
	return addr
}

func newHTTPServer(t *testing.T, h http.HandlerFunc) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv
}

// testCert borrows httptest's self-signed certificate (valid for 127.0.0.1 and example.com).
func testCert(t *testing.T) tls.Certificate {
	t.Helper()
	srv := httptest.NewUnstartedServer(nil)
	srv.StartTLS()
	cert := srv.TLS.Certificates[0]
	srv.Close()
	return cert
}

func TestProbeSetTLSReloadsExistingProbes(t *testing.T) {
	t.Parallel()
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	t.Cleanup(srv.Close)
	pool := x509.NewCertPool()
	pool.AddCert(srv.Certificate())

	p := newProbeBuilder(nil)
	probe, err := p.newProbe(&checkDefinition{HTTP: srv.URL}, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if status, _ := probe(context.Background(), nil); status != statusCritical {
		t.Fatalf("untrusted server: %q", status)
	}
	p.setTLS(&tls.Config{RootCAs: pool})
	if status, out := probe(context.Background(), nil); status != statusPassing {
		t.Fatalf("after setTLS: (%q, %q)", status, out)
	}

	// Reloads race with running probes only through the builder's lock.
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 5; j++ {
				probe(context.Background(), nil)
			}
		}()
	}
	for j := 0; j < 5; j++ {
		p.setTLS(&tls.Config{RootCAs: pool})
	}
	wg.Wait()
	if status, out := probe(context.Background(), nil); status != statusPassing {
		t.Fatalf("after concurrent reloads: (%q, %q)", status, out)
	}
}
