package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// certSource hands out whichever certificate it holds now, so a test can replace a target's
// certificate between two runs, as a renewal does.
type certSource struct {
	cur atomic.Pointer[tls.Certificate]
}

// newCertSource starts with a certificate expiring at notAfter and returns that expiry as set does.
func newCertSource(t *testing.T, notAfter time.Time) (*certSource, time.Time) {
	t.Helper()
	c := &certSource{}
	return c, c.set(t, notAfter)
}

// set installs a new certificate expiring at notAfter and returns that expiry as the certificate
// carries it (whole seconds, UTC).
func (c *certSource) set(t *testing.T, notAfter time.Time) time.Time {
	t.Helper()
	certPEM, keyPEM := newTestCertPEM(t, "target", notAfter)
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	c.cur.Store(&cert)
	return notAfter.Truncate(time.Second).UTC()
}

func (c *certSource) serverConfig() *tls.Config {
	return &tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return c.cur.Load(), nil }}
}

// tlsTarget serves HTTP/1.1 and HTTP/2 over TLS with src's certificate on host (a loopback address)
// and returns its host:port. It answers HTTPS, TCP+TLS and H2PING+TLS checks.
func tlsTarget(t *testing.T, host string, src *certSource) string {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{
		Handler:   http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) }),
		TLSConfig: src.serverConfig(),
		// TCP+TLS checks hang up right after the handshake, which the server would log as an error.
		ErrorLog: log.New(io.Discard, "", 0),
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.ServeTLS(ln, "", "")
	}()
	t.Cleanup(func() {
		_ = srv.Close()
		<-done
	})
	return ln.Addr().String()
}

// tlsDefinitions are one definition per TLS-capable check kind against the targets, verification
// off (the certificates are self-signed).
func tlsDefinitions(https, grpcAddr string) map[string]checkDefinition {
	return map[string]checkDefinition{
		"https":       {HTTP: "https://" + https + "/health", TLSSkipVerify: true},
		"tcp+tls":     {TCP: https, TCPUseTLS: true, TLSSkipVerify: true},
		"grpc+tls":    {GRPC: grpcAddr, GRPCUseTLS: true, TLSSkipVerify: true},
		"h2ping+tls":  {H2PING: https, H2PingUseTLS: true, TLSSkipVerify: true},
		"http (none)": {HTTP: "http://" + https + "/"}, // plain HTTP against TLS: no handshake
	}
}

// Every TLS kind reports the leaf certificate of its own run's handshake: after the target's
// certificate is replaced, the next run reports the new one (nothing is cached between runs).
func TestProbeRecordsCertExpiry(t *testing.T) {
	t.Parallel()
	src, first := newCertSource(t, time.Now().Add(48*time.Hour))
	https := tlsTarget(t, "127.0.0.1", src)
	grpcAddr := grpcHealthServerAt(t, "127.0.0.1:0", grpc.Creds(credentials.NewTLS(src.serverConfig())))
	p := newProbeBuilder(nil)
	defs := tlsDefinitions(https, grpcAddr)
	probes := map[string]probeFunc{}
	for name, d := range defs {
		probe, err := p.newProbe(&d, 2*time.Second)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		probes[name] = probe
	}
	run := func(want time.Time) {
		t.Helper()
		for name, probe := range probes {
			var run probeRun
			status, out := probe(context.Background(), &run)
			expiry := run.certExpiry
			if name == "http (none)" {
				if !expiry.IsZero() {
					t.Errorf("%s: expiry %v without a handshake (%s: %s)", name, expiry, status, out)
				}
				continue
			}
			if status != statusPassing || !expiry.Equal(want) {
				t.Errorf("%s: (%s, %q, %v), want passing with expiry %v", name, status, out, expiry, want)
			}
		}
	}
	run(first)
	second := src.set(t, time.Now().Add(90*24*time.Hour))
	run(second)
}

func TestCertExpiryVerdict(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	const out = "HTTP GET https://127.0.0.1/: 200 OK Output: ok"
	cases := []struct {
		name       string
		status     string
		expiry     time.Time
		window     time.Duration
		wantStatus string
		wantOut    string
	}{
		{"off", statusPassing, now.Add(time.Hour), 0, statusPassing, out},
		{"outside window", statusPassing, now.Add(15 * 24 * time.Hour), 14 * 24 * time.Hour, statusPassing, out},
		{"inside window", statusPassing, now.Add(10 * 24 * time.Hour), 14 * 24 * time.Hour, statusWarning,
			"TLS certificate expires 2026-12-11T12:00:00Z (tls_expiry_warning 336h0m0s). " + out},
		{"at the edge", statusPassing, now.Add(time.Hour), time.Hour, statusWarning,
			"TLS certificate expires 2026-12-01T13:00:00Z (tls_expiry_warning 1h0m0s). " + out},
		{"expired", statusPassing, now.Add(-time.Hour), time.Hour, statusWarning,
			"TLS certificate expired 2026-12-01T11:00:00Z (tls_expiry_warning 1h0m0s). " + out},
		{"critical stands", statusCritical, now.Add(time.Hour), 24 * time.Hour, statusCritical, out},
		{"warning stands", statusWarning, now.Add(time.Hour), 24 * time.Hour, statusWarning, out},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			status, got := certExpiryVerdict(tc.status, out, tc.expiry, now, tc.window)
			if status != tc.wantStatus || got != tc.wantOut {
				t.Fatalf("got (%s, %q), want (%s, %q)", status, got, tc.wantStatus, tc.wantOut)
			}
		})
	}
}

