package main

// Loading the assigned checks from Consul: the blocking health-state query, its streaming decode,
// and the watch that notices when Consul's state went back.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/armon/go-metrics"
	"github.com/hashicorp/consul/api"
)

const (
	// maxFilterNodes and maxFilterURLBytes bound the server-side filter expression that limits the
	// health query to our own nodes. Beyond them the query falls back to the node-meta filter alone
	// and filters on our side: a request line longer than ~8 KiB is refused by common proxies, and
	// Consul evaluates every OR term against every check in the cluster.
	maxFilterNodes    = 200
	maxFilterURLBytes = 6000

	// minLoadGap is the shortest time between two health-state queries. Every check write anywhere
	// in the cluster (our own included) wakes the blocking query, so without a gap a busy cluster
	// would make every instance download its checks continuously. The gap grows with the number of
	// checks (one more second per thousand, up to maxLoadGap) because each load re-decodes them
	// all. A new assignment is always fetched at once.
	minLoadGap = time.Second
	maxLoadGap = 10 * time.Second
)

// catalogCheck is a health check as /v1/health/* returns it. The definition is decoded into our own
// checkDefinition so no field (UDP, H2PING, DisableRedirects, OutputMaxSize, Body, ...) is lost,
// which api.HealthCheckDefinition would drop.
type catalogCheck struct {
	Node        string
	CheckID     string
	Name        string
	Status      string
	Notes       string
	Output      string
	ServiceID   string
	ServiceName string
	ServiceTags []string
	Type        string
	Namespace   string `json:",omitempty"`
	Partition   string `json:",omitempty"`
	ExposedPort int
	PeerName    string `json:",omitempty"`
	Definition  checkDefinition
	CreateIndex uint64
	ModifyIndex uint64
}

// checkKey is the check's identity: <node>/<serviceID>/<checkID>, or <node>/<checkID> for node
// checks (the original's "hash"), prefixed with the namespace outside the default one.
func (c *catalogCheck) checkKey() string {
	var k string
	if c.ServiceID != "" {
		k = c.Node + "/" + c.ServiceID + "/" + c.CheckID
	} else {
		k = c.Node + "/" + c.CheckID
	}
	if c.Namespace != "" && c.Namespace != "default" {
		k = c.Namespace + "/" + k
	}
	return k
}

// loadLoop keeps the running checks in line with the catalog until ctx ends. It is the one watch
// not built on blockingQuery: an assignment change cancels the query in flight and starts over at
// index 0, the pause between loads grows with the number of checks, and an index regression makes
// it take the catalog's copies; it follows the same index rule (nextWaitIndex) and retry pace.
func (r *CheckRunner) loadLoop(ctx context.Context) {
	var (
		idx          uint64
		gen          uint64 // assignment generation idx belongs to
		emptiedGen   uint64 // generation already reconciled to empty
		failing      bool
		lastStart    time.Time
		hadChecks    int
		retry        = newBackoff(queryRetryMin, r.agent.config().RetryInterval)
		errMsg       = "Error querying for health check info"
		fetchAndUpd  = []string{"esm", "checks", "fetch_and_update", "duration"}
		nodesMonitor = []string{"esm", "nodes", "monitored"}
	)
	for ctx.Err() == nil {
		r.nodesMu.Lock()
		nodes, curGen := r.nodes, r.nodesGen
		qctx, cancel := context.WithCancel(ctx)
		r.cancelQuery = cancel
		r.nodesMu.Unlock()

		if curGen != gen {
			// A new assignment starts a fresh, non-blocking query and skips the load gap.
			gen, idx, lastStart = curGen, 0, time.Time{}
		}
		retake := r.retakeNext.Swap(false)
		if retake {
			idx, lastStart = 0, time.Time{}
		}
		if len(nodes) == 0 {
			cancel()
			metrics.SetGauge(nodesMonitor, 0)
			if curGen != emptiedGen {
				emptiedGen = curGen
				r.reconcile(nil, 0)
			}
			select {
			case <-ctx.Done():
			case <-r.nodesChanged:
			}
			continue
		}
		if gap := r.loadGap(hadChecks) - time.Since(lastStart); !lastStart.IsZero() && gap > 0 {
			if !r.waitAssignment(ctx, gap) {
				cancel()
				continue // new assignment or shutdown
			}
		}
		lastStart = time.Now()
		r.blocking.Store(idx > 0)
		known := r.known.Load() // before the query: all of it is in any state the query can see
		checks, meta, arrived, err := r.fetchChecks(qctx, nodes, idx)
		r.blocking.Store(false)
		reassigned := qctx.Err() != nil && ctx.Err() == nil
		cancel()
		if ctx.Err() != nil {
			return
		}
		if reassigned {
			continue
		}
		if err != nil {
			r.agent.status.failed(err)
			if !failing {
				r.logger.Warn(errMsg, "error", err)
				failing = true
			}
			idx = 0
			if retake {
				r.retakeNext.Store(true)
			}
			r.waitAssignment(ctx, retry.next())
			continue
		}
		if failing {
			r.logger.Info("Consul query recovered", "query", errMsg)
			failing = false
		}
		retry.reset()
		r.agent.status.contact()
		if meta.LastIndex < known && !r.agent.config().StaleReadNodes {
			// (A stale read may lag our own writes; watchIndex asks the leader instead.)
			retake = true
		}
		if retake {
			r.logger.Warn("Consul's index went backwards (snapshot restore?), taking the catalog's copy of every check",
				"index", meta.LastIndex, "known", known)
			r.known.Store(meta.LastIndex)
		} else {
			r.raiseKnown(meta.LastIndex)
		}
		metrics.SetGauge(nodesMonitor, float32(len(nodes)))
		r.reconcileAt(checks, len(nodes), meta.LastIndex, retake)
		r.loads.Add(1)
		hadChecks = len(checks)
		if !arrived.IsZero() {
			metrics.MeasureSince(fetchAndUpd, arrived)
		}
		idx = nextWaitIndex(idx, meta.LastIndex)
	}
}

