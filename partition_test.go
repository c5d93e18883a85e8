package main

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// fakeEnterpriseConsul stands in for a Consul Enterprise agent (CE cannot serve namespaces or
// partitions): it keeps a tiny KV store and check list, answers the endpoints consul-esm uses, honours
// blocking-query indexes, and records every request's path and query.
type fakeEnterpriseConsul struct {
	*httptest.Server
	mu       sync.Mutex
	index    uint64
	kv       map[string][]byte
	sessions map[string]bool
	requests []*url.URL
	target   string
}

func newFakeEnterpriseConsul(t *testing.T, target string) *fakeEnterpriseConsul {
	f := &fakeEnterpriseConsul{index: 10, kv: map[string][]byte{}, sessions: map[string]bool{}, target: target}
	f.Server = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.Close)
	return f
}

func (f *fakeEnterpriseConsul) serve(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	f.requests = append(f.requests, r.URL)
	f.mu.Unlock()
	f.block(r)
	f.mu.Lock()
	defer f.mu.Unlock()
	w.Header().Set("X-Consul-Index", strconv.FormatUint(f.index, 10))
	w.Header().Set("X-Consul-KnownLeader", "true")
	p, q := r.URL.Path, r.URL.Query()
	reply := func(v any) { _ = json.NewEncoder(w).Encode(v) }
	switch {
	case p == "/v1/status/leader":
		reply("127.0.0.1:8300")
	case p == "/v1/agent/self":
		reply(map[string]any{"Config": map[string]any{"Version": "1.22.0+ent"}})
	case p == "/v1/catalog/service/consul":
		reply([]map[string]any{{"ServiceMeta": map[string]string{"version": "1.22.0+ent"}}})
	case strings.HasPrefix(p, "/v1/agent/service/register"), strings.HasPrefix(p, "/v1/agent/check/update/"),
		strings.HasPrefix(p, "/v1/agent/service/deregister/"):
		f.index++
	case strings.HasPrefix(p, "/v1/agent/service/"):
		w.WriteHeader(http.StatusNotFound)
	case p == "/v1/session/create":
		f.index++
		id := fmt.Sprintf("sess-%d", f.index)
		f.sessions[id] = true
		reply(map[string]string{"ID": id})
	case strings.HasPrefix(p, "/v1/session/renew/"):
		reply([]map[string]string{{"ID": strings.TrimPrefix(p, "/v1/session/renew/")}})
	case strings.HasPrefix(p, "/v1/session/destroy/"):
		reply(true)
	case strings.HasPrefix(p, "/v1/kv/"):
		f.serveKV(w, r, strings.TrimPrefix(p, "/v1/kv/"))
	case p == "/v1/txn":
		f.serveTxn(w, r)
	case p == "/v1/catalog/nodes":
		reply([]map[string]any{{"Node": "ext1", "Address": "127.0.0.1", "Meta": map[string]string{"external-node": "true"}}})
	case p == "/v1/health/service/consul-esm":
		var out []map[string]any
		for k := range f.kv {
			if id, ok := strings.CutPrefix(k, "registered/"); ok {
				out = append(out, map[string]any{"Service": map[string]string{"ID": id}})
			}
		}
		reply(out)
	case p == "/v1/health/state/any", p == "/v1/health/node/ext1":
		reply([]map[string]any{{
			"Node": "ext1", "CheckID": "web", "Name": "web", "Status": "critical", "ServiceID": "web", "ServiceName": "web",
			"Namespace": "team-ns", "Partition": q.Get("partition"), "ModifyIndex": 5,
			"Definition": map[string]any{"HTTP": f.target, "Interval": "200ms", "Timeout": "1s"},
		}})
	default:
		reply(nil)
	}
}

