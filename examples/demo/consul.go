package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/hashicorp/consul/api"
)

// consulAgent is a throwaway `consul agent -dev`: a single server that keeps its data in memory and
// listens only on 127.0.0.1, every port picked free so it never clashes with a Consul already running.
type consulAgent struct {
	proc     *proc
	httpAddr string
	client   *api.Client
}

// startConsul starts the agent and waits until it has elected itself leader. On error the returned
// agent, if not nil, still has to be stopped.
func startConsul(ctx context.Context, bin, dir string) (*consulAgent, error) {
	ports, err := freePorts(7)
	if err != nil {
		return nil, err
	}
	args := []string{"agent", "-dev",
		"-bind", "127.0.0.1", "-client", "127.0.0.1", "-node", "consul-esm-demo",
		"-http-port", strconv.Itoa(ports[0]),
		"-dns-port", strconv.Itoa(ports[1]),
		"-grpc-port", strconv.Itoa(ports[2]),
		"-grpc-tls-port", strconv.Itoa(ports[3]),
		"-serf-lan-port", strconv.Itoa(ports[4]),
		"-serf-wan-port", strconv.Itoa(ports[5]),
		"-server-port", strconv.Itoa(ports[6]),
		"-hcl", "disable_update_check = true",
	}
	p, err := startProc("consul", bin, args, dir, filepath.Join(dir, "consul.log"), []string{"CHECKPOINT_DISABLE=1"})
	if err != nil {
		return nil, err
	}
	a := &consulAgent{proc: p, httpAddr: loopback(ports[0])}
	a.client, err = api.NewClient(&api.Config{Address: a.httpAddr, Scheme: "http"})
	if err != nil {
		return a, err
	}

	deadline := time.After(60 * time.Second)
	for {
		leader, err := a.client.Status().LeaderWithQueryOptions((&api.QueryOptions{}).WithContext(ctx))
		if err == nil && leader != "" {
			return a, nil
		}
		select {
		case <-ctx.Done():
			return a, ctx.Err()
		case <-p.done:
			return a, fmt.Errorf("consul exited while starting: %v (see %s)", p.err, p.logPath)
		case <-deadline:
			return a, fmt.Errorf("consul elected no leader within 60s (see %s)", p.logPath)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// nodeRegistration is the body of PUT /v1/catalog/register for an external node: the README's
// node.json shape.
type nodeRegistration struct {
	Datacenter string
	ID         string
	Node       string
	Address    string
	NodeMeta   map[string]string
	Service    nodeService
	Checks     []nodeCheck
}

type nodeService struct {
	ID      string
	Service string
	Port    int
}

type nodeCheck struct {
	Node       string
	CheckID    string
	Name       string
	ServiceID  string
	Status     string
	Output     string
	Definition checkDefinition
}

type checkDefinition struct {
	HTTP     string `json:",omitempty"`
	TCP      string `json:",omitempty"`
	UDP      string `json:",omitempty"`
	Interval string
	Timeout  string
}

// demoNodes describes three external nodes backed by the sample service:
//
//	web-saas       service web      web-http (HTTP /web/health), web-tcp (TCP)
//	billing-saas   service billing  billing-http (HTTP /billing/health), billing-tcp (TCP)
//	dns-appliance  service dns      dns-udp (UDP), dns-tcp (TCP)
func demoNodes(svc *sampleService, interval time.Duration, probe bool) []nodeRegistration {
	every := interval.String()
	httpPort := portOf(svc.httpAddr)
	def := func(kind, target string) checkDefinition {
		d := checkDefinition{Interval: every, Timeout: "1s"}
		switch kind {
		case "HTTP":
			d.HTTP = target
		case "TCP":
			d.TCP = target
		case "UDP":
			d.UDP = target
		}
		return d
	}
	node := func(name, service string, port int, checks ...nodeCheck) nodeRegistration {
		for i := range checks {
			checks[i].Node = name
			checks[i].ServiceID = service
			checks[i].Status = api.HealthCritical
			checks[i].Output = "registered by the demo; consul-esm has not run this check yet"
		}
		return nodeRegistration{
			Datacenter: "dc1",
			ID:         newUUID(),
			Node:       name,
			Address:    "127.0.0.1",
			NodeMeta:   map[string]string{"external-node": "true", "external-probe": strconv.FormatBool(probe)},
			Service:    nodeService{ID: service, Service: service, Port: port},
			Checks:     checks,
		}
	}
	httpCheck := func(app string) nodeCheck {
		return nodeCheck{CheckID: app + "-http", Name: app + " HTTP",
			Definition: def("HTTP", "http://"+svc.httpAddr+"/"+app+"/health")}
	}
	return []nodeRegistration{
		node("web-saas", "web", httpPort,
			httpCheck("web"),
			nodeCheck{CheckID: "web-tcp", Name: "web TCP", Definition: def("TCP", svc.httpAddr)}),
		node("billing-saas", "billing", httpPort,
			httpCheck("billing"),
			nodeCheck{CheckID: "billing-tcp", Name: "billing TCP", Definition: def("TCP", svc.httpAddr)}),
		node("dns-appliance", "dns", portOf(svc.udpAddr),
			nodeCheck{CheckID: "dns-udp", Name: "dns UDP", Definition: def("UDP", svc.udpAddr)},
			nodeCheck{CheckID: "dns-tcp", Name: "dns TCP", Definition: def("TCP", svc.tcpAddr)}),
	}
}

// registerNodes writes each node's JSON to dir (so you can read it, or send it yourself with
// `curl -X PUT --data @<file> $CONSUL_HTTP_ADDR/v1/catalog/register`) and registers it.
func registerNodes(ctx context.Context, client *api.Client, nodes []nodeRegistration, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, n := range nodes {
		body, err := json.MarshalIndent(n, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, n.Node+".json"), append(body, '\n'), 0o644); err != nil {
			return err
		}
		if _, err := client.Raw().Write("/v1/catalog/register", json.RawMessage(body), nil,
			(&api.WriteOptions{}).WithContext(ctx)); err != nil {
			return fmt.Errorf("registering node %s: %w", n.Node, err)
		}
	}
	return nil
}

func portOf(addr string) int {
	_, p, _ := net.SplitHostPort(addr)
	n, _ := strconv.Atoi(p)
	return n
}

// newUUID returns a random (version 4) UUID, the form Consul wants for node IDs.
func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
