package main

import (
	"context"
	"fmt"
	"net"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	hv1 "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
)

// grpcProbe queries grpc.health.v1 on "host:port[/service]" with one connection per run, as Consul does.
// A cached ClientConn would also back off between reconnects (up to two minutes) and so be late to
// notice a recovered target.
func (p *probeBuilder) grpcProbe(target string, useTLS bool, key tlsKey, timeout time.Duration) probeFunc {
	server, service, _ := strings.Cut(target, "/")
	return func(ctx context.Context, run *probeRun) (string, string) {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		creds := insecure.NewCredentials()
		if useTLS {
			creds = credentials.NewTLS(p.tlsConfig(key))
		}
		// passthrough is the scheme Consul's grpc.Dial used; NewClient would default to dns.
		conn, err := grpc.NewClient("passthrough:///"+server, grpc.WithTransportCredentials(creds),
			grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) { return p.dial(ctx, "tcp", addr) }))
		if err != nil {
			return statusCritical, err.Error()
		}
		defer conn.Close()
		// The peer carries the handshake of this run's connection; it is filled in by the call itself,
		// so reading it afterwards needs no synchronisation with gRPC's transport goroutines.
		var pr peer.Peer
		resp, err := hv1.NewHealthClient(conn).Check(ctx, &hv1.HealthCheckRequest{Service: service}, grpc.Peer(&pr))
		if info, ok := pr.AuthInfo.(credentials.TLSInfo); ok {
			run.recordTLS(&info.State)
		}
		if err != nil {
			return statusCritical, err.Error()
		}
		if resp.GetStatus() != hv1.HealthCheckResponse_SERVING {
			return statusCritical, fmt.Sprintf("gRPC %s serving status: %s", target, resp.GetStatus())
		}
		return statusPassing, fmt.Sprintf("gRPC check %s: success", target)
	}
}
