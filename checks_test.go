package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	hv1 "google.golang.org/grpc/health/grpc_health_v1"
)

// runProbe builds and runs one probe with a fresh prober.
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

func TestProbeHTTPStatus(t *testing.T) {
	cases := []struct {
		code   int
		status string
		line   string
	}{
		{200, statusPassing, "200 OK"},
		{204, statusPassing, "204 No Content"},
		{429, statusWarning, "429 Too Many Requests"},
		{500, statusCritical, "500 Internal Server Error"},
		{404, statusCritical, "404 Not Found"},
	}
	for _, tc := range cases {
		t.Run(tc.line, func(t *testing.T) {
			srv := newHTTPServer(t, func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(tc.code)
				if tc.code != 204 {
					io.WriteString(w, "body text")
				}
			})
			url := srv.URL + "/health"
			status, out := runProbe(t, &checkDefinition{HTTP: url}, time.Second)
			body := "body text"
			if tc.code == 204 {
				body = ""
			}
			want := fmt.Sprintf("HTTP GET %s: %s Output: %s", url, tc.line, body)
			if status != tc.status || out != want {
				t.Fatalf("got (%q, %q), want (%q, %q)", status, out, tc.status, want)
			}
		})
	}
}

func TestProbeHTTPConnectionRefused(t *testing.T) {
	addr := closedTCPAddr(t)
	url := "http://" + addr + "/"
	status, out := runProbe(t, &checkDefinition{HTTP: url}, time.Second)
	want := fmt.Sprintf("Get %q: dial tcp %s: connect: connection refused", url, addr)
	if status != statusCritical || out != want {
		t.Fatalf("got (%q, %q), want (critical, %q)", status, out, want)
	}
}

func TestProbeHTTPInvalidMethod(t *testing.T) {
	status, out := runProbe(t, &checkDefinition{HTTP: "http://127.0.0.1:1/", Method: "BAD METHOD"}, time.Second)
	if status != statusCritical || !strings.Contains(out, "invalid method") {
		t.Fatalf("got (%q, %q)", status, out)
	}
}

func TestProbeHTTPRequestShape(t *testing.T) {
	type seen struct {
		method, body, host string
		header             http.Header
	}
	cases := []struct {
		name   string
		def    checkDefinition
		method string
		body   string
		host   string
		header map[string]string
	}{
		{
			name:   "defaults",
			method: "GET",
			header: map[string]string{"User-Agent": "Consul Health Check", "Accept": "text/plain, text/*, */*"},
		},
		{
			name:   "method body headers host",
			def:    checkDefinition{Method: "POST", Body: `{"ping":1}`, Header: map[string][]string{"X-Token": {"abc"}, "host": {"svc.example"}, "User-Agent": {"mine"}}},
			method: "POST",
			body:   `{"ping":1}`,
			host:   "svc.example",
			header: map[string]string{"User-Agent": "mine", "Accept": "text/plain, text/*, */*", "X-Token": "abc"},
		},
		{
			name:   "accept kept",
			def:    checkDefinition{Method: "PUT", Header: map[string][]string{"Accept": {"application/json"}}},
			method: "PUT",
			header: map[string]string{"User-Agent": "Consul Health Check", "Accept": "application/json"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := make(chan seen, 1)
			srv := newHTTPServer(t, func(w http.ResponseWriter, r *http.Request) {
				b, _ := io.ReadAll(r.Body)
				got <- seen{r.Method, string(b), r.Host, r.Header.Clone()}
			})
			d := tc.def
			d.HTTP = srv.URL
			status, out := runProbe(t, &d, time.Second)
			wantOut := fmt.Sprintf("HTTP %s %s: 200 OK Output: ", tc.method, srv.URL)
			if status != statusPassing || out != wantOut {
				t.Fatalf("got (%q, %q), want (passing, %q)", status, out, wantOut)
			}
			s := <-got
			host := tc.host
			if host == "" {
				host = strings.TrimPrefix(srv.URL, "http://")
			}
			if s.method != tc.method || s.body != tc.body || s.host != host {
				t.Fatalf("server saw method %q body %q host %q", s.method, s.body, s.host)
			}
			for k, v := range tc.header {
				if got := s.header.Values(k); len(got) != 1 || got[0] != v {
					t.Errorf("header %s = %q, want [%q]", k, got, v)
				}
			}
		})
	}
	// The definition's header map must not be modified by running the probe.
	d := &checkDefinition{HTTP: "http://127.0.0.1:1/", Header: map[string][]string{"X-A": {"1"}}}
	runProbe(t, d, time.Second)
	if len(d.Header) != 1 {
		t.Fatalf("definition header mutated: %v", d.Header)
	}
}