// raiseKnown records that Consul confirmed index.
func (r *CheckRunner) raiseKnown(index uint64) {
	for {
		cur := r.known.Load()
		if index <= cur || r.known.CompareAndSwap(cur, index) {
			return
		}
	}
}

// indexProbeGap is the pause before watchIndex's next probe: half the shortest interval among the
// held checks, so a regression is noticed within one interval of any check, at a cost that follows
// the checks (10 s checks: one request per 5 s). It is never under half the interval floor; zero
// means no check is held, so there is nothing to protect and no request to send. A check added
// with a shorter interval than any before is covered from the next probe on.
func (r *CheckRunner) indexProbeGap() time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	var shortest time.Duration
	for _, st := range r.states {
		if t := st.task; t != nil && (shortest == 0 || t.interval < shortest) {
			shortest = t.interval
		}
	}
	if shortest == 0 {
		return 0
	}
	return max(shortest, r.minInterval) / 2
}

// watchIndex notices a regression of Consul's state the loader cannot see: after a snapshot
// restore the checks table may be back at an index at or below the one the loader waits on, and
// its blocking query then returns only at its wait time (45 s). A check whose result does not
// change would keep the restored status meanwhile. It asks for the table's index (an empty
// node's checks: a tiny answer carrying it) and, when it is below what Consul had confirmed before
// the request was sent, makes the loader take the catalog's copies at once.
func (r *CheckRunner) watchIndex(ctx context.Context) {
	idle := r.minInterval / 2
	t := time.NewTimer(idle)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		gap := r.indexProbeGap()
		if gap == 0 {
			t.Reset(idle)
			continue
		}
		t.Reset(gap)
		known := r.known.Load()
		q := r.agent.queryOptions(ctx)
		q.Namespace = r.namespaceWildcard() // the loads' scope, so the indexes compare
		_, meta, err := r.agent.client.Health().Node(indexProbeNode, q)
		if err != nil || meta.LastIndex >= known || r.retakeNext.Load() {
			continue
		}
		r.logger.Debug("Checks table index below the known one", "index", meta.LastIndex, "known", known)
		r.retakeNext.Store(true)
		r.nodesMu.Lock()
		if r.cancelQuery != nil {
			r.cancelQuery()
		}
		r.nodesMu.Unlock()
		wake(r.nodesChanged)
	}
}

// indexProbeNode is the node watchIndex asks about; whether it exists does not matter, the answer
// carries the index of the whole checks table either way.
const indexProbeNode = "consul-esm-index-probe"

// loadGap is the pause between loads for a given number of checks (see minLoadGap).
func (r *CheckRunner) loadGap(checks int) time.Duration {
	return min(minLoadGap+time.Duration(checks/1000)*time.Second, maxLoadGap)
}

// waitAssignment sleeps for d; it returns false early when the assignment changes or ctx ends.
func (r *CheckRunner) waitAssignment(ctx context.Context, d time.Duration) bool {
	return sleepUnlessWoken(ctx, d, r.nodesChanged) // woken: the caller re-reads the assignment
}

