//go:build unix

package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// Tests for what a newcomer touches first: the example configs and node JSON in examples/, the
// Docker entrypoint, the systemd unit and `make demo` (examples/demo) run end to end.

// exampleConfigFiles lists every .hcl and .json file under examples/config.
func exampleConfigFiles(t *testing.T) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir(filepath.Join("examples", "config"), func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && (strings.HasSuffix(path, ".hcl") || strings.HasSuffix(path, ".json")) {
			files = append(files, path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 5 {
		t.Fatalf("found only %d example configs under examples/config: %v", len(files), files)
	}
	return files
}

// assertLoopback fails unless every address the config makes consul-esm talk to or listen on is a
// loopback one (examples must never point at a real network).
func assertLoopback(t *testing.T, name string, cfg *Config) {
	t.Helper()
	for key, addr := range map[string]string{
		"http_addr":                cfg.HTTPAddr,
		"client_address":           cfg.ClientAddress,
		"telemetry.statsd_address": cfg.Telemetry.StatsdAddr,
		"telemetry.statsite_addr":  cfg.Telemetry.StatsiteAddr,
		"telemetry.dogstatsd_addr": cfg.Telemetry.DogstatsdAddr,
	} {
		if addr == "" {
			continue
		}
		if u, err := url.Parse(addr); err == nil && u.Host != "" {
			addr = u.Host
		}
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			host = addr
		}
		if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
			t.Errorf("%s: %s = %q is not a loopback address", name, key, addr)
		}
	}
}

func TestExampleConfigsLoad(t *testing.T) {
	for _, path := range exampleConfigFiles(t) {
		t.Run(filepath.ToSlash(path), func(t *testing.T) {
			cfg, err := LoadConfig([]string{path})
			if err != nil {
				t.Fatalf("LoadConfig(%s): %v", path, err)
			}
			if len(cfg.Warnings) > 0 {
				t.Errorf("LoadConfig(%s) warned: %q", path, cfg.Warnings)
			}
			assertLoopback(t, path, cfg)
		})
	}

	t.Run("empty config dir (the Docker image's default CMD)", func(t *testing.T) {
		if _, err := LoadConfig([]string{t.TempDir()}); err != nil {
			t.Fatalf("LoadConfig(empty dir): %v", err)
		}
	})
}

func TestExampleConfigJSONMatchesHCL(t *testing.T) {
	hcl, err := LoadConfig([]string{filepath.Join("examples", "config", "consul-esm.hcl")})
	if err != nil {
		t.Fatal(err)
	}
	js, err := LoadConfig([]string{filepath.Join("examples", "config", "consul-esm.json")})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(hcl, js) {
		t.Errorf("examples/config/consul-esm.hcl and consul-esm.json differ:\nhcl:  %+v\njson: %+v", hcl, js)
	}
}

func TestExampleConfigOverlay(t *testing.T) {
	cfg, err := LoadConfig([]string{
		filepath.Join("examples", "config", "consul-esm.hcl"),
		filepath.Join("examples", "config", "conf.d"),
	})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.HTTPAddr != "127.0.0.1:8500" || cfg.ClientAddress != "127.0.0.1:8080" {
		t.Errorf("base keys lost under the overlay: http_addr %q, client_address %q", cfg.HTTPAddr, cfg.ClientAddress)
	}
	if cfg.Telemetry.StatsdAddr != "127.0.0.1:8125" || cfg.Telemetry.PrometheusRetentionTime != 5*time.Minute {
		t.Errorf("conf.d/10-telemetry.hcl not applied: %+v", cfg.Telemetry)
	}
	if cfg.PassingThreshold != 2 || cfg.CriticalThreshold != 3 {
		t.Errorf("conf.d/20-anti-flapping.hcl not applied: passing %d, critical %d", cfg.PassingThreshold, cfg.CriticalThreshold)
	}
}

