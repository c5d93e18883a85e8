// Command bench measures what a consul-esm binary costs at a given scale: its CPU and memory, the
// requests it sends to Consul, how many of its scheduled checks it really runs, and how fast a target
// that changes health shows up in the catalog. Any consul-esm binary can be measured (ours, the
// original, an earlier build), and two can be compared in one run (A B A B).
//
// Each run starts a fresh dev Consul on 127.0.0.1, registers N external nodes with M checks each
// against a target server the harness controls, puts a counting reverse proxy between consul-esm and
// Consul, and then goes through the phases in run.go. Run it with `make bench` (see the README).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// sizePresets are the -size values: nodes x checks per node.
var sizePresets = map[string][2]int{
	"1k":  {100, 10},
	"10k": {1000, 10},
	"50k": {5000, 10},
}

// options are the command-line settings of one harness invocation.
type options struct {
	Size          string
	Nodes         int
	ChecksPerNode int
	TCPFrac       float64
	TCPPorts      int

	Interval time.Duration
	Timeout  time.Duration
	Window   time.Duration
	Settle   time.Duration
	Flip     int
	Outage   bool
	FailMode string // "503": a failing HTTP target answers 503 at once; "hang": it never answers

	ESM       string
	Compare   string
	Rounds    int
	Consul    string
	ESMConfig string // extra config file handed to consul-esm after the generated one

	CheckUpdateInterval string
	FirstWriteTimeout   time.Duration
	ChangeTimeout       time.Duration
	RunTimeout          time.Duration
	Workers             int

	Floor bool

	JSON string
	Keep bool
}

// tcpPerNode is how many of each node's M checks are TCP checks.
func (o options) tcpPerNode() int {
	n := int(o.TCPFrac*float64(o.ChecksPerNode) + 0.5)
	if n > o.ChecksPerNode {
		n = o.ChecksPerNode
	}
	return n
}

// newFlagSet defines every flag, writing into o.
func newFlagSet(o *options, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.Size, "size", "1k", "preset N nodes x M checks: 1k (100x10), 10k (1000x10), 50k (5000x10)")
	fs.IntVar(&o.Nodes, "nodes", 0, "external nodes N (overrides -size)")
	fs.IntVar(&o.ChecksPerNode, "checks", 0, "checks per node M (overrides -size)")
	fs.Float64Var(&o.TCPFrac, "tcp-frac", 0.2, "fraction of each node's checks that are TCP (the rest are HTTP)")
	fs.IntVar(&o.TCPPorts, "tcp-ports", 16, "TCP target ports; TCP checks share them round-robin")
	fs.DurationVar(&o.Interval, "interval", 10*time.Second, "check interval I")
	fs.DurationVar(&o.Timeout, "timeout", 2*time.Second, "check timeout")
	fs.DurationVar(&o.Window, "window", 60*time.Second, "steady-state window W")
	fs.DurationVar(&o.Settle, "settle", 2*time.Second, "pause between the first writes and the steady window")
	fs.IntVar(&o.Flip, "flip", 100, "K HTTP targets to flip to failing and back (0 skips the phase)")
	fs.BoolVar(&o.Outage, "outage", true, "run the mass-outage phase (every target fails at once, then recovers)")
	fs.StringVar(&o.FailMode, "fail-mode", "503", "how a failing HTTP target fails: 503 (answers 503) or hang (never answers; the check times out)")
	fs.StringVar(&o.ESM, "esm", "bin/consul-esm", "consul-esm binary under test (A)")
	fs.StringVar(&o.Compare, "compare", "", "second consul-esm binary (B); runs A B A B and prints A/B ratios")
	fs.IntVar(&o.Rounds, "rounds", 0, "rounds (one run per binary each); default 2 with -compare, else 1")
	fs.StringVar(&o.Consul, "consul", "", "consul binary (default bin/consul, else consul on PATH)")
	fs.StringVar(&o.ESMConfig, "esm-config", "", "extra consul-esm config file, applied after the generated one")
	fs.StringVar(&o.CheckUpdateInterval, "check-update-interval", "", "write check_update_interval into the config (ours only; the original rejects the key)")
	fs.DurationVar(&o.FirstWriteTimeout, "first-write-timeout", 5*time.Minute, "give up waiting for the first write of every check after this (and after 2*interval+timeout+1m without a new one)")
	fs.DurationVar(&o.ChangeTimeout, "change-timeout", 3*time.Minute, "give up waiting for the catalog to show a flip after this (and after interval+timeout+5s without progress)")
	fs.DurationVar(&o.RunTimeout, "run-timeout", 9*time.Minute, "cut the waiting phases short so that one run ends within about this (the steady window is kept whole)")
	fs.IntVar(&o.Workers, "workers", 8, "parallel catalog registrations")
	fs.BoolVar(&o.Floor, "floor", false, "after the runs, measure the floor: a minimal prober making the same requests over fresh connections at the same rate (its CPU is the bare cost of the probes)")
	fs.StringVar(&o.JSON, "json", "", "also write the results as JSON to this file")
	fs.BoolVar(&o.Keep, "keep", false, "keep the work directory (configs and logs) even when every run succeeds")
	return fs
}

