package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	hv1 "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
)

// Consul's health status strings, as the catalog stores them.
const (
	statusPassing  = "passing"
	statusWarning  = "warning"
	statusCritical = "critical"
)

const (
	// defaultCheckTimeout is what Consul uses when a definition has no Timeout.
	defaultCheckTimeout = 10 * time.Second

	// defaultOutputMaxSize is Consul's default check_output_max_size. A check's own OutputMaxSize
	// may only lower it, as on a Consul agent, so one chatty endpoint cannot bloat the catalog.
	defaultOutputMaxSize = 4096

	// httpBodyReadCap bounds how much of a response body is read. Consul reads to EOF; the status
	// code already decided the result, so past this point reading only keeps a runaway or streaming
	// endpoint (or a decompression bomb) occupying the check until its timeout.
	httpBodyReadCap = 1 << 20

	// maxResponseHeaderBytes bounds a response's status line and headers (net/http's default is
	// 10 MiB). A health endpoint's head is a few hundred bytes; this is net/http's server-side
	// default, so an endless status line or a non-HTTP stream costs a run at most this much.
	maxResponseHeaderBytes = 1 << 20

	// checkUserAgent and checkAccept are the headers Consul's HTTP check sends when the definition
	// has none; some endpoints vary their answer on them.
	checkUserAgent = "Consul Health Check"
	checkAccept    = "text/plain, text/*, */*"
)

// durationField is a duration in a check definition. Consul writes Interval/Timeout/
// DeregisterCriticalServiceAfter as strings ("10s") but TTL as integer nanoseconds, and accepts
// either when reading, so both forms are decoded; it is always written back as a string.
type durationField time.Duration

func (d durationField) String() string { return time.Duration(d).String() }

// MarshalJSON writes the duration in Go's string form, which Consul parses back.
func (d durationField) MarshalJSON() ([]byte, error) {
	return json.Marshal(time.Duration(d).String())
}

// UnmarshalJSON accepts a duration string ("10s", "" meaning zero), a number of nanoseconds or null.
func (d *durationField) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	if bytes.Equal(b, []byte("null")) {
		return nil
	}
	if len(b) > 0 && b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return fmt.Errorf("duration: %w", err)
		}
		if s == "" {
			*d = 0
			return nil
		}
		v, err := time.ParseDuration(s)
		if err != nil {
			return fmt.Errorf("duration: %w", err)
		}
		*d = durationField(v)
		return nil
	}
	if n, err := strconv.ParseInt(string(b), 10, 64); err == nil {
		*d = durationField(n)
		return nil
	}
	// Consul itself decodes numbers as float64, so "1e9" style values are legal on the wire.
	f, err := strconv.ParseFloat(string(b), 64)
	if err != nil {
		return fmt.Errorf("duration: invalid value %s", b)
	}
	*d = durationField(f)
	return nil
}

// checkDefinition mirrors the Definition object of a catalog health check as Consul's HTTP API
// returns it in /v1/health/state/any (Consul's structs.HealthCheckDefinition). Field names are
// Consul's so the struct round-trips through JSON and can be written back unchanged.
type checkDefinition struct {
	HTTP             string              `json:",omitempty"`
	Header           map[string][]string `json:",omitempty"`
	Method           string              `json:",omitempty"`
	Body             string              `json:",omitempty"`
	TLSServerName    string              `json:",omitempty"`
	TLSSkipVerify    bool                `json:",omitempty"`
	DisableRedirects bool                `json:",omitempty"`

	TCP       string `json:",omitempty"`
	TCPUseTLS bool   `json:",omitempty"`

	UDP string `json:",omitempty"`

	H2PING       string `json:",omitempty"`
	H2PingUseTLS bool   `json:",omitempty"`

	OSService string `json:",omitempty"`

	GRPC       string `json:",omitempty"`
	GRPCUseTLS bool   `json:",omitempty"`

	Interval                       durationField `json:",omitempty"`
	Timeout                        durationField `json:",omitempty"`
	DeregisterCriticalServiceAfter durationField `json:",omitempty"`
	OutputMaxSize                  int           `json:",omitempty"`

	ScriptArgs        []string      `json:",omitempty"`
	DockerContainerID string        `json:",omitempty"`
	Shell             string        `json:",omitempty"`
	AliasNode         string        `json:",omitempty"`
	AliasService      string        `json:",omitempty"`
	SessionName       string        `json:",omitempty"`
	TTL               durationField `json:",omitempty"`

	// Per-check anti-flapping thresholds, named as in Consul's check definitions. Consul 1.22's
	// catalog does not store them (they exist only in agent check definitions), so today they
	// arrive only from a catalog or proxy that keeps them; when present they override
	// passing_threshold/critical_threshold for this check.
	SuccessBeforePassing   int `json:",omitempty"`
	FailuresBeforeWarning  int `json:",omitempty"`
	FailuresBeforeCritical int `json:",omitempty"`
}

