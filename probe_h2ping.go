package main

import (
	"context"
	"fmt"
	"net"
	"time"

	"golang.org/x/net/http2"
)

// h2pingProbe sends an HTTP/2 PING over a fresh connection: h2c with prior knowledge, or TLS
// with ALPN "h2" when useTLS.
func (p *probeBuilder) h2pingProbe(addr string, useTLS bool, key tlsKey, timeout time.Duration) probeFunc {
	return func(ctx context.Context, run *probeRun) (string, string) {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		t := &http2.Transport{}
		var conn net.Conn
		var err error
		if useTLS {
			cfg := p.tlsConfig(key)
			cfg.NextProtos = []string{http2.NextProtoTLS}
			t.TLSClientConfig = cfg
			conn, err = p.dialTLS(ctx, addr, cfg, run)
		} else {
			t.AllowHTTP = true
			conn, err = p.dial(ctx, "tcp", addr)
		}
		if err != nil {
			return statusCritical, fmt.Sprintf("Failed to dial to %s: %s", addr, err)
		}
		defer conn.Close()
		// A read deadline stops the client's frame reader should the peer never answer.
		if dl, ok := ctx.Deadline(); ok {
			_ = conn.SetDeadline(dl)
		}
		// http2.Transport.NewClientConn is deprecated in favour of net/http's, but only x/net's
		// ClientConn can send a PING frame.
		cc, err := t.NewClientConn(conn) //nolint:staticcheck // see above
		if err != nil {
			return statusCritical, fmt.Sprintf("Failed to create client connection %s", err)
		}
		// A GOAWAY first spares the target a "connection reset" in its logs; ctx bounds the wait.
		defer func() { _ = cc.Shutdown(ctx) }()
		if err := cc.Ping(ctx); err != nil {
			return statusCritical, fmt.Sprintf("HTTP2 ping failed: %s", err)
		}
		return statusPassing, "HTTP2 ping was successful"
	}
}
