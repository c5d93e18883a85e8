package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// figure is one row of the summary: how to read it from a run.
type figure struct {
	section, key, label, unit string
	get                       func(r *runResult) float64 // NaN when the run did not measure it
}

const mb = 1e6

// nan is the value of a figure a run did not reach.
var nan = math.NaN()

func runFig(f func(r *runResult) float64) func(*runResult) float64 { return f }

func steadyFig(f func(s *steadyResult) float64) func(*runResult) float64 {
	return func(r *runResult) float64 {
		if r.Steady == nil {
			return nan
		}
		return f(r.Steady)
	}
}

func changeFig(outage, recover bool, f func(c *changeResult) float64) func(*runResult) float64 {
	return func(r *runResult) float64 {
		t := r.Flip
		if outage {
			t = r.Outage
		}
		if t == nil {
			return nan
		}
		if recover {
			return f(&t.Recover)
		}
		return f(&t.Fail)
	}
}

// figures are the summary rows, in print order.
var figures = func() []figure {
	const setup, steady = "setup", "steady state"
	fs := []figure{
		{setup, "register_seconds", "register all nodes (harness)", "s", runFig(func(r *runResult) float64 { return float64(r.RegisterSeconds) })},
		{setup, "first_write_seconds", "ESM start until every check written once", "s", runFig(func(r *runResult) float64 { return float64(r.FirstWriteSeconds) })},
		{setup, "run_esm_peak_rss_mb", "ESM peak RSS, whole run", "MB", runFig(func(r *runResult) float64 { return rssOrNaN(r.ESMPeakRSSBytes) / mb })},
		{setup, "esm_kb_per_check", "ESM memory per check (run peak RSS / checks)", "KB", runFig(func(r *runResult) float64 { return float64(r.ESMBytesPerCheck) / 1e3 })},
		{steady, "steady_esm_cpu_cores", "ESM CPU", "cores", steadyFig(func(s *steadyResult) float64 { return float64(s.ESMCPUCores) })},
		{steady, "steady_esm_peak_rss_mb", "ESM peak RSS", "MB", steadyFig(func(s *steadyResult) float64 { return float64(s.ESMPeakRSSBytes) / mb })},
		{steady, "steady_esm_end_rss_mb", "ESM end RSS", "MB", steadyFig(func(s *steadyResult) float64 { return float64(s.ESMEndRSSBytes) / mb })},
		{steady, "steady_checks_per_second", "checks executed (target hits)", "/s", steadyFig(func(s *steadyResult) float64 { return float64(s.ChecksPerSec) })},
		{steady, "scheduled_checks_per_second", "checks scheduled (N*M/I)", "/s", runFig(func(r *runResult) float64 { return float64(r.ScheduledPerSec) })},
		{steady, "steady_executed_percent", "executed / scheduled", "%", steadyFig(func(s *steadyResult) float64 { return 100 * float64(s.ExecutedRatio) })},
		{steady, "steady_http_checks_not_run", "HTTP checks never run in the window", "checks", steadyFig(func(s *steadyResult) float64 { return float64(s.HTTPChecksNotRun) })},
		{steady, "steady_requests_per_second", "Consul requests, all", "req/s", steadyFig(func(s *steadyResult) float64 { return float64(s.RequestsPerSec) })},
	}
	for _, k := range []string{kindBlocking, kindRead, kindLiveness, kindWrite} {
		fs = append(fs, figure{steady, "steady_" + k + "_per_second", "Consul requests, " + k, "req/s",
			steadyFig(func(s *steadyResult) float64 { return float64(s.PerKind[k]) })})
	}
	fs = append(fs,
		figure{steady, "steady_response_kb_per_second", "Consul response bytes", "KB/s", steadyFig(func(s *steadyResult) float64 { return float64(s.BytesOutPerSec) / 1e3 })},
		figure{steady, "steady_status_changes", "status changes (expect 0)", "changes", steadyFig(func(s *steadyResult) float64 { return float64(s.StatusChanges) })},
		figure{steady, "steady_consul_cpu_cores", "Consul CPU", "cores", steadyFig(func(s *steadyResult) float64 { return float64(s.ConsulCPUCores) })},
	)
	for _, ph := range []struct {
		outage bool
		key    string
		name   string
	}{{false, "flip", "flip K targets"}, {true, "outage", "mass outage"}} {
		for _, dir := range []struct {
			recover bool
			key     string
			name    string
		}{{false, "fail", "to failing"}, {true, "recover", "back to healthy"}} {
			p := ph.key + "_" + dir.key + "_"
			sec := ph.name + " " + dir.name
			get := func(f func(c *changeResult) float64) func(*runResult) float64 {
				return changeFig(ph.outage, dir.recover, f)
			}
			if !dir.recover {
				fs = append(fs, figure{sec, ph.key + "_floor_seconds", "floor: interval + timeout", "s", func(r *runResult) float64 {
					if t := map[bool]*transitionResult{false: r.Flip, true: r.Outage}[ph.outage]; t != nil {
						return float64(t.FloorSeconds)
					}
					return nan
				}})
			}
			fs = append(fs,
				figure{sec, p + "p50_seconds", "detection latency p50", "s", get(func(c *changeResult) float64 { return float64(c.Latency.P50) })},
				figure{sec, p + "p95_seconds", "detection latency p95", "s", get(func(c *changeResult) float64 { return float64(c.Latency.P95) })},
				figure{sec, p + "p99_seconds", "detection latency p99", "s", get(func(c *changeResult) float64 { return float64(c.Latency.P99) })},
				figure{sec, p + "max_seconds", "detection latency max", "s", get(func(c *changeResult) float64 { return float64(c.Latency.Max) })},
				figure{sec, p + "missed", "changes never seen", "checks", get(func(c *changeResult) float64 { return float64(c.Latency.Missing) })},
				figure{sec, p + "requests_per_change", "Consul requests / status change", "req", get(func(c *changeResult) float64 { return float64(c.RequestsPerChange) })},
				figure{sec, p + "writes_per_change", "Consul writes / status change", "req", get(func(c *changeResult) float64 { return float64(c.WritesPerChange) })},
				figure{sec, p + "esm_cpu_cores", "ESM CPU", "cores", get(func(c *changeResult) float64 { return float64(c.ESMCPUCores) })},
			)
		}
	}
	return fs
}()

