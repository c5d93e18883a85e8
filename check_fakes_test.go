package main

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

// fakeStatusWriter is a statusWriter that records what the runner asked for and writes nothing.
// Like the real one it is called with the runner's lock held, so it needs no lock of its own
// while tests read it under that lock.
type fakeStatusWriter struct {
	writes  []fakeWrite              // enqueued checks, with the wanted state at that moment
	defers  map[string]time.Duration // deferWrite calls by key (the latest delay)
	cancels map[string]int           // cancelDefer calls by key
}

type fakeWrite struct{ key, status, output string }

func newFakeStatusWriter() *fakeStatusWriter {
	return &fakeStatusWriter{defers: map[string]time.Duration{}, cancels: map[string]int{}}
}

func (f *fakeStatusWriter) enqueue(st *checkState) {
	f.writes = append(f.writes, fakeWrite{st.key, st.wantStatus, st.wantOutput})
}

func (f *fakeStatusWriter) deferWrite(st *checkState, d time.Duration) { f.defers[st.key] = d }

func (f *fakeStatusWriter) cancelDefer(st *checkState) { f.cancels[st.key]++ }

// fakeCatalog is a checkCatalog holding checks in memory: transactions CAS on ModifyIndex as
// Consul's do, and every applied write is recorded.
type fakeCatalog struct {
	mu      sync.Mutex
	index   uint64
	checks  map[string]*catalogCheck // by node/checkID
	applied []fakeWrite              // key node/checkID
}

func newFakeCatalog(checks ...*catalogCheck) *fakeCatalog {
	f := &fakeCatalog{checks: map[string]*catalogCheck{}}
	for _, c := range checks {
		cp := *c
		f.checks[c.Node+"/"+c.CheckID] = &cp
		f.index = max(f.index, c.ModifyIndex)
	}
	return f
}

func (f *fakeCatalog) txn(_ context.Context, ops api.TxnOps) (bool, *api.TxnResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	resp := &api.TxnResponse{}
	for i, op := range ops {
		if op.Check == nil || op.Check.Verb != api.CheckCAS {
			return false, nil, fmt.Errorf("fakeCatalog: unsupported op %d", i)
		}
		c := op.Check.Check
		held := f.checks[c.Node+"/"+c.CheckID]
		if held == nil || held.ModifyIndex != c.ModifyIndex {
			resp.Errors = append(resp.Errors, &api.TxnError{OpIndex: i, What: "failed to set check: index is stale"})
		}
	}
	if len(resp.Errors) > 0 {
		return false, resp, nil
	}
	for _, op := range ops {
		c := op.Check.Check
		key := c.Node + "/" + c.CheckID
		f.index++
		held := f.checks[key]
		held.Status, held.Output, held.ModifyIndex = c.Status, c.Output, f.index
		f.applied = append(f.applied, fakeWrite{key, c.Status, c.Output})
		resp.Results = append(resp.Results, &api.TxnResult{Check: &api.HealthCheck{CheckID: c.CheckID, ModifyIndex: f.index}})
	}
	return true, resp, nil
}

func (f *fakeCatalog) nodeChecks(_ context.Context, ref nodeRef) ([]*catalogCheck, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []*catalogCheck
	for _, c := range f.checks {
		if c.Node == ref.node {
			cp := *c
			out = append(out, &cp)
		}
	}
	return out, nil
}

func (f *fakeCatalog) register(context.Context, *catalogRegistration) error {
	return fmt.Errorf("fakeCatalog: register not supported")
}

func (f *fakeCatalog) node(context.Context, string, string) (*api.Node, error) { return nil, nil }

// writes returns the writes applied so far.
func (f *fakeCatalog) writes() []fakeWrite {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]fakeWrite(nil), f.applied...)
}

type nopContact struct{}

func (nopContact) contact()     {}
func (nopContact) failed(error) {}

// fakeRunner is a CheckRunner that is never Run and never contacts Consul (its agent points at a
// closed port): tests drive reconcile and handleResult directly. Its writes go to w.
func fakeRunner(t *testing.T, mutate func(*Config), w statusWriter) *CheckRunner {
	t.Helper()
	cfg := DefaultConfig()
	cfg.HTTPAddr = "127.0.0.1:1"
	if mutate != nil {
		mutate(cfg)
	}
	a, err := NewAgent(cfg, hclog.NewNullLogger(), AgentOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.telemetry.Close() })
	r := a.runner
	r.minInterval = 50 * time.Millisecond
	r.writes = w
	return r
}

// fakeCatalogRunner is fakeRunner with the real writer over catalog, its loop running until the
// test ends.
func fakeCatalogRunner(t *testing.T, mutate func(*Config), catalog checkCatalog) *CheckRunner {
	t.Helper()
	r := fakeRunner(t, mutate, nil)
	r.writer = newCheckWriter(writerEnv{
		logger: r.logger, catalog: catalog, status: nopContact{}, states: &r.mu,
		settings: r.settings.Load, confirmed: r.raiseKnown, window: writeBatchWindow,
	})
	r.writes = r.writer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.writer.loop(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return r
}

// heldTask gives the runner a running check in state c (as a load would, without probing) and
// returns its task, for feeding results to handleResult.
func heldTask(r *CheckRunner, c *catalogCheck) *checkTask {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := &checkState{key: c.checkKey(), check: c, wantStatus: c.Status, wantOutput: c.Output, def: c.Definition, fresh: true}
	t := &checkTask{st: st, index: -1}
	st.task = t
	r.states[st.key] = st
	return t
}
