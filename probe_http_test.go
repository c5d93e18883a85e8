package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"
)

func TestProbeHTTPStatus(t *testing.T) {
	t.Parallel()
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
	t.Parallel()
	addr := closedTCPAddr(t)
	url := "http://" + addr + "/"
	status, out := runProbe(t, &checkDefinition{HTTP: url}, time.Second)
	want := fmt.Sprintf("Get %q: dial tcp %s: connect: connection refused", url, addr)
	if status != statusCritical || out != want {
		t.Fatalf("got (%q, %q), want (critical, %q)", status, out, want)
	}
}

func TestProbeHTTPInvalidMethod(t *testing.T) {
	t.Parallel()
	status, out := runProbe(t, &checkDefinition{HTTP: "http://127.0.0.1:1/", Method: "BAD METHOD"}, time.Second)
	if status != statusCritical || !strings.Contains(out, "invalid method") {
		t.Fatalf("got (%q, %q)", status, out)
	}
}

func TestProbeHTTPRequestShape(t *testing.T) {
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
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