func TestProbeHTTPRedirects(t *testing.T) {
	srv := newHTTPServer(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/from" {
			http.Redirect(w, r, "/to", http.StatusFound)
			return
		}
		io.WriteString(w, "landed")
	})
	url := srv.URL + "/from"
	status, out := runProbe(t, &checkDefinition{HTTP: url}, time.Second)
	if want := fmt.Sprintf("HTTP GET %s: 200 OK Output: landed", url); status != statusPassing || out != want {
		t.Fatalf("follow: got (%q, %q), want %q", status, out, want)
	}
	status, out = runProbe(t, &checkDefinition{HTTP: url, DisableRedirects: true}, time.Second)
	if prefix := fmt.Sprintf("HTTP GET %s: 302 Found Output: ", url); status != statusCritical || !strings.HasPrefix(out, prefix) {
		t.Fatalf("disabled: got (%q, %q), want critical with prefix %q", status, out, prefix)
	}
}

func TestProbeHTTPOutputMaxSize(t *testing.T) {
	body := strings.Repeat("0123456789", 1000) // 10000 bytes
	srv := newHTTPServer(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, body) })
	prefix := fmt.Sprintf("HTTP GET %s: 200 OK Output: ", srv.URL)
	cases := []struct {
		max  int
		want string
	}{
		{0, body[len(body)-4096:]},
		{5, "56789"},
		{12, "890123456789"},
		{100000, body[len(body)-4096:]}, // Consul: a check may only lower the agent limit
	}
	for _, tc := range cases {
		t.Run(fmt.Sprint(tc.max), func(t *testing.T) {
			status, out := runProbe(t, &checkDefinition{HTTP: srv.URL, OutputMaxSize: tc.max}, time.Second)
			if status != statusPassing || out != prefix+tc.want {
				t.Fatalf("got (%q, %d bytes), want %d bytes", status, len(out), len(prefix+tc.want))
			}
		})
	}
}

func TestTailBuffer(t *testing.T) {
	cases := []struct {
		writes []string
		want   string
	}{
		{[]string{"ab", "cd"}, "abcd"},
		{[]string{"abc", "def"}, "cdef"},
		{[]string{"abcdefgh"}, "efgh"},
		{[]string{"a", "bcdefg", "h"}, "efgh"},
		{nil, ""},
	}
	for _, tc := range cases {
		tb := &tailBuffer{max: 4, buf: make([]byte, 0, 6)}
		r := &chunkReader{chunks: tc.writes}
		if _, err := tb.ReadFrom(r); err != nil {
			t.Fatal(err)
		}
		if string(tb.buf) != tc.want {
			t.Errorf("%q: got %q want %q", tc.writes, tb.buf, tc.want)
		}
	}
}

// chunkReader returns its chunks one Read at a time.
type chunkReader struct{ chunks []string }

func (c *chunkReader) Read(p []byte) (int, error) {
	if len(c.chunks) == 0 {
		return 0, io.EOF
	}
	n := copy(p, c.chunks[0])
	if c.chunks[0] = c.chunks[0][n:]; c.chunks[0] == "" {
		c.chunks = c.chunks[1:]
	}
	return n, nil
}