// kind returns the probe type for a definition ESM can run, or "" and the reason it cannot.
// Runnable types win over the rest in Consul's own order, so a definition carrying stray fields
// of an unsupported type still runs.
func (d *checkDefinition) kind() (kind string, unsupported string) {
	switch {
	case d.HTTP != "":
		return "http", ""
	case d.TCP != "":
		return "tcp", ""
	case d.UDP != "":
		return "udp", ""
	case d.GRPC != "":
		return "grpc", ""
	case d.H2PING != "":
		return "h2ping", ""
	case d.TTL != 0:
		return "", "TTL checks are updated by the service itself, not run by ESM"
	case d.AliasNode != "" || d.AliasService != "":
		return "", "alias checks are not supported by ESM"
	case d.DockerContainerID != "":
		return "", "docker checks are not supported by ESM"
	case len(d.ScriptArgs) > 0:
		return "", "script checks are not supported by ESM"
	case d.OSService != "":
		return "", "OS service checks are not supported by ESM"
	case d.SessionName != "":
		return "", "session checks are not supported by ESM"
	default:
		return "", "definition has no HTTP, TCP, UDP, GRPC or H2PING target"
	}
}

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

// tlsKey identifies the per-check TLS overrides; HTTP transports are shared per key because a
// transport's TLS config is fixed once it has dialled.
type tlsKey struct {
	skipVerify bool
	serverName string
}

// dialFunc opens a connection; every probe dials through the prober's, so a test can see (and steer)
// what each run connects to.
type dialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// prober builds probes and owns what they share: the TLS base from the https_* settings, the dialer
// and one HTTP transport per TLS variant.
//
// Nothing a probe uses outlives its run: keep-alives are off, as in Consul's own checks, so every run
// resolves the host name, dials, handshakes and closes. A kept connection would go on answering for a
// service whose listener is closed, whose name now points elsewhere or whose certificate was replaced;
// each run must see the target as a new client would. The transports are kept only because they hold
// nothing between runs but their settings.
type prober struct {
	mu         sync.Mutex
	tlsBase    *tls.Config
	transports map[tlsKey]*http.Transport
	dial       dialFunc
	// bodyBufs recycles the response-body buffers of HTTP runs: at thousands of runs per second a
	// fresh 8 KiB buffer per run was half of all bytes the runner allocated.
	bodyBufs sync.Pool
}

func newProber(tlsBase *tls.Config) *prober {
	// No TCP keep-alive probes: a connection lives for one run, and setting them up is three more
	// system calls per run.
	p := &prober{transports: make(map[tlsKey]*http.Transport), dial: (&net.Dialer{KeepAlive: -1}).DialContext}
	if tlsBase != nil {
		p.tlsBase = tlsBase.Clone()
	}
	return p
}

// setTLS replaces the TLS base (SIGHUP reload). Existing probes pick it up on their next run because
// they look up transports and TLS configs per run.
func (p *prober) setTLS(tlsBase *tls.Config) {
	if tlsBase != nil {
		tlsBase = tlsBase.Clone()
	}
	p.mu.Lock()
	p.tlsBase = tlsBase
	p.transports = make(map[tlsKey]*http.Transport)
	p.mu.Unlock()
}