// TestExampleNodeJSON checks examples/node.json (the README's shape) is a catalog registration of
// an external node whose checks consul-esm runs.
func TestExampleNodeJSON(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("examples", "node.json"))
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var reg api.CatalogRegistration
	if err := dec.Decode(&reg); err != nil {
		t.Fatalf("examples/node.json is not a catalog registration: %v", err)
	}
	if reg.NodeMeta["external-node"] != "true" {
		t.Errorf("NodeMeta = %v, want external-node = true", reg.NodeMeta)
	}
	if reg.Address != "127.0.0.1" || reg.Service == nil || len(reg.Checks) == 0 {
		t.Fatalf("registration = %+v, want address 127.0.0.1, a service and checks", reg)
	}
	for _, c := range reg.Checks {
		d := c.Definition
		if c.Node != reg.Node || c.ServiceID != reg.Service.ID {
			t.Errorf("check %s: node %q / service %q, want %q / %q", c.CheckID, c.Node, c.ServiceID, reg.Node, reg.Service.ID)
		}
		if (d.HTTP == "") == (d.TCP == "") {
			t.Errorf("check %s: want exactly one of HTTP and TCP, got %+v", c.CheckID, d)
		}
		if d.IntervalDuration < time.Second || d.TimeoutDuration <= 0 {
			t.Errorf("check %s: interval %s, timeout %s", c.CheckID, d.IntervalDuration, d.TimeoutDuration)
		}
	}
}

func TestDockerEntrypoint(t *testing.T) {
	t.Parallel()
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh")
	}
	run := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(sh, append([]string{"docker-entrypoint.sh"}, args...)...)
		cmd.Env = append(os.Environ(), "CONSUL_ESM_BINARY="+esmBinary(t))
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("docker-entrypoint.sh %q: %v\n%s", args, err, out)
		}
		return string(out)
	}
	if out := run("-version"); !strings.HasPrefix(out, "consul-esm v") {
		t.Errorf("a leading flag must run consul-esm with it; -version printed %q", out)
	}
	if out := run("echo", "any", "command"); out != "any command\n" {
		t.Errorf("a command must run as given; echo printed %q", out)
	}
}

func TestSystemdUnit(t *testing.T) {
	path := filepath.Join("packaging", "systemd", "consul-esm.service")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	unit := map[string]string{} // "Section.Key" -> value
	section := ""
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "["):
			section = strings.Trim(line, "[]")
		default:
			k, v, _ := strings.Cut(line, "=")
			unit[section+"."+k] = v
		}
	}
	for key, want := range map[string]string{
		"Service.Restart":             "on-failure",
		"Service.AmbientCapabilities": "CAP_NET_RAW",
		"Service.User":                "consul-esm",
		"Service.ExecStart":           "/usr/bin/consul-esm -config-dir=/etc/consul-esm.d",
		"Service.ExecReload":          "/bin/kill -HUP $MAINPID",
		"Install.WantedBy":            "multi-user.target",
	} {
		if unit[key] != want {
			t.Errorf("%s: %s = %q, want %q", path, key, unit[key], want)
		}
	}

	// systemd's own check, where systemd is installed, with ExecStart pointed at a real binary.
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		return
	}
	dir := t.TempDir()
	text := strings.ReplaceAll(string(b), "/usr/bin/consul-esm", esmBinary(t))
	if err := os.WriteFile(filepath.Join(dir, "consul-esm.service"), []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", filepath.Join(dir, "consul-esm.service")).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// demoRun is examples/demo running in a process group of its own, its stdout collected by line.
type demoRun struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	out    []string
	line   chan struct{} // signalled after each new line
	exited chan struct{} // closed once the demo has exited
	err    error         // cmd.Wait's result, read after exited is closed
}