func rssOrNaN(b int64) float64 {
	if b <= 0 {
		return nan
	}
	return float64(b)
}

// labels are the binaries' labels in order (A, then B).
func labels(rep *report) []string {
	out := make([]string, len(rep.Binaries))
	for i, b := range rep.Binaries {
		out[i] = b.Label
	}
	return out
}

// summarize averages every figure per binary over the rounds (skipping runs that did not reach it)
// and adds A/B when two binaries ran.
func summarize(rep *report) []summaryRow {
	labs := labels(rep)
	rows := make([]summaryRow, 0, len(figures))
	for _, f := range figures {
		row := summaryRow{Key: f.key, Section: f.section, Label: f.label, Unit: f.unit, Values: map[string]num{}}
		for _, lab := range labs {
			var vals []float64
			for _, r := range rep.Runs {
				if v := f.get(r); r.Label == lab && !math.IsNaN(v) {
					vals = append(vals, v)
				}
			}
			row.Values[lab] = num(mean(vals))
		}
		if len(labs) == 2 {
			q := num(ratio(float64(row.Values[labs[0]]), float64(row.Values[labs[1]])))
			row.Ratio = &q
		}
		rows = append(rows, row)
	}
	return rows
}

// summaryValue is binary lab's mean of figure key.
func summaryValue(rows []summaryRow, key, lab string) float64 {
	for _, r := range rows {
		if r.Key == key {
			if v, ok := r.Values[lab]; ok {
				return float64(v)
			}
		}
	}
	return nan
}

