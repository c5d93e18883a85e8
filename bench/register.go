package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
)

// layout maps the N x M checks onto nodes, check IDs and targets. Check number j of node i has the
// global index i*M+j and the ID "c<j>"; the first M-T checks of a node are HTTP, the last T are TCP.
// HTTP checks have their own target id; TCP checks share the target's TCP ports round-robin.
type layout struct {
	nodes, perNode, tcpPerNode, tcpPorts int
	interval, timeout                    time.Duration
}

func newLayout(o options) layout {
	l := layout{o.Nodes, o.ChecksPerNode, o.tcpPerNode(), 0, o.Interval, o.Timeout}
	l.tcpPorts = min(o.TCPPorts, l.tcpChecks())
	return l
}

func (l layout) total() int       { return l.nodes * l.perNode }
func (l layout) httpPerNode() int { return l.perNode - l.tcpPerNode }
func (l layout) httpChecks() int  { return l.nodes * l.httpPerNode() }
func (l layout) tcpChecks() int   { return l.nodes * l.tcpPerNode }
func (l layout) nodeName(i int) string {
	return fmt.Sprintf("bench-node-%05d", i)
}
func checkID(j int) string { return "c" + strconv.Itoa(j) }

// parseCheckID is the inverse of checkID.
func parseCheckID(id string) (int, bool) {
	if !strings.HasPrefix(id, "c") {
		return 0, false
	}
	j, err := strconv.Atoi(id[1:])
	return j, err == nil
}

// isHTTP tells whether check j of a node is an HTTP check.
func (l layout) isHTTP(j int) bool { return j < l.httpPerNode() }

// httpID is the target id of HTTP check j of node i.
func (l layout) httpID(i, j int) int { return i*l.httpPerNode() + j }

// httpCheckIndex is the global index of the HTTP check with target id id.
func (l layout) httpCheckIndex(id int) int {
	return (id/l.httpPerNode())*l.perNode + id%l.httpPerNode()
}

// tcpPort is the target TCP port number of TCP check j of node i.
func (l layout) tcpPort(i, j int) int { return (i*l.tcpPerNode + j - l.httpPerNode()) % l.tcpPorts }

// registration is node i with its service and all its checks, for one /v1/catalog/register.
func (l layout) registration(i int, t *target) *api.CatalogRegistration {
	node := l.nodeName(i)
	reg := &api.CatalogRegistration{
		Node:     node,
		Address:  "127.0.0.1",
		NodeMeta: map[string]string{"external-node": "true"},
		Service:  &api.AgentService{ID: "bench", Service: "bench", Port: 80},
	}
	for j := 0; j < l.perNode; j++ {
		def := api.HealthCheckDefinition{IntervalDuration: l.interval, TimeoutDuration: l.timeout}
		kind := "tcp"
		if l.isHTTP(j) {
			def.HTTP, kind = t.httpURL(l.httpID(i, j)), "http"
		} else {
			def.TCP = t.tcpAddr(l.tcpPort(i, j))
		}
		reg.Checks = append(reg.Checks, &api.HealthCheck{
			Node:       node,
			CheckID:    checkID(j),
			Name:       fmt.Sprintf("bench %s %d", kind, j),
			Status:     api.HealthCritical,
			ServiceID:  "bench",
			Definition: def,
		})
	}
	return reg
}

// registerAll registers every node (one request per node, with all its checks) over workers
// goroutines, directly with Consul.
func registerAll(ctx context.Context, client *api.Client, l layout, t *target, workers int) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	next := make(chan int)
	var (
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			opts := (&api.WriteOptions{}).WithContext(ctx)
			for i := range next {
				if _, err := client.Catalog().Register(l.registration(i, t), opts); err != nil {
					errOnce.Do(func() { firstErr = fmt.Errorf("registering %s: %w", l.nodeName(i), err); cancel() })
					return
				}
			}
		}()
	}
feed:
	for i := 0; i < l.nodes; i++ {
		select {
		case next <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return firstErr
}
