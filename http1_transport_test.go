package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"
)

// gzipped returns s compressed.
func gzipped(s string) string {
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	io.WriteString(zw, s)
	zw.Close()
	return b.String()
}

// answerServer reads one request per connection and writes answer(path, the request's raw bytes),
// then closes the connection (the client asked for that with Connection: close).
func answerServer(t *testing.T, answer func(path string, raw []byte) string) string {
	t.Helper()
	return rawServer(t, func(c net.Conn, br *bufio.Reader) {
		var rec bytes.Buffer
		req, err := http.ReadRequest(bufio.NewReader(io.TeeReader(br, &rec)))
		if err != nil {
			return
		}
		io.Copy(io.Discard, req.Body)
		io.WriteString(c, answer(req.URL.Path, rec.Bytes()))
	})
}

// probeBoth runs d through a prober with the lean transport and one with net/http alone and returns
// both results; it fails the test when a plain-http request did not take the lean path.
func probeBoth(t *testing.T, d checkDefinition, timeout time.Duration) (lean, std [2]string) {
	t.Helper()
	for _, useLean := range []bool{true, false} {
		p := newProber(nil)
		p.lean = useLean
		probe, err := p.newProbe(&d, timeout)
		if err != nil {
			t.Fatal(err)
		}
		status, out := probe(context.Background())
		if useLean {
			lean = [2]string{status, out}
			req, _ := http.NewRequest(cmpOr(d.Method, "GET"), d.HTTP, nil)
			for k, vs := range d.Header {
				req.Header[http.CanonicalHeaderKey(k)] = vs
			}
			if lt, ok := p.transport(tlsKey{}).(*leanTransport); !ok || !lt.eligible(req) {
				t.Fatalf("%s %s did not take the lean path", req.Method, d.HTTP)
			}
		} else {
			std = [2]string{status, out}
		}
	}
	return lean, std
}

func cmpOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// TestLeanTransportMatchesNetHTTP runs every case through the lean transport and through net/http
// alone against the same answer: the status and output must be the same, byte for byte.
func TestLeanTransportMatchesNetHTTP(t *testing.T) {
	many1xx := strings.Repeat("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", 6)
	answers := map[string]string{
		"/ok":           "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
		"/chunked":      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
		"/gzip":         "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: " + fmt.Sprint(len(gzipped("zipped body"))) + "\r\n\r\n" + gzipped("zipped body"),
		"/gzip-chunked": "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n" + fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(gzipped("zc")), gzipped("zc")),
		"/gzip-corrupt": "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\nnotgz",
		"/gzip-empty":   "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 0\r\n\r\n",
		"/http10":       "HTTP/1.0 200 OK\r\n\r\nuntil close",
		"/no-content":   "HTTP/1.1 204 No Content\r\n\r\n",
		"/error":        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nboom",
		"/busy":         "HTTP/1.1 429 Too Many Requests\r\nContent-Length: 4\r\n\r\nslow",
		"/continue":     "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nafter",
		"/hints":        "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
		"/many-1xx":     many1xx + "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
		"/switch":       "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\nraw stream",
		"/redirect":     "HTTP/1.1 301 Moved Permanently\r\nLocation: /ok\r\nContent-Length: 0\r\n\r\n",
		"/see-other":    "HTTP/1.1 303 See Other\r\nLocation: /echo\r\nContent-Length: 0\r\n\r\n",
		"/temporary":    "HTTP/1.1 307 Temporary Redirect\r\nLocation: /echo\r\nContent-Length: 0\r\n\r\n",
		"/loop":         "HTTP/1.1 302 Found\r\nLocation: /loop\r\nContent-Length: 0\r\n\r\n",
		"/no-location":  "HTTP/1.1 302 Found\r\nContent-Length: 3\r\n\r\nnah",
		"/malformed":    "HTTP/1.1 abc\r\n\r\n",
		"/garbage":      "\x00\x01\x02 binary \xff\xfe\r\n\r\n",
		"/empty":        "",
		"/cut-head":     "HTTP/1.1 200 OK\r\nContent-",
		"/short-body":   "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab",
		"/bad-header":   "HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
		"/huge-status":  "HTTP/1.1 200 " + strings.Repeat("s", maxResponseHeaderBytes+10),
		"/huge-headers": "HTTP/1.1 200 OK\r\n" + strings.Repeat("X-Pad: "+strings.Repeat("h", 1000)+"\r\n", 1100),
		"/head":         "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
	}
	addr := answerServer(t, func(path string, raw []byte) string {
		if path == "/echo" {
			return fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(raw), raw)
		}
		return answers[path]
	})
	base := "http://" + addr
	type tc struct {
		name string
		def  checkDefinition
	}
	var cases []tc
	for path := range answers {
		cases = append(cases, tc{path, checkDefinition{HTTP: base + path}})
	}
	cases = append(cases,
		tc{"POST redirected by 303", checkDefinition{HTTP: base + "/see-other", Method: "POST", Body: "payload"}},
		tc{"POST redirected by 307 keeps its body", checkDefinition{HTTP: base + "/temporary", Method: "POST", Body: "payload"}},
		tc{"redirect not followed", checkDefinition{HTTP: base + "/redirect", DisableRedirects: true}},
		tc{"HEAD", checkDefinition{HTTP: base + "/head", Method: "HEAD"}},
		// The request as the target receives it.
		tc{"request GET", checkDefinition{HTTP: base + "/echo?q=1&r=%20"}},
		tc{"request POST", checkDefinition{HTTP: base + "/echo", Method: "POST", Body: "a body"}},
		tc{"request PUT empty body", checkDefinition{HTTP: base + "/echo", Method: "PUT"}},
		tc{"request HEAD", checkDefinition{HTTP: base + "/echo", Method: "HEAD"}},
		tc{"request OPTIONS", checkDefinition{HTTP: base + "/echo", Method: "OPTIONS"}},
		tc{"request headers", checkDefinition{HTTP: base + "/echo", Header: map[string][]string{
			"x-lower": {"1"}, "X-Multi": {"a", "b"}, "Accept": {"application/json"}, "User-Agent": {"probe/1"},
			"Authorization": {"Bearer t"}, "Zz-Last": {" padded "}}}},
		tc{"request Host header", checkDefinition{HTTP: base + "/echo", Header: map[string][]string{"Host": {"virtual.example"}}}},
		tc{"request empty User-Agent", checkDefinition{HTTP: base + "/echo", Header: map[string][]string{"User-Agent": {""}}}},
	)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			lean, std := probeBoth(t, c.def, 2*time.Second)
			if lean != std {
				t.Fatalf("lean transport and net/http differ:\nlean: %q\nstd:  %q", lean, std)
			}
		})
	}
}

