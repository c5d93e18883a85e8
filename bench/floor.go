package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// The floor is the bare cost of the probes themselves: a minimal prober, in a process of its own so
// its CPU is measured as consul-esm's is, sends the same requests to the same targets at the same
// rate over a fresh connection each (resolve, dial, write, read the answer, close), and does nothing
// else: no Consul, no thresholds, no scheduling beyond one ticker per check. consul-esm's steady CPU
// divided by the floor's says what everything besides the probes costs.

// floorArg is the first argument that turns the harness binary into the floor prober.
const floorArg = "floor-prober"

// floorPlan is what the floor prober probes, handed over as a JSON file.
type floorPlan struct {
	HTTP     []string      `json:"http"` // check URLs
	TCP      []string      `json:"tcp"`  // host:port, one entry per TCP check
	Interval time.Duration `json:"interval"`
	Timeout  time.Duration `json:"timeout"`
}

// floorResult is the floor run's figures.
type floorResult struct {
	Seconds      num    `json:"seconds"`
	CPUCores     num    `json:"cpu_cores"`
	PeakRSSBytes int64  `json:"peak_rss_bytes"`
	ChecksPerSec num    `json:"checks_per_second"` // target hits, HTTP + TCP
	Error        string `json:"error,omitempty"`
}

// runFloor starts the floor prober against tgt, lets one interval pass so the staggered schedule is
// in step, and measures it for the steady window.
func runFloor(ctx context.Context, o options, lay layout, tgt *target, dir string) *floorResult {
	res := &floorResult{Seconds: unknown(), CPUCores: unknown(), ChecksPerSec: unknown()}
	if err := measureFloor(ctx, o, lay, tgt, dir, res); err != nil {
		res.Error = err.Error()
		log.Printf("floor run failed: %v", err)
	}
	return res
}

func measureFloor(ctx context.Context, o options, lay layout, tgt *target, dir string, res *floorResult) error {
	if err := tgt.setAllHealthy(true); err != nil {
		return err
	}
	plan := floorPlan{Interval: o.Interval, Timeout: o.Timeout}
	for i := 0; i < lay.nodes; i++ {
		for j := 0; j < lay.perNode; j++ {
			if lay.isHTTP(j) {
				plan.HTTP = append(plan.HTTP, tgt.httpURL(lay.httpID(i, j)))
			} else {
				plan.TCP = append(plan.TCP, tgt.tcpAddr(lay.tcpPort(i, j)))
			}
		}
	}
	data, err := json.Marshal(plan)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	planPath := filepath.Join(dir, "floor-plan.json")
	if err := os.WriteFile(planPath, data, 0o644); err != nil {
		return fmt.Errorf("writing the floor plan: %w", err)
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("finding the harness binary: %w", err)
	}
	log.Printf("floor: %d HTTP and %d TCP probes every %s over fresh connections, window %s", len(plan.HTTP), len(plan.TCP), o.Interval, o.Window)
	proc, err := startProcess("floor prober", filepath.Join(dir, "floor.log"), self, floorArg, planPath)
	if err != nil {
		return err
	}
	defer func() { _ = proc.stop(syscall.SIGTERM, 5*time.Second) }()
	sampleCtx, stopSampling := context.WithCancel(context.Background())
	s := startSampler(sampleCtx, proc.pid(), 500*time.Millisecond)
	defer func() { stopSampling(); <-s.done }()

	if err := sleepCtx(ctx, o.Interval); err != nil {
		return err
	}
	h0, t0 := tgt.hits()
	s0 := s.sample()
	if err := sleepCtx(ctx, o.Window); err != nil {
		return err
	}
	s1 := s.sample()
	h1, t1 := tgt.hits()
	if proc.exited() {
		return proc.exitError()
	}
	sec := s1.At.Sub(s0.At).Seconds()
	res.Seconds = num(sec)
	res.CPUCores = num(cpuCores(s0, s1))
	res.PeakRSSBytes = s.peakRSS(s0.At, s1.At)
	res.ChecksPerSec = num(float64(h1-h0+t1-t0) / sec)
	log.Printf("  floor: %.0f checks/s, %.3f cores, %.1f MB RSS", float64(res.ChecksPerSec), float64(res.CPUCores), float64(res.PeakRSSBytes)/mb)
	return nil
}

// floorProberMain is the floor prober process: it runs the plan in planPath until SIGTERM.
func floorProberMain(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "usage: bench floor-prober PLAN.json")
		return 2
	}
	data, err := os.ReadFile(args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	var plan floorPlan
	if err := json.Unmarshal(data, &plan); err != nil {
		fmt.Fprintln(os.Stderr, "decoding the plan:", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var probes []func(context.Context)
	for _, u := range plan.HTTP {
		p, err := newFloorHTTP(u)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		probes = append(probes, p)
	}
	for _, addr := range plan.TCP {
		probes = append(probes, func(ctx context.Context) {
			if c, err := floorDialer.DialContext(ctx, "tcp", addr); err == nil {
				c.Close()
			}
		})
	}
	// One goroutine walks the checks in a fixed order, check i due at i*interval/N into every interval
	// (a perfectly spread schedule), and hands due ones to a small pool of workers: the least a
	// prober can do to run N checks per interval.
	work := make(chan func(context.Context), 64)
	var wg sync.WaitGroup
	for range floorWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for probe := range work {
				pctx, cancel := context.WithTimeout(ctx, plan.Timeout)
				probe(pctx)
				cancel()
			}
		}()
	}
	start := time.Now()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for next := 0; ctx.Err() == nil; {
		due := int(time.Since(start) * time.Duration(len(probes)) / plan.Interval)
		for ; next < due && ctx.Err() == nil; next++ {
			select {
			case work <- probes[next%len(probes)]:
			case <-ctx.Done():
			}
		}
		select {
		case <-ctx.Done():
		case <-tick.C:
		}
	}
	close(work)
	wg.Wait()
	return 0
}

// floorWorkers is the floor prober's concurrency: a probe of a healthy loopback target takes well
// under a millisecond, so a few workers keep up with tens of thousands of probes per second.
const floorWorkers = 16

// floorDialer sets up no TCP keep-alive: a connection lives for one probe.
var floorDialer = &net.Dialer{KeepAlive: -1}

// floorReaders are the floor prober's read buffers, one per probe in flight.
var floorReaders sync.Pool

// newFloorHTTP returns a probe that sends the request consul-esm's HTTP check sends (net/http's
// bytes for Consul's default headers with keep-alives off) on a new connection and reads the answer.
func newFloorHTTP(target string) (func(context.Context), error) {
	u, err := url.Parse(target)
	if err != nil {
		return nil, fmt.Errorf("floor plan: %w", err)
	}
	req := []byte("GET " + u.RequestURI() + " HTTP/1.1\r\nHost: " + u.Host +
		"\r\nUser-Agent: Consul Health Check\r\nAccept: text/plain, text/*, */*\r\nConnection: close\r\nAccept-Encoding: gzip\r\n\r\n")
	return func(ctx context.Context) {
		c, err := floorDialer.DialContext(ctx, "tcp", u.Host)
		if err != nil {
			return
		}
		defer c.Close()
		if dl, ok := ctx.Deadline(); ok {
			_ = c.SetDeadline(dl)
		}
		if _, err := c.Write(req); err != nil {
			return
		}
		br, _ := floorReaders.Get().(*bufio.Reader)
		if br == nil {
			br = bufio.NewReaderSize(c, 4096)
		} else {
			br.Reset(c)
		}
		defer func() { br.Reset(nil); floorReaders.Put(br) }()
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close()
	}, nil
}
