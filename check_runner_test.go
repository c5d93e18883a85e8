package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
)

// crRunner is a CheckRunner running in the background on its own Agent (not started: no
// registration, no leadership), so tests drive the assignment with SetNodes.
type crRunner struct {
	*CheckRunner
	logs *logBuffer
	stop func() // cancels Run and waits for it to return; idempotent
}

// crStart creates an agent for srv (nil: an unreachable Consul) and runs its check runner until the
// test ends. before runs on the runner before Run, for test knobs.
func crStart(t *testing.T, srv *testConsul, mutate func(*Config), before func(*CheckRunner)) *crRunner {
	t.Helper()
	var cfg *Config
	if srv != nil {
		cfg = testConfig(srv)
	} else {
		cfg = DefaultConfig()
		cfg.HTTPAddr = "127.0.0.1:1"
		cfg.RetryInterval = 400 * time.Millisecond
		cfg.CheckUpdateInterval = 0
	}
	if mutate != nil {
		mutate(cfg)
	}
	logger, logs := testLogger(hclog.Trace)
	a, err := NewAgent(cfg, logger, AgentOptions{})
	if err != nil {
		t.Fatalf("NewAgent: %v", err)
	}
	r := a.runner
	r.minInterval = 50 * time.Millisecond
	if before != nil {
		before(r)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.Run(ctx)
	}()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Errorf("check runner did not stop within 10s")
			}
			a.telemetry.Close()
		})
	}
	t.Cleanup(stop)
	return &crRunner{CheckRunner: r, logs: logs, stop: stop}
}

// crRegister registers an external node (node meta external-node=true), optionally a service, and a
// check with a full definition (checkDefinition keeps UDP/H2PING fields api.AgentCheck lacks).
func crRegister(t *testing.T, c *api.Client, node, service string, check catalogRegisterCheck) {
	t.Helper()
	registerNodeCheck(t, c, node, "127.0.0.1", map[string]string{"external-node": "true"}, service, check)
}

// registerNodeCheck registers node at address with meta, optionally a service, and a check.
func registerNodeCheck(t *testing.T, c *api.Client, node, address string, meta map[string]string, service string, check catalogRegisterCheck) {
	t.Helper()
	body := map[string]any{
		"Node":     node,
		"Address":  address,
		"NodeMeta": meta,
	}
	if service != "" {
		body["Service"] = map[string]any{"ID": service, "Service": service}
		check.ServiceID = service
	}
	check.Node = node
	if check.Name == "" {
		check.Name = check.CheckID
	}
	body["Check"] = check
	if _, err := c.Raw().Write("/v1/catalog/register", body, nil, nil); err != nil {
		t.Fatalf("registering %s/%s: %v", node, check.CheckID, err)
	}
}

// crGetCheck reads a check consistently; nil when it does not exist.
func crGetCheck(c *api.Client, node, checkID string) (*catalogCheck, error) {
	var list []*catalogCheck
	if _, err := c.Raw().Query("/v1/health/node/"+node, &list, &api.QueryOptions{RequireConsistent: true}); err != nil {
		return nil, err
	}
	for _, ch := range list {
		if ch.CheckID == checkID {
			return ch, nil
		}
	}
	return nil, nil
}

// crWaitCheck waits until the catalog check satisfies cond and returns it.
func crWaitCheck(t *testing.T, c *api.Client, node, checkID string, timeout time.Duration, cond func(*catalogCheck) error) *catalogCheck {
	t.Helper()
	var got *catalogCheck
	waitFor(t, timeout, func() error {
		ch, err := crGetCheck(c, node, checkID)
		if err != nil {
			return err
		}
		if ch == nil {
			return fmt.Errorf("check %s/%s not found", node, checkID)
		}
		got = ch
		return cond(ch)
	})
	return got
}

func crStatus(status, outputSub string) func(*catalogCheck) error {
	return func(c *catalogCheck) error {
		if c.Status != status || !strings.Contains(c.Output, outputSub) {
			return fmt.Errorf("status %q output %q, want %q containing %q", c.Status, c.Output, status, outputSub)
		}
		return nil
	}
}

// crTarget is an HTTP target counting requests per path; status and body are settable.
type crTarget struct {
	*httptest.Server
	mu     sync.Mutex
	hits   map[string]int
	code   atomic.Int32
	body   atomic.Pointer[string]
	handle func(w http.ResponseWriter, r *http.Request) bool // optional override; true when handled
}

func crNewTarget(t *testing.T) *crTarget {
	tg := &crTarget{hits: make(map[string]int)}
	tg.code.Store(http.StatusOK)
	ok := "ok"
	tg.body.Store(&ok)
	tg.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tg.mu.Lock()
		tg.hits[r.URL.Path]++
		tg.mu.Unlock()
		if tg.handle != nil && tg.handle(w, r) {
			return
		}
		w.WriteHeader(int(tg.code.Load()))
		_, _ = w.Write([]byte(*tg.body.Load()))
	}))
	t.Cleanup(tg.Close)
	return tg
}

func (tg *crTarget) count(path string) int {
	tg.mu.Lock()
	defer tg.mu.Unlock()
	return tg.hits[path]
}

