package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// clockTicks is USER_HZ, the unit of utime/stime in /proc/<pid>/stat: 100 on every Linux platform
// Go supports.
const clockTicks = 100

// procSample is one reading of a process's CPU time and resident memory.
type procSample struct {
	At  time.Time
	CPU time.Duration // utime + stime
	RSS int64         // bytes (VmRSS)
}

// readProc reads /proc/<pid>/stat and /proc/<pid>/status.
func readProc(pid int) (procSample, error) {
	s := procSample{At: time.Now()}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return s, err
	}
	// The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
	// Then field 3 (state) is index 0, so utime (14) and stime (15) are indexes 11 and 12.
	rp := bytes.LastIndexByte(stat, ')')
	if rp < 0 {
		return s, fmt.Errorf("parsing /proc/%d/stat: no ')'", pid)
	}
	f := strings.Fields(string(stat[rp+1:]))
	if len(f) < 13 {
		return s, fmt.Errorf("parsing /proc/%d/stat: %d fields", pid, len(f))
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return s, fmt.Errorf("parsing /proc/%d/stat: utime %q stime %q", pid, f[11], f[12])
	}
	s.CPU = time.Duration(utime+stime) * time.Second / clockTicks
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, err
	}
	s.RSS, err = parseVmRSS(status)
	return s, err
}

// parseVmRSS finds "VmRSS:   1234 kB" in /proc/<pid>/status.
func parseVmRSS(status []byte) (int64, error) {
	for _, line := range strings.Split(string(status), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) != 2 || f[1] != "kB" {
				return 0, fmt.Errorf("parsing VmRSS line %q", line)
			}
			kb, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("parsing VmRSS line %q: %w", line, err)
			}
			return kb * 1024, nil
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc status")
}

// sampler reads a process every period and keeps the samples.
type sampler struct {
	pid     int
	mu      sync.Mutex
	samples []procSample
	done    chan struct{}
}

// startSampler samples pid every period until ctx ends.
func startSampler(ctx context.Context, pid int, period time.Duration) *sampler {
	s := &sampler{pid: pid, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		t := time.NewTicker(period)
		defer t.Stop()
		for {
			s.sample()
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return s
}

// sample takes a reading now (also used at phase boundaries) and records it.
func (s *sampler) sample() procSample {
	p, err := readProc(s.pid)
	if err != nil {
		return procSample{At: time.Now(), CPU: -1}
	}
	s.mu.Lock()
	s.samples = append(s.samples, p)
	s.mu.Unlock()
	return p
}

// peakRSS is the highest RSS sampled in [from, to] (zero times: unbounded).
func (s *sampler) peakRSS(from, to time.Time) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var peak int64
	for _, p := range s.samples {
		if (!from.IsZero() && p.At.Before(from)) || (!to.IsZero() && p.At.After(to)) {
			continue
		}
		peak = max(peak, p.RSS)
	}
	return peak
}

// cpuCores is the CPU used between two readings, in cores (CPU seconds per second).
func cpuCores(a, b procSample) float64 {
	if a.CPU < 0 || b.CPU < 0 || !b.At.After(a.At) {
		return 0
	}
	return (b.CPU - a.CPU).Seconds() / b.At.Sub(a.At).Seconds()
}

// loadAvg is the 1-minute load average (NaN when unreadable).
func loadAvg() num {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return unknown()
	}
	f := strings.Fields(string(data))
	if len(f) == 0 {
		return unknown()
	}
	v, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return unknown()
	}
	return num(v)
}
