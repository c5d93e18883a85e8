package main

import (
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// TestEndToEndWithFakeESM runs the whole harness (dev Consul, target, proxy, observer, every phase)
// against bench/fakeesm, a minimal stand-in for consul-esm, with tiny sizes and times. It needs a
// consul binary and takes about half a minute, so it only runs with BENCH_E2E=1:
//
//	BENCH_E2E=1 PATH=$PWD/bin:$PATH go test -run EndToEnd -v ./bench
func TestEndToEndWithFakeESM(t *testing.T) {
	if os.Getenv("BENCH_E2E") == "" {
		t.Skip("set BENCH_E2E=1 to run the harness end to end (needs consul)")
	}
	consul, err := exec.LookPath("consul")
	if err != nil {
		consul, _ = filepath.Abs("../bin/consul")
	}
	fake := filepath.Join(t.TempDir(), "fakeesm")
	if out, err := exec.Command("go", "build", "-o", fake, "./fakeesm").CombinedOutput(); err != nil {
		t.Fatalf("building fakeesm: %v\n%s", err, out)
	}
	o, err := parseOptions([]string{
		"-esm", fake, "-compare", fake, "-rounds", "1", "-consul", consul,
		"-nodes", "6", "-checks", "5", "-interval", "1s", "-timeout", "1s", "-window", "3s", "-flip", "8",
	}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	rep, err := runBenchmark(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Runs) != 2 || rep.Runs[0].Label != "A" || rep.Runs[1].Label != "B" {
		t.Fatalf("runs: %+v", rep.Runs)
	}
	for _, r := range rep.Runs {
		if r.Error != "" {
			t.Fatalf("run %s%d: %s", r.Label, r.Round, r.Error)
		}
		if r.FirstWritten != 30 || r.Steady == nil || r.Flip == nil || r.Outage == nil {
			t.Fatalf("run %s: first written %d, phases %v %v %v", r.Label, r.FirstWritten, r.Steady != nil, r.Flip != nil, r.Outage != nil)
		}
		if r.Steady.ExecutedRatio < 0.8 || r.Steady.ESMCPUCores <= 0 || r.Steady.ESMEndRSSBytes <= 0 {
			t.Errorf("run %s steady: %+v", r.Label, r.Steady)
		}
		if r.Steady.StatusChanges != 0 {
			t.Errorf("run %s: %d status changes in the steady window", r.Label, r.Steady.StatusChanges)
		}
		for name, c := range map[string]changeResult{"flip fail": r.Flip.Fail, "flip recover": r.Flip.Recover, "outage fail": r.Outage.Fail, "outage recover": r.Outage.Recover} {
			if c.Latency.Missing != 0 || c.Latency.Max > 3 || c.Writes == 0 || c.Changes != int64(c.Checks) {
				t.Errorf("run %s %s: %+v", r.Label, name, c)
			}
		}
	}
	if rep.Summary[0].Ratio == nil {
		t.Error("no A/B ratio with -compare")
	}
}
