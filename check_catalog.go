package main

// The writer's surroundings (writerEnv) and its side of Consul: what a status write needs from the
// catalog (checkCatalog, with the real agentCatalog over the API client), and the two shapes a write
// takes there: a CAS operation in a transaction, or a registration for definitions the txn endpoint
// would mangle.

import (
	"context"
	"fmt"
	"net/url"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

// writerEnv is everything the writer uses outside itself, so it never reaches into the runner or
// the agent: the checks' lock, the catalog, and the runner's settings and index bookkeeping.
type writerEnv struct {
	logger  hclog.Logger
	catalog checkCatalog
	status  consulContact // told whether Consul answered (/health)
	// states guards every checkState field the writer reads or sets (the runner's mu).
	states sync.Locker
	// settings returns the settings in force (a revert needs the check's thresholds).
	settings func() *runnerSettings
	// confirmed records that Consul confirmed the checks table at an index (CheckRunner.raiseKnown).
	confirmed func(index uint64)
	// window is the batch window (batchWindow).
	window time.Duration
}

// consulContact is told whether a request reached Consul (agentStatus).
type consulContact interface {
	contact()
	failed(err error)
}

// checkCatalog is the Consul the writer reads checks from and writes statuses to. Requests use the
// agent's token and partition unless an argument names another partition.
type checkCatalog interface {
	// txn sends one transaction; ok is false when Consul rolled it back (resp says why).
	txn(ctx context.Context, ops api.TxnOps) (ok bool, resp *api.TxnResponse, err error)
	// nodeChecks reads the checks of one node consistently.
	nodeChecks(ctx context.Context, ref nodeRef) ([]*catalogCheck, error)
	// register writes a registration through /v1/catalog/register, in its namespace and partition.
	register(ctx context.Context, reg *catalogRegistration) error
	// node reads a node consistently (nil: no such node); partition "" is the agent's.
	node(ctx context.Context, name, partition string) (*api.Node, error)
}

// agentCatalog is the real checkCatalog: the agent's API client.
type agentCatalog struct{ a *Agent }

func (c agentCatalog) txn(ctx context.Context, ops api.TxnOps) (bool, *api.TxnResponse, error) {
	ok, resp, _, err := c.a.client.Txn().Txn(ops, c.a.queryOptions(ctx))
	return ok, resp, err
}

func (c agentCatalog) nodeChecks(ctx context.Context, ref nodeRef) ([]*catalogCheck, error) {
	q := c.a.queryOptions(ctx)
	q.RequireConsistent = true
	if ref.ns != "" {
		q.Namespace = ref.ns
	}
	if ref.partition != "" {
		q.Partition = ref.partition
	}
	var checks []*catalogCheck
	if _, err := c.a.client.Raw().Query("/v1/health/node/"+url.PathEscape(ref.node), &checks, q); err != nil {
		return nil, fmt.Errorf("reading checks of node %q: %w", ref.node, err)
	}
	return checks, nil
}

func (c agentCatalog) register(ctx context.Context, reg *catalogRegistration) error {
	wo := c.a.writeOptions(ctx)
	if reg.Partition != "" {
		wo.Partition = reg.Partition
	}
	if reg.Namespace != "" {
		wo.Namespace = reg.Namespace
	}
	_, err := c.a.client.Raw().Write("/v1/catalog/register", reg, nil, wo)
	return err
}

func (c agentCatalog) node(ctx context.Context, name, partition string) (*api.Node, error) {
	q := c.a.queryOptions(ctx)
	q.RequireConsistent = true
	if partition != "" {
		q.Partition = partition
	}
	n, _, err := c.a.client.Catalog().Node(name, q)
	if err != nil || n == nil {
		return nil, err
	}
	return n.Node, nil
}

// txnPreservesDefinition reports whether a CAS through /v1/txn keeps d intact. Consul's txn endpoint
// copies only HTTP, TLSServerName, TLSSkipVerify, Header, Method, Body, TCP, TCPUseTLS, GRPC,
// GRPCUseTLS, OSService, Interval, Timeout and DeregisterCriticalServiceAfter into the stored check;
// writing any other definition through it would erase the rest.
func txnPreservesDefinition(d *checkDefinition) bool {
	return d.UDP == "" && d.H2PING == "" && !d.H2PingUseTLS && !d.DisableRedirects && d.OutputMaxSize == 0 &&
		len(d.ScriptArgs) == 0 && d.DockerContainerID == "" && d.Shell == "" && d.AliasNode == "" &&
		d.AliasService == "" && d.SessionName == "" && d.TTL == 0
}

// txnCheck is the fresh copy with our status and output, CAS-guarded by the ModifyIndex just read.
func (op *pendingWrite) txnCheck() api.HealthCheck {
	c := op.fresh
	d := &c.Definition
	return api.HealthCheck{
		Node: c.Node, CheckID: c.CheckID, Name: c.Name, Status: op.status, Notes: c.Notes, Output: op.output,
		ServiceID: c.ServiceID, ServiceName: c.ServiceName, ServiceTags: c.ServiceTags, Type: c.Type,
		Namespace: c.Namespace, Partition: c.Partition, ExposedPort: c.ExposedPort, PeerName: c.PeerName,
		Definition: api.HealthCheckDefinition{
			HTTP: d.HTTP, Header: d.Header, Method: d.Method, Body: d.Body,
			TLSServerName: d.TLSServerName, TLSSkipVerify: d.TLSSkipVerify,
			TCP: d.TCP, TCPUseTLS: d.TCPUseTLS, GRPC: d.GRPC, GRPCUseTLS: d.GRPCUseTLS, OSService: d.OSService,
			IntervalDuration:                       time.Duration(d.Interval),
			TimeoutDuration:                        time.Duration(d.Timeout),
			DeregisterCriticalServiceAfterDuration: time.Duration(d.DeregisterCriticalServiceAfter),
		},
		ModifyIndex: c.ModifyIndex,
	}
}

// catalogRegistration is the body of /v1/catalog/register for a status write that must keep the
// whole definition.
type catalogRegistration struct {
	Node           string
	SkipNodeUpdate bool
	Partition      string `json:",omitempty"`
	Namespace      string `json:",omitempty"`
	Check          *catalogRegisterCheck
}

type catalogRegisterCheck struct {
	Node        string
	CheckID     string
	Name        string
	Status      string
	Notes       string `json:",omitempty"`
	Output      string
	ServiceID   string   `json:",omitempty"`
	ServiceName string   `json:",omitempty"`
	ServiceTags []string `json:",omitempty"`
	Type        string   `json:",omitempty"`
	Namespace   string   `json:",omitempty"`
	Partition   string   `json:",omitempty"`
	ExposedPort int      `json:",omitempty"`
	Definition  checkDefinition
}

// register writes a check whose definition the txn endpoint would mangle (UDP, H2PING,
// DisableRedirects, OutputMaxSize) through /v1/catalog/register, which stores the full definition.
// The register endpoint has no CAS, so this is guarded only by the consistent read just before it:
// an edit landing in the few milliseconds between that read and this write is overwritten (Consul
// 1.22 offers no conditional write that keeps these definitions). A node deleted in that window is
// not left re-created: a service check's write fails with the service gone, and a node check's
// write is followed by removeGhostNode. Checks of every other type keep the real CAS.
func (w *checkWriter) register(ctx context.Context, op *pendingWrite) {
	c := op.fresh
	body := &catalogRegistration{
		Node: c.Node, SkipNodeUpdate: true, Partition: c.Partition, Namespace: c.Namespace,
		Check: &catalogRegisterCheck{
			Node: c.Node, CheckID: c.CheckID, Name: c.Name, Status: op.status, Notes: c.Notes, Output: op.output,
			ServiceID: c.ServiceID, ServiceName: c.ServiceName, ServiceTags: c.ServiceTags, Type: c.Type,
			Namespace: c.Namespace, Partition: c.Partition, ExposedPort: c.ExposedPort, Definition: c.Definition,
		},
	}
	if err := w.env.catalog.register(ctx, body); err != nil {
		w.env.status.failed(err)
		w.env.logger.Warn("Error updating check status in Consul", "checkID", c.CheckID, "node", c.Node, "error", err)
		w.revert(op)
		return
	}
	w.env.status.contact()
	if c.ServiceID == "" && w.removeGhostNode(ctx, c) {
		w.gone(op)
		return
	}
	// The register endpoint does not return the new ModifyIndex; the next load brings it.
	op.index = c.ModifyIndex
	w.apply(op)
}

// removeGhostNode undoes a node the register of a node check re-created: if the node was deleted
// (reaped) after the consistent read, the SkipNodeUpdate registration creates it again without an
// address or meta, which no registration of a real node can do (Consul requires an address unless
// SkipNodeUpdate is set). Such a node is deleted, compare-and-set on the index it has, so a real
// registration landing meanwhile is kept. It reports whether it removed the node.
func (w *checkWriter) removeGhostNode(ctx context.Context, c *catalogCheck) bool {
	node, err := w.env.catalog.node(ctx, c.Node, c.Partition)
	if err != nil || node == nil || node.Address != "" {
		return false
	}
	del := &api.TxnOp{Node: &api.NodeTxnOp{Verb: api.NodeDeleteCAS, Node: api.Node{
		Node: c.Node, Partition: c.Partition, ModifyIndex: node.ModifyIndex}}}
	ok, _, err := w.env.catalog.txn(ctx, api.TxnOps{del})
	if err != nil || !ok {
		w.env.logger.Warn("Could not remove the node a check write re-created after it was deregistered",
			"node", c.Node, "error", err)
		return false
	}
	w.env.logger.Info("Node was deregistered while a check status was written; removed the node the write re-created",
		"node", c.Node, "checkID", c.CheckID)
	return true
}