// demoBinaries builds examples/demo into dir and finds the binaries it runs: the Consul on PATH
// (`make test` puts bin/ first) or bin/consul, and a freshly built consul-esm.
func demoBinaries(t *testing.T, dir string) (demo, consul, esm string) {
	t.Helper()
	consul, err := exec.LookPath("consul")
	if err != nil {
		if consul, err = filepath.Abs(filepath.Join("bin", "consul")); err == nil {
			_, err = os.Stat(consul)
		}
	}
	if err != nil {
		t.Fatalf("no consul binary on PATH or in bin/ (run `make consul`): %v", err)
	}
	demo = filepath.Join(dir, "demo")
	if out, err := exec.Command("go", "build", "-o", demo, "./examples/demo").CombinedOutput(); err != nil {
		t.Fatalf("building examples/demo: %v\n%s", err, out)
	}
	return demo, consul, esmBinary(t)
}

// startDemo starts the demo with args. Whatever happens, the test's cleanup stops it and its children.
func startDemo(t *testing.T, demo, consul, esm string, args ...string) *demoRun {
	t.Helper()
	d := &demoRun{line: make(chan struct{}, 1), exited: make(chan struct{})}
	d.cmd = exec.Command(demo, append([]string{"-consul", consul, "-esm", esm}, args...)...)
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdout, err := d.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	d.cmd.Stderr = d.cmd.Stdout
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			d.mu.Lock()
			d.out = append(d.out, sc.Text())
			d.mu.Unlock()
			select {
			case d.line <- struct{}{}:
			default:
			}
		}
		d.err = d.cmd.Wait()
		close(d.exited)
	}()
	t.Cleanup(func() {
		// Ask the demo to clean up (it stops Consul and consul-esm); if it does not exit in time,
		// kill its process group (its children then die with it: the demo sets a parent-death signal).
		select {
		case <-d.exited:
		default:
			_ = syscall.Kill(-d.cmd.Process.Pid, syscall.SIGTERM)
			select {
			case <-d.exited:
			case <-time.After(15 * time.Second):
				_ = syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
				<-d.exited
			}
		}
		if t.Failed() {
			t.Logf("demo output:\n%s", strings.Join(d.lines(), "\n"))
		}
	})
	return d
}

func (d *demoRun) lines() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.out...)
}

// waitLine waits until a line containing s has been printed and returns its index.
func (d *demoRun) waitLine(t *testing.T, s string, timeout time.Duration) int {
	t.Helper()
	deadline := time.After(timeout)
	for {
		for i, l := range d.lines() {
			if strings.Contains(l, s) {
				return i
			}
		}
		select {
		case <-d.line:
		case <-time.After(100 * time.Millisecond):
		case <-deadline:
			t.Fatalf("the demo printed no line containing %q within %s", s, timeout)
		}
	}
}

// wait waits for the demo to exit and fails unless it exited 0.
func (d *demoRun) wait(t *testing.T, timeout time.Duration) {
	t.Helper()
	select {
	case <-d.exited:
		if d.err != nil {
			t.Fatalf("the demo failed: %v", d.err)
		}
	case <-time.After(timeout):
		t.Fatalf("the demo did not exit within %s", timeout)
	}
}

var (
	demoTempDir    = regexp.MustCompile(`demo: temp dir (\S+)`)
	demoConsulAddr = regexp.MustCompile(`Consul dev agent up: http://(\S+)`)
	demoESMAddr    = regexp.MustCompile(`health http://(\S+)/health`)
)

// assertCleanedUp checks that the demo removed its temp dir and that Consul and consul-esm no
// longer listen.
func (d *demoRun) assertCleanedUp(t *testing.T) {
	t.Helper()
	out := strings.Join(d.lines(), "\n")
	for _, re := range []*regexp.Regexp{demoTempDir, demoConsulAddr, demoESMAddr} {
		m := re.FindStringSubmatch(out)
		if m == nil {
			t.Errorf("the demo printed nothing matching %s", re)
			continue
		}
		if re == demoTempDir {
			if _, err := os.Stat(m[1]); !os.IsNotExist(err) {
				t.Errorf("temp dir %s still exists after the demo exited (stat: %v)", m[1], err)
			}
			continue
		}
		if c, err := net.DialTimeout("tcp", m[1], time.Second); err == nil {
			_ = c.Close()
			t.Errorf("%s still accepts connections after the demo exited", m[1])
		}
	}
}