// judgeGoals checks binary A against the goals set for our consul-esm. They are defined for 10k
// HTTP checks at a 10s interval with a dev Consul on the same 2-core machine; at other settings the
// verdicts are indicative (printReport says so).
func judgeGoals(rep *report, o options) []goalResult {
	a := func(key string) float64 { return summaryValue(rep.Summary, key, "A") }
	iv := o.Interval.Seconds()
	// ok nil: the figure is reported, not judged, and note says why.
	judge := func(goal string, v float64, limit string, ok func(float64) bool, note string) goalResult {
		g := goalResult{Goal: goal, Value: num(v), Limit: limit, Note: note}
		if ok != nil && !math.IsNaN(v) {
			pass := ok(v)
			g.Passed = &pass
		}
		return g
	}
	atMost := func(l float64) func(float64) bool { return func(v float64) bool { return v <= l } }
	p99 := math.Max(a("flip_fail_p99_seconds"), a("flip_recover_p99_seconds"))
	goals := []goalResult{
		judge("checks executed / scheduled (%)", a("steady_executed_percent"), ">= 99", func(v float64) bool { return v >= 99 }, ""),
		judge("flip detection p99, worse direction (s)", p99, fmt.Sprintf("<= %.0f (interval + 1s)", iv+1), atMost(iv+1), ""),
		judge("steady ESM CPU (cores)", a("steady_esm_cpu_cores"), "reported", nil, "info: judged against the floor and B below"),
		judge("steady ESM CPU / floor CPU", floorMultiple(rep, "A"), "<= 1.5", atMost(1.5), floorNote(rep)),
		judge("ESM peak RSS, whole run (MB)", a("run_esm_peak_rss_mb"), "<= 110", atMost(110), ""),
		judge("steady status writes (req/s)", a("steady_write_per_second"), "= 0", atMost(0), ""),
		judge("steady non-blocking reads (req/s)", a("steady_read_per_second"), "same at every -size", nil,
			"info: compare runs of different -size"),
		judge("outage: every check critical after (s)", a("outage_fail_max_seconds"), fmt.Sprintf("<= %.0f (interval + 1s)", iv+1), atMost(iv+1), ""),
		judge("outage: Consul requests per change", a("outage_fail_requests_per_change"), "<= 0.1", atMost(0.1), ""),
		judge("memory per check (KB, run peak RSS / checks)", a("esm_kb_per_check"), "reported", nil, "info: the figure to watch at -size 50k"),
	}
	if len(rep.Binaries) == 2 {
		cpu := ratio(a("steady_esm_cpu_cores"), summaryValue(rep.Summary, "steady_esm_cpu_cores", "B"))
		goals = append(goals, judge("steady ESM CPU, A / B", cpu, "<= 0.7 (B: the original)", atMost(0.7), ""))
	}
	return goals
}

// floorMultiple is binary lab's mean steady CPU as a multiple of the floor prober's (NaN without -floor).
func floorMultiple(rep *report, lab string) float64 {
	if rep.Floor == nil || rep.Floor.Error != "" {
		return nan
	}
	return ratio(summaryValue(rep.Summary, "steady_esm_cpu_cores", lab), float64(rep.Floor.CPUCores))
}

func floorNote(rep *report) string {
	if rep.Floor == nil {
		return "run with -floor to judge"
	}
	return ""
}

// endpointTable averages the steady per-endpoint rates per binary: endpoint -> label -> req/s.
func endpointTable(rep *report) (names []string, kinds map[string]string, rates map[string]map[string]float64) {
	kinds = map[string]string{}
	rates = map[string]map[string]float64{}
	runs := map[string]int{}
	for _, r := range rep.Runs {
		if r.Steady == nil {
			continue
		}
		runs[r.Label]++
		for _, e := range r.Steady.Endpoints {
			if rates[e.Endpoint] == nil {
				rates[e.Endpoint] = map[string]float64{}
				names = append(names, e.Endpoint)
			}
			kinds[e.Endpoint] = e.Kind
			rates[e.Endpoint][r.Label] += e.PerSecond
		}
	}
	for _, m := range rates {
		for lab := range m {
			m[lab] /= float64(runs[lab])
		}
	}
	sort.Slice(names, func(i, j int) bool {
		si, sj := 0.0, 0.0
		for _, v := range rates[names[i]] {
			si += v
		}
		for _, v := range rates[names[j]] {
			sj += v
		}
		if si != sj {
			return si > sj
		}
		return names[i] < names[j]
	})
	return names, kinds, rates
}

