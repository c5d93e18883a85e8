package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"time"
)

// runBenchmark runs every binary for every round (A B A B ...) and builds the report. A run that
// fails is recorded with its error and the next one still runs; only Ctrl-C stops early.
func runBenchmark(ctx context.Context, o options) (*report, error) {
	bins := []binaryInfo{{Label: "A", Path: o.ESM}}
	if o.Compare != "" {
		bins = append(bins, binaryInfo{Label: "B", Path: o.Compare})
	}
	for _, check := range []struct{ flag, path string }{{"-esm", o.ESM}, {"-compare", o.Compare}, {"-consul", o.Consul}} {
		if check.path == "" {
			continue
		}
		if err := checkExecutable(check.flag, check.path); err != nil {
			if check.flag == "-consul" {
				err = fmt.Errorf("%w (run `make consul` first)", err)
			}
			return nil, err
		}
	}
	lay := newLayout(o)
	tcpPorts := min(o.TCPPorts, lay.tcpChecks())
	rep := &report{
		Started: time.Now().UTC(),
		Settings: settings{
			Size: o.Size, Nodes: o.Nodes, ChecksPerNode: o.ChecksPerNode, Checks: lay.total(),
			HTTPChecks: lay.httpChecks(), TCPChecks: lay.tcpChecks(), TCPPorts: tcpPorts,
			IntervalSeconds: o.Interval.Seconds(), TimeoutSeconds: o.Timeout.Seconds(), WindowSeconds: o.Window.Seconds(),
			Flip: min(o.Flip, lay.httpChecks()), Outage: o.Outage, FailMode: o.FailMode, Rounds: o.Rounds,
		},
		Env: environment{CPUs: runtime.NumCPU(), GOOS: runtime.GOOS, GOARCH: runtime.GOARCH, ConsulBin: o.Consul, LoadAvgStart: loadAvg()},
	}
	rep.Env.Consul, _ = commandOutput(ctx, o.Consul, "version")
	for i := range bins {
		v, err := commandOutput(ctx, bins[i].Path, "-version")
		if err != nil {
			v = "unknown: " + err.Error()
		}
		bins[i].Version = v
	}
	rep.Binaries = bins

	workDir, err := os.MkdirTemp("", "consul-esm-bench-")
	if err != nil {
		return nil, fmt.Errorf("creating work directory: %w", err)
	}
	tgt, err := startTarget(lay.httpChecks(), tcpPorts, o.FailMode == "hang")
	if err != nil {
		return nil, err
	}
	defer tgt.close()

	log.Printf("%d nodes x %d checks (%d HTTP, %d TCP on %d ports), interval %s, window %s; work dir %s",
		o.Nodes, o.ChecksPerNode, lay.httpChecks(), lay.tcpChecks(), tcpPorts, o.Interval, o.Window, workDir)
	failed := false
	for round := 1; round <= o.Rounds && ctx.Err() == nil; round++ {
		for _, b := range bins {
			if ctx.Err() != nil {
				break
			}
			dir := filepath.Join(workDir, fmt.Sprintf("%s%d", b.Label, round))
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return nil, err
			}
			log.Printf("run %s%d: %s", b.Label, round, b.Path)
			res := runOnce(ctx, o, lay, tgt, b, round, dir)
			if res.Error != "" {
				failed = true
				log.Printf("run %s%d failed: %s", b.Label, round, res.Error)
			}
			rep.Runs = append(rep.Runs, res)
		}
	}
	if o.Floor && ctx.Err() == nil {
		rep.Floor = runFloor(ctx, o, lay, tgt, filepath.Join(workDir, "floor"))
		failed = failed || rep.Floor.Error != ""
	}
	rep.Env.LoadAvgEnd = loadAvg()
	rep.Summary = summarize(rep)
	rep.Goals = judgeGoals(rep, o)
	if failed || o.Keep || ctx.Err() != nil {
		rep.WorkDir = workDir
		log.Printf("configs and logs kept in %s", workDir)
	} else {
		os.RemoveAll(workDir)
	}
	if ctx.Err() != nil {
		return rep, fmt.Errorf("interrupted: %w", ctx.Err())
	}
	if failed {
		return rep, errors.New("not every run completed (see the table)")
	}
	return rep, nil
}

