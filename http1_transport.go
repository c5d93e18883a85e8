package main

// Why this file exists. net/http's Transport runs every HTTP/1.1 exchange through three goroutines (a
// dialer, a read loop and a write loop) and hands the request and the response between them and the
// caller. With a new connection for every check run, as Consul's semantics require, that machinery
// was a third of ESM's CPU at 10k checks: `make bench -size 10k -tcp-frac 0 -compare` with this file
// against plain net/http measured 0.114 against 0.180 cores and 0.170 against 0.229 cores in two
// A/B invocations. leanTransport makes the same exchange in the calling goroutine.
//
// It replaces only the HTTP/1.1 mechanics of plain-http requests without a proxy. http.Client still
// drives it (redirects, timeouts, error wrapping), and it hands every other request (TLS, proxies,
// HTTP/2, headers that change framing) to the net/http Transport it wraps. From net/http it keeps the
// request bytes (Request.Write plus the Transport's extra headers), the response parser
// (http.ReadResponse), the 1 MiB head limit, the 1xx rules, transparent gzip and the error texts.
// TestLeanTransportMatchesNetHTTP runs both on the same answers and requires the same results.

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
	"net/url"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http/httpguts"
)

// leanExcludedHeaders change how net/http frames or sends a request; a request carrying any of them
// goes through net/http.
var leanExcludedHeaders = []string{
	"Connection", "Content-Length", "Transfer-Encoding", "Trailer", "Te", "Upgrade", "Expect",
	"Proxy-Connection", "Keep-Alive", "Accept-Encoding", "Range",
}

// leanTransport is an http.RoundTripper for the HTTP checks: plain-http requests are exchanged over a
// new connection in the calling goroutine, everything else goes to next.
type leanTransport struct {
	next  http.RoundTripper
	dial  dialFunc
	proxy func(*http.Request) (*url.URL, error) // net/http's proxy choice; a proxied request goes to next
	bufs  *leanBuffers
}

// leanBuffers are the read buffers and request buffers the lean exchanges borrow.
type leanBuffers struct {
	readers sync.Pool
	writes  sync.Pool
}

func newLeanBuffers() *leanBuffers {
	return &leanBuffers{
		readers: sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 4096) }},
		writes:  sync.Pool{New: func() any { return new(bytes.Buffer) }},
	}
}

// eligible reports whether req can take the lean path: what it would write and how it would read
// the answer are exactly net/http's.
func (t *leanTransport) eligible(req *http.Request) bool {
	u := req.URL
	if u.Scheme != "http" || u.User != nil || u.Host == "" || req.Close || len(req.TransferEncoding) > 0 || req.Trailer != nil {
		return false
	}
	host := u.Host
	if req.Host != "" {
		host = req.Host
	}
	if !isASCIIPrintable(host) || !httpguts.ValidHostHeader(host) || !isASCIIPrintable(u.Hostname()) {
		return false
	}
	for _, k := range leanExcludedHeaders {
		if _, ok := req.Header[k]; ok {
			return false
		}
	}
	if p, err := t.proxy(req); err != nil || p != nil {
		return false
	}
	return true
}

func isASCIIPrintable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] >= 0x7f {
			return false
		}
	}
	return true
}

// RoundTrip implements http.RoundTripper.
func (t *leanTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if !t.eligible(req) {
		return t.next.RoundTrip(req)
	}
	ctx := req.Context()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	raw, gzipped, err := t.requestBytes(req)
	if err != nil {
		return nil, err
	}
	defer t.bufs.writes.Put(raw)
	port := req.URL.Port()
	if port == "" {
		port = "80"
	}
	conn, err := t.dial(ctx, "tcp", net.JoinHostPort(req.URL.Hostname(), port))
	if err != nil {
		return nil, err
	}
	ex := &leanExchange{conn: conn, bufs: t.bufs}
	// The request's context carries the check's timeout (http.Client derives it) and its
	// cancellation; it alone ends the exchange, so a failure is always worded by why it ended.
	ex.stop = context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	resp, err := ex.roundTrip(req, raw.Bytes(), gzipped)
	if err != nil {
		ex.close()
		if cerr := ctx.Err(); cerr != nil {
			awaitClientTimeout(req, cerr)
			return nil, cerr // as net/http: a canceled request reports why, not the torn-down socket
		}
		return nil, err
	}
	return resp, nil
}

// awaitClientTimeout waits, when the request's deadline passed, until http.Client has noticed its own
// Timeout (it closes req.Cancel right after recording it). The two fire at the same instant; returning
// first would lose the "(Client.Timeout exceeded ...)" that net/http's and Consul's error texts carry.
func awaitClientTimeout(req *http.Request, cerr error) {
	if req.Cancel == nil || !errors.Is(cerr, context.DeadlineExceeded) {
		return
	}
	t := time.NewTimer(time.Second)
	defer t.Stop()
	select {
	case <-req.Cancel:
	case <-t.C:
	}
}