// formatValue prints a figure with a precision that suits its size.
func formatValue(v float64) string {
	switch {
	case math.IsNaN(v):
		return "-"
	case math.IsInf(v, 0):
		return "inf"
	case v == 0:
		return "0"
	case math.Abs(v) >= 100:
		return fmt.Sprintf("%.0f", v)
	case math.Abs(v) >= 10:
		return fmt.Sprintf("%.1f", v)
	case math.Abs(v) >= 1:
		return fmt.Sprintf("%.2f", v)
	case math.Abs(v) >= 0.01:
		return fmt.Sprintf("%.3f", v)
	default:
		return fmt.Sprintf("%.4f", v)
	}
}

// printReport writes the human tables: the figures by section, the steady window's requests by
// endpoint, and the goals.
func printReport(w io.Writer, rep *report) {
	s := rep.Settings
	labs := labels(rep)
	fmt.Fprintf(w, "\nconsul-esm benchmark: %d checks (%d nodes x %d: %d HTTP, %d TCP on %d ports), interval %gs, timeout %gs\n",
		s.Checks, s.Nodes, s.ChecksPerNode, s.HTTPChecks, s.TCPChecks, s.TCPPorts, s.IntervalSeconds, s.TimeoutSeconds)
	fmt.Fprintf(w, "window %gs, flip K=%d, outage %v, fail mode %s; %s; %d CPUs, load average %s before, %s after\n",
		s.WindowSeconds, s.Flip, s.Outage, s.FailMode, rep.Env.Consul, rep.Env.CPUs,
		formatValue(float64(rep.Env.LoadAvgStart)), formatValue(float64(rep.Env.LoadAvgEnd)))
	for _, b := range rep.Binaries {
		fmt.Fprintf(w, "%s = %s (%s)\n", b.Label, b.Path, b.Version)
	}
	order := make([]string, 0, len(rep.Runs))
	for _, r := range rep.Runs {
		order = append(order, fmt.Sprintf("%s%d", r.Label, r.Round))
	}
	fmt.Fprintf(w, "runs: %s (values are means over each binary's runs; - = not reached)\n", strings.Join(order, " "))
	for _, r := range rep.Runs {
		if r.Error != "" {
			fmt.Fprintf(w, "run %s%d FAILED: %s\n", r.Label, r.Round, indent(r.Error))
		}
		if r.StopError != "" {
			fmt.Fprintf(w, "run %s%d: %s\n", r.Label, r.Round, r.StopError)
		}
		for _, p := range []struct {
			name string
			t    *transitionResult
		}{{"flip", r.Flip}, {"mass outage", r.Outage}} {
			if p.t == nil {
				continue
			}
			for dir, c := range map[string]changeResult{"to failing": p.t.Fail, "back to healthy": p.t.Recover} {
				if c.GaveUp != "" {
					fmt.Fprintf(w, "run %s%d: %s %s: %d of %d changes never seen (%s)\n", r.Label, r.Round, p.name, dir, c.Latency.Missing, c.Checks, c.GaveUp)
				}
			}
		}
	}

	t := newTextTable(append([]bool{false, false}, repeatBool(true, len(labs)+1)...)...)
	head := append([]string{"figure", "unit"}, labs...)
	if len(labs) == 2 {
		head = append(head, "A/B")
	}
	t.add(head...)
	section := ""
	for _, row := range rep.Summary {
		if row.Section != section {
			section = row.Section
			t.title(section)
		}
		cells := []string{"  " + row.Label, row.Unit}
		for _, lab := range labs {
			cells = append(cells, formatValue(float64(row.Values[lab])))
		}
		if row.Ratio != nil {
			cells = append(cells, formatValue(float64(*row.Ratio)))
		}
		t.add(cells...)
	}
	fmt.Fprintln(w)
	t.write(w)

	if f := rep.Floor; f != nil {
		fmt.Fprintf(w, "\nfloor (a minimal prober, same requests, fresh connections): %s checks/s, %s cores, %s MB peak RSS",
			formatValue(float64(f.ChecksPerSec)), formatValue(float64(f.CPUCores)), formatValue(rssOrNaN(f.PeakRSSBytes)/mb))
		if f.Error != "" {
			fmt.Fprintf(w, " (FAILED: %s)", f.Error)
		}
		fmt.Fprintln(w)
		for _, lab := range labs {
			fmt.Fprintf(w, "  steady ESM CPU of %s = %s x the floor\n", lab, formatValue(floorMultiple(rep, lab)))
		}
	}

	names, kinds, rates := endpointTable(rep)
	if len(names) > 0 {
		fmt.Fprintf(w, "\nsteady state: consul-esm's requests to Consul by endpoint (req/s)\n")
		t = newTextTable(append([]bool{false, false}, repeatBool(true, len(labs))...)...)
		t.add(append([]string{"endpoint", "kind"}, labs...)...)
		for _, n := range names {
			cells := []string{n, kinds[n]}
			for _, lab := range labs {
				cells = append(cells, formatValue(rates[n][lab]))
			}
			t.add(cells...)
		}
		t.write(w)
	}

	if len(rep.Goals) > 0 {
		fmt.Fprintf(w, "\ngoals for our consul-esm, judged on A")
		if s.HTTPChecks != 10000 || s.TCPChecks != 0 || s.IntervalSeconds != 10 {
			fmt.Fprintf(w, " (they are set for 10k HTTP checks at 10s: -size 10k -tcp-frac 0)")
		}
		fmt.Fprintln(w)
		t = newTextTable(false, true, false, false)
		t.add("goal", "A", "limit", "verdict")
		for _, g := range rep.Goals {
			verdict := "not measured"
			switch {
			case g.Note != "":
				verdict = g.Note
			case g.Passed != nil && *g.Passed:
				verdict = "ok"
			case g.Passed != nil:
				verdict = "MISSED"
			}
			t.add(g.Goal, formatValue(float64(g.Value)), g.Limit, verdict)
		}
		t.write(w)
	}
	if rep.WorkDir != "" {
		fmt.Fprintf(w, "\nconfigs and logs: %s\n", rep.WorkDir)
	}
}

