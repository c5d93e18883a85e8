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
	"testing"
	"time"
)

// answerEach reads requests off a connection and writes answer(request) for each until the
// client goes away; answer returns the raw response and whether to keep the connection open.
func answerEach(answer func(r *http.Request) (string, bool)) func(net.Conn, *bufio.Reader) {
	return func(c net.Conn, br *bufio.Reader) {
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			io.Copy(io.Discard, req.Body)
			resp, keep := answer(req)
			if _, err := io.WriteString(c, resp); err != nil || !keep {
				return
			}
		}
	}
}

func gzipped(s string) string {
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	io.WriteString(zw, s)
	zw.Close()
	return b.String()
}

func leanCount(p *prober) int {
	p.h1.mu.Lock()
	defer p.h1.mu.Unlock()
	n := 0
	for _, conns := range p.h1.idle {
		n += len(conns)
	}
	return n
}

// TestH1MatchesNetHTTP runs every probe twice, through the lean client and through net/http
// alone, and requires the same status and output: a check must read the same whichever path ran
// it. kept says whether the lean client must have kept the connection (so the case really ran on
// the lean path, not a fallback).
func TestH1MatchesNetHTTP(t *testing.T) {
	big := strings.Repeat("0123456789", 1000) + "END"
	gz := gzipped("compressed hello")
	cases := []struct {
		name   string
		def    checkDefinition
		answer func(r *http.Request) (string, bool)
		kept   bool
		status string
	}{
		{"200 content-length", checkDefinition{}, func(*http.Request) (string, bool) {
			return "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", true
		}, true, statusPassing},
		{"chunked", checkDefinition{}, func(*http.Request) (string, bool) {
			return "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", true
		}, true, statusPassing},
		{"gzip", checkDefinition{}, func(*http.Request) (string, bool) {
			return fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s", len(gz), gz), true
		}, true, statusPassing},
		{"gzip chunked", checkDefinition{}, func(*http.Request) (string, bool) {
			return fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n", len(gz), gz), true
		}, true, statusPassing},
		{"empty gzip", checkDefinition{}, func(*http.Request) (string, bool) {
			return "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 0\r\n\r\n", true
		}, false, statusPassing},
		{"503 connection close", checkDefinition{}, func(*http.Request) (string, bool) {
			return "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 4\r\n\r\ndown", false
		}, false, statusCritical},
		{"http/1.0 until close", checkDefinition{}, func(*http.Request) (string, bool) {
			return "HTTP/1.0 200 OK\r\n\r\nold server", false
		}, false, statusPassing},
		{"429", checkDefinition{}, func(*http.Request) (string, bool) {
			return "HTTP/1.1 429 Too Many Requests\r\nContent-Length: 4\r\n\r\nslow", true
		}, true, statusWarning},
		{"204", checkDefinition{}, func(*http.Request) (string, bool) {
			return "HTTP/1.1 204 No Content\r\n\r\n", true
		}, true, statusPassing},
		{"custom reason", checkDefinition{}, func(*http.Request) (string, bool) {
			return "HTTP/1.1 500 Everything Is On Fire\r\nContent-Length: 0\r\n\r\n", true
		}, true, statusCritical},
		{"HEAD with length", checkDefinition{Method: "HEAD"}, func(*http.Request) (string, bool) {
			return "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", true
		}, true, statusPassing},
		{"tail of a large body", checkDefinition{}, func(*http.Request) (string, bool) {
			return fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(big), big), true
		}, true, statusPassing},
		{"small OutputMaxSize", checkDefinition{OutputMaxSize: 7}, func(*http.Request) (string, bool) {
			return fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(big), big), true
		}, true, statusPassing},
		{"100 continue first", checkDefinition{}, func(*http.Request) (string, bool) {
			return "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true
		}, false, statusPassing},
		{"redirect followed", checkDefinition{}, func(r *http.Request) (string, bool) {
			if r.URL.Path == "/to" {
				return "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\narrived", true
			}
			return "HTTP/1.1 302 Found\r\nLocation: /to\r\nContent-Length: 0\r\n\r\n", true
		}, false, statusPassing},
		{"redirect not followed", checkDefinition{DisableRedirects: true}, func(r *http.Request) (string, bool) {
			return "HTTP/1.1 302 Found\r\nLocation: /to\r\nContent-Length: 5\r\n\r\nmoved", true
		}, true, statusCritical},
		{"malformed status", checkDefinition{}, func(*http.Request) (string, bool) {
			return "HTTP/1.1 abc\r\n\r\n", false
		}, false, statusCritical},
		{"closed without answer", checkDefinition{}, func(*http.Request) (string, bool) {
			return "", false
		}, false, statusCritical},
		{"short body", checkDefinition{}, func(*http.Request) (string, bool) {
			return "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", false
		}, false, statusPassing},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			addr := rawServer(t, answerEach(tc.answer))
			d := tc.def
			d.HTTP = "http://" + addr + "/health?x=1"

			lean := newProber(nil)
			t.Cleanup(lean.close)
			std := newProber(nil)
			std.h1 = nil
			t.Cleanup(std.close)

			wantStatus, wantOut := runWith(t, std, &d, 2*time.Second)
			gotStatus, gotOut := runWith(t, lean, &d, 2*time.Second)
			if gotStatus != wantStatus || gotOut != wantOut {
				t.Fatalf("lean client: (%q, %q)\nnet/http:    (%q, %q)", gotStatus, gotOut, wantStatus, wantOut)
			}
			if gotStatus != tc.status {
				t.Fatalf("status %q, want %q (output %q)", gotStatus, tc.status, gotOut)
			}
			if kept := leanCount(lean) == 1; kept != tc.kept {
				t.Fatalf("lean client kept the connection: %v, want %v", kept, tc.kept)
			}
			// A second run reads the same (and reuses the kept connection where there is one).
			if s, out := runWith(t, lean, &d, 2*time.Second); s != wantStatus || out != wantOut {
				t.Fatalf("second lean run: (%q, %q), want (%q, %q)", s, out, wantStatus, wantOut)
			}
		})
	}
}

