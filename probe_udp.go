package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"
)

// udpProbe follows Consul's CheckUDP: send an empty datagram (Consul never sets a payload) and
// wait for any reply. Silence is passing because UDP services need not answer; only an error,
// such as the ICMP port-unreachable that surfaces as "connection refused", is critical. Unlike
// Consul, the read is bounded by the timeout instead of blocking forever.
func (p *probeBuilder) udpProbe(addr string, timeout time.Duration) probeFunc {
	success := fmt.Sprintf("UDP connect %s: Success", addr)
	return func(ctx context.Context, _ *probeRun) (string, string) {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		conn, err := p.dial(ctx, "udp", addr)
		if err != nil {
			if isTimeout(err) {
				return statusPassing, success
			}
			return statusCritical, err.Error()
		}
		defer conn.Close()
		if dl, ok := ctx.Deadline(); ok {
			_ = conn.SetDeadline(dl)
		}
		// Expire the socket if the caller gives up first, so the read below returns.
		stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Now()) })
		defer stop()
		if _, err := conn.Write(nil); err != nil {
			return statusCritical, err.Error()
		}
		if _, err := conn.Read(make([]byte, 1)); err != nil {
			if isTimeout(err) {
				return statusPassing, success
			}
			return statusCritical, err.Error()
		}
		return statusPassing, success
	}
}

// isTimeout reports whether err is a network timeout (a deadline reached).
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
