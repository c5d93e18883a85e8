package main

import (
	"net"
	"strings"
	"testing"
	"time"
)

// udpServer answers (or, when silent, swallows) datagrams and reports each payload length.
func udpServer(t *testing.T, silent bool) (string, <-chan int) {
	t.Helper()
	return udpServerAt(t, "127.0.0.1", silent)
}

// udpServerAt is udpServer on host (a loopback address).
func udpServerAt(t *testing.T, host string, silent bool) (string, <-chan int) {
	t.Helper()
	c, err := net.ListenPacket("udp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	sizes := make(chan int, 16)
	done := make(chan struct{})
	t.Cleanup(func() { c.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			select {
			case sizes <- n:
			default:
			}
			if !silent {
				c.WriteTo([]byte("pong"), from)
			}
		}
	}()
	return c.LocalAddr().String(), sizes
}

func TestProbeUDP(t *testing.T) {
	t.Parallel()
	echo, sizes := udpServer(t, false)
	silent, _ := udpServer(t, true)
	closed := closedUDPAddr(t)
	cases := []struct {
		name, addr, status, output string
		timeout                    time.Duration
	}{
		{"reply", echo, statusPassing, "UDP connect " + echo + ": Success", 5 * time.Second},
		{"silence", silent, statusPassing, "UDP connect " + silent + ": Success", 200 * time.Millisecond},
		{"refused", closed, statusCritical, "connection refused", 5 * time.Second},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			status, out := runProbe(t, &checkDefinition{UDP: tc.addr}, tc.timeout)
			if status != tc.status || !strings.Contains(out, tc.output) {
				t.Fatalf("got (%q, %q), want (%q, %q)", status, out, tc.status, tc.output)
			}
			if tc.status == statusPassing && out != tc.output {
				t.Fatalf("output %q, want exactly %q", out, tc.output)
			}
			if time.Since(start) > tc.timeout+2*time.Second {
				t.Fatalf("took %v", time.Since(start))
			}
		})
	}
	// Consul's UDP check sends an empty datagram.
	if n := <-sizes; n != 0 {
		t.Fatalf("payload %d bytes, want 0", n)
	}
}
