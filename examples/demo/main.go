// Command demo shows consul-esm at work on one machine, using nothing but 127.0.0.1.
//
// It starts a throwaway Consul dev agent, a tiny sample service (HTTP, TCP and UDP endpoints),
// registers three external nodes whose checks point at that service, runs consul-esm against the
// agent and shows every check in a live table: all of them turn passing, then the demo breaks one
// HTTP endpoint and its check turns critical, then it repairs the endpoint and the check passes
// again. Ctrl-C stops both processes and removes the temporary directory.
//
//	make demo
//	go run ./examples/demo -consul bin/consul -esm bin/consul-esm
//	go run ./examples/demo -non-interactive   # plain lines, short pauses, exits when done (used by the tests)
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"
)

type options struct {
	consul         string
	esm            string
	nonInteractive bool
	plain          bool
	duration       time.Duration
	interval       time.Duration
	keep           bool
	probe          bool
}

func main() {
	var o options
	flag.StringVar(&o.consul, "consul", "consul", "Consul binary: a path, or a name looked up on PATH (bin/consul is tried first)")
	flag.StringVar(&o.esm, "esm", "bin/consul-esm", "consul-esm binary: a path, or a name looked up on PATH")
	flag.BoolVar(&o.nonInteractive, "non-interactive", false,
		"print plain lines instead of the live table, keep the pauses short and exit once the scenario is done")
	flag.DurationVar(&o.duration, "duration", 0,
		"stop after this long (0: run until Ctrl-C; with -non-interactive the default is 60s, and running out is a failure)")
	flag.DurationVar(&o.interval, "interval", time.Second, "interval of every check (consul-esm's minimum is 1s)")
	flag.BoolVar(&o.keep, "keep", false, "keep the temporary directory (config, logs, node JSON) when stopping")
	flag.BoolVar(&o.probe, "probe", false,
		`also mark the nodes external-probe = "true", so consul-esm pings them and adds an externalNodeHealth check `+
			`(needs unprivileged ICMP: net.ipv4.ping_group_range must include your group)`)
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "Usage: go run ./examples/demo [flags]\n\n"+
			"Runs a dev Consul, a sample service and consul-esm on 127.0.0.1 and shows the checks live.\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() > 0 {
		flag.Usage()
		os.Exit(2)
	}
	if o.nonInteractive && o.duration == 0 {
		o.duration = 60 * time.Second
	}
	o.plain = o.nonInteractive || !isTerminal(os.Stdout) || os.Getenv("TERM") == "dumb"

	// SIGHUP (the terminal closed) and SIGPIPE (`make demo | head` ended) must clean up like Ctrl-C.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGPIPE)
	go func() {
		// After the first Ctrl-C the demo cleans up; a second one kills it at once (the children die
		// with it on Linux, see proc_linux.go).
		<-ctx.Done()
		stop()
	}()
	err := run(ctx, o, os.Stdout)
	stop()
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
}

// errConsulExited means the Consul agent died while the demo ran.
var errConsulExited = errors.New("consul exited unexpectedly")

// errIncomplete means -duration ran out in non-interactive mode before the scenario finished.
var errIncomplete = errors.New("the scenario did not finish in time")