func TestProbeHTTPLargeBodyBounded(t *testing.T) {
	big := make([]byte, 10<<20)
	for i := range big {
		big[i] = 'a' + byte(i%26)
	}
	srv := newHTTPServer(t, func(w http.ResponseWriter, r *http.Request) { w.Write(big) })
	p := newProbeBuilder(nil)
	probe, err := p.newProbe(&checkDefinition{HTTP: srv.URL}, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	status, out := probe(context.Background(), nil)
	runtime.ReadMemStats(&after)
	prefix := fmt.Sprintf("HTTP GET %s: 200 OK Output: ", srv.URL)
	if status != statusPassing || !strings.HasPrefix(out, prefix) || len(out)-len(prefix) != defaultOutputMaxSize {
		t.Fatalf("got (%q, %d bytes)", status, len(out))
	}
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 4<<20 {
		t.Fatalf("probe allocated %d bytes for a 10 MiB body", alloc)
	}
}

func TestProbeHTTPTimeout(t *testing.T) {
	release := make(chan struct{})
	srv := newHTTPServer(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-release:
		}
	})
	t.Cleanup(func() { close(release) })
	timeout := 300 * time.Millisecond
	start := time.Now()
	status, out := runProbe(t, &checkDefinition{HTTP: srv.URL}, timeout)
	elapsed := time.Since(start)
	if status != statusCritical || !strings.Contains(out, "Client.Timeout exceeded") {
		t.Fatalf("got (%q, %q)", status, out)
	}
	if elapsed > timeout+2*time.Second {
		t.Fatalf("probe took %v with timeout %v", elapsed, timeout)
	}

	// The definition's Timeout applies when the caller passes none.
	start = time.Now()
	status, _ = runProbe(t, &checkDefinition{HTTP: srv.URL, Timeout: durationField(timeout)}, 0)
	if status != statusCritical || time.Since(start) > timeout+2*time.Second {
		t.Fatalf("definition timeout not honoured: %q after %v", status, time.Since(start))
	}

	// So does the caller's context.
	p := newProbeBuilder(nil)
	probe, _ := p.newProbe(&checkDefinition{HTTP: srv.URL}, time.Minute)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	start = time.Now()
	if status, out := probe(ctx, nil); status != statusCritical || time.Since(start) > timeout+2*time.Second {
		t.Fatalf("context not honoured: (%q, %q) after %v", status, out, time.Since(start))
	}
}

func TestProbeHTTPS(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "secure") }))
	t.Cleanup(srv.Close)
	pool := x509.NewCertPool()
	pool.AddCert(srv.Certificate())
	trusted := &tls.Config{RootCAs: pool}
	want := fmt.Sprintf("HTTP GET %s: 200 OK Output: secure", srv.URL)

	cases := []struct {
		name     string
		base     *tls.Config
		def      checkDefinition
		status   string
		contains string
	}{
		{"untrusted", nil, checkDefinition{}, statusCritical, "certificate"},
		{"skip verify", nil, checkDefinition{TLSSkipVerify: true}, statusPassing, want},
		{"trusted base", trusted, checkDefinition{}, statusPassing, want},
		{"server name matches", trusted, checkDefinition{TLSServerName: "example.com"}, statusPassing, want},
		{"server name mismatch", trusted, checkDefinition{TLSServerName: "other.test"}, statusCritical, "certificate"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := newProbeBuilder(tc.base)
			d := tc.def
			d.HTTP = srv.URL
			status, out := runWith(t, p, &d, time.Second)
			if status != tc.status || !strings.Contains(out, tc.contains) {
				t.Fatalf("got (%q, %q), want %q containing %q", status, out, tc.status, tc.contains)
			}
		})
	}
}

func TestProbeSetTLSReloadsExistingProbes(t *testing.T) {
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

	// Reloads race with running probes only through the prober's lock.
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

func TestProbeTCP(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	open, closed := l.Addr().String(), closedTCPAddr(t)
	cases := []struct {
		addr, status, output string
	}{
		{open, statusPassing, "TCP connect " + open + ": Success"},
		{closed, statusCritical, "dial tcp " + closed + ": connect: connection refused"},
	}
	for _, tc := range cases {
		status, out := runProbe(t, &checkDefinition{TCP: tc.addr}, time.Second)
		if status != tc.status || out != tc.output {
			t.Errorf("%s: got (%q, %q), want (%q, %q)", tc.addr, status, out, tc.status, tc.output)
		}
	}
}

func TestProbeTCPTLS(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	t.Cleanup(srv.Close)
	addr := srv.Listener.Addr().String()
	plain := newHTTPServer(t, func(w http.ResponseWriter, r *http.Request) {})
	plainAddr := plain.Listener.Addr().String()
	cases := []struct {
		name     string
		def      checkDefinition
		status   string
		contains string
	}{
		{"skip verify", checkDefinition{TCP: addr, TCPUseTLS: true, TLSSkipVerify: true}, statusPassing, "TCP+TLS connect " + addr + ": Success"},
		{"untrusted", checkDefinition{TCP: addr, TCPUseTLS: true}, statusCritical, "certificate"},
		{"plaintext target", checkDefinition{TCP: plainAddr, TCPUseTLS: true, TLSSkipVerify: true}, statusCritical, "tls"},
		{"refused", checkDefinition{TCP: closedTCPAddr(t), TCPUseTLS: true}, statusCritical, "connection refused"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			status, out := runProbe(t, &tc.def, time.Second)
			if status != tc.status || !strings.Contains(out, tc.contains) {
				t.Fatalf("got (%q, %q), want %q containing %q", status, out, tc.status, tc.contains)
			}
			if tc.status == statusPassing && out != tc.contains {
				t.Fatalf("output %q, want exactly %q", out, tc.contains)
			}
		})
	}
}

