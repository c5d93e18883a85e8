package main

import (
	"crypto/tls"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	hv1 "google.golang.org/grpc/health/grpc_health_v1"
)

func grpcHealthServer(t *testing.T, opts ...grpc.ServerOption) string {
	t.Helper()
	return grpcHealthServerAt(t, "127.0.0.1:0", opts...)
}

// grpcHealthServerAt serves grpc.health.v1 on addr (services "" and "up" serving, "down" not) and
// returns the address it listens on.
func grpcHealthServerAt(t *testing.T, addr string, opts ...grpc.ServerOption) string {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer(opts...)
	hs := health.NewServer()
	hs.SetServingStatus("", hv1.HealthCheckResponse_SERVING)
	hs.SetServingStatus("up", hv1.HealthCheckResponse_SERVING)
	hs.SetServingStatus("down", hv1.HealthCheckResponse_NOT_SERVING)
	hv1.RegisterHealthServer(s, hs)
	done := make(chan struct{})
	go func() { defer close(done); s.Serve(l) }()
	t.Cleanup(func() { s.Stop(); <-done })
	return l.Addr().String()
}

func TestProbeGRPC(t *testing.T) {
	t.Parallel()
	plain := grpcHealthServer(t)
	secure := grpcHealthServer(t, grpc.Creds(credentials.NewServerTLSFromCert(func() *tls.Certificate { c := testCert(t); return &c }())))
	closed := closedTCPAddr(t)
	cases := []struct {
		name     string
		def      checkDefinition
		status   string
		output   string
		contains bool
	}{
		{"serving", checkDefinition{GRPC: plain}, statusPassing, "gRPC check " + plain + ": success", false},
		{"service serving", checkDefinition{GRPC: plain + "/up"}, statusPassing, "gRPC check " + plain + "/up: success", false},
		{"not serving", checkDefinition{GRPC: plain + "/down"}, statusCritical, "gRPC " + plain + "/down serving status: NOT_SERVING", false},
		{"unknown service", checkDefinition{GRPC: plain + "/nope"}, statusCritical, "rpc error: code = NotFound desc = unknown service", false},
		{"tls against plaintext", checkDefinition{GRPC: plain, GRPCUseTLS: true, TLSSkipVerify: true}, statusCritical, "tls", true},
		{"tls", checkDefinition{GRPC: secure + "/up", GRPCUseTLS: true, TLSSkipVerify: true}, statusPassing, "gRPC check " + secure + "/up: success", false},
		{"tls untrusted", checkDefinition{GRPC: secure, GRPCUseTLS: true}, statusCritical, "certificate", true},
		{"refused", checkDefinition{GRPC: closed}, statusCritical, "connection refused", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			status, out := runProbe(t, &tc.def, 5*time.Second)
			ok := out == tc.output
			if tc.contains {
				ok = strings.Contains(out, tc.output)
			}
			if status != tc.status || !ok {
				t.Fatalf("got (%q, %q), want (%q, %q)", status, out, tc.status, tc.output)
			}
		})
	}
}