func crHTTPCheck(id, url string, interval time.Duration) catalogRegisterCheck {
	return catalogRegisterCheck{CheckID: id, Status: statusCritical,
		Definition: checkDefinition{HTTP: url, Interval: durationField(interval), Timeout: durationField(time.Second)}}
}

// crWaitRunning waits until the runner runs exactly n checks.
func crWaitRunning(t *testing.T, r *crRunner, n int) {
	t.Helper()
	waitFor(t, 10*time.Second, func() error {
		if _, checks, _ := r.Stats(); checks != n {
			return fmt.Errorf("running %d checks, want %d", checks, n)
		}
		return nil
	})
}

// crStopped asserts that path gets no more requests while other keeps getting them: it waits for
// three more requests on other and checks path's count did not move.
func crStopped(t *testing.T, tg *crTarget, path, other string) {
	t.Helper()
	stopped, base := tg.count(path), tg.count(other)
	waitFor(t, 10*time.Second, func() error {
		if n := tg.count(other); n < base+3 {
			return fmt.Errorf("%s: %d requests, waiting for %d", other, n, base+3)
		}
		return nil
	})
	if n := tg.count(path); n != stopped {
		t.Fatalf("%s still probed after its check stopped: %d requests, was %d", path, n, stopped)
	}
}

// TestCheckRunnerEndToEnd runs checks through the whole runner against a real Consul: results
// reach the catalog, and a status write keeps what Consul stores of the definition (the txn
// endpoint would drop UDP, H2PING, DisableRedirects and OutputMaxSize). Every case uses its own
// nodes and its own runner, which only loads the nodes assigned to it.
func TestCheckRunnerEndToEnd(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	c := srv.Client

	t.Run("HTTP", func(t *testing.T) {
		tg := crNewTarget(t)
		r := crStart(t, srv, nil, nil)
		crRegister(t, c, "cr-http", "web", crHTTPCheck("web-http", tg.URL+"/health", 200*time.Millisecond))
		r.SetNodes([]string{"cr-http"})
		want := fmt.Sprintf("HTTP GET %s/health: 200 OK Output: ok", tg.URL)
		crWaitCheck(t, c, "cr-http", "web-http", 10*time.Second, crStatus(statusPassing, want))
		down := "down"
		tg.body.Store(&down)
		tg.code.Store(http.StatusServiceUnavailable)
		crWaitCheck(t, c, "cr-http", "web-http", 10*time.Second,
			crStatus(statusCritical, fmt.Sprintf("HTTP GET %s/health: 503 Service Unavailable Output: down", tg.URL)))
		tg.code.Store(http.StatusTooManyRequests)
		crWaitCheck(t, c, "cr-http", "web-http", 10*time.Second, crStatus(statusWarning, "429 Too Many Requests"))
		if !strings.Contains(r.logs.String(), "Added HTTP check") {
			t.Errorf("no 'Added HTTP check' log line:\n%s", r.logs)
		}
	})

	t.Run("HTTPDefinitionKept", func(t *testing.T) {
		// DisableRedirects and OutputMaxSize are lost by the txn endpoint: the write must keep them.
		tg := crNewTarget(t)
		r := crStart(t, srv, nil, nil)
		chk := crHTTPCheck("web-redirects", tg.URL+"/r", 200*time.Millisecond)
		chk.Definition.DisableRedirects = true
		chk.Definition.OutputMaxSize = 100
		chk.Definition.Header = map[string][]string{"X-Test": {"1"}}
		chk.Notes = "keep me"
		crRegister(t, c, "cr-http-def", "web", chk)
		r.SetNodes([]string{"cr-http-def"})
		got := crWaitCheck(t, c, "cr-http-def", "web-redirects", 10*time.Second, crStatus(statusPassing, "200 OK"))
		d := got.Definition
		if !d.DisableRedirects || d.OutputMaxSize != 100 || d.HTTP != tg.URL+"/r" || time.Duration(d.Interval) != 200*time.Millisecond ||
			!slices.Equal(d.Header["X-Test"], []string{"1"}) || got.Notes != "keep me" {
			t.Fatalf("definition or notes changed by the status write: %+v notes %q", d, got.Notes)
		}
	})

	t.Run("UDP", func(t *testing.T) {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := pc.LocalAddr().String()
		go func() {
			buf := make([]byte, 64)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				_, _ = pc.WriteTo(buf[:n], from)
			}
		}()
		t.Cleanup(func() { pc.Close() })
		r := crStart(t, srv, nil, nil)
		crRegister(t, c, "cr-udp", "dns", catalogRegisterCheck{CheckID: "dns-udp", Status: statusCritical,
			Definition: checkDefinition{UDP: addr, Interval: durationField(200 * time.Millisecond), Timeout: durationField(300 * time.Millisecond)}})
		r.SetNodes([]string{"cr-udp"})
		got := crWaitCheck(t, c, "cr-udp", "dns-udp", 10*time.Second, crStatus(statusPassing, "UDP connect "+addr+": Success"))
		if got.Definition.UDP != addr || time.Duration(got.Definition.Interval) != 200*time.Millisecond {
			t.Fatalf("UDP definition lost by the status write: %+v", got.Definition)
		}
		pc.Close()
		got = crWaitCheck(t, c, "cr-udp", "dns-udp", 10*time.Second, crStatus(statusCritical, "refused"))
		if got.Definition.UDP != addr {
			t.Fatalf("UDP definition lost by the status write: %+v", got.Definition)
		}
	})

	t.Run("H2PING", func(t *testing.T) {
		h2 := httptest.NewServer(h2c.NewHandler(http.NotFoundHandler(), &http2.Server{}))
		t.Cleanup(h2.Close)
		addr := h2.Listener.Addr().String()
		r := crStart(t, srv, nil, nil)
		crRegister(t, c, "cr-h2", "grpcweb", catalogRegisterCheck{CheckID: "h2", Status: statusCritical,
			Definition: checkDefinition{H2PING: addr, Interval: durationField(200 * time.Millisecond), Timeout: durationField(time.Second)}})
		r.SetNodes([]string{"cr-h2"})
		got := crWaitCheck(t, c, "cr-h2", "h2", 10*time.Second, crStatus(statusPassing, "HTTP2 ping was successful"))
		if got.Definition.H2PING != addr {
			t.Fatalf("H2PING definition lost by the status write: %+v", got.Definition)
		}
	})
}