// textTable lays out rows in padded columns; title rows stand alone.
type textTable struct {
	right []bool
	rows  [][]string // a row of one cell with titleMark is a title
}

const titleMark = "\x00"

func newTextTable(right ...bool) *textTable { return &textTable{right: right} }

func (t *textTable) add(cells ...string) { t.rows = append(t.rows, cells) }
func (t *textTable) title(s string)      { t.rows = append(t.rows, []string{titleMark + s}) }

func (t *textTable) write(w io.Writer) {
	width := make([]int, len(t.right))
	for _, r := range t.rows {
		if len(r) == 1 && strings.HasPrefix(r[0], titleMark) {
			continue
		}
		for i, c := range r {
			width[i] = max(width[i], len(c))
		}
	}
	for _, r := range t.rows {
		if len(r) == 1 && strings.HasPrefix(r[0], titleMark) {
			fmt.Fprintln(w, strings.TrimPrefix(r[0], titleMark))
			continue
		}
		var b strings.Builder
		for i, c := range r {
			if i > 0 {
				b.WriteString("  ")
			}
			pad := strings.Repeat(" ", width[i]-len(c))
			if t.right[i] {
				b.WriteString(pad + c)
			} else {
				b.WriteString(c + pad)
			}
		}
		fmt.Fprintln(w, strings.TrimRight(b.String(), " "))
	}
}

func repeatBool(v bool, n int) []bool {
	out := make([]bool, n)
	for i := range out {
		out[i] = v
	}
	return out
}

func indent(s string) string { return strings.ReplaceAll(s, "\n", "\n    ") }

// writeJSON writes the report to path (creating its directory).
func writeJSON(path string, rep *report) error {
	data, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding JSON report: %w", err)
	}
	if dir := filepath.Dir(path); dir != "." {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("writing JSON report: %w", err)
		}
	}
	if err := os.WriteFile(path, append(data, '\n'), 0o644); err != nil {
		return fmt.Errorf("writing JSON report: %w", err)
	}
	return nil
}
