package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http/httpguts"
)

const (
	// h1MaxIdlePerHost matches the per-target in-flight limit, so a target probed at full
	// concurrency keeps all its connections.
	h1MaxIdlePerHost = 32
	// h1IdleTimeout is how long an unused connection is kept, as net/http's default transport.
	h1IdleTimeout = 90 * time.Second
)

// errH1Fallback tells the caller to run this request through net/http instead: the response
// needs something the lean client leaves to net/http (redirects, 1xx) or failed in a way whose
// exact error text only net/http produces.
var errH1Fallback = errors.New("h1: use net/http")

// h1Client sends plain-HTTP probe requests over kept-alive HTTP/1.1 connections in the calling
// goroutine. net/http's transport runs a reader and a writer goroutine per connection and hands
// every request and response between them and the caller; with thousands of checks per second
// those hand-offs (thread wake-ups, channel operations) and the per-request allocations were most of
// the runner's CPU. Only requests net/http would send identically take this path (see newRequest);
// everything else, and every response it does not handle itself, goes through net/http.
type h1Client struct {
	dialer net.Dialer
	// proxy is the net/http path's proxy choice (http.ProxyFromEnvironment); a proxied URL is
	// left to net/http.
	proxy func(*http.Request) (*url.URL, error)

	mu        sync.Mutex
	idle      map[string][]*h1Conn // by dial address, most recently used last
	lastSweep time.Time

	// readers lends read buffers to connections in use. An idle connection has nothing buffered
	// (or it would not have been kept), so it holds none: with one kept connection per target,
	// 10,000 targets would otherwise pin 40 MB of empty buffers.
	readers sync.Pool
}

// h1Conn is one kept-alive connection and, while in use, its read buffer.
type h1Conn struct {
	nc        net.Conn
	br        *bufio.Reader
	idleSince time.Time
}

func newH1Client() *h1Client {
	return &h1Client{
		dialer:  net.Dialer{KeepAlive: 30 * time.Second},
		proxy:   http.ProxyFromEnvironment,
		idle:    make(map[string][]*h1Conn),
		readers: sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 4096) }},
	}
}

// h1Request is a probe's request, serialised once when the probe is built: a check sends the same
// bytes on every run.
type h1Request struct {
	addr string // host:port to dial
	raw  []byte // request line, headers and body
	// head: a HEAD request. Its response has no body whatever its headers say; every other
	// request asks for gzip as net/http's transport does, so a gzip response is decoded.
	head bool
	// op and url make net/http's *url.Error text ("Get \"http://...\": ...") for errors the lean
	// client reports itself.
	op, url string
}

// ReadResponse learns from the request's method alone whether a body follows; these two are
// read-only and shared so that 10,000 checks do not each hold a whole http.Request for it.
var (
	h1HeadRequest = &http.Request{Method: http.MethodHead}
	h1BodyRequest = &http.Request{Method: http.MethodGet}
)

// h1ExcludedHeaders are request headers that change how net/http frames or sends a request; a
// check setting any of them goes through net/http.
var h1ExcludedHeaders = []string{
	"Connection", "Content-Length", "Transfer-Encoding", "Trailer", "Te", "Upgrade", "Expect",
	"Proxy-Connection", "Keep-Alive", "Accept-Encoding", "Range",
}