// TestH1ErrorsMatchNetHTTP covers failures before any response: the texts are what an operator
// reads in the catalog, so they must be net/http's (Consul's) word for word.
func TestH1ErrorsMatchNetHTTP(t *testing.T) {
	hang := rawServer(t, func(c net.Conn, br *bufio.Reader) { io.Copy(io.Discard, br) })
	cases := []struct {
		name string
		url  string
	}{
		{"refused", "http://" + closedTCPAddr(t) + "/"},
		{"timeout awaiting headers", "http://" + hang + "/slow"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			lean := newProber(nil)
			t.Cleanup(lean.close)
			std := newProber(nil)
			std.h1 = nil
			t.Cleanup(std.close)
			d := &checkDefinition{HTTP: tc.url}
			wantStatus, wantOut := runWith(t, std, d, 300*time.Millisecond)
			gotStatus, gotOut := runWith(t, lean, d, 300*time.Millisecond)
			if gotStatus != wantStatus || gotOut != wantOut {
				t.Fatalf("lean client: (%q, %q)\nnet/http:    (%q, %q)", gotStatus, gotOut, wantStatus, wantOut)
			}
		})
	}
}

// TestH1RequestMatchesNetHTTP compares what a target receives from both paths, header by header.
func TestH1RequestMatchesNetHTTP(t *testing.T) {
	type request struct {
		line   string
		header textproto.MIMEHeader
		body   string
	}
	got := make(chan request, 1)
	addr := rawServer(t, func(c net.Conn, br *bufio.Reader) {
		tp := textproto.NewReader(br)
		for {
			line, err := tp.ReadLine()
			if err != nil {
				return
			}
			h, err := tp.ReadMIMEHeader()
			if err != nil {
				return
			}
			var n int
			fmt.Sscan(h.Get("Content-Length"), &n)
			body := make([]byte, n)
			io.ReadFull(br, body)
			got <- request{line, h, string(body)}
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
		}
	})
	defs := []checkDefinition{
		{},
		{HTTP: "/path/with%20space?q=a+b&r=%2F"},
		{Method: "POST", Body: `{"ping":1}`, Header: map[string][]string{"X-Token": {"abc"}, "x-multi": {"1", " 2 "}, "host": {"svc.example"}}},
		{Method: "PUT"},
		{Method: "HEAD", Header: map[string][]string{"User-Agent": {"mine"}, "Accept": {"application/json"}}},
		{Method: "DELETE", Body: "bye"},
	}
	for i, def := range defs {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			d := def
			d.HTTP = "http://" + addr + d.HTTP
			lean := newProber(nil)
			t.Cleanup(lean.close)
			std := newProber(nil)
			std.h1 = nil
			t.Cleanup(std.close)
			var seen [2]request
			for j, p := range []*prober{std, lean} {
				if s, out := runWith(t, p, &d, 2*time.Second); s != statusPassing {
					t.Fatalf("(%q, %q)", s, out)
				}
				seen[j] = <-got
			}
			if leanCount(lean) != 1 {
				t.Fatal("the lean client did not send the request")
			}
			std1, lean1 := seen[0], seen[1]
			if std1.line != lean1.line || std1.body != lean1.body {
				t.Fatalf("net/http sent %q %q, lean %q %q", std1.line, std1.body, lean1.line, lean1.body)
			}
			keys := func(h textproto.MIMEHeader) []string {
				var ks []string
				for k := range h {
					ks = append(ks, k)
				}
				slices.Sort(ks)
				return ks
			}
			if !slices.Equal(keys(std1.header), keys(lean1.header)) {
				t.Fatalf("header names: net/http %v, lean %v", keys(std1.header), keys(lean1.header))
			}
			for k, v := range std1.header {
				if !slices.Equal(v, lean1.header[k]) {
					t.Errorf("%s: net/http %q, lean %q", k, v, lean1.header[k])
				}
			}
		})
	}
}

