package main

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestProbeH2PING(t *testing.T) {
	t.Parallel()
	h2c := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	h2c.Config.Protocols = new(http.Protocols)
	h2c.Config.Protocols.SetHTTP1(true)
	h2c.Config.Protocols.SetUnencryptedHTTP2(true)
	h2c.Start()
	t.Cleanup(h2c.Close)
	h2tls := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	h2tls.EnableHTTP2 = true
	h2tls.StartTLS()
	t.Cleanup(h2tls.Close)
	h1 := newHTTPServer(t, func(w http.ResponseWriter, r *http.Request) {})

	addr := func(s *httptest.Server) string { return s.Listener.Addr().String() }
	closed := closedTCPAddr(t)
	cases := []struct {
		name   string
		def    checkDefinition
		status string
		prefix string
	}{
		{"h2c", checkDefinition{H2PING: addr(h2c)}, statusPassing, "HTTP2 ping was successful"},
		{"tls", checkDefinition{H2PING: addr(h2tls), H2PingUseTLS: true, TLSSkipVerify: true}, statusPassing, "HTTP2 ping was successful"},
		{"tls untrusted", checkDefinition{H2PING: addr(h2tls), H2PingUseTLS: true}, statusCritical, "Failed to dial to " + addr(h2tls) + ": tls: failed to verify certificate"},
		{"http1 only", checkDefinition{H2PING: addr(h1)}, statusCritical, "HTTP2 ping failed: "},
		{"refused", checkDefinition{H2PING: closed}, statusCritical, "Failed to dial to " + closed + ": dial tcp " + closed + ": connect: connection refused"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			status, out := runProbe(t, &tc.def, time.Second)
			if status != tc.status || !strings.HasPrefix(out, tc.prefix) {
				t.Fatalf("got (%q, %q), want (%q, prefix %q)", status, out, tc.status, tc.prefix)
			}
			if time.Since(start) > 3*time.Second {
				t.Fatalf("took %v", time.Since(start))
			}
		})
	}
}