// tlsConfig returns a fresh config for one check: a clone of the base (mTLS material, CAs) with
// the check's own verification overrides, as Consul's OutgoingTLSConfigForCheck does.
func (p *prober) tlsConfig(k tlsKey) *tls.Config {
	p.mu.Lock()
	base := p.tlsBase
	p.mu.Unlock()
	cfg := &tls.Config{}
	if base != nil {
		cfg = base.Clone()
	}
	cfg.InsecureSkipVerify = k.skipVerify
	if k.serverName != "" {
		cfg.ServerName = k.serverName
	}
	return cfg
}

// transport returns the HTTP transport for one TLS variant, built as Consul builds its check
// client's: keep-alives off, proxies from the environment, HTTP/2 when TLS offers it.
func (p *prober) transport(k tlsKey) *http.Transport {
	cfg := p.tlsConfig(k)
	p.mu.Lock()
	defer p.mu.Unlock()
	if t, ok := p.transports[k]; ok {
		return t
	}
	t := &http.Transport{
		Proxy:                  http.ProxyFromEnvironment,
		DialContext:            p.dial,
		TLSClientConfig:        cfg,
		ForceAttemptHTTP2:      true,
		DisableKeepAlives:      true,
		MaxResponseHeaderBytes: maxResponseHeaderBytes,
		TLSHandshakeTimeout:    10 * time.Second,
		ExpectContinueTimeout:  time.Second,
	}
	p.transports[k] = t
	return t
}