// udpServer answers (or, when silent, swallows) datagrams and reports each payload length.
func udpServer(t *testing.T, silent bool) (string, <-chan int) {
	t.Helper()
	return udpServerAt(t, "127.0.0.1", silent)
}

// udpServerAt is udpServer on host (a loopback address).
func udpServerAt(t *testing.T, host string, silent bool) (string, <-chan int) {
	t.Helper()
	c, err := net.ListenPacket("udp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	sizes := make(chan int, 16)
	done := make(chan struct{})
	t.Cleanup(func() { c.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			select {
			case sizes <- n:
			default:
			}
			if !silent {
				c.WriteTo([]byte("pong"), from)
			}
		}
	}()
	return c.LocalAddr().String(), sizes
}

func TestProbeUDP(t *testing.T) {
	echo, sizes := udpServer(t, false)
	silent, _ := udpServer(t, true)
	closed := closedUDPAddr(t)
	cases := []struct {
		name, addr, status, output string
		timeout                    time.Duration
	}{
		{"reply", echo, statusPassing, "UDP connect " + echo + ": Success", 5 * time.Second},
		{"silence", silent, statusPassing, "UDP connect " + silent + ": Success", 200 * time.Millisecond},
		{"refused", closed, statusCritical, "connection refused", 5 * time.Second},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			status, out := runProbe(t, &checkDefinition{UDP: tc.addr}, tc.timeout)
			if status != tc.status || !strings.Contains(out, tc.output) {
				t.Fatalf("got (%q, %q), want (%q, %q)", status, out, tc.status, tc.output)
			}
			if tc.status == statusPassing && out != tc.output {
				t.Fatalf("output %q, want exactly %q", out, tc.output)
			}
			if time.Since(start) > tc.timeout+2*time.Second {
				t.Fatalf("took %v", time.Since(start))
			}
		})
	}
	// Consul's UDP check sends an empty datagram.
	if n := <-sizes; n != 0 {
		t.Fatalf("payload %d bytes, want 0", n)
	}
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

func grpcHealthServer(t *testing.T, opts ...grpc.ServerOption) string {
	t.Helper()
	return grpcHealthServerAt(t, "127.0.0.1:0", opts...)
}

// grpcHealthServerAt serves grpc.health.v1 on addr (services "" and "up" serving, "down" not) and
// returns the address it listens on.
func grpcHealthServerAt(t *testing.T, addr string, opts ...grpc.ServerOption) string {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer(opts...)
	hs := health.NewServer()
	hs.SetServingStatus("", hv1.HealthCheckResponse_SERVING)
	hs.SetServingStatus("up", hv1.HealthCheckResponse_SERVING)
	hs.SetServingStatus("down", hv1.HealthCheckResponse_NOT_SERVING)
	hv1.RegisterHealthServer(s, hs)
	done := make(chan struct{})
	go func() { defer close(done); s.Serve(l) }()
	t.Cleanup(func() { s.Stop(); <-done })
	return l.Addr().String()
}