// block makes a query with an index at or past the current one wait, as Consul's blocking queries do.
func (f *fakeEnterpriseConsul) block(r *http.Request) {
	idx, err := strconv.ParseUint(r.URL.Query().Get("index"), 10, 64)
	if err != nil || idx == 0 {
		return
	}
	deadline := time.Now().Add(300 * time.Millisecond)
	for time.Now().Before(deadline) && r.Context().Err() == nil {
		f.mu.Lock()
		changed := f.index > idx
		f.mu.Unlock()
		if changed {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (f *fakeEnterpriseConsul) serveKV(w http.ResponseWriter, r *http.Request, key string) {
	q := r.URL.Query()
	switch r.Method {
	case http.MethodPut:
		f.index++
		body, _ := io.ReadAll(r.Body)
		if q.Has("release") {
			_ = json.NewEncoder(w).Encode(true)
			return
		}
		f.kv[key] = body
		_ = json.NewEncoder(w).Encode(true)
	default:
		var out []map[string]any
		for k, v := range f.kv {
			if k == key || (q.Has("recurse") && strings.HasPrefix(k, key)) {
				out = append(out, map[string]any{"Key": k, "Value": base64.StdEncoding.EncodeToString(v), "Session": q.Get("acquire"), "ModifyIndex": f.index})
			}
		}
		if key == "consul-esm/leader" && len(f.sessions) > 0 {
			for id := range f.sessions {
				out = []map[string]any{{"Key": key, "Session": id, "Flags": uint64(lockFlagValue), "ModifyIndex": f.index}}
				break
			}
		}
		if len(out) == 0 {
			w.WriteHeader(http.StatusNotFound)
			return
		}
		_ = json.NewEncoder(w).Encode(out)
	}
}

func (f *fakeEnterpriseConsul) serveTxn(w http.ResponseWriter, r *http.Request) {
	f.index++
	var ops []struct {
		KV    *struct{ Verb, Key, Value string }
		Check *struct {
			Verb  string
			Check struct{ Namespace, Partition, Status string }
		}
	}
	_ = json.NewDecoder(r.Body).Decode(&ops)
	var results []map[string]any
	for _, op := range ops {
		switch {
		case op.KV != nil && (op.KV.Verb == "set" || op.KV.Verb == "cas"):
			v, _ := base64.StdEncoding.DecodeString(op.KV.Value)
			f.kv[op.KV.Key] = v
			results = append(results, map[string]any{"KV": map[string]string{"Key": op.KV.Key}})
		case op.KV != nil && (op.KV.Verb == "delete" || op.KV.Verb == "delete-cas"):
			delete(f.kv, op.KV.Key)
		case op.KV != nil: // check-session on the leader key: the fake's only session holds it
			results = append(results, map[string]any{"KV": map[string]string{"Key": op.KV.Key}})
		case op.Check != nil:
			f.kv["check-write/"+op.Check.Check.Namespace+"/"+op.Check.Check.Partition] = []byte(op.Check.Check.Status)
			results = append(results, map[string]any{"Check": map[string]string{"CheckID": "web"}})
		}
	}
	_ = json.NewEncoder(w).Encode(map[string]any{"Results": results})
}

// startAgainstFake runs an agent (instance "inst", short timings, mutate applied) against a fake
// Consul Enterprise whose only check points at a passing local target.
func startAgainstFake(t *testing.T, mutate func(*Config)) (*fakeEnterpriseConsul, *runningAgent) {
	t.Helper()
	target := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	t.Cleanup(target.Close)
	fake := newFakeEnterpriseConsul(t, target.URL)
	cfg := DefaultConfig()
	cfg.HTTPAddr = fake.Listener.Addr().String()
	cfg.InstanceID = "inst"
	cfg.TTLRefreshInterval, cfg.RetryInterval, cfg.QueryWaitTime = 200*time.Millisecond, 200*time.Millisecond, time.Second
	cfg.CheckUpdateInterval = 0
	mutate(cfg)
	// The fake's instance watch lists whoever "registered": mark ourselves healthy.
	fake.mu.Lock()
	fake.kv["registered/consul-esm:inst"] = nil
	fake.mu.Unlock()
	return fake, startAgent(t, cfg)
}

func TestPartitionAndNamespaceOnEveryRequest(t *testing.T) {
	t.Parallel()
	fake, ra := startAgainstFake(t, func(cfg *Config) { cfg.Partition = "team-a" })

	// The check (critical in the fake catalog, passing at the target) gets written with its namespace.
	waitFor(t, 15*time.Second, func() error {
		fake.mu.Lock()
		defer fake.mu.Unlock()
		if string(fake.kv["check-write/team-ns/team-a"]) != api.HealthPassing {
			return fmt.Errorf("no passing write carrying namespace team-ns and partition team-a yet")
		}
		return nil
	})
	if err := ra.stop(t); err != nil {
		t.Fatal(err)
	}

	fake.mu.Lock()
	defer fake.mu.Unlock()
	seen := map[string]bool{}
	for _, u := range fake.requests {
		seen[u.Path] = true
		if got := u.Query().Get("partition"); got != "team-a" {
			t.Errorf("%s?%s lacks partition=team-a", u.Path, u.RawQuery)
		}
		if u.Path == "/v1/health/state/any" && u.Query().Get("ns") != "*" {
			t.Errorf("health query without ns=*: %s", u.RawQuery)
		}
	}
	for _, p := range []string{"/v1/agent/service/register", "/v1/session/create", "/v1/kv/consul-esm/leader", "/v1/health/state/any", "/v1/txn", "/v1/agent/service/deregister/consul-esm:inst"} {
		if !seen[p] {
			t.Errorf("never saw a request to %s", p)
		}
	}
}

func TestStaleReadNodes(t *testing.T) {
	t.Parallel()
	for _, stale := range []bool{false, true} {
		t.Run(fmt.Sprintf("stale=%v", stale), func(t *testing.T) {
			fake, ra := startAgainstFake(t, func(cfg *Config) { cfg.StaleReadNodes = stale })
			waitFor(t, 15*time.Second, func() error {
				fake.mu.Lock()
				defer fake.mu.Unlock()
				nodes, health := false, false
				for _, u := range fake.requests {
					nodes = nodes || u.Path == "/v1/catalog/nodes"
					health = health || u.Path == "/v1/health/state/any"
				}
				if !nodes || !health {
					return errNotYet
				}
				return nil
			})
			if err := ra.stop(t); err != nil {
				t.Fatal(err)
			}
			fake.mu.Lock()
			defer fake.mu.Unlock()
			for _, u := range fake.requests {
				if u.Path != "/v1/catalog/nodes" && u.Path != "/v1/health/state/any" {
					continue
				}
				if u.Query().Has("stale") != stale {
					t.Errorf("%s?%s: stale=%v expected", u.Path, u.RawQuery, stale)
				}
			}
		})
	}
}
