// Command fakeesm is a minimal stand-in for consul-esm, used only to test the benchmark harness
// (bench/e2e_test.go): it reads http_addr from the config file the harness writes, follows the
// external nodes' checks with a blocking query, runs their HTTP and TCP checks and writes status
// changes in batched txns. It does no leader election, assignment, thresholds or liveness.
package main

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"regexp"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"
)

func main() {
	configFile := flag.String("config-file", "", "config file written by the harness")
	version := flag.Bool("version", false, "print the version")
	flag.Parse()
	if *version {
		fmt.Println("fakeesm (bench test double)")
		return
	}
	data, err := os.ReadFile(*configFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(11)
	}
	m := regexp.MustCompile(`http_addr = "([^"]+)"`).FindSubmatch(data)
	if m == nil {
		fmt.Fprintln(os.Stderr, "no http_addr in", *configFile)
		os.Exit(11)
	}
	client, err := api.NewClient(&api.Config{Address: string(m[1])})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(11)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	updates := make(chan *api.HealthCheck, 1024)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); writeLoop(ctx, client, updates) }()
	watch(ctx, client, updates)
	wg.Wait()
}

// watch follows every external node's checks and starts one runner per new check.
func watch(ctx context.Context, client *api.Client, updates chan<- *api.HealthCheck) {
	running := map[string]bool{}
	var index uint64
	for ctx.Err() == nil {
		q := (&api.QueryOptions{WaitIndex: index, WaitTime: 30 * time.Second, NodeMeta: map[string]string{"external-node": "true"}}).WithContext(ctx)
		checks, meta, err := client.Health().State(api.HealthAny, q)
		if err != nil {
			time.Sleep(time.Second)
			continue
		}
		index = meta.LastIndex
		for _, c := range checks {
			key := c.Node + "/" + c.CheckID
			if running[key] || (c.Definition.HTTP == "" && c.Definition.TCP == "") {
				continue
			}
			running[key] = true
			go runCheck(ctx, c, updates)
		}
	}
}

// runCheck probes one check every interval and reports its first result and every status change.
func runCheck(ctx context.Context, c *api.HealthCheck, updates chan<- *api.HealthCheck) {
	interval, timeout := c.Definition.IntervalDuration, c.Definition.TimeoutDuration
	if interval <= 0 {
		interval = 30 * time.Second
	}
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	httpClient := &http.Client{Timeout: timeout, Transport: &http.Transport{DisableKeepAlives: true}}
	last := ""
	timer := time.NewTimer(rand.N(interval))
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		timer.Reset(interval)
		status, output := probe(httpClient, c.Definition, timeout)
		if status == last {
			continue
		}
		last = status
		u := *c
		u.Status, u.Output = status, output
		select {
		case updates <- &u:
		case <-ctx.Done():
			return
		}
	}
}

func probe(client *http.Client, def api.HealthCheckDefinition, timeout time.Duration) (string, string) {
	if def.TCP != "" {
		conn, err := net.DialTimeout("tcp", def.TCP, timeout)
		if err != nil {
			return api.HealthCritical, err.Error()
		}
		conn.Close()
		return api.HealthPassing, "TCP connect " + def.TCP + ": Success"
	}
	resp, err := client.Get(def.HTTP)
	if err != nil {
		return api.HealthCritical, err.Error()
	}
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return api.HealthCritical, "HTTP GET " + def.HTTP + ": " + resp.Status
	}
	return api.HealthPassing, "HTTP GET " + def.HTTP + ": " + resp.Status
}

// writeLoop writes updates in txns of up to 64 checks, at most every 50ms.
func writeLoop(ctx context.Context, client *api.Client, updates <-chan *api.HealthCheck) {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var pending api.TxnOps
	for {
		select {
		case <-ctx.Done():
			return
		case u := <-updates:
			pending = append(pending, &api.TxnOp{Check: &api.CheckTxnOp{Verb: api.CheckSet, Check: *u}})
			if len(pending) < 64 {
				continue
			}
		case <-tick.C:
			if len(pending) == 0 {
				continue
			}
		}
		for len(pending) > 0 {
			n := min(len(pending), 64)
			if _, _, _, err := client.Txn().Txn(pending[:n], nil); err != nil {
				fmt.Fprintln(os.Stderr, "txn:", err)
			}
			pending = pending[n:]
		}
		pending = nil
	}
}
