package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
)

// view shows the demo: in a terminal a live table redrawn in place; otherwise (and with
// -non-interactive) plain lines, one per event and one per change of a check:
//
//	[   4.2s] demo: all 6 checks are passing
//	[   5.3s] check billing-saas   billing  billing-http  critical  HTTP GET http://...: 500 Internal Server Error Output: ...
//
// All methods are called from one goroutine.
type view struct {
	out   io.Writer
	plain bool // plain lines (also after freeze)
	color bool
	start time.Time

	infos  [][2]string
	events []string
	step   string
	rows   []*api.HealthCheck
	seen   map[string]string // node/check -> status and output last printed (plain mode)
	drawn  bool
	done   bool
}

const maxEvents = 8

func newView(out io.Writer, plain bool) *view {
	_, noColor := os.LookupEnv("NO_COLOR")
	return &view{out: out, plain: plain, color: !plain && !noColor, start: time.Now(), seen: map[string]string{}}
}

func (v *view) elapsed() string {
	return fmt.Sprintf("%6.1fs", time.Since(v.start).Seconds())
}

// info sets a line of the table's header (plain mode has none: events say the same).
func (v *view) info(label, value string) {
	for i := range v.infos {
		if v.infos[i][0] == label {
			v.infos[i][1] = value
			return
		}
	}
	v.infos = append(v.infos, [2]string{label, value})
}

// event records something that happened.
func (v *view) event(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if v.plain {
		fmt.Fprintf(v.out, "[%s] demo: %s\n", v.elapsed(), msg)
		return
	}
	v.events = append(v.events, fmt.Sprintf("%s  %s", v.elapsed(), msg))
	if len(v.events) > maxEvents {
		v.events = v.events[len(v.events)-maxEvents:]
	}
	v.render()
}

// setStep sets the line that says what the demo is doing now.
func (v *view) setStep(s string) {
	v.step = s
	v.render()
}

// update replaces the checks shown; in plain mode it prints each check whose status or output changed.
func (v *view) update(rows []*api.HealthCheck) {
	rows = append([]*api.HealthCheck(nil), rows...)
	sort.Slice(rows, func(i, j int) bool {
		if rows[i].Node != rows[j].Node {
			return rows[i].Node < rows[j].Node
		}
		return rows[i].CheckID < rows[j].CheckID
	})
	v.rows = rows
	if !v.plain {
		return
	}
	for _, c := range rows {
		key, val := c.Node+"/"+c.CheckID, c.Status+"\x00"+c.Output
		if v.seen[key] == val {
			continue
		}
		v.seen[key] = val
		fmt.Fprintf(v.out, "[%s] check %-14s %-8s %-18s %-9s %s\n",
			v.elapsed(), c.Node, service(c), c.CheckID, c.Status, oneLine(c.Output))
	}
}

func service(c *api.HealthCheck) string {
	if c.ServiceName == "" {
		return "-"
	}
	return c.ServiceName
}

// render redraws the table (a no-op in plain mode).
func (v *view) render() {
	if v.plain {
		return
	}
	width := terminalWidth(os.Stdout)
	if width <= 0 {
		width = 120
	}
	var b strings.Builder
	if !v.drawn {
		b.WriteString("\x1b[?25l\x1b[2J") // hide the cursor, clear the screen
		v.drawn = true
	}
	b.WriteString("\x1b[H")
	line := func(s string) {
		b.WriteString(truncate(s, width-1))
		b.WriteString("\x1b[K\n")
	}

	boldLine := func(s string) {
		b.WriteString(v.bold(truncate(s, width-1)))
		b.WriteString("\x1b[K\n")
	}

	boldLine("consul-esm demo, running for " + strings.TrimSpace(v.elapsed()))
	for _, kv := range v.infos {
		line(fmt.Sprintf("  %-15s %s", kv[0], kv[1]))
	}
	line("")

	// The checks table; the output column takes what the terminal has left.
	cols := []string{"NODE", "SERVICE", "CHECK", "STATUS"}
	w := []int{len(cols[0]), len(cols[1]), len(cols[2]), len("critical")}
	for _, c := range v.rows {
		w[0] = max(w[0], len(c.Node))
		w[1] = max(w[1], len(service(c)))
		w[2] = max(w[2], len(c.CheckID))
	}
	used := w[0] + w[1] + w[2] + w[3] + 8
	outW := max(width-1-used, 10)
	boldLine(fmt.Sprintf("%-*s  %-*s  %-*s  %-*s  %s", w[0], cols[0], w[1], cols[1], w[2], cols[2], w[3], cols[3], "OUTPUT"))
	if len(v.rows) == 0 {
		line("(no external nodes registered yet)")
	}
	for _, c := range v.rows {
		status := fmt.Sprintf("%-*s", w[3], c.Status)
		b.WriteString(fmt.Sprintf("%-*s  %-*s  %-*s  %s  %s\x1b[K\n", w[0], c.Node, w[1], service(c), w[2], c.CheckID,
			v.colorStatus(c.Status, status), truncate(oneLine(c.Output), outW)))
	}
	line("")
	for _, l := range wrap("> "+v.step, width-1) {
		boldLine(l)
	}
	line("")
	line("Events:")
	for _, e := range v.events {
		line("  " + e)
	}
	line("")
	if v.done {
		line("Stopped; nothing is left running.")
	} else {
		line("Ctrl-C stops consul-esm and Consul and removes the temp dir.")
	}
	b.WriteString("\x1b[J") // clear whatever an earlier, longer frame left below
	fmt.Fprint(v.out, b.String())
}

// freeze draws the table one last time and switches to plain lines, so that whatever is printed
// next (the cleanup, log excerpts) appears below the table instead of being drawn over.
func (v *view) freeze() {
	if v.plain {
		return
	}
	v.render()
	fmt.Fprint(v.out, "\x1b[?25h") // show the cursor again
	v.plain = true
}

// finish says the demo has stopped and cleaned up.
func (v *view) finish() {
	v.done = true
	v.step = "Stopped."
	v.event("stopped; nothing is left running")
}

func (v *view) close() { v.freeze() }

// dumpLog prints the last lines of a log file, for when something went wrong.
func (v *view) dumpLog(path string) {
	v.freeze()
	f, err := os.Open(path)
	if err != nil {
		return
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if len(lines) > 30 {
			lines = lines[1:]
		}
	}
	fmt.Fprintf(v.out, "--- last lines of %s\n", path)
	for _, l := range lines {
		fmt.Fprintf(v.out, "  | %s\n", l)
	}
}

func (v *view) bold(s string) string {
	if !v.color {
		return s
	}
	return "\x1b[1m" + s + "\x1b[0m"
}

func (v *view) colorStatus(status, padded string) string {
	if !v.color {
		return padded
	}
	code := map[string]string{api.HealthPassing: "32", api.HealthWarning: "33", api.HealthCritical: "31"}[status]
	if code == "" {
		return padded
	}
	return "\x1b[" + code + "m" + padded + "\x1b[0m"
}

// truncate cuts s to n runes, marking the cut with "...".
func truncate(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	if n <= 3 {
		return string(r[:max(n, 0)])
	}
	return string(r[:n-3]) + "..."
}

// wrap breaks s into lines of at most n runes at spaces.
func wrap(s string, n int) []string {
	var lines []string
	cur := ""
	for _, word := range strings.Fields(s) {
		switch {
		case cur == "":
			cur = word
		case len([]rune(cur))+1+len([]rune(word)) <= n:
			cur += " " + word
		default:
			lines = append(lines, cur)
			cur = "  " + word
		}
	}
	if cur != "" {
		lines = append(lines, cur)
	}
	return lines
}
