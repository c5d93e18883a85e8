package main

import (
	"math"
	"sort"
	"strconv"
	"time"
)

// num is a figure that may be unknown (NaN); JSON encodes an unknown or infinite figure as null.
type num float64

func (n num) MarshalJSON() ([]byte, error) {
	f := float64(n)
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return []byte("null"), nil
	}
	return strconv.AppendFloat(nil, f, 'g', 6, 64), nil
}

// UnmarshalJSON reads what MarshalJSON wrote (null is NaN).
func (n *num) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		*n = num(math.NaN())
		return nil
	}
	f, err := strconv.ParseFloat(string(b), 64)
	*n = num(f)
	return err
}

// unknown is the NaN num.
func unknown() num { return num(math.NaN()) }

// latencyStats summarises detection latencies in seconds. Missing counts the checks whose change was
// never seen in the catalog before the phase gave up; they are not in the percentiles.
type latencyStats struct {
	N       int `json:"n"`
	Missing int `json:"missing"`
	P50     num `json:"p50"`
	P95     num `json:"p95"`
	P99     num `json:"p99"`
	Max     num `json:"max"`
}

// percentile is the nearest-rank percentile (0 < p <= 100) of sorted values: the smallest value
// with at least p% of all values at or below it.
func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	rank = min(max(rank, 1), len(sorted))
	return sorted[rank-1]
}

// latencies pairs each change's start with when the catalog showed it (zero: never).
func latencies(start, seen []time.Time) latencyStats {
	var s latencyStats
	vals := make([]float64, 0, len(seen))
	for k := range seen {
		if seen[k].IsZero() {
			s.Missing++
			continue
		}
		vals = append(vals, seen[k].Sub(start[k]).Seconds())
	}
	sort.Float64s(vals)
	s.N = len(vals)
	s.P50, s.P95, s.P99 = num(percentile(vals, 50)), num(percentile(vals, 95)), num(percentile(vals, 99))
	s.Max = unknown()
	if s.N > 0 {
		s.Max = num(vals[len(vals)-1])
	}
	return s
}

// mean is the average of xs (NaN when empty).
func mean(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	var sum float64
	for _, x := range xs {
		sum += x
	}
	return sum / float64(len(xs))
}

// ratio is a / b, NaN when either is unknown or b is zero (0/0 is 1: both spent nothing).
func ratio(a, b float64) float64 {
	switch {
	case math.IsNaN(a) || math.IsNaN(b):
		return math.NaN()
	case a == 0 && b == 0:
		return 1
	case b == 0:
		return math.Inf(1)
	}
	return a / b
}

// perChange is n per status change (NaN without changes).
func perChange(n, changes int64) num {
	if changes <= 0 {
		return unknown()
	}
	return num(float64(n) / float64(changes))
}