// runner holds what one run has started.
type runner struct {
	o        options
	deadline time.Time // -run-timeout: waiting phases end by then
	lay      layout
	tgt      *target
	consul   *devConsul
	proxy    *countingProxy
	obs      *observer
	esm      *process
	esmS     *sampler
	conS     *sampler
}

// runOnce is one run of one binary on a fresh Consul: register, start consul-esm, wait for the first
// writes, then the steady window, the flips and the outage. Every process and listener it starts is
// stopped before it returns, in reverse order (consul-esm first, so it can deregister through the
// proxy).
func runOnce(ctx context.Context, o options, lay layout, tgt *target, bin binaryInfo, round int, dir string) *runResult {
	res := &runResult{
		Label: bin.Label, Binary: bin.Path, Round: round, Checks: lay.total(),
		ScheduledPerSec: num(float64(lay.total()) / o.Interval.Seconds()),
		RegisterSeconds: unknown(), FirstWriteSeconds: unknown(), ESMBytesPerCheck: unknown(),
	}
	r := &runner{o: o, deadline: time.Now().Add(o.RunTimeout), lay: lay, tgt: tgt}
	if err := run(ctx, r, res, bin, dir); err != nil {
		res.Error = err.Error()
	}
	return res
}

func run(ctx context.Context, r *runner, res *runResult, bin binaryInfo, dir string) (err error) {
	if err := r.tgt.setAllHealthy(true); err != nil {
		return err
	}
	r.consul, err = startConsul(ctx, r.o.Consul, dir)
	if err != nil {
		return fmt.Errorf("starting consul: %w", err)
	}
	defer r.consul.stop()

	t0 := time.Now()
	if err := registerAll(ctx, r.consul.client, r.lay, r.tgt, r.o.Workers); err != nil {
		return err
	}
	res.RegisterSeconds = num(time.Since(t0).Seconds())
	log.Printf("  registered %d nodes / %d checks in %.1fs", r.lay.nodes, r.lay.total(), float64(res.RegisterSeconds))

	obsCtx, stopObs := context.WithCancel(ctx)
	r.obs = newObserver(r.consul.client, r.lay)
	r.obs.start(obsCtx)
	defer func() { stopObs(); r.obs.stop() }()
	if err := r.obs.waitReady(ctx, 2*time.Minute); err != nil {
		return fmt.Errorf("watching the catalog: %w", err)
	}

	r.proxy, err = startProxy(r.consul.httpAddr)
	if err != nil {
		return err
	}
	defer r.proxy.close()

	kvPath := fmt.Sprintf("consul-esm-bench/%s%d-%d/", bin.Label, res.Round, time.Now().UnixNano())
	r.esm, err = startESM(bin.Path, dir, r.proxy.addr(), kvPath, r.o)
	if err != nil {
		return err
	}
	sampleCtx, stopSampling := context.WithCancel(context.Background())
	r.esmS = startSampler(sampleCtx, r.esm.pid(), 500*time.Millisecond)
	r.conS = startSampler(sampleCtx, r.consul.proc.pid(), 500*time.Millisecond)
	defer func() {
		if serr := r.esm.stop(syscall.SIGTERM, 15*time.Second); serr != nil {
			res.StopError = serr.Error()
		}
		stopSampling()
		<-r.esmS.done
		<-r.conS.done
		res.ESMPeakRSSBytes = r.esmS.peakRSS(time.Time{}, time.Time{})
		res.ESMBytesPerCheck = num(float64(res.ESMPeakRSSBytes) / float64(r.lay.total()))
	}()

	// A consul-esm too slow to write every check once is still measured in the steady window (what
	// it costs at this size is worth knowing); latencies would be meaningless, so the flips and the
	// outage are skipped.
	fwErr := r.firstWrites(ctx, res)
	slow := errors.Is(fwErr, errTimeout) || errors.Is(fwErr, errStalled)
	if fwErr != nil && (!slow || res.FirstWritten == 0) {
		return fwErr
	}
	if err := sleepCtx(ctx, r.o.Settle); err != nil {
		return err
	}
	if res.Steady, err = r.steady(ctx); err != nil {
		return err
	}
	if fwErr != nil {
		return fmt.Errorf("%w; the steady window was measured anyway, the flips and the outage were skipped", fwErr)
	}
	if n := min(r.o.Flip, r.lay.httpChecks()); n > 0 {
		if err := r.timeLeftFor("the flips"); err != nil {
			return err
		}
		if res.Flip, err = r.flips(ctx, n); err != nil {
			return err
		}
	}
	if r.o.Outage {
		if err := r.timeLeftFor("the outage"); err != nil {
			return err
		}
		if res.Outage, err = r.outage(ctx); err != nil {
			return err
		}
	}
	return r.esmAlive()
}