func TestProbeGRPC(t *testing.T) {
	plain := grpcHealthServer(t)
	secure := grpcHealthServer(t, grpc.Creds(credentials.NewServerTLSFromCert(func() *tls.Certificate { c := testCert(t); return &c }())))
	closed := closedTCPAddr(t)
	cases := []struct {
		name     string
		def      checkDefinition
		status   string
		output   string
		contains bool
	}{
		{"serving", checkDefinition{GRPC: plain}, statusPassing, "gRPC check " + plain + ": success", false},
		{"service serving", checkDefinition{GRPC: plain + "/up"}, statusPassing, "gRPC check " + plain + "/up: success", false},
		{"not serving", checkDefinition{GRPC: plain + "/down"}, statusCritical, "gRPC " + plain + "/down serving status: NOT_SERVING", false},
		{"unknown service", checkDefinition{GRPC: plain + "/nope"}, statusCritical, "rpc error: code = NotFound desc = unknown service", false},
		{"tls against plaintext", checkDefinition{GRPC: plain, GRPCUseTLS: true, TLSSkipVerify: true}, statusCritical, "tls", true},
		{"tls", checkDefinition{GRPC: secure + "/up", GRPCUseTLS: true, TLSSkipVerify: true}, statusPassing, "gRPC check " + secure + "/up: success", false},
		{"tls untrusted", checkDefinition{GRPC: secure, GRPCUseTLS: true}, statusCritical, "certificate", true},
		{"refused", checkDefinition{GRPC: closed}, statusCritical, "connection refused", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			status, out := runProbe(t, &tc.def, 5*time.Second)
			ok := out == tc.output
			if tc.contains {
				ok = strings.Contains(out, tc.output)
			}
			if status != tc.status || !ok {
				t.Fatalf("got (%q, %q), want (%q, %q)", status, out, tc.status, tc.output)
			}
		})
	}
}

func TestProbeH2PING(t *testing.T) {
	h2c := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	h2c.Config.Protocols = new(http.Protocols)
	h2c.Config.Protocols.SetHTTP1(true)
	h2c.Config.Protocols.SetUnencryptedHTTP2(true)
	h2c.Start()
	t.Cleanup(h2c.Close)
	h2tls := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	h2tls.EnableHTTP2 = true
	h2tls.StartTLS()
	t.Cleanup(h2tls.Close)
	h1 := newHTTPServer(t, func(w http.ResponseWriter, r *http.Request) {})

	addr := func(s *httptest.Server) string { return s.Listener.Addr().String() }
	closed := closedTCPAddr(t)
	cases := []struct {
		name   string
		def    checkDefinition
		status string
		prefix string
	}{
		{"h2c", checkDefinition{H2PING: addr(h2c)}, statusPassing, "HTTP2 ping was successful"},
		{"tls", checkDefinition{H2PING: addr(h2tls), H2PingUseTLS: true, TLSSkipVerify: true}, statusPassing, "HTTP2 ping was successful"},
		{"tls untrusted", checkDefinition{H2PING: addr(h2tls), H2PingUseTLS: true}, statusCritical, "Failed to dial to " + addr(h2tls) + ": tls: failed to verify certificate"},
		{"http1 only", checkDefinition{H2PING: addr(h1)}, statusCritical, "HTTP2 ping failed: "},
		{"refused", checkDefinition{H2PING: closed}, statusCritical, "Failed to dial to " + closed + ": dial tcp " + closed + ": connect: connection refused"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			status, out := runProbe(t, &tc.def, time.Second)
			if status != tc.status || !strings.HasPrefix(out, tc.prefix) {
				t.Fatalf("got (%q, %q), want (%q, prefix %q)", status, out, tc.status, tc.prefix)
			}
			if time.Since(start) > 3*time.Second {
				t.Fatalf("took %v", time.Since(start))
			}
		})
	}
}

func TestCheckDefinitionJSONRoundTrip(t *testing.T) {
	full := checkDefinition{
		HTTP: "https://x/health", Header: map[string][]string{"A": {"1", "2"}}, Method: "POST", Body: "b",
		TLSServerName: "x", TLSSkipVerify: true, DisableRedirects: true,
		TCP: "x:1", TCPUseTLS: true, UDP: "x:2", H2PING: "x:3", H2PingUseTLS: true, OSService: "svc",
		GRPC: "x:4/s", GRPCUseTLS: true,
		Interval: durationField(10 * time.Second), Timeout: durationField(1500 * time.Millisecond),
		DeregisterCriticalServiceAfter: durationField(time.Hour), OutputMaxSize: 100,
		ScriptArgs: []string{"/bin/true", "-v"}, DockerContainerID: "c", Shell: "/bin/sh",
		AliasNode: "n", AliasService: "s", SessionName: "sess", TTL: durationField(30 * time.Second),
		SuccessBeforePassing: 2, FailuresBeforeWarning: 1, FailuresBeforeCritical: 3,
	}
	// Every field must be set, so a field added without a JSON mapping is caught here.
	v := reflect.ValueOf(full)
	for i := 0; i < v.NumField(); i++ {
		if v.Field(i).IsZero() {
			t.Fatalf("test value leaves %s zero", v.Type().Field(i).Name)
		}
	}
	b, err := json.Marshal(&full)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"Interval":"10s"`, `"Timeout":"1.5s"`, `"DeregisterCriticalServiceAfter":"1h0m0s"`, `"TTL":"30s"`, `"H2PING":"x:3"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("%s missing from %s", want, b)
		}
	}
	var back checkDefinition
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(full, back) {
		t.Fatalf("round trip lost data:\n%+v\n%+v", full, back)
	}
	// A zero definition writes nothing at all.
	if b, _ := json.Marshal(checkDefinition{}); string(b) != "{}" {
		t.Fatalf("zero definition encodes as %s", b)
	}
}