// fetchChecks runs one (blocking) health-state query and returns the checks on nodes, without the
// node monitor's externalNodeHealth checks.
func (r *CheckRunner) fetchChecks(ctx context.Context, nodes []string, idx uint64) ([]*catalogCheck, *api.QueryMeta, time.Time, error) {
	cfg := r.agent.config()
	q := r.agent.queryOptions(ctx)
	q.WaitIndex, q.WaitTime = idx, cfg.QueryWaitTime
	q.NodeMeta = cfg.NodeMeta
	q.AllowStale = cfg.StaleReadNodes
	if ns := r.namespaceWildcard(); ns != "" {
		r.logger.Debug("checking for services in all namespaces")
		q.Namespace = ns
	}
	if f, ok := nodeFilterExpr(nodes); ok {
		q.Filter = f
	}
	var (
		out     []*catalogCheck
		arrived time.Time
	)
	// The body is decoded one check at a time as it arrives (see withStreamBody), and a check we
	// already hold at this or a newer ModifyIndex is not kept twice: a load of an unchanged
	// assignment then allocates only short-lived garbage instead of a second copy of every check.
	q = q.WithContext(withStreamBody(q.Context(), func(body io.Reader) error {
		arrived = time.Now()
		var err error
		out, err = r.decodeChecks(body, nodes)
		return err
	}))
	meta, err := r.agent.client.Raw().Query("/v1/health/state/any", &struct{}{}, q)
	if err != nil {
		return nil, nil, time.Time{}, fmt.Errorf("querying health checks of %d nodes: %w", len(nodes), err)
	}
	return out, meta, arrived, nil
}

// decodeChecks reads a JSON array of health checks and returns those on nodes (sorted), without the
// node monitor's externalNodeHealth checks. A check already held at the same ModifyIndex is returned as
// the held copy, which reconcile treats as unchanged; an older one is returned as decoded, for
// reconcileAt to tell a stale read from a catalog that went back.
func (r *CheckRunner) decodeChecks(body io.Reader, nodes []string) ([]*catalogCheck, error) {
	dec := json.NewDecoder(body)
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	if tok == nil { // null: no checks
		return nil, nil
	}
	if d, ok := tok.(json.Delim); !ok || d != '[' {
		return nil, fmt.Errorf("health checks: want a JSON array, got %v", tok)
	}
	var out []*catalogCheck
	var c catalogCheck
	for dec.More() {
		c = catalogCheck{} // Decode merges into maps and slices, so start from zero every time
		if err := dec.Decode(&c); err != nil {
			return nil, err
		}
		if c.CheckID == "" || c.CheckID == externalNodeHealthCheckID {
			continue
		}
		if _, ok := slices.BinarySearch(nodes, c.Node); !ok {
			continue
		}
		if held := r.heldCopy(&c); held != nil {
			out = append(out, held)
			continue
		}
		kept := c
		out = append(out, &kept)
	}
	if _, err := dec.Token(); err != nil { // the closing ]
		return nil, err
	}
	return out, nil
}

// heldCopy returns the runner's copy of c when it is at c's index.
func (r *CheckRunner) heldCopy(c *catalogCheck) *catalogCheck {
	key := c.checkKey()
	r.mu.Lock()
	defer r.mu.Unlock()
	if st := r.states[key]; st != nil && c.ModifyIndex == st.check.ModifyIndex {
		return st.check
	}
	return nil
}

// nodeFilterExpr builds the server-side filter that limits a health query to nodes (sorted), or
// reports that the set is too large or has names that cannot be quoted safely.
func nodeFilterExpr(nodes []string) (string, bool) {
	if len(nodes) == 0 || len(nodes) > maxFilterNodes {
		return "", false
	}
	var b strings.Builder
	b.WriteString(`CheckID != "` + externalNodeHealthCheckID + `" and (`)
	for i, n := range nodes {
		if strings.ContainsAny(n, "\"\\`") || strings.ContainsFunc(n, func(c rune) bool { return c < 0x20 || c == 0x7f }) {
			return "", false
		}
		if i > 0 {
			b.WriteString(" or ")
		}
		b.WriteString(`Node == "`)
		b.WriteString(n)
		b.WriteByte('"')
	}
	b.WriteByte(')')
	s := b.String()
	if len(url.QueryEscape(s)) > maxFilterURLBytes {
		return "", false
	}
	return s, true
}

// namespaceWildcard returns "*" on Consul Enterprise (detected at startup from the agent's version),
// so one query covers every namespace, and "" on CE, which rejects namespaces.
func (r *CheckRunner) namespaceWildcard() string {
	if r.agent.enterprise.Load() {
		return "*"
	}
	return ""
}