// timeLeftFor fails when the run has too little of -run-timeout left for a flip phase (each
// direction needs about interval + timeout, plus a spread interval for the flips).
func (r *runner) timeLeftFor(phase string) error {
	if need := 3 * (r.o.Interval + r.o.Timeout); time.Until(r.deadline) < need {
		return fmt.Errorf("-run-timeout %s reached: skipped %s and what follows", r.o.RunTimeout, phase)
	}
	return nil
}

// capWait is d, shortened so that a wait ends by the run's deadline.
func (r *runner) capWait(d time.Duration) time.Duration {
	return max(min(d, time.Until(r.deadline)), 0)
}

// esmAlive fails when consul-esm has exited.
func (r *runner) esmAlive() error {
	if r.esm.exited() {
		return r.esm.exitError()
	}
	return nil
}

// firstWrites waits until consul-esm has written every check once (its first result).
func (r *runner) firstWrites(ctx context.Context, res *runResult) error {
	total := r.lay.total()
	nextLog := time.Now().Add(10 * time.Second)
	// Before its first write consul-esm registers, takes the leader lock, assigns and loads the
	// checks; a check's first result may come a whole interval after that.
	stall := 2*r.o.Interval + r.o.Timeout + time.Minute
	// Keep time for the steady window and the shutdown.
	hardCap := min(time.Until(r.esm.started.Add(r.o.FirstWriteTimeout)), r.capWait(r.o.RunTimeout)-r.o.Settle-r.o.Window-20*time.Second)
	err := waitProgress(ctx, total, stall, hardCap, func() (int, error) {
		if err := r.esmAlive(); err != nil {
			return 0, err
		}
		n := int(r.obs.firstWrites.Load())
		if time.Now().After(nextLog) {
			log.Printf("  first writes: %d/%d", n, total)
			nextLog = time.Now().Add(10 * time.Second)
		}
		return n, nil
	})
	written, last := r.obs.firstWriteStatus()
	res.FirstWritten = written
	res.StartupEndpoints = r.proxy.snapshot().rates(time.Since(r.esm.started))
	switch {
	case errors.Is(err, errStalled):
		return fmt.Errorf("only %d of %d checks were written once: no new first write for %s (%w)", written, total, stall, err)
	case errors.Is(err, errTimeout):
		return fmt.Errorf("only %d of %d checks were written within %.0fs of starting consul-esm, -first-write-timeout or -run-timeout (%w)", written, total, time.Since(r.esm.started).Seconds(), err)
	case err != nil:
		return err
	}
	res.FirstWriteSeconds = num(last.Sub(r.esm.started).Seconds())
	log.Printf("  every check written once after %.1fs", float64(res.FirstWriteSeconds))
	return nil
}

