package main

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/consul/sdk/testutil"
	"github.com/hashicorp/go-hclog"
)

// testConsul is a real Consul dev server (the `consul` binary on PATH, built by `make consul`) with
// short session TTLs so leadership tests take seconds.
//
// A test that owns its Consul waits on it and on timers, not on the CPU, so it calls t.Parallel
// (`make test` runs several at once with -parallel). Three kinds stay serial, which go test runs
// alone before any parallel one: tests whose time bounds leave a second or less of slack over what
// they measure (other tests' load could use it up), tests that count the process's goroutines, and
// tests that read metrics through the go-metrics global (every agent started replaces it).
type testConsul struct {
	*testutil.TestServer
	Client *api.Client
}

func newTestConsul(t testing.TB, mutate ...func(*testutil.TestServerConfig)) *testConsul {
	t.Helper()
	srv, err := testutil.NewTestServerConfigT(t, func(c *testutil.TestServerConfig) {
		c.LogLevel = "error"
		c.Stdout, c.Stderr = io.Discard, io.Discard
		if testing.Verbose() && os.Getenv("CONSUL_TEST_LOGS") != "" {
			c.Stdout, c.Stderr = os.Stderr, os.Stderr
		}
		c.Args = append(c.Args, "-hcl", `session_ttl_min = "1s"`)
		for _, m := range mutate {
			m(c)
		}
	})
	if err != nil {
		t.Fatalf("starting consul test server (is `consul` on PATH? run `make consul`): %v", err)
	}
	t.Cleanup(func() { _ = srv.Stop() })
	client, err := api.NewClient(&api.Config{Address: srv.HTTPAddr})
	if err != nil {
		t.Fatal(err)
	}
	return &testConsul{TestServer: srv, Client: client}
}

// testConfig is a config pointed at srv with every internal timing shortened for tests.
func testConfig(srv *testConsul) *Config {
	cfg := DefaultConfig()
	cfg.HTTPAddr = srv.HTTPAddr
	cfg.LogLevel = "DEBUG"
	cfg.AgentTTL = 3 * time.Second
	cfg.TTLRefreshInterval = 300 * time.Millisecond
	cfg.RetryInterval = 400 * time.Millisecond
	cfg.SessionTTL = 2 * time.Second
	cfg.LockDelay = 500 * time.Millisecond
	cfg.QueryWaitTime = 5 * time.Second
	cfg.KeeperInterval = 300 * time.Millisecond
	cfg.ReapInterval = 200 * time.Millisecond
	cfg.PingTimeout = 500 * time.Millisecond
	cfg.NodeProbeInterval = time.Second
	cfg.CheckUpdateInterval = 0
	return cfg
}

// runningAgent is an Agent whose Run is executing in the background.
type runningAgent struct {
	*Agent
	cancel context.CancelFunc
	done   chan error
	logs   *logBuffer
}

// startAgent runs an agent until the test ends (or stop is called) and waits for its Run to return.
func startAgent(t testing.TB, cfg *Config) *runningAgent {
	t.Helper()
	return startAgentOpts(t, cfg, AgentOptions{})
}

func startAgentOpts(t testing.TB, cfg *Config, opts AgentOptions) *runningAgent {
	t.Helper()
	logger, logs := testLogger(hclog.Debug)
	a, err := NewAgent(cfg, logger, opts)
	if err != nil {
		t.Fatalf("NewAgent: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ra := &runningAgent{Agent: a, cancel: cancel, done: make(chan error, 1), logs: logs}
	go func() { ra.done <- a.Run(ctx) }()
	t.Cleanup(func() { ra.stop(t) })
	return ra
}

// stop cancels the agent and waits (bounded) for Run to return; idempotent.
func (ra *runningAgent) stop(t testing.TB) error {
	t.Helper()
	ra.cancel()
	select {
	case err, ok := <-ra.done:
		if ok {
			close(ra.done)
		}
		return err
	case <-time.After(10 * time.Second):
		t.Fatalf("agent %s did not stop within 10s", ra.serviceID)
	}
	return nil
}

// logBuffer collects log output for assertions; safe for concurrent writers.
// testLogger is an agent logger a test reads back through logs; with -v it also writes to stderr.
func testLogger(level hclog.Level) (hclog.Logger, *logBuffer) {
	logs := &logBuffer{}
	var out io.Writer = logs
	if testing.Verbose() {
		out = io.MultiWriter(logs, os.Stderr)
	}
	return hclog.New(&hclog.LoggerOptions{Name: "consul-esm", Level: level, Output: out}), logs
}

type logBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// waitFor polls cond until it returns nil or the deadline passes, then fails with the last error.
func waitFor(t testing.TB, timeout time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for {
		if err = cond(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %s: %v", timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

var errNotYet = errors.New("not yet")

// waitLeader waits until ra holds the leader lock.
func waitLeader(t testing.TB, ra *runningAgent, timeout time.Duration) {
	t.Helper()
	waitFor(t, timeout, func() error {
		if !ra.status.leader.Load() {
			return errNotYet
		}
		return nil
	})
}

func TestHarnessConsulSmoke(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	client, _, err := newConsulClientHTTP(testConfig(srv))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.KV().Put(&api.KVPair{Key: "smoke", Value: []byte("ok")}, nil); err != nil {
		t.Fatalf("KV put through our client: %v", err)
	}
	pair, _, err := client.KV().Get("smoke", nil)
	if err != nil || pair == nil || string(pair.Value) != "ok" {
		t.Fatalf("KV get = %+v, %v", pair, err)
	}
}

// flipTarget is an HTTP health target on 127.0.0.1 that answers 200 while healthy and 500 otherwise.
type flipTarget struct {
	*httptest.Server
	healthy atomic.Bool
}

func newFlipTarget(t testing.TB) *flipTarget {
	t.Helper()
	ft := &flipTarget{}
	ft.healthy.Store(true)
	ft.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !ft.healthy.Load() {
			w.WriteHeader(http.StatusInternalServerError)
		}
	}))
	t.Cleanup(ft.Close)
	return ft
}

// registerHTTPCheck adds an HTTP check (and, with serviceID, its service) to an external node,
// creating the node when it does not exist and leaving its meta alone when it does.
func registerHTTPCheck(t testing.TB, c *api.Client, node, serviceID, checkID, url string, interval time.Duration) {
	t.Helper()
	reg := &api.CatalogRegistration{
		Node: node, Address: "127.0.0.1", NodeMeta: map[string]string{"external-node": "true"}, SkipNodeUpdate: true,
		Check: &api.AgentCheck{Node: node, CheckID: checkID, Name: checkID, ServiceID: serviceID,
			Definition: api.HealthCheckDefinition{HTTP: url, IntervalDuration: interval, TimeoutDuration: time.Second}},
	}
	if serviceID != "" {
		reg.Service = &api.AgentService{ID: serviceID, Service: serviceID}
	}
	if _, err := c.Catalog().Register(reg, nil); err != nil {
		t.Fatalf("registering check %s on %s: %v", checkID, node, err)
	}
}

// rawServer is a TCP server on 127.0.0.1 whose every connection is handled by serve, for answers
// net/http's server would never send.
func rawServer(t *testing.T, serve func(c net.Conn, br *bufio.Reader)) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				serve(c, bufio.NewReader(c))
			}()
		}
	}()
	return l.Addr().String()
}
