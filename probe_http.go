package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
)

const (
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

// transport returns the HTTP transport for one TLS variant, built as Consul builds its check
// client's: keep-alives off, proxies from the environment, HTTP/2 when TLS offers it.
func (p *probeBuilder) transport(k tlsKey) *http.Transport {
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

// httpProbe sends the definition's request (method, headers, body) and judges the answer as
// Consul's HTTP check does: passing for 2xx, warning for 429, critical for any other status or no
// answer. The output names the request and the status line and ends with the last OutputMaxSize
// bytes of the body.
func (p *probeBuilder) httpProbe(d *checkDefinition, timeout time.Duration) probeFunc {
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
func (p *probeBuilder) readTail(body io.ReadCloser, max int) string {
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