// scrapeMetrics returns what GET /metrics serves.
func scrapeMetrics(t *testing.T, a *Agent) string {
	t.Helper()
	rec := httptest.NewRecorder()
	a.metricsHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("/metrics = %d: %s", rec.Code, rec.Body)
	}
	return rec.Body.String()
}

// metricValue finds the sample of series (name with its labels as the text format writes them, in
// label-name order) in a /metrics body.
func metricValue(body, series string) (float64, bool) {
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return f, err == nil
		}
	}
	return 0, false
}

// checkSeriesName is a per-check series as /metrics writes it (with disable_hostname).
func checkSeriesName(metric, node, checkID string) string {
	return fmt.Sprintf(`%s{check_id=%q,node=%q}`, metric, checkID, node)
}

// waitSeries waits until series is on /metrics with a value within [lo, hi].
func waitSeries(t *testing.T, a *Agent, series string, lo, hi float64) {
	t.Helper()
	waitFor(t, 10*time.Second, func() error {
		v, ok := metricValue(scrapeMetrics(t, a), series)
		if !ok {
			return fmt.Errorf("%s not on /metrics", series)
		}
		if v < lo || v > hi {
			return fmt.Errorf("%s = %v, want within [%v, %v]", series, v, lo, hi)
		}
		return nil
	})
}

// The operator's view of certificate expiry: a gauge per TLS check on /metrics, checks turning
// warning (naming the date) within tls_expiry_warning and passing again once the certificate is
// renewed, the window reloadable, and a deregistered check's series gone from the next scrape.
func TestCheckRunnerTLSExpiry(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	src, expiry := newCertSource(t, time.Now().Add(48*time.Hour))
	target := tlsTarget(t, "127.0.0.1", src)
	r := crStart(t, srv, func(c *Config) {
		c.TLSExpiryWarning = 72 * time.Hour
		c.Telemetry.PrometheusRetentionTime = time.Minute
		c.Telemetry.DisableHostname = true
	}, nil)
	def := func(d checkDefinition) checkDefinition { return withTiming(d, 200*time.Millisecond, time.Second) }
	defs := tlsDefinitions(target, "")
	crRegister(t, srv.Client, "tls-node", "web", catalogRegisterCheck{CheckID: "web-https", Status: statusCritical, Definition: def(defs["https"])})
	crRegister(t, srv.Client, "tls-node", "web", catalogRegisterCheck{CheckID: "web-tcp-tls", Status: statusCritical, Definition: def(defs["tcp+tls"])})
	crRegister(t, srv.Client, "tls-node", "web", catalogRegisterCheck{CheckID: "web-plain", Status: statusCritical,
		Definition: def(checkDefinition{TCP: target})})
	r.SetNodes([]string{"tls-node"})

	wantOut := "TLS certificate expires " + expiry.Format(time.RFC3339) + " (tls_expiry_warning 72h0m0s). "
	crWaitCheck(t, srv.Client, "tls-node", "web-https", 10*time.Second,
		crStatus(statusWarning, wantOut+"HTTP GET https://"+target+"/health: 200 OK Output: ok"))
	crWaitCheck(t, srv.Client, "tls-node", "web-tcp-tls", 10*time.Second,
		crStatus(statusWarning, wantOut+"TCP+TLS connect "+target+": Success"))
	crWaitCheck(t, srv.Client, "tls-node", "web-plain", 10*time.Second, crStatus(statusPassing, "TCP connect"))
	left := time.Until(expiry).Seconds()
	for _, id := range []string{"web-https", "web-tcp-tls"} {
		waitSeries(t, r.agent, checkSeriesName("esm_check_tls_expiry_seconds", "tls-node", id), left-60, left+1)
	}
	if strings.Contains(scrapeMetrics(t, r.agent), `check_id="web-plain"`) {
		t.Fatal("a check without TLS has an expiry series")
	}

	// Renewal: the next run's handshake sees the new certificate.
	renewed := src.set(t, time.Now().Add(30*24*time.Hour))
	crWaitCheck(t, srv.Client, "tls-node", "web-https", 10*time.Second, crStatus(statusPassing, "HTTP GET"))
	left = time.Until(renewed).Seconds()
	waitSeries(t, r.agent, checkSeriesName("esm_check_tls_expiry_seconds", "tls-node", "web-https"), left-60, left+1)

	// A wider window, as a SIGHUP reload applies it.
	cfg := *r.agent.config()
	cfg.TLSExpiryWarning = 60 * 24 * time.Hour
	r.Reload(&cfg)
	crWaitCheck(t, srv.Client, "tls-node", "web-https", 10*time.Second,
		crStatus(statusWarning, "TLS certificate expires "+renewed.Format(time.RFC3339)+" (tls_expiry_warning 1440h0m0s)."))

	// A deregistered check takes its series with it; the other check's stays.
	if _, err := srv.Client.Catalog().Deregister(&api.CatalogDeregistration{Node: "tls-node", CheckID: "web-https"}, nil); err != nil {
		t.Fatal(err)
	}
	crWaitRunning(t, r, 2)
	body := scrapeMetrics(t, r.agent)
	if strings.Contains(body, `check_id="web-https"`) {
		t.Fatalf("series of the deregistered check still on /metrics:\n%s", grepLines(body, "web-https"))
	}
	if _, ok := metricValue(body, checkSeriesName("esm_check_tls_expiry_seconds", "tls-node", "web-tcp-tls")); !ok {
		t.Fatal("the remaining TLS check lost its series")
	}
}

// grepLines returns the lines of s that contain sub.
func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
