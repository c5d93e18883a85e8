package main

import (
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// endpointKey is what the proxy counts requests by: method, endpoint with its variable parts
// replaced by "*", and whether the request was a blocking query.
type endpointKey struct {
	Method   string
	Endpoint string
	Blocking bool
}

// String is e.g. "GET /v1/health/state/any (blocking)".
func (k endpointKey) String() string {
	s := k.Method + " " + k.Endpoint
	if k.Blocking {
		s += " (blocking)"
	}
	return s
}

// Request kinds, the columns of the per-second request figures.
const (
	kindBlocking = "blocking" // GET with index > 0: costs Consul only when something changed
	kindRead     = "read"     // any other GET
	kindLiveness = "liveness" // consul-esm's own liveness: TTL check updates, session renewals
	kindWrite    = "write"    // every other PUT/POST/DELETE: status writes, KV, registrations
)

// livenessEndpoints are the writes consul-esm makes to stay alive, whatever it monitors.
var livenessEndpoints = map[string]bool{
	"PUT /v1/agent/check/update/*": true,
	"PUT /v1/agent/check/pass/*":   true,
	"PUT /v1/session/renew/*":      true,
}

// kind classifies a key.
func (k endpointKey) kind() string {
	switch {
	case k.Method == http.MethodGet || k.Method == http.MethodHead:
		if k.Blocking {
			return kindBlocking
		}
		return kindRead
	case livenessEndpoints[k.Method+" "+k.Endpoint]:
		return kindLiveness
	default:
		return kindWrite
	}
}

// classifyRequest maps a request to Consul onto its endpointKey.
func classifyRequest(method string, u *url.URL) endpointKey {
	idx := u.Query().Get("index")
	return endpointKey{Method: method, Endpoint: normalizeEndpoint(u.Path), Blocking: idx != "" && idx != "0"}
}

// normalizeEndpoint replaces the variable parts of a Consul API path (keys, names, IDs) by "*", so
// /v1/kv/esm/agents/x and /v1/kv/esm/leader both count as /v1/kv/*. Health states stay literal
// (/v1/health/state/any and /v1/health/state/critical are different loads).
func normalizeEndpoint(path string) string {
	segs := strings.Split(strings.Trim(path, "/"), "/")
	if len(segs) < 2 || segs[0] != "v1" {
		return "/" + strings.Join(segs, "/")
	}
	rest := segs[1:]
	join := func(parts ...string) string { return "/v1/" + strings.Join(parts, "/") }
	switch group := rest[0]; {
	case group == "kv":
		if len(rest) > 1 {
			return "/v1/kv/*"
		}
		return "/v1/kv"
	case group == "health" && len(rest) >= 3 && rest[1] == "state":
		return join("health", "state", rest[2])
	case group == "agent" && len(rest) >= 3 && (rest[1] == "check" || rest[1] == "service"):
		switch rest[2] {
		case "register":
			return join("agent", rest[1], "register")
		case "update", "pass", "warn", "fail", "deregister", "maintenance":
			if len(rest) > 3 {
				return join("agent", rest[1], rest[2], "*")
			}
			return join("agent", rest[1], rest[2])
		default:
			return join("agent", rest[1], "*")
		}
	}
	if len(rest) > 2 {
		return join(rest[0], rest[1], "*")
	}
	return join(rest...)
}

// reqCount is what the proxy counts per endpointKey.
type reqCount struct {
	Requests int64
	BytesIn  int64 // request bodies (to Consul)
	BytesOut int64 // response bodies (from Consul)
}

// requestCounts is a snapshot of the proxy's counters.
type requestCounts map[endpointKey]reqCount

// sub is c - before, per key.
func (c requestCounts) sub(before requestCounts) requestCounts {
	out := make(requestCounts, len(c))
	for k, v := range c {
		b := before[k]
		d := reqCount{v.Requests - b.Requests, v.BytesIn - b.BytesIn, v.BytesOut - b.BytesOut}
		if d != (reqCount{}) {
			out[k] = d
		}
	}
	return out
}

// byKind sums requests per kind.
func (c requestCounts) byKind() map[string]int64 {
	out := map[string]int64{}
	for k, v := range c {
		out[k.kind()] += v.Requests
	}
	return out
}

// total sums all requests.
func (c requestCounts) total() int64 {
	var n int64
	for _, v := range c {
		n += v.Requests
	}
	return n
}

// endpointRate is one row of the per-endpoint table.
type endpointRate struct {
	Endpoint    string  `json:"endpoint"`
	Kind        string  `json:"kind"`
	Requests    int64   `json:"requests"`
	PerSecond   float64 `json:"per_second"`
	BytesOutSec float64 `json:"bytes_out_per_second"`
}

// rates turns a window's counts into per-second rows, busiest first.
func (c requestCounts) rates(window time.Duration) []endpointRate {
	out := make([]endpointRate, 0, len(c))
	sec := window.Seconds()
	for k, v := range c {
		out = append(out, endpointRate{k.String(), k.kind(), v.Requests, float64(v.Requests) / sec, float64(v.BytesOut) / sec})
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Requests != out[j].Requests {
			return out[i].Requests > out[j].Requests
		}
		return out[i].Endpoint < out[j].Endpoint
	})
	return out
}