// TestH1Eligibility: only requests net/http would write byte for byte the same take the lean path.
func TestH1Eligibility(t *testing.T) {
	h := http.Header{"User-Agent": {checkUserAgent}}
	cases := []struct {
		method, url string
		header      http.Header
		lean        bool
	}{
		{"GET", "http://127.0.0.1:8080/x", h, true},
		{"GET", "http://[::1]:8080/x", h, true},
		{"GET", "http://127.0.0.1/x", h, true},
		{"GET", "https://127.0.0.1/x", h, false},
		{"GET", "http://user:pw@127.0.0.1/x", h, false},
		{"BAD METHOD", "http://127.0.0.1/x", h, false},
		{"GET", "http://127.0.0.1/x", http.Header{"Connection": {"close"}}, false},
		{"GET", "http://127.0.0.1/x", http.Header{"Accept-Encoding": {"br"}}, false},
		{"GET", "http://127.0.0.1/x", http.Header{"X-Bad": {"a\r\nb"}}, false},
		{"GET", "http://127.0.0.1/x", http.Header{"Host": {"bad host"}}, false},
		{"GET", "http://bücher.example/x", h, false},
	}
	c := newH1Client()
	for _, tc := range cases {
		if got := c.newRequest(tc.method, tc.url, tc.header, "") != nil; got != tc.lean {
			t.Errorf("%s %s %v: lean %v, want %v", tc.method, tc.url, tc.header, got, tc.lean)
		}
	}
	// A URL the environment proxies (or whose proxy setting is broken) goes through net/http, which
	// honours it. net/http reads the environment once per process, so the choice is stubbed here.
	c.proxy = func(*http.Request) (*url.URL, error) { return url.Parse("http://127.0.0.1:3128") }
	if c.newRequest("GET", "http://127.0.0.2/x", h, "") != nil {
		t.Error("a proxied URL took the lean path")
	}
	c.proxy = func(*http.Request) (*url.URL, error) { return nil, errors.New("bad proxy setting") }
	if c.newRequest("GET", "http://127.0.0.2/x", h, "") != nil {
		t.Error("a URL with a broken proxy setting took the lean path")
	}
}

// TestH1CancelStopsRun: a stopped check or a shutdown does not wait for a hanging target's timeout.
func TestH1CancelStopsRun(t *testing.T) {
	addr := rawServer(t, func(c net.Conn, br *bufio.Reader) { io.Copy(io.Discard, br) })
	p := newProber(nil)
	t.Cleanup(p.close)
	probe, err := p.newProbe(&checkDefinition{HTTP: "http://" + addr + "/"}, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	start := time.Now()
	probe(ctx)
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("cancelled run took %s", d)
	}
	if n := leanCount(p); n != 0 {
		t.Fatalf("%d connections kept after a cancelled run", n)
	}
}

// TestH1IdleConnectionsClosed: the prober's close drops kept connections (the target sees EOF).
func TestH1IdleConnectionsClosed(t *testing.T) {
	closed := make(chan struct{}, 1)
	addr := rawServer(t, func(c net.Conn, br *bufio.Reader) {
		answerEach(func(*http.Request) (string, bool) {
			return "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", true
		})(c, br)
		closed <- struct{}{}
	})
	p := newProber(nil)
	if s, out := runWith(t, p, &checkDefinition{HTTP: "http://" + addr + "/"}, time.Second); s != statusPassing {
		t.Fatalf("(%q, %q)", s, out)
	}
	p.close()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("idle connection still open after close")
	}
}