// checkLine matches the demo's plain line for one check: "[  3.4s] check <node> <service> <check> <status> <output>".
func checkLine(line, node, check, status string) bool {
	_, rest, ok := strings.Cut(line, "] check ")
	f := strings.Fields(rest)
	return ok && len(f) >= 4 && f[0] == node && f[2] == check && f[3] == status
}

// TestDemoEndToEnd runs `make demo`'s program non-interactively: a dev Consul, the sample service
// and consul-esm; every check must turn passing, the broken endpoint's check critical, then passing
// again, and nothing may be left behind.
func TestDemoEndToEnd(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("starts Consul and consul-esm processes")
	}
	demo, consul, esm := demoBinaries(t, t.TempDir())

	t.Run("scenario", func(t *testing.T) {
		t.Parallel()
		d := startDemo(t, demo, consul, esm, "-non-interactive", "-duration", "45s")
		d.wait(t, 60*time.Second)
		lines := d.lines()

		// The events, in order.
		at := func(s string, from int) int {
			for i := from; i < len(lines); i++ {
				if strings.Contains(lines[i], s) {
					return i
				}
			}
			t.Fatalf("no line containing %q after line %d", s, from)
			return -1
		}
		allPassing := at("demo: all 6 checks are passing", 0)
		broke := at("demo: broke billing's endpoint", allPassing)
		critical := at("demo: billing-saas/billing-http is critical", broke)
		repaired := at("demo: repaired billing's endpoint", critical)
		at("demo: billing-saas/billing-http is passing again", repaired)
		at("demo: scenario complete", repaired)

		// And the check lines behind them.
		for _, c := range [][2]string{
			{"web-saas", "web-http"}, {"web-saas", "web-tcp"},
			{"billing-saas", "billing-http"}, {"billing-saas", "billing-tcp"},
			{"dns-appliance", "dns-udp"}, {"dns-appliance", "dns-tcp"},
		} {
			found := false
			for _, l := range lines[:allPassing] {
				found = found || checkLine(l, c[0], c[1], "passing")
			}
			if !found {
				t.Errorf("no passing line for %s/%s before all checks passed", c[0], c[1])
			}
		}
		sawCritical, sawRecovered := false, false
		for i, l := range lines {
			switch {
			case i > broke && i <= critical && checkLine(l, "billing-saas", "billing-http", "critical"):
				sawCritical = strings.Contains(l, "500 Internal Server Error")
			case i > repaired && checkLine(l, "billing-saas", "billing-http", "passing"):
				sawRecovered = true
			case i > broke && strings.Contains(l, "] check ") && !strings.Contains(l, "billing-http"):
				t.Errorf("a check other than billing-http changed after the failure: %s", l)
			}
		}
		if !sawCritical {
			t.Error("no critical line with the 500 output for billing-http after the endpoint broke")
		}
		if !sawRecovered {
			t.Error("no passing line for billing-http after the endpoint was repaired")
		}
		d.assertCleanedUp(t)
	})

	t.Run("ctrl-c cleans up", func(t *testing.T) {
		t.Parallel()
		d := startDemo(t, demo, consul, esm) // no -non-interactive: runs until interrupted (plain lines: stdout is a pipe)
		d.waitLine(t, "demo: all 6 checks are passing", 40*time.Second)
		if err := d.cmd.Process.Signal(syscall.SIGINT); err != nil {
			t.Fatal(err)
		}
		d.wait(t, 20*time.Second)
		d.waitLine(t, "demo: stopped; nothing is left running", time.Second)
		d.assertCleanedUp(t)
	})
}