// parseOptions parses and checks the command line and fills in the defaults that depend on others.
func parseOptions(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := newFlagSet(&o, stderr)
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	preset, ok := sizePresets[o.Size]
	if !ok {
		return o, fmt.Errorf("-size %q: want 1k, 10k or 50k", o.Size)
	}
	if o.Nodes == 0 {
		o.Nodes = preset[0]
	}
	if o.ChecksPerNode == 0 {
		o.ChecksPerNode = preset[1]
	}
	switch {
	case o.Nodes < 1 || o.ChecksPerNode < 1:
		return o, errors.New("-nodes and -checks must be at least 1")
	case o.TCPFrac < 0 || o.TCPFrac > 1:
		return o, errors.New("-tcp-frac must be between 0 and 1")
	case o.TCPPorts < 1:
		return o, errors.New("-tcp-ports must be at least 1")
	case o.Interval < time.Second:
		return o, errors.New("-interval must be at least 1s (Consul's minimum)")
	case o.Timeout <= 0:
		return o, errors.New("-timeout must be positive")
	case o.Window < time.Second:
		return o, errors.New("-window must be at least 1s")
	case o.Flip < 0:
		return o, errors.New("-flip must not be negative")
	case o.FailMode != "503" && o.FailMode != "hang":
		return o, fmt.Errorf("-fail-mode %q: want 503 or hang", o.FailMode)
	case o.Workers < 1:
		return o, errors.New("-workers must be at least 1")
	case o.RunTimeout < o.Window+o.Settle+time.Minute:
		return o, errors.New("-run-timeout must leave at least a minute besides -window")
	}
	if o.Rounds == 0 {
		o.Rounds = 1
		if o.Compare != "" {
			o.Rounds = 2
		}
	}
	if o.Consul == "" {
		o.Consul = findConsul()
	}
	return o, nil
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == floorArg {
		os.Exit(floorProberMain(os.Args[2:]))
	}
	log.SetFlags(log.Ltime)
	log.SetPrefix("bench: ")
	opts, err := parseOptions(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	// The first Ctrl-C cancels ctx and every deferred cleanup runs; after stop() a second one kills
	// the harness at once (its children die with it: they get SIGKILL through Pdeathsig).
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() { <-ctx.Done(); stop() }()

	rep, err := runBenchmark(ctx, opts)
	if rep != nil {
		printReport(os.Stdout, rep)
		if opts.JSON != "" {
			if werr := writeJSON(opts.JSON, rep); werr != nil {
				log.Print(werr)
				err = errors.Join(err, werr)
			} else {
				log.Printf("wrote %s", opts.JSON)
			}
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}