// run does the whole demo and cleans up after itself before returning, whatever happened.
func run(ctx context.Context, o options, stdout io.Writer) (err error) {
	consulBin, err := findBinary(o.consul, "bin/consul", "run `make consul` to build one")
	if err != nil {
		return err
	}
	esmBin, err := findBinary(o.esm, "bin/consul-esm", "run `make build` to build it")
	if err != nil {
		return err
	}

	ping := "udp"
	if o.probe {
		if ping, err = pingType(); err != nil {
			return err
		}
	}

	dir, err := os.MkdirTemp("", "consul-esm-demo-")
	if err != nil {
		return err
	}
	v := newView(stdout, o.plain)
	defer v.close()
	v.event("temp dir %s", dir)

	var cleanups []func()
	consulFailed := false // dump Consul's log too when it is the one that failed
	defer func() {
		v.setStep("Stopping consul-esm and Consul...")
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
		if err != nil && !errors.Is(err, context.Canceled) {
			v.event("something went wrong; the last lines of the logs follow")
			v.dumpLog(filepath.Join(dir, "consul-esm.log"))
			if consulFailed {
				v.dumpLog(filepath.Join(dir, "consul.log"))
			}
		}
		if o.keep {
			v.event("kept %s", dir)
		} else {
			_ = os.RemoveAll(dir)
			v.event("removed %s", dir)
		}
		v.finish()
		if errors.Is(err, context.Canceled) {
			err = nil // Ctrl-C is a normal way to end the demo
		}
	}()
	if o.duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(ctx, o.duration, errIncomplete)
		defer cancel()
	}

	// 1. The sample service the external nodes stand for.
	svc, err := startSampleService()
	if err != nil {
		return err
	}
	cleanups = append(cleanups, svc.close)
	v.event("sample service up: HTTP %s, TCP %s, UDP %s", svc.httpAddr, svc.tcpAddr, svc.udpAddr)

	// 2. A throwaway Consul dev agent on free loopback ports.
	v.setStep("Starting a Consul dev agent...")
	consul, err := startConsul(ctx, consulBin, dir)
	if consul != nil {
		cleanups = append(cleanups, func() { consul.proc.stop(syscall.SIGTERM, 5*time.Second) })
	}
	if err != nil {
		consulFailed = true
		return cause(ctx, err)
	}
	v.info("Consul", fmt.Sprintf("http://%s/ui   CONSUL_HTTP_ADDR=%s", consul.httpAddr, consul.httpAddr))
	v.event("Consul dev agent up: http://%s", consul.httpAddr)

	// 3. Three external nodes, in the README's node.json shape.
	nodes := demoNodes(svc, o.interval, o.probe)
	if err := registerNodes(ctx, consul.client, nodes, filepath.Join(dir, "nodes")); err != nil {
		return cause(ctx, err)
	}
	nChecks := 0
	names := map[string]bool{}
	for _, n := range nodes {
		nChecks += len(n.Checks)
		names[n.Node] = true
	}
	if o.probe {
		nChecks += len(nodes) // one externalNodeHealth check per probed node
	}
	v.event("registered %d external nodes with %d checks (nodes/*.json)", len(nodes), nChecks)

	// 4. consul-esm itself.
	v.setStep("Starting consul-esm...")
	esm, err := startESM(esmBin, dir, consul.httpAddr, ping)
	if esm != nil {
		cleanups = append(cleanups, func() { esm.proc.stop(syscall.SIGTERM, 7*time.Second) })
	}
	if err != nil {
		return cause(ctx, err)
	}
	v.info("consul-esm", fmt.Sprintf("http://%s/health   http://%s/metrics", esm.clientAddr, esm.clientAddr))
	v.info("sample service", fmt.Sprintf("HTTP %s   TCP %s   UDP %s", svc.httpAddr, svc.tcpAddr, svc.udpAddr))
	v.info("files", dir+"/ (config, logs, nodes/*.json)")
	v.event("consul-esm started, health http://%s/health (consul-esm.hcl, consul-esm.log)", esm.clientAddr)

	// 5. Watch the checks and play the scenario.
	err = playScenario(ctx, o, v, svc, consul, esm, names, nChecks)
	consulFailed = errors.Is(err, errConsulExited)
	return cause(ctx, err)
}

// cause turns a context error into the reason the context ended (Ctrl-C or -duration).
func cause(ctx context.Context, err error) error {
	if err != nil && ctx.Err() != nil {
		return context.Cause(ctx)
	}
	return err
}

// The scenario's steps.
const (
	stepWaitPassing   = iota // until every check passes
	stepHoldPassing          // all passing; break the endpoint after a pause
	stepWaitCritical         // endpoint broken; until its check is critical
	stepHoldCritical         // critical; repair after a pause
	stepWaitRecovered        // repaired; until every check passes again
	stepDone
)

// The check the demo breaks.
const (
	brokenApp   = "billing"
	brokenNode  = "billing-saas"
	brokenCheck = "billing-http"
)