// newRequest returns the lean form of a probe's request, or nil when net/http must send it:
// anything but plain http, a URL with credentials or a non-ASCII host, a proxy from the
// environment, an invalid method or header, or a header that changes framing.
func (c *h1Client) newRequest(method, target string, header http.Header, body string) *h1Request {
	// NewRequest parses the URL and rejects a method that is not a token, as the net/http path would.
	req, err := http.NewRequest(method, target, nil)
	if err != nil {
		return nil
	}
	u := req.URL
	if u.Scheme != "http" || u.User != nil || u.Host == "" || u.Opaque != "" {
		return nil
	}
	host := u.Host
	if h := header.Get("Host"); h != "" {
		host = h
	}
	if !isASCIIPrintable(host) || !httpguts.ValidHostHeader(host) || !isASCIIPrintable(u.Hostname()) {
		return nil
	}
	if p, err := c.proxy(req); err != nil || p != nil {
		return nil
	}
	for _, k := range h1ExcludedHeaders {
		if _, ok := header[k]; ok {
			return nil
		}
	}
	keys := make([]string, 0, len(header))
	for k, vs := range header {
		if !httpguts.ValidHeaderFieldName(k) {
			return nil
		}
		for _, v := range vs {
			if !httpguts.ValidHeaderFieldValue(v) {
				return nil
			}
		}
		if k != "Host" && k != "User-Agent" {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)

	port := u.Port()
	if port == "" {
		port = "80"
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: %s\r\n", method, u.RequestURI(), removeZone(host))
	if ua := textproto.TrimString(header.Get("User-Agent")); ua != "" {
		fmt.Fprintf(&b, "User-Agent: %s\r\n", ua)
	}
	if len(body) > 0 || method == http.MethodPost || method == http.MethodPut || method == http.MethodPatch {
		fmt.Fprintf(&b, "Content-Length: %d\r\n", len(body))
	}
	for _, k := range keys {
		for _, v := range header[k] {
			fmt.Fprintf(&b, "%s: %s\r\n", k, textproto.TrimString(v))
		}
	}
	// net/http's transport asks for gzip (and decodes it) except for HEAD, unless told otherwise;
	// Consul's check client does not tell it otherwise.
	head := method == http.MethodHead
	if !head {
		b.WriteString("Accept-Encoding: gzip\r\n")
	}
	b.WriteString("\r\n")
	b.WriteString(body)

	return &h1Request{
		addr: net.JoinHostPort(u.Hostname(), port),
		raw:  b.Bytes(),
		head: head,
		op:   method[:1] + strings.ToLower(method[1:]),
		url:  target,
	}
}

// removeZone drops an IPv6 zone from a Host header value, as net/http does.
func removeZone(host string) string {
	if !strings.HasPrefix(host, "[") {
		return host
	}
	i := strings.LastIndex(host, "]")
	if i < 0 {
		return host
	}
	j := strings.LastIndex(host[:i], "%")
	if j < 0 {
		return host
	}
	return host[:j] + host[i:]
}

func isASCIIPrintable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] >= 0x7f {
			return false
		}
	}
	return true
}

// h1Result is a response read by the lean client.
type h1Result struct {
	status     string
	statusCode int
	output     string
}

// do sends r and reads the response, its body cut to the last max bytes. It retries once on a
// fresh connection when a reused one fails before any response arrives (the target may have closed
// it while idle). errH1Fallback means net/http must send the request instead; any other error is
// final and reads as net/http's would.
func (c *h1Client) do(ctx context.Context, r *h1Request, deadline time.Time, max int, followRedirects bool,
	readTail func(io.Reader, int) (string, int64, error)) (h1Result, error) {
	for attempt := 0; ; attempt++ {
		conn, reused, err := c.get(ctx, r.addr, deadline)
		if err != nil {
			return h1Result{}, c.urlError(r, err, deadline)
		}
		conn.br = c.readers.Get().(*bufio.Reader)
		conn.br.Reset(conn.nc)
		res, keep, err := c.exchange(ctx, conn, r, deadline, max, followRedirects, readTail)
		conn.br.Reset(nil)
		c.readers.Put(conn.br)
		conn.br = nil
		if keep {
			c.put(r.addr, conn)
		} else {
			conn.nc.Close()
		}
		if err == nil || errors.Is(err, errH1Fallback) {
			return res, err
		}
		if reused && attempt == 0 && ctx.Err() == nil && time.Now().Before(deadline) {
			continue
		}
		if isTimeout(err) || ctx.Err() != nil {
			return h1Result{}, c.urlError(r, err, deadline)
		}
		// A target that answers with something broken: net/http's error text for it is what
		// Consul shows, so let net/http say it.
		return h1Result{}, errH1Fallback
	}
}

// exchange writes r on conn and reads one response. keep reports whether conn can carry another
// request.
func (c *h1Client) exchange(ctx context.Context, conn *h1Conn, r *h1Request, deadline time.Time, max int,
	followRedirects bool, readTail func(io.Reader, int) (string, int64, error)) (res h1Result, keep bool, err error) {
	if err := conn.nc.SetDeadline(deadline); err != nil {
		return res, false, err
	}
	// A stopped check or a shutdown must not wait for the timeout.
	stop := context.AfterFunc(ctx, func() { _ = conn.nc.SetDeadline(time.Unix(1, 0)) })
	res, keep, err = c.roundTrip(conn, r, max, followRedirects, readTail)
	// The callback may have run: then the connection's deadline is spoiled, so it is not kept.
	if !stop() {
		keep = false
	}
	if keep {
		keep = conn.nc.SetDeadline(time.Time{}) == nil
	}
	return res, keep, err
}