// newProbe builds the probe for d. timeout bounds one run; when it is not positive the
// definition's Timeout applies, and then Consul's 10s default.
func (p *prober) newProbe(d *checkDefinition, timeout time.Duration) (probeFunc, error) {
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

func (p *prober) httpProbe(d *checkDefinition, timeout time.Duration) probeFunc {
	method := d.Method
	if method == "" {
		method = http.MethodGet
	}
	// Canonicalise once so a lower-case "host" still sets req.Host and defaults are not doubled.
	header := make(http.Header, len(d.Header)+2)
	for k, vs := range d.Header {
		for _, v := range vs {
			header.Add(k, v)
		}
	}
	if header.Get("User-Agent") == "" {
		header.Set("User-Agent", checkUserAgent)
	}
	if header.Get("Accept") == "" {
		header.Set("Accept", checkAccept)
	}
	target, body := d.HTTP, d.Body
	maxOut := outputLimit(d.OutputMaxSize)
	key := tlsKey{d.TLSSkipVerify, d.TLSServerName}
	// The closure below must not capture d: it would keep the whole catalog entry d points into
	// alive after a reload replaced it, a kilobyte per check.
	var redirect func(*http.Request, []*http.Request) error
	if d.DisableRedirects {
		redirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	}
	return func(ctx context.Context, run *probeRun) (string, string) {
		req, err := http.NewRequestWithContext(ctx, method, target, strings.NewReader(body))
		if err != nil {
			return statusCritical, err.Error()
		}
		req.Header = header.Clone()
		if host := req.Header.Get("Host"); host != "" {
			req.Host = host
		}
		// Client.Timeout rather than a context deadline keeps Consul's error text
		// ("... (Client.Timeout exceeded while awaiting headers)").
		client := &http.Client{Transport: p.transport(key), CheckRedirect: redirect, Timeout: timeout}
		resp, err := client.Do(req)
		if err != nil {
			return statusCritical, err.Error()
		}
		// With redirects this is the last hop's handshake, the server that answered.
		run.recordTLS(resp.TLS)
		// A reason phrase may run to the header limit; no real one comes near the agent's output limit.
		status := truncateOutput(resp.Status, defaultOutputMaxSize)
		out := fmt.Sprintf("HTTP %s %s: %s Output: %s", method, target, status, p.readTail(resp.Body, maxOut))
		switch {
		case resp.StatusCode >= 200 && resp.StatusCode <= 299:
			return statusPassing, out
		case resp.StatusCode == http.StatusTooManyRequests:
			return statusWarning, out
		default:
			return statusCritical, out
		}
	}
}

// readTail reads a response body and returns its last max bytes, as Consul's ring buffer keeps
// them, holding no more than a buffer of twice max bytes. It stops after httpBodyReadCap bytes:
// Consul reads to EOF, but the status code has decided the result already, and an endless or
// dripping body must not hold the check until its timeout.
func (p *prober) readTail(body io.ReadCloser, max int) string {
	defer body.Close()
	// ReadFrom leaves t.buf re-sliced to the tail, so the whole buffer is kept aside for reuse.
	var buf []byte
	if b, ok := p.bodyBufs.Get().(*[]byte); ok && cap(*b) >= tailBufferSize(max) {
		buf = (*b)[:0]
	} else {
		buf = make([]byte, 0, tailBufferSize(max))
	}
	t := &tailBuffer{max: max, buf: buf}
	_, _ = t.ReadFrom(io.LimitReader(body, httpBodyReadCap)) // like Consul, a body cut short still reports what came
	out := string(t.buf)
	p.bodyBufs.Put(&buf)
	return out
}

// tailBufferSize is the buffer a tailBuffer of max bytes reads into: twice the tail (at least 512
// bytes, so a tiny OutputMaxSize does not mean tiny reads), so shifting the tail to the front happens
// at most once per max bytes read.
func tailBufferSize(n int) int { return max(2*n, 512) }

// tailBuffer keeps only the last max bytes read into it.
type tailBuffer struct {
	buf []byte
	max int
}

// ReadFrom reads straight into the tail buffer, so a run costs one small buffer instead of io.Copy's
// 32 KiB scratch buffer plus the copies.
func (t *tailBuffer) ReadFrom(r io.Reader) (int64, error) {
	if t.buf == nil {
		t.buf = make([]byte, 0, tailBufferSize(t.max))
	}
	var total int64
	for {
		if len(t.buf) == cap(t.buf) {
			t.buf = t.buf[:copy(t.buf, t.buf[len(t.buf)-min(t.max, len(t.buf)):])]
		}
		n, err := r.Read(t.buf[len(t.buf):cap(t.buf)])
		t.buf = t.buf[:len(t.buf)+n]
		total += int64(n)
		if err != nil {
			if len(t.buf) > t.max {
				t.buf = t.buf[len(t.buf)-t.max:]
			}
			if err == io.EOF {
				err = nil
			}
			return total, err
		}
	}
}

// dialTLS dials addr through the prober's dialer and completes a TLS handshake with cfg, both bounded
// by ctx, and notes the handshake's certificate in run. It returns a net.Conn (nil on error, never a
// typed nil) so callers can hold plain and TLS connections in one variable.
func (p *prober) dialTLS(ctx context.Context, addr string, cfg *tls.Config, run *probeRun) (net.Conn, error) {
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

func (p *prober) tcpProbe(addr string, useTLS bool, key tlsKey, timeout time.Duration) probeFunc {
	kind := "TCP"
	if useTLS {
		kind = "TCP+TLS"
	}
	success := fmt.Sprintf("%s connect %s: Success", kind, addr)
	return func(ctx context.Context, run *probeRun) (string, string) {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		var conn net.Conn
		var err error
		if useTLS {
			conn, err = p.dialTLS(ctx, addr, p.tlsConfig(key), run)
		} else {
			conn, err = p.dial(ctx, "tcp", addr)
		}
		if err != nil {
			return statusCritical, err.Error()
		}
		_ = conn.Close()
		return statusPassing, success
	}
}

// udpProbe follows Consul's CheckUDP: send an empty datagram (Consul never sets a payload) and
// wait for any reply. Silence is passing because UDP services need not answer; only an error,
// such as the ICMP port-unreachable that surfaces as "connection refused", is critical. Unlike
// Consul, the read is bounded by the timeout instead of blocking forever.
func (p *prober) udpProbe(addr string, timeout time.Duration) probeFunc {
	success := fmt.Sprintf("UDP connect %s: Success", addr)
	return func(ctx context.Context, _ *probeRun) (string, string) {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		conn, err := p.dial(ctx, "udp", addr)
		if err != nil {
			if isTimeout(err) {
				return statusPassing, success
			}
			return statusCritical, err.Error()
		}
		defer conn.Close()
		if dl, ok := ctx.Deadline(); ok {
			_ = conn.SetDeadline(dl)
		}
		// Expire the socket if the caller gives up first, so the read below returns.
		stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Now()) })
		defer stop()
		if _, err := conn.Write(nil); err != nil {
			return statusCritical, err.Error()
		}
		if _, err := conn.Read(make([]byte, 1)); err != nil {
			if isTimeout(err) {
				return statusPassing, success
			}
			return statusCritical, err.Error()
		}
		return statusPassing, success
	}
}

