package main

import (
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestProbeTCP(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	open, closed := l.Addr().String(), closedTCPAddr(t)
	cases := []struct {
		addr, status, output string
	}{
		{open, statusPassing, "TCP connect " + open + ": Success"},
		{closed, statusCritical, "dial tcp " + closed + ": connect: connection refused"},
	}
	for _, tc := range cases {
		status, out := runProbe(t, &checkDefinition{TCP: tc.addr}, time.Second)
		if status != tc.status || out != tc.output {
			t.Errorf("%s: got (%q, %q), want (%q, %q)", tc.addr, status, out, tc.status, tc.output)
		}
	}
}

func TestProbeTCPTLS(t *testing.T) {
	t.Parallel()
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	t.Cleanup(srv.Close)
	addr := srv.Listener.Addr().String()
	plain := newHTTPServer(t, func(w http.ResponseWriter, r *http.Request) {})
	plainAddr := plain.Listener.Addr().String()
	cases := []struct {
		name     string
		def      checkDefinition
		status   string
		contains string
	}{
		{"skip verify", checkDefinition{TCP: addr, TCPUseTLS: true, TLSSkipVerify: true}, statusPassing, "TCP+TLS connect " + addr + ": Success"},
		{"untrusted", checkDefinition{TCP: addr, TCPUseTLS: true}, statusCritical, "certificate"},
		{"plaintext target", checkDefinition{TCP: plainAddr, TCPUseTLS: true, TLSSkipVerify: true}, statusCritical, "tls"},
		{"refused", checkDefinition{TCP: closedTCPAddr(t), TCPUseTLS: true}, statusCritical, "connection refused"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			status, out := runProbe(t, &tc.def, time.Second)
			if status != tc.status || !strings.Contains(out, tc.contains) {
				t.Fatalf("got (%q, %q), want %q containing %q", status, out, tc.status, tc.contains)
			}
			if tc.status == statusPassing && out != tc.contains {
				t.Fatalf("output %q, want exactly %q", out, tc.contains)
			}
		})
	}
}
