package main

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"
)

// sampleApps are the apps whose /<app>/health the sample service answers.
var sampleApps = []string{"web", "billing"}

// sampleService stands in for the external services: one HTTP server with a health endpoint per
// app, a TCP listener that accepts connections (a database, say) and a UDP socket that answers
// every datagram (a DNS server, say). All on 127.0.0.1, on ports the kernel picks.
//
// GET /<app>/break makes /<app>/health answer 500, GET /<app>/fix makes it answer 200 again; the
// demo uses the same switch to fail an endpoint on purpose.
type sampleService struct {
	httpAddr, tcpAddr, udpAddr string

	mu     sync.Mutex
	broken map[string]bool

	srv  *http.Server
	tcp  net.Listener
	udp  net.PacketConn
	wg   sync.WaitGroup
	once sync.Once
}

func startSampleService() (*sampleService, error) {
	s := &sampleService{broken: map[string]bool{}}
	httpLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	tcpLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		_ = httpLn.Close()
		return nil, err
	}
	udp, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		_ = httpLn.Close()
		_ = tcpLn.Close()
		return nil, err
	}
	s.httpAddr, s.tcpAddr, s.udpAddr = httpLn.Addr().String(), tcpLn.Addr().String(), udp.LocalAddr().String()
	s.tcp, s.udp = tcpLn, udp
	s.srv = &http.Server{Handler: http.HandlerFunc(s.serveHTTP), ReadHeaderTimeout: 5 * time.Second}

	s.wg.Add(3)
	go func() {
		defer s.wg.Done()
		if err := s.srv.Serve(httpLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			fmt.Printf("sample service: HTTP server stopped: %v\n", err)
		}
	}()
	go func() {
		defer s.wg.Done()
		s.serveTCP()
	}()
	go func() {
		defer s.wg.Done()
		s.serveUDP()
	}()
	return s, nil
}

func (s *sampleService) serveHTTP(w http.ResponseWriter, r *http.Request) {
	app, action, _ := strings.Cut(strings.Trim(r.URL.Path, "/"), "/")
	known := false
	for _, a := range sampleApps {
		known = known || a == app
	}
	switch {
	case !known:
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusNotFound)
		fmt.Fprintf(w, "sample service: try /<app>/health, /<app>/break or /<app>/fix with app one of %s\n",
			strings.Join(sampleApps, ", "))
	case action == "health":
		if s.isBroken(app) {
			http.Error(w, app+" is failing (broken on purpose)", http.StatusInternalServerError)
			return
		}
		fmt.Fprintf(w, "%s is healthy\n", app)
	case action == "break" || action == "fix":
		s.setBroken(app, action == "break")
		fmt.Fprintf(w, "%s/health now answers %d\n", app, map[bool]int{true: 500, false: 200}[action == "break"])
	default:
		http.NotFound(w, r)
	}
}

// serveTCP accepts connections and closes them at once: a TCP check only needs the handshake.
func (s *sampleService) serveTCP() {
	for {
		c, err := s.tcp.Accept()
		if err != nil {
			return
		}
		_ = c.Close()
	}
}

// serveUDP answers every datagram with "pong".
func (s *sampleService) serveUDP() {
	buf := make([]byte, 1500)
	for {
		_, addr, err := s.udp.ReadFrom(buf)
		if err != nil {
			return
		}
		_, _ = s.udp.WriteTo([]byte("pong"), addr)
	}
}

func (s *sampleService) setBroken(app string, broken bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.broken[app] = broken
}

func (s *sampleService) isBroken(app string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.broken[app]
}

func (s *sampleService) close() {
	s.once.Do(func() {
		_ = s.srv.Close()
		_ = s.tcp.Close()
		_ = s.udp.Close()
		s.wg.Wait()
	})
}
