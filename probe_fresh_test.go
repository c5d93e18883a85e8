package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	hv1 "google.golang.org/grpc/health/grpc_health_v1"
)

// These tests hold the probes to Consul's semantics: every run is a new client. It resolves the name,
// dials, handshakes and closes, so what it reports is what a client connecting now would get.

// probeKinds are the connection-oriented probe kinds, as "kind" or "kind+tls".
var probeKinds = []string{"http", "https", "tcp", "tcp+tls", "grpc", "grpc+tls", "h2ping", "h2ping+tls"}

// kindDefinition is a definition of kind probing addr.
func kindDefinition(kind, addr string) checkDefinition {
	switch kind {
	case "http":
		return checkDefinition{HTTP: "http://" + addr + "/health"}
	case "https":
		return checkDefinition{HTTP: "https://" + addr + "/health"}
	case "tcp", "tcp+tls":
		return checkDefinition{TCP: addr, TCPUseTLS: kind == "tcp+tls"}
	case "grpc", "grpc+tls":
		return checkDefinition{GRPC: addr, GRPCUseTLS: kind == "grpc+tls"}
	case "h2ping", "h2ping+tls":
		return checkDefinition{H2PING: addr, H2PingUseTLS: kind == "h2ping+tls"}
	case "udp":
		return checkDefinition{UDP: addr}
	}
	panic("unknown kind " + kind)
}

// testPKI is a CA and leaf certificates it signed for 127.0.0.1 and svc.esm.test.
type testPKI struct {
	pool           *x509.CertPool
	valid, expired tls.Certificate
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "esm test CA"},
		NotBefore: now.Add(-24 * time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	leaf := func(serial int64, notBefore, notAfter time.Time) tls.Certificate {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "svc.esm.test"},
			NotBefore: notBefore, NotAfter: notAfter,
			DNSNames: []string{"svc.esm.test"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return &testPKI{
		pool:    pool,
		valid:   leaf(2, now.Add(-time.Hour), now.Add(time.Hour)),
		expired: leaf(3, now.Add(-2*time.Hour), now.Add(-time.Hour)),
	}
}

// kindServer serves one probe kind on a loopback listener. Closing the listener stops new
// connections while the ones already accepted stay served: a draining process, a stuck accept loop.
// cert is the certificate TLS kinds present, swappable between runs.
type kindServer struct {
	addr    string
	ln      net.Listener
	accepts atomic.Int32
	cert    atomic.Pointer[tls.Certificate]
}

// countingListener counts accepted connections.
type countingListener struct {
	net.Listener
	n *atomic.Int32
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

func startKindServer(t *testing.T, kind string, cert tls.Certificate) *kindServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &kindServer{addr: ln.Addr().String(), ln: ln}
	s.cert.Store(&cert)
	l := net.Listener(countingListener{ln, &s.accepts})
	tlsCfg := &tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return s.cert.Load(), nil }}
	ok := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok")) })
	var wg sync.WaitGroup
	var stop func()
	switch kind {
	case "http", "https", "h2ping", "h2ping+tls":
		srv := &http.Server{Handler: ok, Protocols: new(http.Protocols)}
		srv.Protocols.SetHTTP1(true)
		if strings.HasSuffix(kind, "s") || strings.HasSuffix(kind, "+tls") {
			srv.Protocols.SetHTTP2(true)
			l = tls.NewListener(l, withNextProtos(tlsCfg, "h2", "http/1.1"))
		} else {
			srv.Protocols.SetUnencryptedHTTP2(true)
		}
		wg.Add(1)
		go func() { defer wg.Done(); _ = srv.Serve(l) }()
		stop = func() { _ = srv.Close() }
	case "grpc", "grpc+tls":
		var opts []grpc.ServerOption
		if kind == "grpc+tls" {
			opts = append(opts, grpc.Creds(credentials.NewTLS(tlsCfg)))
		}
		gs := grpc.NewServer(opts...)
		hv1.RegisterHealthServer(gs, health.NewServer())
		wg.Add(1)
		go func() { defer wg.Done(); _ = gs.Serve(l) }()
		stop = gs.Stop
	case "tcp", "tcp+tls":
		if kind == "tcp+tls" {
			l = tls.NewListener(l, tlsCfg)
		}
		var mu sync.Mutex
		var conns []net.Conn
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				if tc, ok := c.(*tls.Conn); ok {
					_ = tc.Handshake()
				}
				mu.Lock()
				conns = append(conns, c)
				mu.Unlock()
			}
		}()
		stop = func() {
			mu.Lock()
			defer mu.Unlock()
			for _, c := range conns {
				c.Close()
			}
		}
	default:
		t.Fatalf("unknown kind %q", kind)
	}
	t.Cleanup(func() { ln.Close(); stop(); wg.Wait() })
	return s
}