// isTimeout reports whether err is a network timeout (a deadline reached).
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// grpcProbe queries grpc.health.v1 on "host:port[/service]" with one connection per run, as Consul does.
// A cached ClientConn would also back off between reconnects (up to two minutes) and so be late to
// notice a recovered target.
func (p *prober) grpcProbe(target string, useTLS bool, key tlsKey, timeout time.Duration) probeFunc {
	server, service, _ := strings.Cut(target, "/")
	return func(ctx context.Context, run *probeRun) (string, string) {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		creds := insecure.NewCredentials()
		if useTLS {
			creds = credentials.NewTLS(p.tlsConfig(key))
		}
		// passthrough is the scheme Consul's grpc.Dial used; NewClient would default to dns.
		conn, err := grpc.NewClient("passthrough:///"+server, grpc.WithTransportCredentials(creds),
			grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) { return p.dial(ctx, "tcp", addr) }))
		if err != nil {
			return statusCritical, err.Error()
		}
		defer conn.Close()
		// The peer carries the handshake of this run's connection; it is filled in by the call itself,
		// so reading it afterwards needs no synchronisation with gRPC's transport goroutines.
		var pr peer.Peer
		resp, err := hv1.NewHealthClient(conn).Check(ctx, &hv1.HealthCheckRequest{Service: service}, grpc.Peer(&pr))
		if info, ok := pr.AuthInfo.(credentials.TLSInfo); ok {
			run.recordTLS(&info.State)
		}
		if err != nil {
			return statusCritical, err.Error()
		}
		if resp.GetStatus() != hv1.HealthCheckResponse_SERVING {
			return statusCritical, fmt.Sprintf("gRPC %s serving status: %s", target, resp.GetStatus())
		}
		return statusPassing, fmt.Sprintf("gRPC check %s: success", target)
	}
}

// h2pingProbe sends an HTTP/2 PING over a fresh connection: h2c with prior knowledge, or TLS
// with ALPN "h2" when useTLS.
func (p *prober) h2pingProbe(addr string, useTLS bool, key tlsKey, timeout time.Duration) probeFunc {
	return func(ctx context.Context, run *probeRun) (string, string) {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		t := &http2.Transport{}
		var conn net.Conn
		var err error
		if useTLS {
			cfg := p.tlsConfig(key)
			cfg.NextProtos = []string{http2.NextProtoTLS}
			t.TLSClientConfig = cfg
			conn, err = p.dialTLS(ctx, addr, cfg, run)
		} else {
			t.AllowHTTP = true
			conn, err = p.dial(ctx, "tcp", addr)
		}
		if err != nil {
			return statusCritical, fmt.Sprintf("Failed to dial to %s: %s", addr, err)
		}
		defer conn.Close()
		// A read deadline stops the client's frame reader should the peer never answer.
		if dl, ok := ctx.Deadline(); ok {
			_ = conn.SetDeadline(dl)
		}
		// http2.Transport.NewClientConn is deprecated in favour of net/http's, but only x/net's
		// ClientConn can send a PING frame.
		cc, err := t.NewClientConn(conn) //nolint:staticcheck // see above
		if err != nil {
			return statusCritical, fmt.Sprintf("Failed to create client connection %s", err)
		}
		// A GOAWAY first spares the target a "connection reset" in its logs; ctx bounds the wait.
		defer func() { _ = cc.Shutdown(ctx) }()
		if err := cc.Ping(ctx); err != nil {
			return statusCritical, fmt.Sprintf("HTTP2 ping failed: %s", err)
		}
		return statusPassing, "HTTP2 ping was successful"
	}
}
