package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"slices"
	"strconv"
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
	logs := &logBuffer{}
	logger := hclog.New(&hclog.LoggerOptions{Name: "consul-esm", Level: hclog.Trace, Output: logs})
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

// TestCheckRunner runs the end-to-end cases against one shared Consul; every case uses its own nodes
// and its own runner, which only loads the nodes assigned to it.
func TestCheckRunner(t *testing.T) {
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

	t.Run("TCP", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		go func() {
			for {
				conn, err := ln.Accept()
				if err != nil {
					return
				}
				conn.Close()
			}
		}()
		t.Cleanup(func() { ln.Close() })
		r := crStart(t, srv, nil, nil)
		crRegister(t, c, "cr-tcp", "db", catalogRegisterCheck{CheckID: "db-tcp", Status: statusCritical,
			Definition: checkDefinition{TCP: addr, Interval: durationField(200 * time.Millisecond), Timeout: durationField(time.Second)}})
		r.SetNodes([]string{"cr-tcp"})
		crWaitCheck(t, c, "cr-tcp", "db-tcp", 10*time.Second, crStatus(statusPassing, "TCP connect "+addr+": Success"))
		ln.Close()
		crWaitCheck(t, c, "cr-tcp", "db-tcp", 10*time.Second, crStatus(statusCritical, "connection refused"))
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

	t.Run("DefinitionChange", func(t *testing.T) {
		tg := crNewTarget(t)
		r := crStart(t, srv, nil, nil)
		chk := crHTTPCheck("svc-check", tg.URL+"/a", 200*time.Millisecond)
		crRegister(t, c, "cr-def", "svc", chk)
		r.SetNodes([]string{"cr-def"})
		waitFor(t, 10*time.Second, func() error {
			if tg.count("/a") < 2 {
				return errNotYet
			}
			return nil
		})

		// Unchanged definition (only Notes edited): the check keeps running, not restarted.
		r.mu.Lock()
		task := r.states["cr-def/svc/svc-check"].task
		r.mu.Unlock()
		cur, _ := crGetCheck(c, "cr-def", "svc-check")
		same := chk
		same.Status, same.Output, same.Notes = cur.Status, cur.Output, "edited notes"
		crRegister(t, c, "cr-def", "svc", same)
		waitFor(t, 10*time.Second, func() error {
			r.mu.Lock()
			defer r.mu.Unlock()
			st := r.states["cr-def/svc/svc-check"]
			if st.check.Notes != "edited notes" {
				return errors.New("notes edit not loaded yet")
			}
			if st.task != task {
				return errors.New("check restarted although its definition did not change")
			}
			return nil
		})
		if strings.Contains(r.logs.String(), "Updating HTTP check") {
			t.Fatalf("unchanged definition logged as updated:\n%s", r.logs)
		}

		// Changed path: restarted, the target sees the new path and no more of the old one.
		changed := chk
		changed.Definition.HTTP = tg.URL + "/b"
		crRegister(t, c, "cr-def", "svc", changed)
		waitFor(t, 10*time.Second, func() error {
			if tg.count("/b") < 1 {
				return errNotYet
			}
			return nil
		})
		crStopped(t, tg, "/a", "/b")
		if !strings.Contains(r.logs.String(), "Updating HTTP check") {
			t.Errorf("no 'Updating HTTP check' log line")
		}
	})

	t.Run("Removal", func(t *testing.T) {
		tg := crNewTarget(t)
		r := crStart(t, srv, nil, nil)
		crRegister(t, c, "cr-rm", "", crHTTPCheck("one", tg.URL+"/one", 150*time.Millisecond))
		crRegister(t, c, "cr-rm", "", crHTTPCheck("two", tg.URL+"/two", 150*time.Millisecond))
		crRegister(t, c, "cr-rm2", "", crHTTPCheck("three", tg.URL+"/three", 150*time.Millisecond))
		r.SetNodes([]string{"cr-rm", "cr-rm2"})
		crWaitRunning(t, r, 3)

		if _, err := c.Catalog().Deregister(&api.CatalogDeregistration{Node: "cr-rm", CheckID: "one"}, nil); err != nil {
			t.Fatal(err)
		}
		crWaitRunning(t, r, 2)
		crStopped(t, tg, "/one", "/two")

		// The last check of a node.
		if _, err := c.Catalog().Deregister(&api.CatalogDeregistration{Node: "cr-rm", CheckID: "two"}, nil); err != nil {
			t.Fatal(err)
		}
		crWaitRunning(t, r, 1)
		crStopped(t, tg, "/two", "/three")

		// The assignment empties.
		r.SetNodes(nil)
		crWaitRunning(t, r, 0)
		base := tg.count("/three")
		other := crNewTarget(t)
		r2 := crStart(t, srv, nil, nil)
		crRegister(t, c, "cr-rm3", "", crHTTPCheck("four", other.URL+"/four", 150*time.Millisecond))
		r2.SetNodes([]string{"cr-rm3"})
		waitFor(t, 10*time.Second, func() error {
			if other.count("/four") < 3 {
				return errNotYet
			}
			return nil
		})
		if n := tg.count("/three"); n != base {
			t.Fatalf("check kept running after the assignment emptied: %d requests, was %d", n, base)
		}
		if !strings.Contains(r.logs.String(), "Deleting check") || !strings.Contains(r.logs.String(), "Updated checks") {
			t.Errorf("missing reconcile log lines:\n%s", r.logs)
		}
	})

	t.Run("Thresholds", func(t *testing.T) {
		// critical_threshold 3 with the README's sequence after a passing status:
		// FAIL FAIL FAIL PASS FAIL FAIL -> counter 1 2 3 2 3 4: critical only on the 6th result
		// (the 4th net failure); the pass in between decrements.
		script := []bool{false, false, false, true, false, false}
		tg := crNewTarget(t)
		var mu sync.Mutex
		var seen []string // catalog status when each request arrived
		tg.handle = func(w http.ResponseWriter, req *http.Request) bool {
			cur, _ := crGetCheck(c, "cr-thr", "thr")
			mu.Lock()
			n := len(seen)
			status := "?"
			if cur != nil {
				status = cur.Status
			}
			seen = append(seen, status)
			mu.Unlock()
			if n < len(script) && script[n] {
				w.WriteHeader(http.StatusOK)
			} else {
				w.WriteHeader(http.StatusInternalServerError)
			}
			return true
		}
		chk := crHTTPCheck("thr", tg.URL+"/thr", 300*time.Millisecond)
		chk.Status = statusPassing
		crRegister(t, c, "cr-thr", "", chk)
		r := crStart(t, srv, func(cfg *Config) { cfg.CriticalThreshold = 3 }, nil)
		r.SetNodes([]string{"cr-thr"})
		crWaitCheck(t, c, "cr-thr", "thr", 15*time.Second, crStatus(statusCritical, "500 Internal Server Error"))
		mu.Lock()
		defer mu.Unlock()
		if len(seen) < 6 {
			t.Fatalf("critical after %d results, want the 6th: %v", len(seen), seen)
		}
		for i, s := range seen[:6] {
			if s != statusPassing {
				t.Fatalf("catalog was %q before result %d, want passing until the 6th result: %v", s, i+1, seen)
			}
		}
	})

	t.Run("CASNotClobbered", func(t *testing.T) {
		tg := crNewTarget(t)
		var once atomic.Bool
		var hookErr atomic.Pointer[string]
		crRegister(t, c, "cr-cas", "api", crHTTPCheck("cas", tg.URL+"/cas", 200*time.Millisecond))
		r := crStart(t, srv, nil, func(r *CheckRunner) {
			// Between the writer's consistent read and its txn, an operator edits the check.
			r.writer.afterRead = func() {
				if once.Swap(true) {
					return
				}
				cur, err := crGetCheck(c, "cr-cas", "cas")
				if err != nil || cur == nil {
					msg := fmt.Sprint("reading check in hook: ", err)
					hookErr.Store(&msg)
					return
				}
				edit := crHTTPCheck("cas", tg.URL+"/cas", 200*time.Millisecond)
				edit.Status, edit.Output, edit.Notes = cur.Status, cur.Output, "operator was here"
				crRegister(t, c, "cr-cas", "api", edit)
			}
		})
		r.SetNodes([]string{"cr-cas"})
		got := crWaitCheck(t, c, "cr-cas", "cas", 10*time.Second, crStatus(statusPassing, "200 OK"))
		if msg := hookErr.Load(); msg != nil {
			t.Fatal(*msg)
		}
		if !once.Load() {
			t.Fatal("hook never ran")
		}
		if got.Notes != "operator was here" {
			t.Fatalf("operator's edit overwritten: notes %q", got.Notes)
		}
		if !strings.Contains(r.logs.String(), "retrying the batch") {
			t.Errorf("stale index did not cause a re-read:\n%s", r.logs)
		}
	})

	t.Run("CASRevertedThenRetried", func(t *testing.T) {
		// The check changes between read and write on every attempt: the transaction is reverted as a
		// whole after the last retry, and the next probe result tries again.
		tg := crNewTarget(t)
		var edits atomic.Int32
		crRegister(t, c, "cr-cas2", "", crHTTPCheck("cas2", tg.URL+"/cas2", 200*time.Millisecond))
		r := crStart(t, srv, nil, func(r *CheckRunner) {
			r.writer.afterRead = func() {
				n := edits.Add(1)
				if n > writeAttempts {
					return
				}
				cur, err := crGetCheck(c, "cr-cas2", "cas2")
				if err != nil || cur == nil {
					return
				}
				edit := crHTTPCheck("cas2", tg.URL+"/cas2", 200*time.Millisecond)
				edit.Status, edit.Output, edit.Notes = cur.Status, cur.Output, fmt.Sprintf("edit %d", n)
				crRegister(t, c, "cr-cas2", "", edit)
			}
		})
		r.SetNodes([]string{"cr-cas2"})
		got := crWaitCheck(t, c, "cr-cas2", "cas2", 10*time.Second, crStatus(statusPassing, "200 OK"))
		if want := fmt.Sprintf("edit %d", writeAttempts); got.Notes != want {
			t.Fatalf("notes %q, want the operator's last edit %q", got.Notes, want)
		}
		if !strings.Contains(r.logs.String(), "Error(s) returned from txn when updating check status in Consul") {
			t.Errorf("no txn failure logged:\n%s", r.logs)
		}
		if r.writer.failures.Load() == 0 {
			t.Error("write failure not counted")
		}
	})

	t.Run("Batching", func(t *testing.T) {
		const n = 150
		tg := crNewTarget(t)
		var nodes []string
		for i := range n {
			node := fmt.Sprintf("cr-batch-%d", i%5)
			if i < 5 {
				nodes = append(nodes, node)
			}
			chk := crHTTPCheck(fmt.Sprintf("b%d", i), tg.URL+"/b", 300*time.Millisecond)
			chk.Status = statusPassing
			crRegister(t, c, node, "", chk)
		}
		r := crStart(t, srv, nil, nil)
		r.SetNodes(nodes)
		crWaitRunning(t, r, n)
		// Every check's first result writes its output; then the target fails and all go critical.
		waitFor(t, 10*time.Second, func() error {
			if runs := r.runs.Load(); runs < n {
				return fmt.Errorf("%d runs", runs)
			}
			return nil
		})
		tg.code.Store(http.StatusInternalServerError)
		start, txns0 := time.Now(), r.writer.txns.Load()
		waitFor(t, 10*time.Second, func() error {
			var list []*catalogCheck
			q := &api.QueryOptions{RequireConsistent: true, Filter: `Status == "critical" and Node matches "^cr-batch-"`}
			if _, err := c.Raw().Query("/v1/health/state/any", &list, q); err != nil {
				return err
			}
			if len(list) != n {
				return fmt.Errorf("%d of %d critical", len(list), n)
			}
			return nil
		})
		txns := r.writer.txns.Load() - txns0
		t.Logf("%d status changes in %d transactions (largest %d ops), all in the catalog after %s",
			n, txns, r.writer.maxOps.Load(), time.Since(start).Round(time.Millisecond))
		if txns >= n/2 {
			t.Errorf("%d transactions for %d changes: not batched", txns, n)
		}
		if m := r.writer.maxOps.Load(); m > maxTxnOps {
			t.Errorf("a transaction had %d ops, limit %d", m, maxTxnOps)
		}
	})

	t.Run("DeregisterCriticalServiceAfter", func(t *testing.T) {
		r := crStart(t, srv, nil, nil)
		chk := catalogRegisterCheck{CheckID: "dead-tcp", Status: statusCritical, Definition: checkDefinition{
			TCP: "127.0.0.1:1", Interval: durationField(200 * time.Millisecond), Timeout: durationField(time.Second),
			DeregisterCriticalServiceAfter: durationField(time.Second)}}
		crRegister(t, c, "cr-reap", "doomed", chk)
		crRegister(t, c, "cr-reap", "", catalogRegisterCheck{CheckID: "node-level", Status: statusCritical, Definition: checkDefinition{
			TCP: "127.0.0.1:1", Interval: durationField(200 * time.Millisecond), DeregisterCriticalServiceAfter: durationField(time.Second)}})
		start := time.Now()
		r.SetNodes([]string{"cr-reap"})
		waitFor(t, 15*time.Second, func() error {
			svcs, _, err := c.Catalog().NodeServiceList("cr-reap", nil)
			if err != nil {
				return err
			}
			for _, s := range svcs.Services {
				if s.ID == "doomed" {
					return errors.New("service still registered")
				}
			}
			return nil
		})
		if d := time.Since(start); d < time.Second {
			t.Fatalf("deregistered after %s, before the 1s timeout", d)
		}
		if !strings.Contains(r.logs.String(), "agent has been critical for too long, deregistered service") {
			t.Errorf("missing reaper log line:\n%s", r.logs)
		}
		// Node checks never reap.
		if ch, _ := crGetCheck(c, "cr-reap", "node-level"); ch == nil {
			t.Fatal("node-level check was removed")
		}
	})

	outputTarget := func(t *testing.T) (*crTarget, *atomic.Int64) {
		tg := crNewTarget(t)
		var n atomic.Int64
		tg.handle = func(w http.ResponseWriter, _ *http.Request) bool {
			fmt.Fprintf(w, "n=%d", n.Add(1))
			return true
		}
		return tg, &n
	}
	outputN := func(c *catalogCheck) int64 {
		i := strings.LastIndex(c.Output, "n=")
		if i < 0 {
			return -1
		}
		v, _ := strconv.ParseInt(c.Output[i+2:], 10, 64)
		return v
	}

	t.Run("OutputDeferred", func(t *testing.T) {
		tg, served := outputTarget(t)
		chk := crHTTPCheck("out", tg.URL+"/out", 200*time.Millisecond)
		chk.Status = statusPassing
		crRegister(t, c, "cr-out", "", chk)
		r := crStart(t, srv, func(cfg *Config) { cfg.CheckUpdateInterval = 1500 * time.Millisecond }, nil)
		r.SetNodes([]string{"cr-out"})
		// The first result of a started check is written at once.
		first := crWaitCheck(t, c, "cr-out", "out", 10*time.Second, func(ch *catalogCheck) error {
			if outputN(ch) < 1 {
				return errNotYet
			}
			return nil
		})
		t0 := time.Now()
		firstN := outputN(first)
		// Later output-only changes wait for check_update_interval and carry the latest output.
		var next *catalogCheck
		var servedAt int64
		waitFor(t, 10*time.Second, func() error {
			ch, err := crGetCheck(c, "cr-out", "out")
			if err != nil || ch == nil || outputN(ch) == firstN {
				return errNotYet
			}
			next, servedAt = ch, served.Load()
			return nil
		})
		if d := time.Since(t0); d < 1200*time.Millisecond {
			t.Fatalf("output-only change written after %s, want check_update_interval (1.5s)", d)
		}
		if n := outputN(next); n < firstN+4 || n < servedAt-1 {
			t.Fatalf("deferred write carried n=%d, not the latest output (first %d, served %d)", n, firstN, servedAt)
		}
	})

	t.Run("OutputImmediate", func(t *testing.T) {
		tg, _ := outputTarget(t)
		chk := crHTTPCheck("out0", tg.URL+"/out0", 200*time.Millisecond)
		chk.Status = statusPassing
		crRegister(t, c, "cr-out0", "", chk)
		r := crStart(t, srv, func(cfg *Config) { cfg.CheckUpdateInterval = 0 }, nil)
		r.SetNodes([]string{"cr-out0"})
		seen := map[int64]bool{}
		waitFor(t, 10*time.Second, func() error {
			ch, err := crGetCheck(c, "cr-out0", "out0")
			if err != nil || ch == nil {
				return errNotYet
			}
			if n := outputN(ch); n > 0 {
				seen[n] = true
			}
			if len(seen) < 4 {
				return fmt.Errorf("saw outputs %v", seen)
			}
			return nil
		})
	})

	t.Run("UnsupportedLoggedOnce", func(t *testing.T) {
		tg, _ := outputTarget(t) // its output changes every run, so loads keep coming
		crRegister(t, c, "cr-ttl", "", catalogRegisterCheck{CheckID: "ttl", Status: statusWarning, Output: "set by app",
			Definition: checkDefinition{TTL: durationField(time.Minute)}})
		// 20ms is below the runner's floor (50ms in tests): clamped, with a warning.
		crRegister(t, c, "cr-ttl", "", crHTTPCheck("busy", tg.URL+"/busy", 20*time.Millisecond))
		r := crStart(t, srv, nil, nil)
		r.SetNodes([]string{"cr-ttl"})
		waitFor(t, 15*time.Second, func() error {
			if n := r.loads.Load(); n < 3 {
				return fmt.Errorf("%d loads", n)
			}
			return nil
		})
		if n := strings.Count(r.logs.String(), "check is not a valid"); n != 1 {
			t.Fatalf("unsupported check logged %d times, want once:\n%s", n, r.logs)
		}
		ch, _ := crGetCheck(c, "cr-ttl", "ttl")
		if ch.Status != statusWarning || ch.Output != "set by app" {
			t.Fatalf("unsupported check was written: %q %q", ch.Status, ch.Output)
		}
		if _, checks, _ := r.Stats(); checks != 1 {
			t.Fatalf("running %d checks, want 1", checks)
		}
		if !strings.Contains(r.logs.String(), "Check interval too low: interval=20ms check=cr-ttl/busy") {
			t.Errorf("no 'Check interval too low' warning:\n%s", r.logs)
		}
	})

	t.Run("Reload", func(t *testing.T) {
		r := crStart(t, srv, nil, nil)
		cfg := testConfig(srv)
		cfg.PassingThreshold, cfg.CriticalThreshold, cfg.CheckUpdateInterval = 2, 5, time.Minute
		r.Reload(cfg)
		if s := r.settings.Load(); s.passingThreshold != 2 || s.criticalThreshold != 5 || s.checkUpdateInterval != time.Minute {
			t.Fatalf("settings after Reload: %+v", s)
		}
	})

	t.Run("FilterFallback", func(t *testing.T) {
		crRegister(t, c, "cr-f1", "", crHTTPCheck("f1", "http://127.0.0.1:1/", time.Hour))
		crRegister(t, c, "cr-f1", "", catalogRegisterCheck{CheckID: externalNodeHealthCheckID, Status: statusPassing})
		crRegister(t, c, "cr-f2", "", crHTTPCheck("f2", "http://127.0.0.1:1/", time.Hour))
		r := crStart(t, srv, nil, nil)
		for _, nodes := range [][]string{{"cr-f1"}, {"cr-f1", `we"ird`}} {
			slices.Sort(nodes)
			_, useFilter := nodeFilterExpr(nodes)
			checks, _, _, err := r.fetchChecks(context.Background(), nodes, 0)
			if err != nil {
				t.Fatal(err)
			}
			if len(checks) != 1 || checks[0].CheckID != "f1" {
				var ids []string
				for _, ch := range checks {
					ids = append(ids, ch.Node+"/"+ch.CheckID)
				}
				t.Fatalf("nodes %q (server-side filter %v): got %v, want only cr-f1/f1", nodes, useFilter, ids)
			}
		}
	})

	t.Run("NewAssignmentCancelsQuery", func(t *testing.T) {
		crRegister(t, c, "cr-as1", "", crHTTPCheck("a1", "http://127.0.0.1:1/", time.Hour))
		crRegister(t, c, "cr-as2", "", crHTTPCheck("a2", "http://127.0.0.1:1/", time.Hour))
		r := crStart(t, srv, func(cfg *Config) { cfg.QueryWaitTime = time.Minute }, nil)
		r.SetNodes([]string{"cr-as1"})
		crWaitRunning(t, r, 1)
		waitFor(t, 10*time.Second, func() error {
			if !r.blocking.Load() {
				return errors.New("no blocking query in flight")
			}
			return nil
		})
		start := time.Now()
		r.SetNodes([]string{"cr-as1", "cr-as2"})
		crWaitRunning(t, r, 2)
		if d := time.Since(start); d > 3*time.Second {
			t.Fatalf("new assignment took %s to load", d)
		}
	})
}

// TestCheckRunnerWithAgent runs the check runner inside a whole agent: it becomes leader, assigns
// itself the external node, and the worker hands the node to the runner.
func TestCheckRunnerWithAgent(t *testing.T) {
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

func TestCheckRunnerNodeFilterExpr(t *testing.T) {
	got, ok := nodeFilterExpr([]string{"a", "b-1"})
	want := `CheckID != "externalNodeHealth" and (Node == "a" or Node == "b-1")`
	if !ok || got != want {
		t.Fatalf("got %q %v, want %q", got, ok, want)
	}
	if _, ok := nodeFilterExpr([]string{`x"y`}); ok {
		t.Error("a node name with a quote must fall back to client-side filtering")
	}
	many := make([]string, maxFilterNodes+1)
	for i := range many {
		many[i] = fmt.Sprintf("n%d", i)
	}
	if _, ok := nodeFilterExpr(many); ok {
		t.Error("more than maxFilterNodes nodes must fall back")
	}
	if _, ok := nodeFilterExpr([]string{strings.Repeat("x", maxFilterURLBytes)}); ok {
		t.Error("an over-long filter must fall back")
	}
}

func TestCheckRunnerDefsEqual(t *testing.T) {
	base := checkDefinition{HTTP: "http://x", Header: map[string][]string{"A": {"1"}}, Interval: durationField(time.Second)}
	same := base
	same.Header = map[string][]string{"A": {"1"}}
	if !defsEqual(&base, &same) {
		t.Error("equal definitions differ")
	}
	empty1, empty2 := checkDefinition{Header: map[string][]string{}}, checkDefinition{}
	if !defsEqual(&empty1, &empty2) {
		t.Error("nil and empty headers must be equal")
	}
	added := base
	added.Header = map[string][]string{"A": {"1"}, "B": {"2"}}
	if defsEqual(&base, &added) || defsEqual(&added, &base) {
		t.Error("an added header must count as a change, both directions")
	}
	for name, mut := range map[string]func(*checkDefinition){
		"Body":             func(d *checkDefinition) { d.Body = "x" },
		"DisableRedirects": func(d *checkDefinition) { d.DisableRedirects = true },
		"OutputMaxSize":    func(d *checkDefinition) { d.OutputMaxSize = 10 },
		"Timeout":          func(d *checkDefinition) { d.Timeout = durationField(time.Second) },
		"TLSSkipVerify":    func(d *checkDefinition) { d.TLSSkipVerify = true },
		"Method":           func(d *checkDefinition) { d.Method = "POST" },
		"DCSA":             func(d *checkDefinition) { d.DeregisterCriticalServiceAfter = durationField(time.Minute) },
	} {
		d := base
		mut(&d)
		if defsEqual(&base, &d) {
			t.Errorf("%s change not detected", name)
		}
	}
}

// crSyntheticChecks builds n checks on 10 fake nodes; odd ones already carry the output the
// target will produce (no write), even ones start critical (a write the writer must handle).
// crSyntheticNodes are the nodes of crSyntheticChecks; reconcile runs only checks of assigned nodes.
var crSyntheticNodes = []string{"syn-0", "syn-1", "syn-2", "syn-3", "syn-4", "syn-5", "syn-6", "syn-7", "syn-8", "syn-9"}

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

// TestCheckRunnerGoroutinesAfterChurn starts, restarts and stops 1,000 checks and verifies that
// every goroutine is gone once Run returned.
func TestCheckRunnerGoroutinesAfterChurn(t *testing.T) {
	tg := crNewTarget(t)
	before := runtime.NumGoroutine()

	// A short idle timeout lets the pool drain while the runner still runs.
	r := crStart(t, nil, nil, func(r *CheckRunner) { r.sched.idle = 300 * time.Millisecond })
	// The synthetic nodes are not in any Consul (the agent points at 127.0.0.1:1): every write of the
	// even checks fails and is reverted, which churns the writer too.
	r.SetNodes(crSyntheticNodes)
	r.reconcile(crSyntheticChecks(1000, tg.URL+"/a", 10, 0), 10)
	waitFor(t, 15*time.Second, func() error {
		if n := tg.count("/a"); n < 1000 {
			return fmt.Errorf("%d runs of /a", n)
		}
		return nil
	})
	mid := runtime.NumGoroutine()
	r.sched.mu.Lock()
	t.Logf("workers while running 1000 checks: %d", r.sched.workers)
	r.sched.mu.Unlock()

	// Every definition changes: 1,000 restarts.
	r.reconcile(crSyntheticChecks(1000, tg.URL+"/b", 11, 0), 10)
	waitFor(t, 15*time.Second, func() error {
		if n := tg.count("/b"); n < 1000 {
			return fmt.Errorf("%d runs of /b", n)
		}
		return nil
	})
	// Half removed, half new.
	r.reconcile(crSyntheticChecks(1000, tg.URL+"/b", 12, 500), 10)
	if _, checks, _ := r.Stats(); checks != 1000 {
		t.Fatalf("running %d checks, want 1000", checks)
	}
	r.reconcile(nil, 0)
	if _, checks, _ := r.Stats(); checks != 0 {
		t.Fatalf("running %d checks after emptying, want 0", checks)
	}
	r.sched.mu.Lock()
	queued, count := r.sched.heap.Len(), r.sched.count
	r.sched.mu.Unlock()
	if queued != 0 || count != 0 {
		t.Fatalf("scheduler still holds %d tasks (count %d)", queued, count)
	}
	waitFor(t, 10*time.Second, func() error {
		r.sched.mu.Lock()
		defer r.sched.mu.Unlock()
		if r.sched.workers != 0 || len(r.sched.idleWs) != 0 {
			return fmt.Errorf("%d workers (%d idle) left with no checks", r.sched.workers, len(r.sched.idleWs))
		}
		return nil
	})
	if r.writer.failures.Load() == 0 {
		t.Error("the writes to the unreachable Consul were not counted as failures")
	}

	t.Logf("goroutines: before %d, while running 1000 checks %d", before, mid)
	r.stop()
	// Server-side connection goroutines of the target end asynchronously after the last run closed its
	// connection; the slack covers the API client's idle keep-alive connections.
	waitFor(t, 10*time.Second, func() error {
		if n := runtime.NumGoroutine(); n > before+10 {
			return fmt.Errorf("%d goroutines, %d before", n, before)
		}
		return nil
	})
}

// TestDecodeChecks covers the streaming decode of a health-state body: filtering, malformed
// bodies, per-check fields not leaking into the next check, and held copies reused.
func TestDecodeChecks(t *testing.T) {
	r := crStart(t, nil, nil, nil)
	nodes := []string{"n1", "n2"}
	cases := []struct {
		name    string
		body    string
		want    []string // Node/CheckID of the checks returned
		wantErr bool
	}{
		{"null", `null`, nil, false},
		{"empty", `[]`, nil, false},
		{"filtered", `[{"Node":"n1","CheckID":"a"},{"Node":"other","CheckID":"b"},{"Node":"n2","CheckID":"externalNodeHealth"},null,{"Node":"n2","CheckID":"c"}]`, []string{"n1/a", "n2/c"}, false},
		{"object", `{"Node":"n1"}`, nil, true},
		{"truncated", `[{"Node":"n1","CheckID":"a"},{"Node":"n1"`, nil, true},
		{"garbage", `[{"Node":"n1","CheckID":"a"}, nonsense]`, nil, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := r.decodeChecks(strings.NewReader(tc.body), nodes)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			var keys []string
			for _, c := range got {
				keys = append(keys, c.Node+"/"+c.CheckID)
			}
			if !tc.wantErr && !slices.Equal(keys, tc.want) {
				t.Fatalf("got %v, want %v", keys, tc.want)
			}
		})
	}

	// One check's header map and tags must not show up in the next one's (json.Decode merges into
	// a reused value).
	got, err := r.decodeChecks(strings.NewReader(`[
		{"Node":"n1","CheckID":"a","ServiceTags":["x","y"],"Definition":{"HTTP":"http://127.0.0.1:1/","Header":{"X-A":["1"]}}},
		{"Node":"n1","CheckID":"b","Definition":{"HTTP":"http://127.0.0.1:1/"}}]`), nodes)
	if err != nil || len(got) != 2 {
		t.Fatalf("got %d checks, err %v", len(got), err)
	}
	if len(got[1].ServiceTags) != 0 || len(got[1].Definition.Header) != 0 || len(got[0].Definition.Header["X-A"]) != 1 {
		t.Fatalf("fields leaked between checks: %+v / %+v", got[0], got[1])
	}

	// Once running, a check at the same ModifyIndex comes back as the runner's own copy, a newer or
	// an older one as the fresh decode (reconcileAt decides whether an older one is a stale read).
	held := &catalogCheck{Node: "n1", CheckID: "a", Status: statusPassing, ModifyIndex: 7,
		Definition: checkDefinition{HTTP: "http://127.0.0.1:1/", Interval: durationField(time.Hour)}}
	r.SetNodes(nodes)
	r.reconcile([]*catalogCheck{held}, 1)
	for _, tc := range []struct {
		index uint64
		same  bool
	}{{6, false}, {7, true}, {8, false}} {
		body := fmt.Sprintf(`[{"Node":"n1","CheckID":"a","Status":"passing","ModifyIndex":%d,"Definition":{"HTTP":"http://127.0.0.1:1/","Interval":"1h"}}]`, tc.index)
		got, err := r.decodeChecks(strings.NewReader(body), nodes)
		if err != nil || len(got) != 1 {
			t.Fatalf("index %d: %d checks, err %v", tc.index, len(got), err)
		}
		if (got[0] == held) != tc.same {
			t.Errorf("index %d: held copy returned %v, want %v", tc.index, got[0] == held, tc.same)
		}
	}
}

// TestCheckRunnerShrinkStopsAtOnce: nodes taken out of the assignment stop being checked at once,
// also while Consul cannot be queried (their new owner runs them already; two owners writing the
// same checks is what the assignment exists to prevent).
func TestCheckRunnerShrinkStopsAtOnce(t *testing.T) {
	srv := newTestConsul(t)
	proxy := newFaultProxy(t, srv.HTTPAddr)
	tg := crNewTarget(t)
	interval := 100 * time.Millisecond
	crRegister(t, srv.Client, "shrink-keep", "", crHTTPCheck("keep", tg.URL+"/keep", interval))
	crRegister(t, srv.Client, "shrink-gone", "", crHTTPCheck("gone", tg.URL+"/gone", interval))
	r := crStart(t, srv, func(c *Config) { c.HTTPAddr = proxy.Listener.Addr().String() }, nil)
	r.SetNodes([]string{"shrink-gone", "shrink-keep"})
	crWaitRunning(t, r, 2)
	waitFor(t, 5*time.Second, func() error {
		if tg.count("/gone") < 2 {
			return errNotYet
		}
		return nil
	})

	proxy.mode.Store(fault500)
	r.SetNodes([]string{"shrink-keep"})
	if _, checks, _ := r.Stats(); checks != 1 {
		t.Errorf("running %d checks right after the assignment shrank, want 1", checks)
	}
	crStopped(t, tg, "/gone", "/keep")
}

// TestCheckRunnerConvergesAfterSnapshotRestore: a snapshot restore brings back an old status with a
// lower ModifyIndex than the runner's copy. The runner must take the catalog's copy, so a target
// whose result does not change is written again within two intervals.
func TestCheckRunnerConvergesAfterSnapshotRestore(t *testing.T) {
	srv := newTestConsul(t)
	tg := crNewTarget(t)
	tg.code.Store(http.StatusInternalServerError)
	interval := time.Second
	crRegister(t, srv.Client, "restore-node", "", crHTTPCheck("c", tg.URL+"/c", interval))
	r := crStart(t, srv, nil, nil)
	r.SetNodes([]string{"restore-node"})
	crWaitCheck(t, srv.Client, "restore-node", "c", 10*time.Second, crStatus(statusCritical, "500"))

	snap, _, err := srv.Client.Snapshot().Save(nil)
	if err != nil {
		t.Fatal(err)
	}
	data, err := io.ReadAll(snap)
	snap.Close()
	if err != nil {
		t.Fatal(err)
	}
	tg.code.Store(http.StatusOK)
	crWaitCheck(t, srv.Client, "restore-node", "c", 10*time.Second, crStatus(statusPassing, "200 OK"))
	if err := srv.Client.Snapshot().Restore(nil, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	restored := time.Now()
	if c, err := crGetCheck(srv.Client, "restore-node", "c"); err != nil || c == nil || c.Status != statusCritical {
		t.Fatalf("after the restore the check is %+v (%v), want the snapshot's critical", c, err)
	}
	crWaitCheck(t, srv.Client, "restore-node", "c", 10*time.Second, crStatus(statusPassing, "200 OK"))
	took := time.Since(restored)
	t.Logf("passing again %s after the snapshot restore", took)
	if took > 2*interval {
		t.Errorf("status converged %s after the restore, want within two intervals (%s)", took, 2*interval)
	}
}

// TestIndexProbeGap: the regression probe follows the shortest held interval (half of it), never
// goes under half the interval floor, and sends nothing while no check is held.
func TestIndexProbeGap(t *testing.T) {
	for _, tc := range []struct {
		name      string
		intervals []time.Duration
		want      time.Duration
	}{
		{"no checks", nil, 0},
		{"one 10s check", []time.Duration{10 * time.Second}, 5 * time.Second},
		{"shortest wins", []time.Duration{30 * time.Second, 4 * time.Second, time.Minute}, 2 * time.Second},
		{"floor", []time.Duration{200 * time.Millisecond}, 500 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &CheckRunner{minInterval: time.Second, states: map[string]*checkState{}}
			for i, iv := range tc.intervals {
				st := &checkState{key: fmt.Sprint(i)}
				st.task = &checkTask{st: st, interval: iv}
				r.states[st.key] = st
			}
			r.states["stopped"] = &checkState{key: "stopped"} // held but not running: no interval
			if got := r.indexProbeGap(); got != tc.want {
				t.Errorf("indexProbeGap() = %s, want %s", got, tc.want)
			}
		})
	}
}

// TestReconcileOlderCopy: a catalog copy older than the runner's is a stale read unless the state
// it came from covers the runner's index (then the catalog went back) or a regression was seen.
func TestReconcileOlderCopy(t *testing.T) {
	r := crStart(t, nil, nil, nil)
	r.SetNodes([]string{"n1"})
	check := func(index uint64, status string) *catalogCheck {
		return &catalogCheck{Node: "n1", CheckID: "a", Status: status, ModifyIndex: index,
			Definition: checkDefinition{HTTP: "http://127.0.0.1:1/", Interval: durationField(time.Hour)}}
	}
	status := func() string {
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.states["n1/a"].check.Status
	}
	for _, tc := range []struct {
		name   string
		asOf   uint64
		retake bool
		want   string
	}{
		{"stale read (state before our index)", 19, false, statusPassing},
		{"state covers our index: the catalog went back", 25, false, statusCritical},
		{"regression seen", 19, true, statusCritical},
	} {
		r.reconcile([]*catalogCheck{check(20, statusPassing)}, 1)
		r.reconcileAt([]*catalogCheck{check(18, statusCritical)}, 1, tc.asOf, tc.retake)
		if got := status(); got != tc.want {
			t.Errorf("%s: runner holds %s, want %s", tc.name, got, tc.want)
		}
		r.reconcile(nil, 0)
	}
}