// steady holds the window with every target healthy and measures what consul-esm costs.
func (r *runner) steady(ctx context.Context) (*steadyResult, error) {
	log.Printf("  steady window %s", r.o.Window)
	reqs0, changes0 := r.proxy.snapshot(), r.obs.statusChanges()
	http0, tcp0 := r.tgt.hits()
	perID0 := r.tgt.httpHitCounts()
	esm0, con0 := r.esmS.sample(), r.conS.sample()
	if err := sleepCtx(ctx, r.o.Window); err != nil {
		return nil, err
	}
	esm1, con1 := r.esmS.sample(), r.conS.sample()
	http1, tcp1 := r.tgt.hits()
	perID1 := r.tgt.httpHitCounts()
	reqs := r.proxy.snapshot().sub(reqs0)
	if err := r.esmAlive(); err != nil {
		return nil, err
	}

	sec := esm1.At.Sub(esm0.At).Seconds()
	s := &steadyResult{
		Seconds:          num(sec),
		ESMCPUCores:      num(cpuCores(esm0, esm1)),
		ESMPeakRSSBytes:  r.esmS.peakRSS(esm0.At, esm1.At),
		ESMEndRSSBytes:   esm1.RSS,
		ConsulCPUCores:   num(cpuCores(con0, con1)),
		ConsulRSSBytes:   con1.RSS,
		HTTPPerSec:       num(float64(http1-http0) / sec),
		TCPPerSec:        num(float64(tcp1-tcp0) / sec),
		RequestsPerSec:   num(float64(reqs.total()) / sec),
		PerKind:          map[string]num{},
		Endpoints:        reqs.rates(time.Duration(sec * float64(time.Second))),
		StatusChanges:    r.obs.statusChanges() - changes0,
		HTTPChecksNotRun: unknown(),
	}
	s.ChecksPerSec = s.HTTPPerSec + s.TCPPerSec
	s.ExecutedRatio = num(float64(s.ChecksPerSec) * r.o.Interval.Seconds() / float64(r.lay.total()))
	kinds := reqs.byKind()
	for _, k := range []string{kindBlocking, kindRead, kindLiveness, kindWrite} {
		s.PerKind[k] = num(float64(kinds[k]) / sec)
	}
	s.Writes = kinds[kindWrite]
	var bytesOut int64
	for _, v := range reqs {
		bytesOut += v.BytesOut
	}
	s.BytesOutPerSec = num(float64(bytesOut) / sec)
	if r.o.Window >= r.o.Interval {
		notRun := 0
		for i := range perID1 {
			if perID1[i] == perID0[i] {
				notRun++
			}
		}
		s.HTTPChecksNotRun = num(notRun)
	}
	log.Printf("  %.0f checks/s of %.0f scheduled, ESM %.3f cores, %.1f MB RSS, %.2f Consul req/s",
		float64(s.ChecksPerSec), float64(r.lay.total())/r.o.Interval.Seconds(), float64(s.ESMCPUCores),
		float64(s.ESMEndRSSBytes)/1e6, float64(s.RequestsPerSec))
	return s, nil
}

// step is one scheduled change of targets: at the offset from the phase start, apply changes the
// targets of the checks at positions members of the phase's check list.
type step struct {
	at      time.Duration
	apply   func() error
	members []int
}

// flips fails k HTTP targets, evenly spread over one interval (so each flip lands at a different
// point of its check's schedule), waits until the catalog shows each critical, then recovers them
// the same way.
func (r *runner) flips(ctx context.Context, k int) (*transitionResult, error) {
	ids := make([]int, k)
	idx := make([]int, k)
	for n := range ids {
		ids[n] = n * r.lay.httpChecks() / k
		idx[n] = r.lay.httpCheckIndex(ids[n])
	}
	plan := func(healthy bool) []step {
		steps := make([]step, k)
		for n := range steps {
			id := ids[n]
			steps[n] = step{
				at:      time.Duration(n) * r.o.Interval / time.Duration(k),
				apply:   func() error { r.tgt.setHTTPHealthy(id, healthy); return nil },
				members: []int{n},
			}
		}
		return steps
	}
	tr := &transitionResult{FloorSeconds: num((r.o.Interval + r.o.Timeout).Seconds())}
	var err error
	log.Printf("  flipping %d HTTP targets to failing", k)
	if tr.Fail, err = r.change(ctx, idx, plan(false), isCritical); err != nil {
		return tr, err
	}
	log.Printf("  flipping them back")
	if tr.Recover, err = r.change(ctx, idx, plan(true), isPassing); err != nil {
		return tr, err
	}
	return tr, nil
}

