package main

import (
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// Fault modes of faultProxy.
const (
	faultNone int32 = iota
	faultLatency
	faultReset
	fault500
	fault429
)

// faultProxy sits between consul-esm and Consul and misbehaves on demand.
type faultProxy struct {
	*httptest.Server
	mode     atomic.Int32
	requests atomic.Int64
}

func newFaultProxy(t *testing.T, consulAddr string) *faultProxy {
	t.Helper()
	u, _ := url.Parse("http://" + consulAddr)
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.FlushInterval = -1
	rp.ErrorLog = nil
	fp := &faultProxy{}
	fp.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fp.requests.Add(1)
		switch fp.mode.Load() {
		case faultLatency:
			select {
			case <-time.After(400 * time.Millisecond):
			case <-r.Context().Done():
				return
			}
		case faultReset:
			if hj, ok := w.(http.Hijacker); ok {
				if conn, _, err := hj.Hijack(); err == nil {
					if tcp, ok := conn.(*net.TCPConn); ok {
						_ = tcp.SetLinger(0) // RST, not FIN
					}
					conn.Close()
					return
				}
			}
		case fault500:
			http.Error(w, "injected failure", http.StatusInternalServerError)
			return
		case fault429:
			http.Error(w, "rate limit exceeded", http.StatusTooManyRequests)
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(fp.Close)
	return fp
}

var logMessage = regexp.MustCompile(`\[(WARN|ERROR)\] +consul-esm: ([^:=]+?)(?: [a-z_]+=|$)`)

// warnCounts counts WARN/ERROR messages (without their key/value pairs) in a log excerpt.
func warnCounts(logs string) map[string]int {
	out := map[string]int{}
	for _, line := range strings.Split(logs, "\n") {
		if m := logMessage.FindStringSubmatch(line); m != nil {
			out[m[2]]++
		}
	}
	return out
}

// TestConsulFaults drives consul-esm through a misbehaving path to Consul: during each fault a target
// flips; after the fault clears, the status change must reach the catalog (nothing lost), and each
// problem must be logged a bounded number of times (no log storm).
func TestConsulFaults(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	proxy := newFaultProxy(t, srv.HTTPAddr)

	target := newFlipTarget(t)
	healthy := &target.healthy
	registerHTTPCheck(t, srv.Client, "fault-ext", "svc", "svc-http", target.URL, 200*time.Millisecond)
	status := func() string {
		checks, _, err := srv.Client.Health().Checks("svc", nil)
		if err != nil || len(checks) == 0 {
			return ""
		}
		return checks[0].Status
	}

	cfg := testConfig(srv)
	cfg.HTTPAddr = proxy.Listener.Addr().String()
	ra := startAgent(t, cfg)
	waitFor(t, 15*time.Second, func() error {
		if s := status(); s != api.HealthPassing {
			return fmt.Errorf("check %q", s)
		}
		return nil
	})

	for _, fault := range []struct {
		name string
		mode int32
	}{
		{"latency", faultLatency},
		{"connection resets", faultReset},
		{"500s", fault500},
		{"429s", fault429},
	} {
		t.Run(fault.name, func(t *testing.T) {
			logStart := len(ra.logs.String())
			want := api.HealthCritical
			if healthy.Load() {
				healthy.Store(false)
			} else {
				healthy.Store(true)
				want = api.HealthPassing
			}
			proxy.mode.Store(fault.mode)
			// The point of the test: the fault lasts a while, several check intervals and retries.
			time.Sleep(3 * time.Second)
			proxy.mode.Store(faultNone)
			cleared := time.Now()
			waitFor(t, 15*time.Second, func() error {
				if s := status(); s != want {
					return fmt.Errorf("check %q, want %q after the fault cleared", s, want)
				}
				return nil
			})
			t.Logf("%s: status change landed %s after the fault cleared", fault.name, time.Since(cleared).Round(time.Millisecond))
			counts := warnCounts(ra.logs.String()[logStart:])
			var keys []string
			for k := range counts {
				keys = append(keys, k)
			}
			slices.Sort(keys)
			for _, k := range keys {
				t.Logf("  %3d x %s", counts[k], k)
				if counts[k] > 6 {
					t.Errorf("log storm: %q logged %d times in a 3s fault", k, counts[k])
				}
			}
		})
	}
}