var localPort = regexp.MustCompile(`(127\.0\.0\.1):\d+->`)

// TestLeanTransportErrorsMatchNetHTTP: refused and reset connections and timeouts read the same on
// both paths.
func TestLeanTransportErrorsMatchNetHTTP(t *testing.T) {
	silent := rawServer(t, func(c net.Conn, br *bufio.Reader) {
		http.ReadRequest(br)
		io.Copy(io.Discard, c) // never answers; returns when the client hangs up
	})
	reset := rawServer(t, func(c net.Conn, br *bufio.Reader) {
		http.ReadRequest(br)
		c.(*net.TCPConn).SetLinger(0) // RST instead of FIN
	})
	for _, c := range []struct {
		name string
		url  string
	}{
		{"refused", "http://" + closedTCPAddr(t) + "/"},
		{"timeout", "http://" + silent + "/"},
		{"reset before the answer", "http://" + reset + "/"},
	} {
		t.Run(c.name, func(t *testing.T) {
			lean, std := probeBoth(t, checkDefinition{HTTP: c.url}, 300*time.Millisecond)
			// The client's own port differs between two connections.
			lean[1] = localPort.ReplaceAllString(lean[1], "$1:PORT->")
			std[1] = localPort.ReplaceAllString(std[1], "$1:PORT->")
			if lean != std {
				t.Fatalf("lean transport and net/http differ:\nlean: %q\nstd:  %q", lean, std)
			}
		})
	}
}

// TestLeanTransportEligibility: only requests whose bytes and handling are net/http's take the lean
// path.
func TestLeanTransportEligibility(t *testing.T) {
	p := newProber(nil)
	lt := p.transport(tlsKey{}).(*leanTransport)
	for _, c := range []struct {
		url    string
		header http.Header
		want   bool
	}{
		{"http://127.0.0.1:1/x", nil, true},
		{"http://[::1]:1/x", nil, true},
		{"https://127.0.0.1:1/x", nil, false},
		{"http://user:pw@127.0.0.1:1/x", nil, false},
		{"http://bücher.example/x", nil, false},
		{"http://127.0.0.1:1/x", http.Header{"Connection": {"keep-alive"}}, false},
		{"http://127.0.0.1:1/x", http.Header{"Accept-Encoding": {"br"}}, false},
		{"http://127.0.0.1:1/x", http.Header{"Range": {"bytes=0-1"}}, false},
		{"http://127.0.0.1:1/x", http.Header{"Expect": {"100-continue"}}, false},
	} {
		req, err := http.NewRequest("GET", c.url, nil)
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range c.header {
			req.Header[k] = v
		}
		if got := lt.eligible(req); got != c.want {
			t.Errorf("%s %v: eligible %v, want %v", c.url, c.header, got, c.want)
		}
	}
	lt.proxy = func(r *http.Request) (*url.URL, error) { return url.Parse("http://127.0.0.1:3128") }
	req, _ := http.NewRequest("GET", "http://example.test/", nil)
	if lt.eligible(req) {
		t.Error("a proxied request took the lean path")
	}
}
