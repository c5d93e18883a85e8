package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"
	"unicode/utf8"
)

// Probes run one health check once. Each protocol has its own file (probe_http.go, probe_tcp.go,
// probe_udp.go, probe_grpc.go, probe_h2ping.go) and every probe has the probeFunc signature;
// probeBuilder.newProbe picks one from a check definition and caps what it reports.

const (
	// defaultCheckTimeout is what Consul uses when a definition has no Timeout.
	defaultCheckTimeout = 10 * time.Second

	// defaultOutputMaxSize is Consul's default check_output_max_size. A check's own OutputMaxSize
	// may only lower it, as on a Consul agent, so one chatty endpoint cannot bloat the catalog.
	defaultOutputMaxSize = 4096
)

// probeFunc runs one check once and returns Consul's status string and the check output. What else
// the run observed goes into run when it is not nil; the caller owns it (the runner keeps one per
// check, whose runs never overlap, so a run allocates nothing for it).
type probeFunc func(ctx context.Context, run *probeRun) (status, output string)

// probeRun is what one run observed besides its verdict: when it completed a TLS handshake, the
// NotAfter of the leaf certificate that handshake presented (zero otherwise). The certificate is the
// run's own: every run handshakes afresh, so a replaced certificate shows up at the next run.
type probeRun struct {
	certExpiry time.Time
}

// recordTLS notes the leaf certificate of a completed handshake. The leaf is what a client verifies
// the name against and what an operator renews; intermediates are the CA's business.
func (r *probeRun) recordTLS(cs *tls.ConnectionState) {
	if r != nil && cs != nil && len(cs.PeerCertificates) > 0 {
		r.certExpiry = cs.PeerCertificates[0].NotAfter
	}
}

// dialFunc opens a connection; every probe dials through its builder's, so a test can see (and
// steer) what each run connects to.
type dialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// probeBuilder builds probes from check definitions and owns what they share: the TLS base from the
// https_* settings, the dialer and one HTTP transport per TLS variant. It is safe for concurrent use;
// setTLS may run while probes run.
//
// Nothing a probe uses outlives its run: keep-alives are off, as in Consul's own checks, so every run
// resolves the host name, dials, handshakes and closes. A kept connection would go on answering for a
// service whose listener is closed, whose name now points elsewhere or whose certificate was replaced;
// each run must see the target as a new client would. The transports are kept only because they hold
// nothing between runs but their settings.
type probeBuilder struct {
	mu         sync.Mutex
	tlsBase    *tls.Config
	transports map[tlsKey]*http.Transport
	dial       dialFunc
	// bodyBufs recycles the response-body buffers of HTTP runs: at thousands of runs per second a
	// fresh buffer per run would dominate what the runner allocates.
	bodyBufs sync.Pool
}

func newProbeBuilder(tlsBase *tls.Config) *probeBuilder {
	// No TCP keep-alive probes: a connection lives for one run, and setting them up is three more
	// system calls per run.
	p := &probeBuilder{transports: make(map[tlsKey]*http.Transport), dial: (&net.Dialer{KeepAlive: -1}).DialContext}
	if tlsBase != nil {
		p.tlsBase = tlsBase.Clone()
	}
	return p
}

// setTLS replaces the TLS base (SIGHUP reload). Existing probes pick it up on their next run because
// they look up transports and TLS configs per run.
func (p *probeBuilder) setTLS(tlsBase *tls.Config) {
	if tlsBase != nil {
		tlsBase = tlsBase.Clone()
	}
	p.mu.Lock()
	p.tlsBase = tlsBase
	p.transports = make(map[tlsKey]*http.Transport)
	p.mu.Unlock()
}

// tlsConfig returns a fresh TLS config for one check, derived from the current base.
func (p *probeBuilder) tlsConfig(k tlsKey) *tls.Config {
	p.mu.Lock()
	base := p.tlsBase
	p.mu.Unlock()
	return checkTLSConfig(base, k)
}

// newProbe builds the probe for d. timeout bounds one run; when it is not positive the
// definition's Timeout applies, and then Consul's 10s default.
func (p *probeBuilder) newProbe(d *checkDefinition, timeout time.Duration) (probeFunc, error) {
	if timeout <= 0 {
		timeout = time.Duration(d.Timeout)
	}
	if timeout <= 0 {
		timeout = defaultCheckTimeout
	}
	key := tlsKey{d.TLSSkipVerify, d.TLSServerName}
	maxOut := outputLimit(d.OutputMaxSize)
	var probe probeFunc
	switch kind, why := d.kind(); kind {
	case "http":
		probe = p.httpProbe(d, timeout)
	case "tcp":
		probe = p.tcpProbe(d.TCP, d.TCPUseTLS, key, timeout)
	case "udp":
		probe = p.udpProbe(d.UDP, timeout)
	case "grpc":
		probe = p.grpcProbe(d.GRPC, d.GRPCUseTLS, key, timeout)
	case "h2ping":
		probe = p.h2pingProbe(d.H2PING, d.H2PingUseTLS, key, timeout)
	default:
		return nil, fmt.Errorf("cannot run check: %s", why)
	}
	return func(ctx context.Context, run *probeRun) (string, string) {
		status, out := probe(ctx, run)
		if status != statusPassing && status != statusWarning {
			// An error text can quote what the target sent (a malformed status line of up to
			// maxResponseHeaderBytes); the catalog gets no more than the check's output limit.
			out = truncateOutput(out, maxOut)
		}
		return status, out
	}, nil
}

// outputLimit applies Consul's rule: the check's OutputMaxSize can only lower the default.
func outputLimit(n int) int {
	if n > 0 && n < defaultOutputMaxSize {
		return n
	}
	return defaultOutputMaxSize
}

// truncateOutput cuts s to at most n bytes without splitting a UTF-8 sequence.
func truncateOutput(s string, n int) string {
	if len(s) <= n {
		return s
	}
	s = s[:n]
	for i := 0; i < utf8.UTFMax && len(s) > 0; i++ {
		if r, size := utf8.DecodeLastRuneInString(s); r != utf8.RuneError || size != 1 {
			break
		}
		s = s[:len(s)-1]
	}
	return s
}

// dialTLS dials addr through the builder's dialer and completes a TLS handshake with cfg, both bounded
// by ctx, and notes the handshake's certificate in run. It returns a net.Conn (nil on error, never a
// typed nil) so callers can hold plain and TLS connections in one variable.
func (p *probeBuilder) dialTLS(ctx context.Context, addr string, cfg *tls.Config, run *probeRun) (net.Conn, error) {
	raw, err := p.dial(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	if cfg.ServerName == "" {
		// As tls.Dial: verify against the host the check names.
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			host = addr
		}
		cfg = cfg.Clone()
		cfg.ServerName = host
	}
	conn := tls.Client(raw, cfg)
	if err := conn.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, err
	}
	cs := conn.ConnectionState()
	run.recordTLS(&cs)
	return conn, nil
}