// TestCheckRunnerWithAgent runs the check runner inside a whole agent: it becomes leader, assigns
// itself the external node, and the worker hands the node to the runner.
func TestCheckRunnerWithAgent(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	tg := crNewTarget(t)
	crRegister(t, srv.Client, "cr-agent-node", "web", crHTTPCheck("web-agent", tg.URL+"/up", 200*time.Millisecond))
	ra := startAgent(t, testConfig(srv))
	crWaitCheck(t, srv.Client, "cr-agent-node", "web-agent", 20*time.Second,
		crStatus(statusPassing, fmt.Sprintf("HTTP GET %s/up: 200 OK Output: ok", tg.URL)))
	if nodes, checks, passing := ra.runner.Stats(); nodes != 1 || checks != 1 || passing != 1 {
		t.Fatalf("Stats() = %d nodes, %d checks, %d passing; want 1 1 1", nodes, checks, passing)
	}
	if err := ra.stop(t); err != nil {
		t.Fatal(err)
	}
	n := tg.count("/up")
	if _, checks, _ := ra.runner.Stats(); checks != 0 {
		t.Fatalf("%d checks still registered with the runner after Run returned", checks)
	}
	// Nothing probes after shutdown: wait three check intervals' worth of a second target.
	other := crNewTarget(t)
	r := crStart(t, srv, nil, nil)
	crRegister(t, srv.Client, "cr-agent-other", "", crHTTPCheck("other", other.URL+"/o", 200*time.Millisecond))
	r.SetNodes([]string{"cr-agent-other"})
	waitFor(t, 10*time.Second, func() error {
		if other.count("/o") < 3 {
			return errNotYet
		}
		return nil
	})
	if m := tg.count("/up"); m != n {
		t.Fatalf("check kept running after the agent stopped: %d requests, was %d", m, n)
	}
}

// crSyntheticNodes are the nodes of crSyntheticChecks; reconcile runs only checks of assigned nodes.
var crSyntheticNodes = []string{"syn-0", "syn-1", "syn-2", "syn-3", "syn-4", "syn-5", "syn-6", "syn-7", "syn-8", "syn-9"}

// crSyntheticChecks builds n checks on 10 fake nodes; odd ones already carry the output the
// target will produce (no write), even ones start critical (a write the writer must handle).
func crSyntheticChecks(n int, url string, modifyIndex uint64, keyOffset int) []*catalogCheck {
	out := make([]*catalogCheck, n)
	for i := range out {
		c := &catalogCheck{
			Node:        crSyntheticNodes[i%len(crSyntheticNodes)],
			CheckID:     fmt.Sprintf("check-%d", i+keyOffset),
			Status:      statusPassing,
			Output:      fmt.Sprintf("HTTP GET %s: 200 OK Output: ok", url),
			ModifyIndex: modifyIndex,
			Definition:  checkDefinition{HTTP: url, Interval: durationField(time.Second), Timeout: durationField(time.Second)},
		}
		if i%2 == 0 {
			c.Status, c.Output = statusCritical, ""
		}
		out[i] = c
	}
	return out
}

// TestCheckRunnerReload: a SIGHUP's thresholds and check_update_interval take effect.
func TestCheckRunnerReload(t *testing.T) {
	r := fakeRunner(t, nil, newFakeStatusWriter())
	cfg := DefaultConfig()
	cfg.PassingThreshold, cfg.CriticalThreshold, cfg.CheckUpdateInterval = 2, 5, time.Minute
	r.Reload(cfg)
	if s := r.settings.Load(); s.passingThreshold != 2 || s.criticalThreshold != 5 || s.checkUpdateInterval != time.Minute {
		t.Fatalf("settings after Reload: %+v", s)
	}
}