// countingProxy is a reverse proxy from consul-esm to Consul that counts every request.
type countingProxy struct {
	ln     net.Listener
	srv    *http.Server
	rp     *httputil.ReverseProxy
	mu     sync.RWMutex
	counts map[endpointKey]*counter
}

type counter struct{ requests, bytesIn, bytesOut atomic.Int64 }

// startProxy listens on a loopback port and forwards to consulAddr.
func startProxy(consulAddr string) (*countingProxy, error) {
	upstream := &url.URL{Scheme: "http", Host: consulAddr}
	tr := newTransport()
	tr.ResponseHeaderTimeout = 0 // blocking queries hold the response for up to their wait time
	p := &countingProxy{counts: map[endpointKey]*counter{}}
	p.rp = &httputil.ReverseProxy{
		Rewrite:   func(r *httputil.ProxyRequest) { r.SetURL(upstream); r.Out.Host = consulAddr },
		Transport: tr,
		ErrorLog:  log.New(io.Discard, "", 0),
	}
	ln, err := listenLoopback()
	if err != nil {
		return nil, fmt.Errorf("proxy listener: %w", err)
	}
	p.ln = ln
	p.srv = &http.Server{Handler: p, ReadHeaderTimeout: 10 * time.Second, ErrorLog: log.New(io.Discard, "", 0)}
	go func() { _ = p.srv.Serve(ln) }()
	return p, nil
}

// addr is the proxy's host:port, consul-esm's http_addr.
func (p *countingProxy) addr() string { return p.ln.Addr().String() }

func (p *countingProxy) counter(k endpointKey) *counter {
	p.mu.RLock()
	c := p.counts[k]
	p.mu.RUnlock()
	if c != nil {
		return c
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if c = p.counts[k]; c == nil {
		c = &counter{}
		p.counts[k] = c
	}
	return c
}

// ServeHTTP counts the request when it arrives, then forwards it, counting the response bytes.
func (p *countingProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c := p.counter(classifyRequest(r.Method, r.URL))
	c.requests.Add(1)
	if r.ContentLength > 0 {
		c.bytesIn.Add(r.ContentLength)
	}
	p.rp.ServeHTTP(&countingWriter{ResponseWriter: w, n: &c.bytesOut}, r)
}

// snapshot copies the counters.
func (p *countingProxy) snapshot() requestCounts {
	p.mu.RLock()
	defer p.mu.RUnlock()
	out := make(requestCounts, len(p.counts))
	for k, c := range p.counts {
		out[k] = reqCount{c.requests.Load(), c.bytesIn.Load(), c.bytesOut.Load()}
	}
	return out
}

// close stops the proxy and cuts its open connections (blocking queries included).
func (p *countingProxy) close() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := p.srv.Shutdown(ctx); err != nil {
		_ = p.srv.Close()
	}
}

// countingWriter counts the bytes of a response body.
type countingWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (w *countingWriter) Write(b []byte) (int, error) {
	n, err := w.ResponseWriter.Write(b)
	w.n.Add(int64(n))
	return n, err
}

// Unwrap lets http.ResponseController (used by ReverseProxy to flush) reach the real writer.
func (w *countingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