func TestCheckDefinitionDurationDecoding(t *testing.T) {
	cases := []struct {
		in   string
		want time.Duration
		err  bool
	}{
		{`"10s"`, 10 * time.Second, false},
		{`""`, 0, false},
		{`null`, 0, false},
		{`30000000000`, 30 * time.Second, false},
		{`1e9`, time.Second, false},
		{`"ten"`, 0, true},
		{`true`, 0, true},
	}
	for _, tc := range cases {
		var d checkDefinition
		err := json.Unmarshal([]byte(`{"Interval":`+tc.in+`,"TTL":`+tc.in+`}`), &d)
		if (err != nil) != tc.err {
			t.Errorf("%s: err %v", tc.in, err)
			continue
		}
		if !tc.err && (time.Duration(d.Interval) != tc.want || time.Duration(d.TTL) != tc.want) {
			t.Errorf("%s: got %v/%v want %v", tc.in, d.Interval, d.TTL, tc.want)
		}
	}
	// As /v1/health/state/any serves it: durations as strings except TTL in nanoseconds.
	var d checkDefinition
	wire := `{"HTTP":"http://x","Interval":"30s","Timeout":"","DeregisterCriticalServiceAfter":"1m0s","TTL":0,"Header":{"X":["y"]}}`
	if err := json.Unmarshal([]byte(wire), &d); err != nil {
		t.Fatal(err)
	}
	if d.Interval != durationField(30*time.Second) || d.Timeout != 0 || d.DeregisterCriticalServiceAfter != durationField(time.Minute) || d.Header["X"][0] != "y" {
		t.Fatalf("decoded %+v", d)
	}
}

func TestCheckKind(t *testing.T) {
	cases := []struct {
		name        string
		def         checkDefinition
		kind        string
		unsupported bool
	}{
		{"http", checkDefinition{HTTP: "http://x"}, "http", false},
		{"tcp", checkDefinition{TCP: "x:1"}, "tcp", false},
		{"tcp tls", checkDefinition{TCP: "x:1", TCPUseTLS: true}, "tcp", false},
		{"udp", checkDefinition{UDP: "x:1"}, "udp", false},
		{"grpc", checkDefinition{GRPC: "x:1"}, "grpc", false},
		{"h2ping", checkDefinition{H2PING: "x:1"}, "h2ping", false},
		{"http wins", checkDefinition{HTTP: "http://x", TCP: "x:1", GRPC: "x:2"}, "http", false},
		{"tcp before udp", checkDefinition{TCP: "x:1", UDP: "x:2"}, "tcp", false},
		{"script", checkDefinition{ScriptArgs: []string{"true"}}, "", true},
		{"docker", checkDefinition{DockerContainerID: "c", ScriptArgs: []string{"true"}}, "", true},
		{"alias", checkDefinition{AliasService: "s"}, "", true},
		{"ttl", checkDefinition{TTL: durationField(time.Second)}, "", true},
		{"os service", checkDefinition{OSService: "svc"}, "", true},
		{"session", checkDefinition{SessionName: "s"}, "", true},
		{"empty", checkDefinition{}, "", true},
	}
	p := newProbeBuilder(nil)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			kind, why := tc.def.kind()
			if kind != tc.kind || (why != "") != tc.unsupported {
				t.Fatalf("kind() = (%q, %q)", kind, why)
			}
			probe, err := p.newProbe(&tc.def, time.Second)
			if tc.unsupported != (err != nil) || tc.unsupported != (probe == nil) {
				t.Fatalf("newProbe: probe %v err %v", probe != nil, err)
			}
			if err != nil && !strings.Contains(err.Error(), why) {
				t.Fatalf("error %q lacks reason %q", err, why)
			}
		})
	}
}
