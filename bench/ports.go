package main

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

// Every port the harness uses is on 127.0.0.1 and below the kernel's ephemeral range: the checks
// under test open thousands of outgoing connections a second, and one of them could otherwise take a
// port the harness closed for a moment (a TCP target that is "down", or a port handed to Consul).
const lowestPort = 20000

// ephemeralLow is the first port of net.ipv4.ip_local_port_range (32768 when unreadable).
func ephemeralLow() int {
	data, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err == nil {
		if f := strings.Fields(string(data)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil && n > lowestPort+1000 {
				return n
			}
		}
	}
	return 32768
}

// listenLoopback listens on a free 127.0.0.1 port in [lowestPort, ephemeralLow).
func listenLoopback() (net.Listener, error) {
	hi := ephemeralLow()
	span := hi - lowestPort
	start := rand.IntN(span)
	for i := 0; i < span; i++ {
		port := lowestPort + (start+i)%span
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err == nil {
			return ln, nil
		}
	}
	return nil, fmt.Errorf("no free port on 127.0.0.1 in %d-%d", lowestPort, hi-1)
}

// relistenLoopback listens on 127.0.0.1:port again, retrying for up to two seconds.
func relistenLoopback(port int) (net.Listener, error) {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	deadline := time.Now().Add(2 * time.Second)
	for {
		ln, err := net.Listen("tcp", addr)
		if err == nil || time.Now().After(deadline) {
			if err != nil {
				return nil, fmt.Errorf("listening on %s again: %w", addr, err)
			}
			return ln, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// freeLoopbackPorts returns n distinct free ports for a child process to bind (they are closed
// again, so another process may take one meanwhile; startConsul retries with new ports).
func freeLoopbackPorts(n int) ([]int, error) {
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	ports := make([]int, 0, n)
	for len(ports) < n {
		ln, err := listenLoopback()
		if err != nil {
			return nil, err
		}
		lns = append(lns, ln)
		ports = append(ports, ln.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// portOf is the port of a listener.
func portOf(ln net.Listener) int { return ln.Addr().(*net.TCPAddr).Port }

// newTransport is the HTTP transport for the harness's own Consul clients: many long-lived blocking
// queries at once, so the idle pool must hold them all (the default of 2 per host would close and
// redial a connection after nearly every response).
func newTransport() *http.Transport {
	return &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        0,
		MaxIdleConnsPerHost: 20000,
		IdleConnTimeout:     90 * time.Second,
	}
}
