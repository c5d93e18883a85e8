package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/consul/sdk/testutil"
	"github.com/hashicorp/go-hclog"
)

// Every Config field must be classified, and every key a file can set must be named by the
// classification, so a new config key can never be half-applied (or silently ignored) on SIGHUP.
func TestReloadFieldClassification(t *testing.T) {
	typ := reflect.TypeOf(Config{})
	named := map[string]bool{"telemetry": true}
	for i := range typ.NumField() {
		f := typ.Field(i).Name
		rk, r := reloadableFields[f]
		ok, o := restartOnlyFields[f]
		n := slices.Contains(notFromFiles, f)
		if f == "Telemetry" {
			continue
		}
		if btoi(r)+btoi(o)+btoi(n) != 1 {
			t.Errorf("Config.%s: reloadable=%v restart-only=%v internal=%v; classify it exactly once", f, r, o, n)
		}
		named[rk], named[ok] = true, true
	}
	for _, key := range telemetryKeysByField() {
		named["telemetry."+key] = true
	}
	for _, key := range configFileKeys() {
		if !named[key] {
			t.Errorf("config key %q has no reload classification", key)
		}
	}
	keys := configFileKeys()
	for field, key := range telemetryKeysByField() {
		if field == "AllowedPrefixes" || field == "BlockedPrefixes" {
			continue // derived from prefix_filter
		}
		if !slices.Contains(keys, "telemetry."+key) {
			t.Errorf("TelemetryConfig.%s maps to unknown key telemetry.%s", field, key)
		}
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

func TestPlanReloadKeepsRestartOnlyFields(t *testing.T) {
	t.Setenv("CONSUL_HTTP_TOKEN", "")
	t.Setenv("CONSUL_HTTP_TOKEN_FILE", "")
	running := DefaultConfig()
	running.InstanceID = "generated-at-startup"
	running.AgentTTL = 3 * time.Second // instance_ttl: restart-only, so it survives and is named
	running.Token = "old"

	loaded := DefaultConfig()
	loaded.LogLevel = "DEBUG"
	loaded.Token = "new"
	loaded.PassingThreshold, loaded.CriticalThreshold = 2, 3
	loaded.CheckUpdateInterval = time.Minute
	loaded.TLSExpiryWarning = 336 * time.Hour
	loaded.KVPath = "elsewhere/"
	loaded.Tag = "blue"
	loaded.NodeMeta = map[string]string{"external-node": "true", "dc": "x"}
	loaded.Telemetry.PrefixFilter = []string{"-esm.agent"}
	loaded.Telemetry.BlockedPrefixes = []string{"esm.agent"}
	loaded.Telemetry.StatsdAddr = "127.0.0.1:8125"
	loaded.Telemetry.PerCheckMetrics = true

	plan, err := planReload(running, loaded)
	if err != nil {
		t.Fatal(err)
	}
	n := plan.next
	if n.LogLevel != "DEBUG" || n.Token != "new" || plan.token != "new" || n.PassingThreshold != 2 ||
		n.CriticalThreshold != 3 || n.CheckUpdateInterval != time.Minute || n.TLSExpiryWarning != 336*time.Hour || !n.Telemetry.PerCheckMetrics ||
		!slices.Equal(n.Telemetry.BlockedPrefixes, []string{"esm.agent"}) {
		t.Errorf("reloadable fields not applied: %+v", n)
	}
	if n.KVPath != "consul-esm/" || n.Tag != "" || len(n.NodeMeta) != 1 || n.InstanceID != "generated-at-startup" ||
		n.AgentTTL != 3*time.Second || n.Telemetry.StatsdAddr != "" {
		t.Errorf("restart-only fields changed: %+v", n)
	}
	wantRestart := []string{"consul_kv_path", "consul_service_tag", "external_node_meta", "instance_ttl", "telemetry.statsd_address"}
	if !slices.Equal(plan.restartKeys, wantRestart) {
		t.Errorf("restart keys = %v, want %v", plan.restartKeys, wantRestart)
	}
	wantChanged := []string{"check_update_interval", "critical_threshold", "log_level", "passing_threshold", "telemetry.per_check_metrics", "telemetry.prefix_filter", "tls_expiry_warning", "token"}
	if !slices.Equal(plan.changed, wantChanged) {
		t.Errorf("changed = %v, want %v", plan.changed, wantChanged)
	}
	if running.LogLevel != "INFO" || running.PassingThreshold != 0 {
		t.Errorf("planReload modified the running config")
	}

	// An unreadable TLS file rejects the whole reload.
	bad := *loaded
	bad.HTTPSCertFile, bad.HTTPSKeyFile = "/nonexistent/cert.pem", "/nonexistent/key.pem"
	if _, err := planReload(running, &bad); err == nil || !strings.Contains(err.Error(), "TLS files for health checks") {
		t.Fatalf("bad TLS reload error = %v", err)
	}

	// Without a token key the token file from the environment is re-read on each reload.
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("from-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("CONSUL_HTTP_TOKEN_FILE", tokenFile)
	noToken := *loaded
	noToken.Token = ""
	plan, err = planReload(running, &noToken)
	if err != nil || plan.token != "from-file" {
		t.Fatalf("token from CONSUL_HTTP_TOKEN_FILE = %q, %v", plan.token, err)
	}
}

func writeConfig(t *testing.T, path, body string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestReloadInProcess reloads a running leader: thresholds and level change, restart-only keys are
// named and kept, leadership is untouched, and a broken file changes nothing.
func TestReloadInProcess(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	ra := startAgent(t, testConfig(srv))
	waitLeader(t, ra, 15*time.Second)
	before := ra.config()

	path := filepath.Join(t.TempDir(), "esm.hcl")
	writeConfig(t, path, fmt.Sprintf(`
http_addr = %q
log_level = "warn"
passing_threshold = 2
critical_threshold = 3
check_update_interval = "1m"
consul_kv_path = "moved"
consul_service_tag = "blue"
node_probe_interval = "1s" # testConfig's values: unchanged
instance_ttl = "3s"
instance_ttl_refresh = "300ms"
session_ttl = "2s"
lock_delay = "500ms"
`, srv.HTTPAddr))
	ra.opts.ConfigPaths = []string{path}
	ra.Reload()

	cfg := ra.config()
	if cfg.PassingThreshold != 2 || cfg.CriticalThreshold != 3 || cfg.CheckUpdateInterval != time.Minute || cfg.LogLevel != "WARN" {
		t.Errorf("reloadable settings not applied: %+v", cfg)
	}
	if cfg.KVPath != before.KVPath || cfg.Tag != before.Tag || cfg.InstanceID != before.InstanceID ||
		cfg.TTLRefreshInterval != before.TTLRefreshInterval || cfg.SessionTTL != before.SessionTTL {
		t.Errorf("restart-only settings changed: %+v", cfg)
	}
	if lvl := ra.logger.GetLevel(); lvl != hclog.Warn {
		t.Errorf("log level = %v, want WARN", lvl)
	}
	if want := `Config changes that need a restart were ignored: keys="consul_kv_path, consul_service_tag"`; !strings.Contains(ra.logs.String(), want) {
		t.Errorf("logs lack %q:\n%s", want, ra.logs.String())
	}
	if !ra.status.leader.Load() {
		t.Errorf("leadership lost by a reload")
	}

	writeConfig(t, path, `log_level = "LOUD"`)
	ra.Reload()
	if !strings.Contains(ra.logs.String(), "Failed to reload configuration, keeping the running configuration") {
		t.Errorf("broken reload not logged:\n%s", ra.logs.String())
	}
	if ra.config() != cfg {
		t.Errorf("a failed reload replaced the config")
	}
}

// syncBuffer collects a child process's output.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

var httpAddrLine = regexp.MustCompile(`Serving HTTP interface: address=(\S+)`)

// TestReloadSIGHUPRunningProcess drives the real binary against an ACL-enforcing Consul: SIGHUP
// switches the log level to DEBUG and rotates the ACL token (good → bad → good), and /health follows
// the token. SIGUSR1 dumps the in-memory metrics.
func TestReloadSIGHUPRunningProcess(t *testing.T) {
	t.Parallel()
	bin := esmBinary(t)
	srv := newTestConsul(t, func(c *testutil.TestServerConfig) {
		c.ACL.Enabled = true
		c.ACL.DefaultPolicy = "deny"
		c.ACL.Tokens.InitialManagement = "root"
	})
	// The ACL system bootstraps a moment after the leader election testutil waits for.
	rootClient, err := api.NewClient(&api.Config{Address: srv.HTTPAddr, Token: "root"})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 15*time.Second, func() error {
		_, err := rootClient.Agent().Self()
		return err
	})

	path := filepath.Join(t.TempDir(), "esm.hcl")
	conf := func(level, token string) string {
		return fmt.Sprintf(`
http_addr = %q
token = %q
log_level = %q
client_address = "127.0.0.1:0"
consul_kv_path = %q
telemetry {
  prometheus_retention_time = "1m"
  disable_hostname = true
}
`, srv.HTTPAddr, token, level, "esm-"+level+"/")
	}
	writeConfig(t, path, conf("INFO", "root"))

	out := &syncBuffer{}
	cmd := exec.Command(bin, "-config-file", path)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = append(os.Environ(), "CONSUL_HTTP_TOKEN=", "CONSUL_HTTP_TOKEN_FILE=")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("consul-esm output:\n%s", out.String())
		}
	})
	signal := func(sig syscall.Signal) {
		t.Helper()
		if err := cmd.Process.Signal(sig); err != nil {
			t.Fatalf("signal %v: %v", sig, err)
		}
	}
	waitOutput := func(want string) {
		t.Helper()
		waitFor(t, 15*time.Second, func() error {
			select {
			case err := <-exited:
				exited <- err
				return fmt.Errorf("consul-esm exited: %v", err)
			default:
			}
			if !strings.Contains(out.String(), want) {
				return fmt.Errorf("output lacks %q", want)
			}
			return nil
		})
	}
	var base string
	waitFor(t, 20*time.Second, func() error {
		if m := httpAddrLine.FindStringSubmatch(out.String()); m != nil {
			base = "http://" + m[1]
			return nil
		}
		return errNotYet
	})
	healthIs := func(want int, check func(healthReport) error) {
		t.Helper()
		waitFor(t, 15*time.Second, func() error {
			code, body := httpGet(t, base+"/health")
			if code != want {
				return fmt.Errorf("/health = %d %s", code, body)
			}
			var r healthReport
			if err := json.Unmarshal([]byte(body), &r); err != nil {
				return err
			}
			if check != nil {
				return check(r)
			}
			return nil
		})
	}
	healthIs(200, func(r healthReport) error {
		if !r.Leader {
			return fmt.Errorf("not leader yet")
		}
		return nil
	})
	if strings.Contains(out.String(), "[DEBUG]") {
		t.Fatalf("DEBUG lines at log_level INFO:\n%s", out.String())
	}

	// Bad token and DEBUG: the token is tried at once and rejected, so consul_error says why at once
	// (the status code turns 503 only when no call has succeeded for its window, 45 s here); the
	// second SIGHUP is logged at DEBUG, proving the new level.
	writeConfig(t, path, conf("DEBUG", "not-a-real-token"))
	signal(syscall.SIGHUP)
	waitOutput("Request to Consul with the reloaded ACL token failed")
	waitOutput(`Config changes that need a restart were ignored: keys=consul_kv_path`)
	healthIs(200, func(r healthReport) error {
		if !strings.Contains(r.ConsulError, "403") && !strings.Contains(r.ConsulError, "ACL not found") {
			return fmt.Errorf("consul_error = %q", r.ConsulError)
		}
		return nil
	})
	signal(syscall.SIGHUP)
	waitOutput("[DEBUG] consul-esm: Caught signal:hangup")

	writeConfig(t, path, conf("DEBUG", "root"))
	signal(syscall.SIGHUP)
	healthIs(200, func(r healthReport) error {
		if r.ConsulError != "" {
			return fmt.Errorf("consul_error = %q after a good token", r.ConsulError)
		}
		return nil
	})

	// go-metrics dumps only completed 10s intervals, so repeat the signal until one has completed.
	waitFor(t, 15*time.Second, func() error {
		if strings.Contains(out.String(), "[G] 'esm.agent.isLeader'") {
			return nil
		}
		signal(syscall.SIGUSR1)
		return errNotYet
	})

	code, body := httpGet(t, base+"/metrics")
	if code != 200 || !strings.Contains(body, "esm_agent_isLeader") {
		t.Fatalf("/metrics = %d, lacks esm_agent_isLeader", code)
	}
}