func withNextProtos(cfg *tls.Config, protos ...string) *tls.Config {
	c := cfg.Clone()
	c.NextProtos = protos
	return c
}

// TestProbeSeesClosedListener: a target that stops accepting connections (its listener closed, the
// connections it accepted still served) is critical on the next run, and every run opened its own
// connection.
func TestProbeSeesClosedListener(t *testing.T) {
	t.Parallel()
	pki := newTestPKI(t)
	for _, kind := range probeKinds {
		t.Run(kind, func(t *testing.T) {
			srv := startKindServer(t, kind, pki.valid)
			p := newProbeBuilder(&tls.Config{RootCAs: pki.pool})
			d := kindDefinition(kind, srv.addr)
			probe, err := p.newProbe(&d, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			for i := 1; i <= 3; i++ {
				if status, out := probe(context.Background(), nil); status != statusPassing {
					t.Fatalf("run %d: (%q, %q)", i, status, out)
				}
				// A TCP connect completes in the kernel before the server's Accept returns.
				waitFor(t, 2*time.Second, func() error {
					if n := srv.accepts.Load(); n != int32(i) {
						return fmt.Errorf("after %d runs the target accepted %d connections: each run must open its own", i, n)
					}
					return nil
				})
			}
			srv.ln.Close()
			status, out := probe(context.Background(), nil)
			if status != statusCritical || !strings.Contains(out, "refused") {
				t.Fatalf("run after the listener closed: (%q, %q), want critical, connection refused", status, out)
			}
		})
	}
}

// TestProbeSeesReplacedCertificate: a TLS target whose certificate is replaced by an expired one is
// critical on the next run (a new handshake), whatever connection the run before used.
func TestProbeSeesReplacedCertificate(t *testing.T) {
	t.Parallel()
	pki := newTestPKI(t)
	for _, kind := range probeKinds {
		if kind != "https" && !strings.HasSuffix(kind, "+tls") {
			continue
		}
		t.Run(kind, func(t *testing.T) {
			srv := startKindServer(t, kind, pki.valid)
			p := newProbeBuilder(&tls.Config{RootCAs: pki.pool})
			d := kindDefinition(kind, srv.addr)
			probe, err := p.newProbe(&d, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if status, out := probe(context.Background(), nil); status != statusPassing {
				t.Fatalf("valid certificate: (%q, %q)", status, out)
			}
			srv.cert.Store(&pki.expired)
			status, out := probe(context.Background(), nil)
			if status != statusCritical || !strings.Contains(out, "expired") {
				t.Fatalf("after the certificate expired: (%q, %q), want critical naming the expiry", status, out)
			}
		})
	}
}

// TestProbeResolvesEveryRun: a check naming a host resolves it on every run, so when the name moves
// to another address the next run goes there. The test steers the builder's dialer, which receives
// the name (not an address cached from an earlier run) every time.
func TestProbeResolvesEveryRun(t *testing.T) {
	t.Parallel()
	for _, kind := range append([]string{"udp"}, probeKinds...) {
		if strings.HasSuffix(kind, "+tls") || kind == "https" {
			continue // the TLS kinds dial the same way; certificates for a fake name add nothing here
		}
		t.Run(kind, func(t *testing.T) {
			var healthy string
			if kind == "udp" {
				healthy, _ = udpServer(t, false)
			} else {
				healthy = startKindServer(t, kind, tls.Certificate{}).addr
			}
			network := "tcp"
			moved := closedTCPAddr(t)
			if kind == "udp" {
				network, moved = "udp", closedUDPAddr(t)
			}
			var current atomic.Pointer[string]
			current.Store(&healthy)
			var mu sync.Mutex
			var dialled []string
			p := newProbeBuilder(nil)
			p.dial = func(ctx context.Context, nw, addr string) (net.Conn, error) {
				mu.Lock()
				dialled = append(dialled, addr)
				mu.Unlock()
				if host, _, _ := net.SplitHostPort(addr); host == "svc.esm.test" {
					addr = *current.Load()
				}
				return (&net.Dialer{}).DialContext(ctx, nw, addr)
			}
			d := kindDefinition(kind, "svc.esm.test:4242")
			probe, err := p.newProbe(&d, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if status, out := probe(context.Background(), nil); status != statusPassing {
				t.Fatalf("first run: (%q, %q)", status, out)
			}
			current.Store(&moved)
			status, out := probe(context.Background(), nil)
			if status != statusCritical || !strings.Contains(out, "refused") {
				t.Fatalf("run after the name moved: (%q, %q), want critical, connection refused", status, out)
			}
			mu.Lock()
			defer mu.Unlock()
			if len(dialled) != 2 || dialled[0] != "svc.esm.test:4242" || dialled[1] != "svc.esm.test:4242" {
				t.Fatalf("dialled %q (%s), want the name once per run", dialled, network)
			}
		})
	}
}
