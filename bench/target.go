package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// target is what the checks under test probe: one HTTP listener whose path names the check
// (/t/<id>), with a hit counter and a healthy flag per id, and a few TCP listeners shared by the TCP
// checks round-robin. A TCP check connects and disconnects, so TCP hits can only be counted per port,
// and a TCP port fails by closing its listener (connection refused), which fails every check on it.
type target struct {
	httpLn   net.Listener
	httpSrv  *http.Server
	hang     bool // failing HTTP targets never answer (the check times out) instead of answering 503
	httpHits []atomic.Int64
	httpFail []atomic.Bool
	tcp      []*tcpPort
	closing  chan struct{}
}

// tcpPort is one TCP listener; ln is nil while the port is failing.
type tcpPort struct {
	port int
	hits atomic.Int64
	mu   sync.Mutex
	ln   net.Listener
	wg   sync.WaitGroup
}

// startTarget listens for httpIDs HTTP check ids and on tcpPorts TCP ports.
func startTarget(httpIDs, tcpPorts int, hang bool) (*target, error) {
	t := &target{
		hang:     hang,
		httpHits: make([]atomic.Int64, httpIDs),
		httpFail: make([]atomic.Bool, httpIDs),
		closing:  make(chan struct{}),
	}
	ln, err := listenLoopback()
	if err != nil {
		return nil, fmt.Errorf("target HTTP listener: %w", err)
	}
	t.httpLn = ln
	t.httpSrv = &http.Server{
		Handler:           t,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       30 * time.Second,
		ErrorLog:          log.New(io.Discard, "", 0),
	}
	go func() { _ = t.httpSrv.Serve(ln) }()
	for i := 0; i < tcpPorts; i++ {
		ln, err := listenLoopback()
		if err != nil {
			t.close()
			return nil, fmt.Errorf("target TCP listener: %w", err)
		}
		p := &tcpPort{port: portOf(ln)}
		p.serve(ln)
		t.tcp = append(t.tcp, p)
	}
	return t, nil
}

// httpURL is the check URL of HTTP id.
func (t *target) httpURL(id int) string {
	return fmt.Sprintf("http://%s/t/%d", t.httpLn.Addr(), id)
}

// tcpAddr is the address of TCP port number i.
func (t *target) tcpAddr(i int) string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(t.tcp[i].port))
}

// ServeHTTP answers /t/<id>: 200 "ok" while healthy, 503 (or nothing, in hang mode) while failing.
// The body never changes, so check output does not change while the status stays the same.
func (t *target) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	id, err := strconv.Atoi(strings.TrimPrefix(r.URL.Path, "/t/"))
	if err != nil || id < 0 || id >= len(t.httpHits) {
		http.NotFound(w, r)
		return
	}
	t.httpHits[id].Add(1)
	if !t.httpFail[id].Load() {
		_, _ = io.WriteString(w, "ok")
		return
	}
	if t.hang {
		select {
		case <-r.Context().Done():
		case <-t.closing:
		}
		return
	}
	http.Error(w, "failing", http.StatusServiceUnavailable)
}

// setHTTPHealthy flips one HTTP id.
func (t *target) setHTTPHealthy(id int, healthy bool) { t.httpFail[id].Store(!healthy) }

// setAllHealthy flips every HTTP id and TCP port at once.
func (t *target) setAllHealthy(healthy bool) error {
	for i := range t.httpFail {
		t.httpFail[i].Store(!healthy)
	}
	var errs []error
	for _, p := range t.tcp {
		if err := p.setHealthy(healthy); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// hits is the sum of all HTTP and TCP hits so far.
func (t *target) hits() (httpHits, tcpHits int64) {
	for i := range t.httpHits {
		httpHits += t.httpHits[i].Load()
	}
	for _, p := range t.tcp {
		tcpHits += p.hits.Load()
	}
	return httpHits, tcpHits
}

// httpHitCounts copies the per-id HTTP hit counters.
func (t *target) httpHitCounts() []int64 {
	out := make([]int64, len(t.httpHits))
	for i := range t.httpHits {
		out[i] = t.httpHits[i].Load()
	}
	return out
}

// close stops every listener and releases hanging requests.
func (t *target) close() {
	close(t.closing)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if t.httpSrv != nil {
		if err := t.httpSrv.Shutdown(ctx); err != nil {
			_ = t.httpSrv.Close()
		}
	}
	for _, p := range t.tcp {
		_ = p.setHealthy(false)
	}
}

// serve accepts on ln until it is closed, counting and closing each connection.
func (p *tcpPort) serve(ln net.Listener) {
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					continue
				}
				if errors.Is(err, net.ErrClosed) {
					return
				}
				time.Sleep(10 * time.Millisecond) // e.g. out of file descriptors
				continue
			}
			p.hits.Add(1)
			conn.Close()
		}
	}()
}

// setHealthy opens (healthy) or closes (failing: connection refused) the port's listener.
func (p *tcpPort) setHealthy(healthy bool) error {
	p.mu.Lock()
	ln := p.ln
	p.mu.Unlock()
	if healthy {
		if ln != nil {
			return nil
		}
		ln, err := relistenLoopback(p.port)
		if err != nil {
			return fmt.Errorf("TCP target: %w", err)
		}
		p.serve(ln)
		return nil
	}
	if ln == nil {
		return nil
	}
	p.mu.Lock()
	p.ln = nil
	p.mu.Unlock()
	err := ln.Close()
	p.wg.Wait()
	return err
}
