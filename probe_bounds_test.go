package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// hostileServer answers every request with prefix and then whatever more produces, until the client
// goes away or limit bytes are written; written counts what it sent in all.
func hostileServer(t *testing.T, prefix string, more func(w io.Writer) error, limit int64) (addr string, written *atomic.Int64) {
	t.Helper()
	written = new(atomic.Int64)
	addr = rawServer(t, func(c net.Conn, br *bufio.Reader) {
		// Answer only after the request's head, as a server does (net/http drops an answer that
		// comes before its request).
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			if line == "\r\n" {
				break
			}
		}
		w := &countingWriter{w: c, n: written, limit: limit}
		if _, err := io.WriteString(w, prefix); err != nil {
			return
		}
		for more != nil && more(w) == nil {
		}
	})
	return addr, written
}

// countingWriter counts bytes and fails once limit is reached.
type countingWriter struct {
	w     io.Writer
	n     *atomic.Int64
	limit int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	if c.n.Load() >= c.limit {
		return 0, io.ErrShortWrite
	}
	n, err := c.w.Write(p)
	c.n.Add(int64(n))
	return n, err
}

// countingConn counts the bytes read from it.
type countingConn struct {
	net.Conn
	read *atomic.Int64
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.read.Add(int64(n))
	return n, err
}

// repeat returns a producer writing chunk over and over.
func repeat(chunk string) func(io.Writer) error {
	return func(w io.Writer) error {
		_, err := io.WriteString(w, chunk)
		return err
	}
}

// processRSS is the resident set size of this process in bytes (0 where /proc is missing).
func processRSS() int64 {
	data, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(data))
	if len(f) < 2 {
		return 0
	}
	pages, _ := strconv.ParseInt(f[1], 10, 64)
	return pages * int64(os.Getpagesize())
}

// TestProbeHTTPReadsAreBounded: whatever an HTTP target sends instead of a sane answer, a run ends by
// its timeout as critical with an output within the check's limit, having read a bounded amount:
// the target can write no more than the header limit (plus socket buffers) before the probe hangs up.
func TestProbeHTTPReadsAreBounded(t *testing.T) {
	const streamCap = 64 << 20 // what a target writes at most; an unbounded reader takes all of it
	line := strings.Repeat("a", 4096)
	garbage := make([]byte, 64<<10)
	if _, err := rand.Read(garbage); err != nil {
		t.Fatal(err)
	}
	drip := func(w io.Writer) error {
		time.Sleep(time.Second) // the target's pace: a negative window by design
		_, err := w.Write([]byte("X"))
		return err
	}
	for _, tc := range []struct {
		name    string
		prefix  string
		more    func(io.Writer) error
		timeout time.Duration
		want    string // in the output
	}{
		{"endless status line", "HTTP/1.1 200 ", repeat(line), 10 * time.Second, "exceeded"},
		{"endless headers", "HTTP/1.1 200 OK\r\n", repeat("X-Pad: " + line + "\r\n"), 10 * time.Second, "exceeded"},
		{"binary garbage", "", repeat(string(garbage)), 10 * time.Second, "malformed HTTP"},
		{"drip", "HTTP/1.1 200 OK\r\n", drip, 2 * time.Second, "Client.Timeout exceeded"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr, _ := hostileServer(t, tc.prefix, tc.more, streamCap)
			for _, maxOut := range []int{0, 100} {
				p := newProbeBuilder(nil)
				var read atomic.Int64
				p.dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
					c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
					if err != nil {
						return nil, err
					}
					return &countingConn{Conn: c, read: &read}, nil
				}
				d := checkDefinition{HTTP: "http://" + addr + "/health", OutputMaxSize: maxOut}
				probe, err := p.newProbe(&d, tc.timeout)
				if err != nil {
					t.Fatal(err)
				}
				runtime.GC()
				rss0 := processRSS()
				start := time.Now()
				status, out := probe(context.Background(), nil)
				elapsed := time.Since(start)
				grew := processRSS() - rss0
				t.Logf("OutputMaxSize %d: %s after %s, read %d bytes, RSS %+d bytes, output %d bytes",
					maxOut, status, elapsed.Round(time.Millisecond), read.Load(), grew, len(out))
				if status != statusCritical || (maxOut == 0 && !strings.Contains(out, tc.want)) {
					t.Fatalf("got (%q, %.300q), want critical containing %q", status, out, tc.want)
				}
				if limit := outputLimit(maxOut); len(out) > limit {
					t.Fatalf("output of %d bytes, limit %d", len(out), limit)
				}
				if elapsed > tc.timeout+time.Second {
					t.Fatalf("run took %s, timeout %s", elapsed, tc.timeout)
				}
				if n := read.Load(); n > maxResponseHeaderBytes+64<<10 {
					t.Fatalf("the probe read %d bytes of a hostile answer: reads are not bounded", n)
				}
				if grew > 32<<20 {
					t.Fatalf("RSS grew by %d bytes in one run", grew)
				}
			}
		})
	}
}

// TestProbeOutputsAreBounded: error texts of every kind stay within the check's output limit.
func TestProbeOutputsAreBounded(t *testing.T) {
	t.Parallel()
	long := "svc-" + strings.Repeat("x", 200) + ".invalid"
	for _, d := range []checkDefinition{
		{HTTP: "http://" + long + "/", OutputMaxSize: 64},
		{TCP: long + ":1", OutputMaxSize: 64},
		{UDP: long + ":1", OutputMaxSize: 64},
		{GRPC: long + ":1", OutputMaxSize: 64},
		{H2PING: long + ":1", OutputMaxSize: 64},
	} {
		kind, _ := d.kind()
		t.Run(kind, func(t *testing.T) {
			p := newProbeBuilder(nil)
			p.dial = func(context.Context, string, string) (net.Conn, error) {
				return nil, fmt.Errorf("dial %s: no such host", long)
			}
			status, out := runWith(t, p, &d, time.Second)
			if status != statusCritical || out == "" || len(out) > 64 {
				t.Fatalf("got (%q, %q: %d bytes), want critical within 64 bytes", status, out, len(out))
			}
		})
	}
}

// TestProbeSendsOneRequestPerRun: a request is written once per run, whatever the answer: a
// connection closed after the request was read, or a malformed answer, is the run's result (critical),
// never a reason to send the request again.
func TestProbeSendsOneRequestPerRun(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		answer string // written after reading the request; "" closes the connection at once
		want   string
	}{
		{"closed after the request", "", "EOF"},
		{"malformed answer", "HTTP/1.1 abc\r\n\r\n", "malformed HTTP"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var requests atomic.Int32
			addr := rawServer(t, func(c net.Conn, br *bufio.Reader) {
				req, err := http.ReadRequest(br)
				if err != nil {
					return
				}
				io.Copy(io.Discard, req.Body)
				requests.Add(1)
				io.WriteString(c, tc.answer)
			})
			d := checkDefinition{HTTP: "http://" + addr + "/", Method: "POST", Body: "payload"}
			status, out := runProbe(t, &d, 2*time.Second)
			if status != statusCritical || !strings.Contains(out, tc.want) {
				t.Fatalf("got (%q, %q), want critical containing %q", status, out, tc.want)
			}
			if n := requests.Load(); n != 1 {
				t.Fatalf("the target received the request %d times in one run", n)
			}
		})
	}
}