// requestBytes serialises req as net/http's Transport writes it with keep-alives off: Request.Write
// followed by the Transport's own headers, Accept-Encoding (when it asks for gzip) and Connection.
func (t *leanTransport) requestBytes(req *http.Request) (*bytes.Buffer, bool, error) {
	b := t.bufs.writes.Get().(*bytes.Buffer)
	b.Reset()
	if err := req.Write(b); err != nil {
		t.bufs.writes.Put(b)
		return nil, false, err
	}
	gzipped := req.Method != http.MethodHead
	extra := "Connection: close\r\n"
	if gzipped {
		extra = "Accept-Encoding: gzip\r\n" + extra
	}
	// Header values cannot hold CR or LF (Request.Write refuses them), so the first empty line ends
	// the head; the extra headers go right before it.
	data := b.Bytes()
	end := bytes.Index(data, []byte("\r\n\r\n"))
	if end < 0 {
		t.bufs.writes.Put(b)
		return nil, false, errors.New("lean transport: request without a head")
	}
	body := append([]byte(nil), data[end+2:]...)
	b.Truncate(end + 2)
	b.WriteString(extra)
	b.Write(body)
	return b, gzipped, nil
}

// leanExchange is one request and its answer on its own connection.
type leanExchange struct {
	conn net.Conn
	br   *bufio.Reader
	lim  headLimit
	bufs *leanBuffers
	stop func() bool
	once sync.Once
}

// headLimit fails reads once the response head (every 1xx head and the final one) passes
// maxResponseHeaderBytes, as net/http's read limit does; the body is not limited here.
type headLimit struct {
	r         io.Reader
	left      int64
	unlimited bool
}

var errHeadTooLarge = fmt.Errorf("net/http: server response headers exceeded %d bytes; aborted", maxResponseHeaderBytes)

func (l *headLimit) Read(p []byte) (int, error) {
	if l.unlimited {
		return l.r.Read(p)
	}
	if l.left <= 0 {
		return 0, errHeadTooLarge
	}
	if int64(len(p)) > l.left {
		p = p[:l.left]
	}
	n, err := l.r.Read(p)
	l.left -= int64(n)
	return n, err
}

func (ex *leanExchange) roundTrip(req *http.Request, raw []byte, gzipped bool) (*http.Response, error) {
	if _, err := ex.conn.Write(raw); err != nil {
		return nil, err
	}
	ex.lim = headLimit{r: ex.conn, left: maxResponseHeaderBytes}
	ex.br = ex.bufs.readers.Get().(*bufio.Reader)
	ex.br.Reset(&ex.lim)
	if _, err := ex.br.Peek(1); err != nil {
		return nil, ex.readError(err, false)
	}
	// Informational answers are skipped; what bounds them is the head limit, which spans them all.
	var resp *http.Response
	for {
		var err error
		if resp, err = http.ReadResponse(ex.br, req); err != nil {
			return nil, ex.readError(err, true)
		}
		if code := resp.StatusCode; code < 100 || code > 199 || code == http.StatusSwitchingProtocols {
			break
		}
	}
	ex.lim.unlimited = true
	body := io.Reader(resp.Body)
	if resp.StatusCode == http.StatusSwitchingProtocols {
		body = ex.br // as net/http: after a 101 the connection itself is the body
	}
	if gzipped && resp.ContentLength != 0 && strings.EqualFold(resp.Header.Get("Content-Encoding"), "gzip") {
		body = &lazyGzip{r: body}
		resp.Header.Del("Content-Encoding")
		resp.Header.Del("Content-Length")
		resp.ContentLength = -1
		resp.Uncompressed = true
	}
	resp.Body = &leanBody{r: body, ex: ex}
	return resp, nil
}

// readError words a failure to read the answer as net/http's Transport does: before the first byte
// it is the read's own error; after it the connection is broken; a head past the limit says so
// whatever the parser made of the cut.
func (ex *leanExchange) readError(err error, started bool) error {
	if !ex.lim.unlimited && ex.lim.left <= 0 {
		err, started = errHeadTooLarge, true
	}
	if !started {
		return err
	}
	return fmt.Errorf("net/http: HTTP/1.x transport connection broken: %w", err)
}

// close ends the exchange: the connection is closed and the read buffer goes back to the pool.
func (ex *leanExchange) close() {
	ex.once.Do(func() {
		if ex.stop != nil {
			ex.stop()
		}
		ex.conn.Close()
		if ex.br != nil {
			ex.br.Reset(nil)
			ex.bufs.readers.Put(ex.br)
		}
	})
}

// leanBody is a response body; closing it closes the connection.
type leanBody struct {
	r  io.Reader
	ex *leanExchange
}

func (b *leanBody) Read(p []byte) (int, error) { return b.r.Read(p) }

func (b *leanBody) Close() error {
	b.ex.close()
	return nil
}

// lazyGzip decodes a gzip body from its first read on, as net/http's gzipReader: an empty or corrupt
// stream is a read error, not a failed request.
type lazyGzip struct {
	r   io.Reader
	zr  *gzip.Reader
	err error
}

func (g *lazyGzip) Read(p []byte) (int, error) {
	if g.err != nil {
		return 0, g.err
	}
	if g.zr == nil {
		if g.zr, g.err = gzip.NewReader(g.r); g.err != nil {
			return 0, g.err
		}
	}
	return g.zr.Read(p)
}