func playScenario(ctx context.Context, o options, v *view, svc *sampleService, consul *consulAgent, esm *esmProcess,
	names map[string]bool, nChecks int) error {
	holdPassing, holdCritical := 5*time.Second, 8*time.Second
	if o.nonInteractive {
		holdPassing, holdCritical = time.Second, time.Second
	}

	snapshots := make(chan []*api.HealthCheck)
	go watchChecks(ctx, consul.client, snapshots)

	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var hold <-chan time.Time
	step := stepWaitPassing
	stepStart := time.Now()
	esmUp := false
	hinted := false
	v.setStep(fmt.Sprintf("Waiting for consul-esm to run the %d checks (every %s)...", nChecks, o.interval))

	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-consul.proc.done:
			return fmt.Errorf("%w: %v", errConsulExited, consul.proc.err)
		case <-esm.proc.done:
			return fmt.Errorf("consul-esm exited unexpectedly: %v", esm.proc.err)
		case <-tick.C:
			if step == stepWaitPassing && !hinted && time.Since(stepStart) > 30*time.Second {
				hinted = true
				v.event("still waiting after 30s: see consul-esm's log, %s", esm.proc.logPath)
			}
			v.render()
			continue
		case <-hold:
			hold = nil
			switch step {
			case stepHoldPassing:
				svc.setBroken(brokenApp, true)
				step, stepStart = stepWaitCritical, time.Now()
				v.event("broke %s's endpoint: http://%s/%s/health now answers 500", brokenApp, svc.httpAddr, brokenApp)
				v.setStep(fmt.Sprintf("http://%s/%s/health now answers 500. Waiting for consul-esm to mark %s critical...",
					svc.httpAddr, brokenApp, brokenCheck))
			case stepHoldCritical:
				svc.setBroken(brokenApp, false)
				step, stepStart = stepWaitRecovered, time.Now()
				v.event("repaired %s's endpoint: it answers 200 again", brokenApp)
				v.setStep(fmt.Sprintf("Repaired %s's endpoint. Waiting for %s to pass again...", brokenApp, brokenCheck))
			}
			v.render()
			continue
		case all := <-snapshots:
			var rows []*api.HealthCheck
			for _, c := range all {
				switch {
				case names[c.Node]:
					rows = append(rows, c)
				case c.ServiceName == "consul-esm" && c.Status == api.HealthPassing && !esmUp:
					esmUp = true
					v.event("consul-esm registered as service %q, its TTL check passing", c.ServiceID)
				}
			}
			v.update(rows)
			passing := countStatus(rows, api.HealthPassing)
			switch step {
			case stepWaitPassing:
				if passing == nChecks {
					step, stepStart = stepHoldPassing, time.Now()
					hold = time.After(holdPassing)
					v.event("all %d checks are passing", nChecks)
					v.setStep(fmt.Sprintf("All %d checks are passing. In %s the demo breaks %s's HTTP endpoint...",
						nChecks, holdPassing, brokenApp))
				}
			case stepWaitCritical:
				if c := findCheck(rows, brokenNode, brokenCheck); c != nil && c.Status == api.HealthCritical {
					took := time.Since(stepStart).Round(10 * time.Millisecond)
					step, stepStart = stepHoldCritical, time.Now()
					hold = time.After(holdCritical)
					v.event("%s/%s is critical, %s after the failure", brokenNode, brokenCheck, took)
					v.setStep(fmt.Sprintf("%s is critical (consul-esm noticed in %s). The demo repairs it in %s...",
						brokenCheck, took, holdCritical))
				}
			case stepWaitRecovered:
				if passing == nChecks {
					step = stepDone
					v.event("%s/%s is passing again; all %d checks are passing", brokenNode, brokenCheck, nChecks)
					if o.nonInteractive {
						v.event("scenario complete")
						return nil
					}
				}
			}
			if step == stepDone {
				v.setStep(doneStep(rows, nChecks, svc))
			}
			v.render()
		}
	}
}

// doneStep is the step line once the scenario is over: an invitation to break a check yourself, or
// how to repair the ones that are not passing.
func doneStep(rows []*api.HealthCheck, nChecks int, svc *sampleService) string {
	var failing []string
	for _, c := range rows {
		if c.Status != api.HealthPassing {
			failing = append(failing, fmt.Sprintf("%s/%s is %s", c.Node, c.CheckID, c.Status))
		}
	}
	if len(failing) == 0 {
		return fmt.Sprintf("That's it: all %d checks pass again. Break one yourself: curl http://%s/web/break "+
			"(and /web/fix). Ctrl-C stops everything and cleans up.", nChecks, svc.httpAddr)
	}
	return fmt.Sprintf("%s. Repair with: curl http://%s/<app>/fix (app web or billing).",
		strings.Join(failing, ", "), svc.httpAddr)
}

func countStatus(rows []*api.HealthCheck, status string) int {
	n := 0
	for _, c := range rows {
		if c.Status == status {
			n++
		}
	}
	return n
}

func findCheck(rows []*api.HealthCheck, node, checkID string) *api.HealthCheck {
	for _, c := range rows {
		if c.Node == node && c.CheckID == checkID {
			return c
		}
	}
	return nil
}

// watchChecks sends every check in the catalog to out, once now and again after every change,
// using blocking queries on /v1/health/state/any.
func watchChecks(ctx context.Context, client *api.Client, out chan<- []*api.HealthCheck) {
	var index uint64
	for ctx.Err() == nil {
		opts := (&api.QueryOptions{WaitIndex: index, WaitTime: 10 * time.Second}).WithContext(ctx)
		checks, meta, err := client.Health().State(api.HealthAny, opts)
		if err != nil {
			select {
			case <-ctx.Done():
			case <-time.After(500 * time.Millisecond):
			}
			continue
		}
		if meta.LastIndex < index {
			index = 0 // the index went backwards: start over, as Consul's docs advise
		} else {
			index = meta.LastIndex
		}
		select {
		case out <- checks:
		case <-ctx.Done():
			return
		}
	}
}

// findBinary resolves a binary flag: an existing path, the repo's bin/ copy when the flag is a bare
// name, or a name on PATH.
func findBinary(flagValue, repoPath, hint string) (string, error) {
	if !strings.ContainsRune(flagValue, filepath.Separator) {
		if _, err := os.Stat(repoPath); err == nil && filepath.Base(repoPath) == flagValue {
			return filepath.Abs(repoPath)
		}
	}
	p, err := exec.LookPath(flagValue)
	if err != nil {
		return "", fmt.Errorf("cannot find %s (%v): %s", flagValue, err, hint)
	}
	return filepath.Abs(p)
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
