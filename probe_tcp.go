package main

import (
	"context"
	"fmt"
	"net"
	"time"
)

// tcpProbe connects to addr, with useTLS also completing a TLS handshake, and closes again: passing
// when that succeeds, critical with the dial or handshake error otherwise.
func (p *probeBuilder) tcpProbe(addr string, useTLS bool, key tlsKey, timeout time.Duration) probeFunc {
	kind := "TCP"
	if useTLS {
		kind = "TCP+TLS"
	}
	success := fmt.Sprintf("%s connect %s: Success", kind, addr)
	return func(ctx context.Context, run *probeRun) (string, string) {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		var conn net.Conn
		var err error
		if useTLS {
			conn, err = p.dialTLS(ctx, addr, p.tlsConfig(key), run)
		} else {
			conn, err = p.dial(ctx, "tcp", addr)
		}
		if err != nil {
			return statusCritical, err.Error()
		}
		_ = conn.Close()
		return statusPassing, success
	}
}