func (c *h1Client) roundTrip(conn *h1Conn, r *h1Request, max int, followRedirects bool,
	readTail func(io.Reader, int) (string, int64, error)) (res h1Result, keep bool, err error) {
	if _, err := conn.nc.Write(r.raw); err != nil {
		return res, false, err
	}
	req := h1BodyRequest
	if r.head {
		req = h1HeadRequest
	}
	resp, err := http.ReadResponse(conn.br, req)
	if err != nil {
		return res, false, err
	}
	if resp.StatusCode < 200 || (followRedirects && isRedirect(resp)) {
		return h1Result{statusCode: resp.StatusCode}, false, errH1Fallback
	}
	body := io.Reader(resp.Body)
	if !r.head && strings.EqualFold(resp.Header.Get("Content-Encoding"), "gzip") {
		zr, err := gzip.NewReader(resp.Body)
		if err != nil {
			// Empty or corrupt: net/http reports this lazily as a body read error, which the
			// output ignores, so the body is simply empty.
			return h1Result{status: resp.Status, statusCode: resp.StatusCode}, false, nil
		}
		body = zr
	}
	out, n, rerr := readTail(body, max)
	res = h1Result{status: resp.Status, statusCode: resp.StatusCode, output: out}
	// Only a body read to its end leaves the connection at the next response; a body cut at the
	// read cap or by an error is abandoned with its connection.
	keep = rerr == nil && n < httpBodyReadCap && !resp.Close
	if keep && body != resp.Body {
		// The gzip stream has ended; the HTTP body must end with it (no trailing junk).
		var one [1]byte
		_, err := resp.Body.Read(one[:])
		keep = err == io.EOF
	}
	// Bytes after the response are not an answer to anything: the connection is out of step.
	keep = keep && conn.br.Buffered() == 0
	return res, keep, nil
}

// isRedirect reports whether net/http's client would follow resp.
func isRedirect(resp *http.Response) bool {
	switch resp.StatusCode {
	case http.StatusMovedPermanently, http.StatusFound, http.StatusSeeOther,
		http.StatusTemporaryRedirect, http.StatusPermanentRedirect:
		return resp.Header.Get("Location") != ""
	}
	return false
}

// isTimeout reports whether err is a network timeout (a deadline reached).
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// urlError words err as net/http's client does for the same failure.
func (c *h1Client) urlError(r *h1Request, err error, deadline time.Time) error {
	if !time.Now().Before(deadline) || isTimeout(err) {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			err = fmt.Errorf("%w (Client.Timeout exceeded while awaiting headers)", err)
		} else {
			err = errors.New("context deadline exceeded (Client.Timeout exceeded while awaiting headers)")
		}
	}
	return &url.Error{Op: r.op, URL: r.url, Err: err}
}

// get returns an idle connection to addr, or dials one.
func (c *h1Client) get(ctx context.Context, addr string, deadline time.Time) (conn *h1Conn, reused bool, err error) {
	now := time.Now()
	c.mu.Lock()
	for conns := c.idle[addr]; len(conns) > 0; conns = c.idle[addr] {
		conn = conns[len(conns)-1]
		conns[len(conns)-1] = nil
		c.idle[addr] = conns[:len(conns)-1]
		if now.Sub(conn.idleSince) < h1IdleTimeout {
			c.mu.Unlock()
			return conn, true, nil
		}
		conn.nc.Close()
	}
	c.mu.Unlock()
	dctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	nc, err := c.dialer.DialContext(dctx, "tcp", addr)
	if err != nil {
		return nil, false, err
	}
	return &h1Conn{nc: nc}, false, nil
}

// put keeps conn for the next request to addr, and now and then closes connections idle for
// longer than h1IdleTimeout so targets no longer probed do not hold sockets.
func (c *h1Client) put(addr string, conn *h1Conn) {
	now := time.Now()
	conn.idleSince = now
	var stale []*h1Conn
	c.mu.Lock()
	if conns := c.idle[addr]; len(conns) < h1MaxIdlePerHost {
		c.idle[addr] = append(conns, conn)
		conn = nil
	}
	if now.Sub(c.lastSweep) > h1IdleTimeout/3 {
		c.lastSweep = now
		for a, conns := range c.idle {
			live := conns[:0]
			for _, ic := range conns {
				if now.Sub(ic.idleSince) < h1IdleTimeout {
					live = append(live, ic)
				} else {
					stale = append(stale, ic)
				}
			}
			clear(conns[len(live):])
			if len(live) == 0 {
				delete(c.idle, a)
			} else {
				c.idle[a] = live
			}
		}
	}
	c.mu.Unlock()
	if conn != nil {
		conn.nc.Close()
	}
	for _, ic := range stale {
		ic.nc.Close()
	}
}

// closeIdle closes every idle connection.
func (c *h1Client) closeIdle() {
	c.mu.Lock()
	old := c.idle
	c.idle = make(map[string][]*h1Conn)
	c.mu.Unlock()
	for _, conns := range old {
		for _, ic := range conns {
			ic.nc.Close()
		}
	}
}