// outage fails every target at once (HTTP ids and TCP ports), waits until every check is critical,
// then recovers every target at once.
func (r *runner) outage(ctx context.Context) (*transitionResult, error) {
	idx := make([]int, r.lay.total())
	all := make([]int, len(idx))
	for i := range idx {
		idx[i], all[i] = i, i
	}
	plan := func(healthy bool) []step {
		return []step{{apply: func() error { return r.tgt.setAllHealthy(healthy) }, members: all}}
	}
	tr := &transitionResult{FloorSeconds: num((r.o.Interval + r.o.Timeout).Seconds())}
	var err error
	log.Printf("  outage: every target fails")
	if tr.Fail, err = r.change(ctx, idx, plan(false), isCritical); err != nil {
		return tr, err
	}
	log.Printf("  outage over: every target recovers")
	if tr.Recover, err = r.change(ctx, idx, plan(true), isPassing); err != nil {
		return tr, err
	}
	return tr, nil
}

// change carries out steps and waits until every check in idx shows a status matching want. It gives
// up when no further check has changed for interval+timeout+5s (every check runs at least that
// often), or after -change-timeout. It measures each check's latency from its target's change to the
// catalog's, and what consul-esm spent from the first step until one second after the catalog showed
// the last change (or the give-up time).
func (r *runner) change(ctx context.Context, idx []int, steps []step, want func(string) bool) (changeResult, error) {
	var c changeResult
	c.Checks = len(idx)
	reqs0, changes0, esm0 := r.proxy.snapshot(), r.obs.statusChanges(), r.esmS.sample()
	start := time.Now()
	since := make([]time.Time, len(idx))
	for _, s := range steps {
		if err := sleepCtx(ctx, time.Until(start.Add(s.at))); err != nil {
			return c, err
		}
		at := time.Now()
		if err := s.apply(); err != nil {
			return c, err
		}
		for _, m := range s.members {
			since[m] = at
		}
	}
	stall := r.o.Interval + r.o.Timeout + 5*time.Second
	hardCap := r.capWait(r.o.ChangeTimeout)
	err := waitProgress(ctx, len(idx), stall, hardCap, func() (int, error) {
		if err := r.esmAlive(); err != nil {
			return 0, err
		}
		return r.obs.countStatus(idx, want), nil
	})
	switch {
	case errors.Is(err, errStalled):
		c.GaveUp = fmt.Sprintf("no check changed for %s", stall)
	case errors.Is(err, errTimeout) && hardCap < r.o.ChangeTimeout:
		c.GaveUp = fmt.Sprintf("-run-timeout %s reached", r.o.RunTimeout)
	case errors.Is(err, errTimeout):
		c.GaveUp = fmt.Sprintf("-change-timeout %s reached", r.o.ChangeTimeout)
	case err != nil:
		return c, err
	}
	seen := r.obs.reached(idx, since, want)
	c.Latency = latencies(since, seen)
	last := start
	for _, t := range seen {
		if t.After(last) {
			last = t
		}
	}
	c.Seconds = num(last.Sub(start).Seconds())
	if c.Latency.Missing > 0 {
		c.Seconds = unknown()
	}
	if err := sleepCtx(ctx, time.Second); err != nil {
		return c, err
	}
	reqs, esm1 := r.proxy.snapshot().sub(reqs0), r.esmS.sample()
	c.Endpoints = reqs.rates(esm1.At.Sub(esm0.At))
	c.Changes = r.obs.statusChanges() - changes0
	c.Requests = reqs.total()
	c.Writes = reqs.byKind()[kindWrite]
	c.RequestsPerChange = perChange(c.Requests, c.Changes)
	c.WritesPerChange = perChange(c.Writes, c.Changes)
	c.ESMCPUCores = num(cpuCores(esm0, esm1))
	p99 := float64(c.Latency.P99)
	if math.IsNaN(p99) {
		p99 = -1
	}
	log.Printf("    %d/%d seen, p99 %.2fs, %d changes, %d requests (%d writes)", c.Latency.N, len(idx), p99, c.Changes, c.Requests, c.Writes)
	if c.GaveUp != "" {
		log.Printf("    gave up waiting: %s", c.GaveUp)
	}
	return c, nil
}
