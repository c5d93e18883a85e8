package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// clearConfigEnv makes the tests independent of the caller's environment.
func clearConfigEnv(t *testing.T) {
	t.Helper()
	for _, k := range []string{
		"CONSUL_ENABLEAGENTLESS", "CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE",
		"CONSUL_HTTP_AUTH", "CONSUL_HTTP_SSL", "CONSUL_HTTP_SSL_VERIFY", "CONSUL_CACERT", "CONSUL_CAPATH",
		"CONSUL_CLIENT_CERT", "CONSUL_CLIENT_KEY", "CONSUL_TLS_SERVER_NAME", "CONSUL_NAMESPACE",
		"CONSUL_PARTITION",
	} {
		t.Setenv(k, "")
		os.Unsetenv(k) // t.Setenv restores the original value at the end of the test
	}
}

func writeConfigFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func mustLoad(t *testing.T, paths ...string) *Config {
	t.Helper()
	c, err := LoadConfig(paths)
	if err != nil {
		t.Fatalf("LoadConfig(%v): %v", paths, err)
	}
	return c
}

func diffConfigs(t *testing.T, got, want *Config) {
	t.Helper()
	if reflect.DeepEqual(got, want) {
		return
	}
	gv, wv := reflect.ValueOf(*got), reflect.ValueOf(*want)
	for i := 0; i < gv.NumField(); i++ {
		if !reflect.DeepEqual(gv.Field(i).Interface(), wv.Field(i).Interface()) {
			t.Errorf("%s: got %#v, want %#v", gv.Type().Field(i).Name,
				gv.Field(i).Interface(), wv.Field(i).Interface())
		}
	}
}

func TestConfigDefaults(t *testing.T) {
	clearConfigEnv(t)
	c := mustLoad(t)
	want := &Config{
		LogLevel:                  "INFO",
		Service:                   "consul-esm",
		KVPath:                    "consul-esm/",
		NodeMeta:                  map[string]string{"external-node": "true"},
		NodeReconnectTimeout:      72 * time.Hour,
		NodeProbeInterval:         10 * time.Second,
		BatchFlushInterval:        500 * time.Millisecond,
		PingType:                  "udp",
		CheckUpdateInterval:       5 * time.Minute,
		Telemetry:                 TelemetryConfig{FilterDefault: true},
		NodeHealthRefreshInterval: time.Hour,
		PingTimeout:               5 * time.Second,
		AgentTTL:                  7 * time.Second,
		TTLRefreshInterval:        1500 * time.Millisecond,
		DeregisterAfter:           30 * time.Minute,
		RetryInterval:             10 * time.Second,
		SessionTTL:                15 * time.Second,
		LockDelay:                 500 * time.Millisecond,
		QueryWaitTime:             45 * time.Second,
		KeeperInterval:            30 * time.Second,
		ReapInterval:              30 * time.Second,
	}
	diffConfigs(t, c, want)
	diffConfigs(t, DefaultConfig(), want)

	// Each DefaultConfig owns its node meta map.
	a, b := DefaultConfig(), DefaultConfig()
	a.NodeMeta["x"] = "y"
	if _, ok := b.NodeMeta["x"]; ok {
		t.Fatal("DefaultConfig shares the NodeMeta map between calls")
	}
	if err := DefaultConfig().Validate(); err != nil {
		t.Fatalf("default config does not validate: %v", err)
	}
}

// configKeyCase is one file key written in HCL and in JSON, and what it does to the default config.
type configKeyCase struct {
	key  string
	hcl  string
	json string // a JSON object member, without the surrounding braces
	want func(c *Config)
}

func configKeyCases() []configKeyCase {
	return []configKeyCase{
		{"log_level", `log_level = "debug"`, `"log_level": "debug"`, func(c *Config) { c.LogLevel = "DEBUG" }},
		{"log_json", `log_json = true`, `"log_json": true`, func(c *Config) { c.LogJSON = true }},
		{"enable_syslog", `enable_syslog = true`, `"enable_syslog": true`, func(c *Config) {
			c.EnableSyslog = true
			c.SyslogFacility = "LOCAL0"
		}},
		{"syslog_facility", `syslog_facility = "LOCAL3"`, `"syslog_facility": "LOCAL3"`, func(c *Config) { c.SyslogFacility = "LOCAL3" }},
		{"log_file", `log_file = "/var/log/esm/"`, `"log_file": "/var/log/esm/"`, func(c *Config) { c.LogFile = "/var/log/esm/" }},
		{"log_rotate_bytes", `log_rotate_bytes = 1048576`, `"log_rotate_bytes": 1048576`, func(c *Config) { c.LogRotateBytes = 1048576 }},
		{"log_rotate_max_files", `log_rotate_max_files = -1`, `"log_rotate_max_files": -1`, func(c *Config) { c.LogRotateMaxFiles = -1 }},
		{"log_rotate_duration", `log_rotate_duration = "12h"`, `"log_rotate_duration": "12h"`, func(c *Config) { c.LogRotateDuration = 12 * time.Hour }},
		{"enable_debug", `enable_debug = true`, `"enable_debug": true`, func(c *Config) { c.EnableDebug = true }},
		{"enable_agentless", `enable_agentless = true`, `"enable_agentless": true`, func(c *Config) { c.EnableAgentless = true }},
		{"instance_id", `instance_id = "esm-1"`, `"instance_id": "esm-1"`, func(c *Config) { c.InstanceID = "esm-1" }},
		{"consul_service", `consul_service = "esm"`, `"consul_service": "esm"`, func(c *Config) { c.Service = "esm" }},
		{"consul_service_tag", `consul_service_tag = "blue"`, `"consul_service_tag": "blue"`, func(c *Config) { c.Tag = "blue" }},
		{"consul_kv_path", `consul_kv_path = "custom/esm/"`, `"consul_kv_path": "custom/esm/"`, func(c *Config) { c.KVPath = "custom/esm/" }},
		{"external_node_meta", "external_node_meta {\n  \"role\" = \"ext\"\n  zone = \"a\"\n}",
			`"external_node_meta": {"role": "ext", "zone": "a"}`,
			func(c *Config) { c.NodeMeta = map[string]string{"role": "ext", "zone": "a"} }},
		{"partition", `partition = "part1"`, `"partition": "part1"`, func(c *Config) { c.Partition = "part1" }},
		{"node_reconnect_timeout", `node_reconnect_timeout = "8h"`, `"node_reconnect_timeout": "8h"`, func(c *Config) { c.NodeReconnectTimeout = 8 * time.Hour }},
		{"node_probe_interval", `node_probe_interval = "2s"`, `"node_probe_interval": "2s"`, func(c *Config) { c.NodeProbeInterval = 2 * time.Second }},
		{"node_probe_port", `node_probe_port = 443`, `"node_probe_port": 443`, func(c *Config) { c.NodeProbePort = 443 }},
		{"batch_flush_interval", `batch_flush_interval = "0s"`, `"batch_flush_interval": "0s"`, func(c *Config) { c.BatchFlushInterval = 0 }},
		{"http_addr", `http_addr = "https://127.0.0.1:8501"`, `"http_addr": "https://127.0.0.1:8501"`, func(c *Config) { c.HTTPAddr = "https://127.0.0.1:8501" }},
		{"token", `token = "secret"`, `"token": "secret"`, func(c *Config) { c.Token = "secret" }},
		{"datacenter", `datacenter = "dc2"`, `"datacenter": "dc2"`, func(c *Config) { c.Datacenter = "dc2" }},
		{"ca_file", `ca_file = "/ca.pem"`, `"ca_file": "/ca.pem"`, func(c *Config) { c.CAFile = "/ca.pem" }},
		{"ca_path", `ca_path = "/cas"`, `"ca_path": "/cas"`, func(c *Config) { c.CAPath = "/cas" }},
		{"cert_file", `cert_file = "/cert.pem"`, `"cert_file": "/cert.pem"`, func(c *Config) { c.CertFile = "/cert.pem" }},
		{"key_file", `key_file = "/key.pem"`, `"key_file": "/key.pem"`, func(c *Config) { c.KeyFile = "/key.pem" }},
		{"tls_server_name", `tls_server_name = "consul.local"`, `"tls_server_name": "consul.local"`, func(c *Config) { c.TLSServerName = "consul.local" }},
		{"https_ca_file", `https_ca_file = "/hca.pem"`, `"https_ca_file": "/hca.pem"`, func(c *Config) { c.HTTPSCAFile = "/hca.pem" }},
		{"https_ca_path", `https_ca_path = "/hcas"`, `"https_ca_path": "/hcas"`, func(c *Config) { c.HTTPSCAPath = "/hcas" }},
		{"https_cert_file", `https_cert_file = "/hcert.pem"`, `"https_cert_file": "/hcert.pem"`, func(c *Config) { c.HTTPSCertFile = "/hcert.pem" }},
		{"https_key_file", `https_key_file = "/hkey.pem"`, `"https_key_file": "/hkey.pem"`, func(c *Config) { c.HTTPSKeyFile = "/hkey.pem" }},
		{"client_address", `client_address = "127.0.0.1:8080"`, `"client_address": "127.0.0.1:8080"`, func(c *Config) { c.ClientAddress = "127.0.0.1:8080" }},
		{"ping_type", `ping_type = "socket"`, `"ping_type": "socket"`, func(c *Config) { c.PingType = "socket" }},
		{"disable_coordinate_updates", `disable_coordinate_updates = true`, `"disable_coordinate_updates": true`, func(c *Config) { c.DisableCoordinateUpdates = true }},
		{"stale_read_nodes", `stale_read_nodes = true`, `"stale_read_nodes": true`, func(c *Config) { c.StaleReadNodes = true }},
		{"passing_threshold", `passing_threshold = 3`, `"passing_threshold": 3`, func(c *Config) { c.PassingThreshold = 3 }},
		{"critical_threshold", `critical_threshold = 2`, `"critical_threshold": 2`, func(c *Config) { c.CriticalThreshold = 2 }},
		{"check_update_interval", `check_update_interval = "0s"`, `"check_update_interval": "0s"`, func(c *Config) { c.CheckUpdateInterval = 0 }},
		{"instance_ttl", `instance_ttl = "20s"`, `"instance_ttl": "20s"`, func(c *Config) { c.AgentTTL = 20 * time.Second }},
		{"instance_ttl_refresh", `instance_ttl_refresh = "2s"`, `"instance_ttl_refresh": "2s"`, func(c *Config) { c.TTLRefreshInterval = 2 * time.Second }},
		{"session_ttl", `session_ttl = "15s"`, `"session_ttl": "15s"`, func(c *Config) { c.SessionTTL = 15 * time.Second }},
		{"lock_delay", `lock_delay = "15s"`, `"lock_delay": "15s"`, func(c *Config) { c.LockDelay = 15 * time.Second }},
		{"tls_expiry_warning", `tls_expiry_warning = "336h"`, `"tls_expiry_warning": "336h"`, func(c *Config) { c.TLSExpiryWarning = 336 * time.Hour }},
		{"telemetry", "telemetry {\n}", `"telemetry": {}`, func(c *Config) { c.Telemetry = TelemetryConfig{FilterDefault: true} }},

		// telemetry.<key>: each alone in a block; the rest of the block keeps its defaults.
		telemetryKeyCase("circonus_api_app", `"app"`, func(t *TelemetryConfig) { t.CirconusAPIApp = "app" }),
		telemetryKeyCase("circonus_api_token", `"tok"`, func(t *TelemetryConfig) { t.CirconusAPIToken = "tok" }),
		telemetryKeyCase("circonus_api_url", `"https://circonus.invalid/v2"`, func(t *TelemetryConfig) { t.CirconusAPIURL = "https://circonus.invalid/v2" }),
		telemetryKeyCase("circonus_broker_id", `"35"`, func(t *TelemetryConfig) { t.CirconusBrokerID = "35" }),
		telemetryKeyCase("circonus_broker_select_tag", `"dc:sfo1"`, func(t *TelemetryConfig) { t.CirconusBrokerSelectTag = "dc:sfo1" }),
		telemetryKeyCase("circonus_check_display_name", `"esm"`, func(t *TelemetryConfig) { t.CirconusCheckDisplayName = "esm" }),
		telemetryKeyCase("circonus_check_force_metric_activation", `"true"`, func(t *TelemetryConfig) { t.CirconusCheckForceMetricActivation = "true" }),
		telemetryKeyCase("circonus_check_id", `"12"`, func(t *TelemetryConfig) { t.CirconusCheckID = "12" }),
		telemetryKeyCase("circonus_check_instance_id", `"host:esm"`, func(t *TelemetryConfig) { t.CirconusCheckInstanceID = "host:esm" }),
		telemetryKeyCase("circonus_check_search_tag", `"service:esm"`, func(t *TelemetryConfig) { t.CirconusCheckSearchTag = "service:esm" }),
		telemetryKeyCase("circonus_check_tags", `"a:b,c:d"`, func(t *TelemetryConfig) { t.CirconusCheckTags = "a:b,c:d" }),
		telemetryKeyCase("circonus_submission_interval", `"10s"`, func(t *TelemetryConfig) { t.CirconusSubmissionInterval = "10s" }),
		telemetryKeyCase("circonus_submission_url", `"https://sub.invalid/"`, func(t *TelemetryConfig) { t.CirconusSubmissionURL = "https://sub.invalid/" }),
		telemetryKeyCase("disable_hostname", `true`, func(t *TelemetryConfig) { t.DisableHostname = true }),
		telemetryKeyCase("dogstatsd_addr", `"127.0.0.1:8125"`, func(t *TelemetryConfig) { t.DogstatsdAddr = "127.0.0.1:8125" }),
		telemetryKeyCase("dogstatsd_tags", `["env:test", "team:x"]`, func(t *TelemetryConfig) { t.DogstatsdTags = []string{"env:test", "team:x"} }),
		telemetryKeyCase("filter_default", `false`, func(t *TelemetryConfig) { t.FilterDefault = false }),
		telemetryKeyCase("prefix_filter", `["+esm.checks", "-esm.agent", "+runtime"]`, func(t *TelemetryConfig) {
			t.PrefixFilter = []string{"+esm.checks", "-esm.agent", "+runtime"}
			t.AllowedPrefixes = []string{"esm.checks", "runtime"}
			t.BlockedPrefixes = []string{"esm.agent"}
		}),
		telemetryKeyCase("metrics_prefix", `"myesm"`, func(t *TelemetryConfig) { t.MetricsPrefix = "myesm" }),
		telemetryKeyCase("per_check_metrics", `true`, func(t *TelemetryConfig) { t.PerCheckMetrics = true }),
		telemetryKeyCase("prometheus_retention_time", `"1m"`, func(t *TelemetryConfig) { t.PrometheusRetentionTime = time.Minute }),
		telemetryKeyCase("statsd_address", `"127.0.0.1:8126"`, func(t *TelemetryConfig) { t.StatsdAddr = "127.0.0.1:8126" }),
		telemetryKeyCase("statsite_address", `"127.0.0.1:8127"`, func(t *TelemetryConfig) { t.StatsiteAddr = "127.0.0.1:8127" }),
	}
}

// telemetryKeyCase builds a case for one telemetry key; value is valid in both HCL and JSON.
func telemetryKeyCase(key, value string, want func(*TelemetryConfig)) configKeyCase {
	return configKeyCase{
		key:  "telemetry." + key,
		hcl:  fmt.Sprintf("telemetry {\n  %s = %s\n}", key, value),
		json: fmt.Sprintf(`"telemetry": {%q: %s}`, key, value),
		want: func(c *Config) {
			c.Telemetry = TelemetryConfig{FilterDefault: true}
			want(&c.Telemetry)
		},
	}
}

func TestConfigEveryKeyRoundTrips(t *testing.T) {
	clearConfigEnv(t)
	cases := configKeyCases()

	// The table must cover every key the loader knows, and nothing else.
	covered := map[string]bool{}
	for _, tc := range cases {
		if covered[tc.key] {
			t.Errorf("key %q appears twice in the table", tc.key)
		}
		covered[tc.key] = true
	}
	for _, k := range configFileKeys() {
		if !covered[k] {
			t.Errorf("configFileKeys has %q but the round-trip table does not", k)
		}
		delete(covered, k)
	}
	for k := range covered {
		t.Errorf("round-trip table has %q which configFileKeys does not list", k)
	}

	for _, tc := range cases {
		t.Run(tc.key, func(t *testing.T) {
			want := DefaultConfig()
			tc.want(want)
			dir := t.TempDir()
			hclPath := writeConfigFile(t, dir, "a.hcl", tc.hcl+"\n")
			jsonPath := writeConfigFile(t, dir, "a.json", "{"+tc.json+"}\n")
			t.Run("hcl", func(t *testing.T) { diffConfigs(t, mustLoad(t, hclPath), want) })
			t.Run("json", func(t *testing.T) { diffConfigs(t, mustLoad(t, jsonPath), want) })
		})
	}

	// All keys together in one file, HCL and JSON, give the same config (telemetry keys go in one block).
	var hclLines, jsonMembers, telHCL, telJSON []string
	want := DefaultConfig()
	wantTel := TelemetryConfig{FilterDefault: true}
	for _, tc := range cases {
		switch {
		case tc.key == "telemetry":
		case strings.HasPrefix(tc.key, "telemetry."):
			line := strings.TrimSpace(strings.Split(tc.hcl, "\n")[1])
			telHCL = append(telHCL, line)
			telJSON = append(telJSON, strings.TrimSuffix(strings.TrimPrefix(tc.json, `"telemetry": {`), "}"))
			tmp := DefaultConfig()
			tc.want(tmp)
			applyTelemetryField(&wantTel, tmp.Telemetry)
		default:
			hclLines = append(hclLines, tc.hcl)
			jsonMembers = append(jsonMembers, tc.json)
			tc.want(want)
		}
	}
	want.Telemetry = wantTel
	hclLines = append(hclLines, "telemetry {\n"+strings.Join(telHCL, "\n")+"\n}")
	jsonMembers = append(jsonMembers, `"telemetry": {`+strings.Join(telJSON, ", ")+"}")
	dir := t.TempDir()
	hclPath := writeConfigFile(t, dir, "all.hcl", strings.Join(hclLines, "\n")+"\n")
	jsonPath := writeConfigFile(t, dir, "all.json", "{\n"+strings.Join(jsonMembers, ",\n")+"\n}\n")
	t.Run("all-keys/hcl", func(t *testing.T) { diffConfigs(t, mustLoad(t, hclPath), want) })
	t.Run("all-keys/json", func(t *testing.T) { diffConfigs(t, mustLoad(t, jsonPath), want) })
}

// applyTelemetryField copies the fields of src that differ from the telemetry defaults into dst.
func applyTelemetryField(dst *TelemetryConfig, src TelemetryConfig) {
	def := TelemetryConfig{FilterDefault: true}
	dv, sv, zv := reflect.ValueOf(dst).Elem(), reflect.ValueOf(src), reflect.ValueOf(def)
	for i := 0; i < sv.NumField(); i++ {
		if !reflect.DeepEqual(sv.Field(i).Interface(), zv.Field(i).Interface()) {
			dv.Field(i).Set(sv.Field(i))
		}
	}
}

func TestConfigMergeOrder(t *testing.T) {
	clearConfigEnv(t)
	dir := t.TempDir()
	first := writeConfigFile(t, dir, "first.hcl", `
log_level = "DEBUG"
consul_service = "svc-a"
passing_threshold = 2
node_probe_interval = "5s"
external_node_meta {
  a = "1"
  b = "2"
}
telemetry {
  statsd_address = "127.0.0.1:1"
  metrics_prefix = "p1"
  filter_default = false
}
`)
	second := writeConfigFile(t, dir, "second.json", `{
  "consul_service": "svc-b",
  "external_node_meta": {"c": "3"},
  "telemetry": {"metrics_prefix": "p2"}
}`)
	third := writeConfigFile(t, dir, "third.hcl", `passing_threshold = 0`)

	c := mustLoad(t, first, second, third)
	want := DefaultConfig()
	want.LogLevel = "DEBUG"                                                    // only in first: kept
	want.Service = "svc-b"                                                     // later file wins
	want.PassingThreshold = 0                                                  // a later explicit zero overrides
	want.NodeProbeInterval = 5 * time.Second                                   // unset later: not reset
	want.NodeMeta = map[string]string{"c": "3"}                                // block replaced wholesale
	want.Telemetry = TelemetryConfig{FilterDefault: true, MetricsPrefix: "p2"} // block replaced wholesale
	diffConfigs(t, c, want)

	// Reversed order: the first file's values win now.
	c = mustLoad(t, second, first)
	if c.Service != "svc-a" || c.Telemetry.MetricsPrefix != "p1" || c.Telemetry.StatsdAddr != "127.0.0.1:1" ||
		c.Telemetry.FilterDefault || !reflect.DeepEqual(c.NodeMeta, map[string]string{"a": "1", "b": "2"}) {
		t.Fatalf("reversed merge wrong: %+v", c)
	}

	// Files and directories share one ordered list.
	sub := filepath.Join(dir, "conf.d")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	writeConfigFile(t, sub, "10.hcl", `consul_service = "from-dir"`+"\n"+`consul_service_tag = "t"`)
	c = mustLoad(t, first, sub, second)
	if c.Service != "svc-b" || c.Tag != "t" || c.LogLevel != "DEBUG" {
		t.Fatalf("file,dir,file merge wrong: service=%q tag=%q level=%q", c.Service, c.Tag, c.LogLevel)
	}
	c = mustLoad(t, second, sub)
	if c.Service != "from-dir" {
		t.Fatalf("dir after file should win, got %q", c.Service)
	}

	// A scalar repeated inside one file: the last one wins.
	dup := writeConfigFile(t, dir, "dup.hcl", "consul_service = \"x\"\nconsul_service = \"y\"\n")
	if c := mustLoad(t, dup); c.Service != "y" {
		t.Fatalf("repeated key: got %q, want y", c.Service)
	}
}

func TestConfigDirectoryWalk(t *testing.T) {
	clearConfigEnv(t)
	dir := t.TempDir()
	// Sorted by name: 01 < 02 < 10 < b. The later one wins for consul_service.
	writeConfigFile(t, dir, "10-last.hcl", `consul_service = "ten"`)
	writeConfigFile(t, dir, "02-second.json", `{"consul_service": "two", "consul_service_tag": "json"}`)
	writeConfigFile(t, dir, "01-first.hcl", `consul_service = "one"`+"\n"+`instance_id = "i1"`)
	writeConfigFile(t, dir, "b.txt", `this is not config at all {{{`)
	writeConfigFile(t, dir, "c.hcl.bak", `consul_service = "backup"`)
	writeConfigFile(t, dir, "d.HCL", `consul_service = "upper"`)
	writeConfigFile(t, dir, "empty.hcl", "")
	writeConfigFile(t, dir, "empty.json", "")
	nested := filepath.Join(dir, "nested.hcl") // a directory whose name looks like a config file
	if err := os.Mkdir(nested, 0o755); err != nil {
		t.Fatal(err)
	}
	writeConfigFile(t, nested, "x.hcl", `consul_service = "nested"`)
	sub := filepath.Join(dir, "sub")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	writeConfigFile(t, sub, "zz.hcl", `consul_service = "sub"`)

	c := mustLoad(t, dir)
	if c.Service != "ten" || c.Tag != "json" || c.InstanceID != "i1" {
		t.Fatalf("dir walk: service=%q tag=%q instance=%q", c.Service, c.Tag, c.InstanceID)
	}

	// Other extensions are ignored even when named explicitly; so are empty files.
	for _, name := range []string{"b.txt", "c.hcl.bak", "d.HCL", "empty.hcl", "empty.json"} {
		c := mustLoad(t, filepath.Join(dir, name))
		diffConfigs(t, c, DefaultConfig())
	}

	// An empty directory is fine.
	diffConfigs(t, mustLoad(t, t.TempDir()), DefaultConfig())

	// A broken file inside a directory is reported with its own path.
	bad := t.TempDir()
	writeConfigFile(t, bad, "a.hcl", `consul_service = "ok"`)
	badFile := writeConfigFile(t, bad, "b.hcl", `stuff = 1`)
	_, err := LoadConfig([]string{bad})
	want := fmt.Sprintf(`error in %q: unknown key "stuff"`, badFile)
	if err == nil || err.Error() != want {
		t.Fatalf("got %v, want %s", err, want)
	}
}

func TestConfigLoadErrors(t *testing.T) {
	clearConfigEnv(t)
	dir := t.TempDir()
	missing := filepath.Join(dir, "nope.hcl")

	cases := []struct {
		name    string
		content string // written to <dir>/<name>
		want    string // full text after `error in "<path>": `
	}{
		{"unknown.hcl", "stuff = 1\n", `unknown key "stuff"`},
		{"unknown.json", `{"stuff": 1}`, `unknown key "stuff"`},
		{"unknown2.hcl", "foo = 1\nbar = 2\n", `unknown keys "foo", "bar"`},
		{"unknown-tel.hcl", "telemetry {\n  stuff = 1\n}\n", `unknown key "telemetry.stuff"`},
		{"unknown-tel.json", `{"telemetry": {"stuff": 1}}`, `unknown key "telemetry.stuff"`},
		{"two-meta.hcl", "external_node_meta {\n a = \"1\"\n}\nexternal_node_meta {\n b = \"2\"\n}\n", "only one node_meta block allowed"},
		{"two-meta.json", `{"external_node_meta": [{"a": "1"}, {"b": "2"}]}`, "only one node_meta block allowed"},
		{"two-tel.hcl", "telemetry {\n}\ntelemetry {\n}\n", "only one telemetry block allowed"},
		{"two-tel.json", `{"telemetry": [{"metrics_prefix": "a"}, {"metrics_prefix": "b"}]}`, "only one telemetry block allowed"},
		{"bad-dur.hcl", "node_reconnect_timeout = \"forever\"\n",
			`node_reconnect_timeout: invalid duration: "forever": time: invalid duration "forever"`},
		{"bad-dur.json", `{"node_probe_interval": "10"}`,
			`node_probe_interval: invalid duration: "10": time: missing unit in duration "10"`},
		{"int-dur.hcl", "check_update_interval = 10\n",
			`check_update_interval: invalid duration: "10": time: missing unit in duration "10"`},
		{"bad-tls-expiry.hcl", "tls_expiry_warning = \"2 weeks\"\n",
			`tls_expiry_warning: invalid duration: "2 weeks": time: unknown unit " weeks" in duration "2 weeks"`},
		{"bad-dur2.hcl", "batch_flush_interval = \"1 second\"\n",
			`batch_flush_interval: invalid duration: "1 second": time: unknown unit " second" in duration "1 second"`},
		{"bad-retention.hcl", "telemetry {\n  prometheus_retention_time = \"1x\"\n}\n",
			`prometheus_retention_time: invalid duration: "1x": time: unknown unit "x" in duration "1x"`},
		{"bad-int.hcl", "passing_threshold = \"three\"\n", `passing_threshold: expected an integer, got "three"`},
		{"bad-int.json", `{"critical_threshold": 1.5}`, `critical_threshold: expected an integer, got a float`},
		{"bad-bool.hcl", "log_json = \"maybe\"\n", `log_json: expected a boolean, got "maybe"`},
		{"bad-bool.json", `{"log_json": 1}`, `log_json: expected a boolean, got a number`},
		{"bad-string.hcl", "consul_service = true\n", `consul_service: expected a string, got a boolean`},
		{"bad-string.json", `{"token": ["a"]}`, `token: expected a string, got a list`},
		{"bad-list.hcl", "telemetry {\n  dogstatsd_tags = [1, true]\n}\n", `dogstatsd_tags: element 1: expected a string, got a boolean`},
		{"bad-meta.hcl", "external_node_meta = \"x\"\n", `external_node_meta: expected a block, got a string`},
		{"bad-meta-val.json", `{"external_node_meta": {"a": ["b"]}}`, `external_node_meta: a: expected a string, got a list`},
		{"label.hcl", "telemetry \"x\" {\n}\n", `telemetry: unexpected nested key "x"`},
		{"syntax.hcl", "log_level = \"a\n", "error parsing: "},
		{"syntax2.hcl", "telemetry {\n", "error parsing: "},
		{"syntax.json", `{"log_level": "INFO}`, "error parsing: "},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := writeConfigFile(t, dir, tc.name, tc.content)
			_, err := LoadConfig([]string{p})
			if err == nil {
				t.Fatal("expected an error")
			}
			var le *LoadError
			if !errors.As(err, &le) {
				t.Fatalf("error %v (%T) is not a *LoadError", err, err)
			}
			var ve *ValidationError
			if errors.As(err, &ve) {
				t.Fatalf("error %v is also a *ValidationError", err)
			}
			prefix := fmt.Sprintf("error in %q: ", p)
			if !strings.HasPrefix(err.Error(), prefix) {
				t.Fatalf("error %q does not start with %q", err, prefix)
			}
			rest := strings.TrimPrefix(err.Error(), prefix)
			if strings.HasSuffix(tc.want, ": ") {
				if !strings.HasPrefix(rest, tc.want) {
					t.Fatalf("got %q, want prefix %q", rest, tc.want)
				}
			} else if rest != tc.want {
				t.Fatalf("got %q\nwant %q", rest, tc.want)
			}
		})
	}

	t.Run("missing path", func(t *testing.T) {
		_, err := LoadConfig([]string{missing})
		var le *LoadError
		if !errors.As(err, &le) || le.Op != "reading" || le.Path != missing {
			t.Fatalf("got %v", err)
		}
		if want := fmt.Sprintf("error reading %q: ", missing); !strings.HasPrefix(err.Error(), want) {
			t.Fatalf("got %q, want prefix %q", err, want)
		}
		if !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("error does not unwrap to ErrNotExist: %v", err)
		}
	})

	t.Run("failing file stops loading", func(t *testing.T) {
		good := writeConfigFile(t, dir, "good.hcl", `consul_service = "x"`)
		bad := writeConfigFile(t, dir, "badtail.hcl", "consul_service = \"y\"\nstuff = 1\n")
		if c, err := LoadConfig([]string{good, bad}); err == nil || c != nil {
			t.Fatalf("got %v, %v", c, err)
		}
	})
}

func TestConfigValidation(t *testing.T) {
	clearConfigEnv(t)
	cases := []struct {
		name string
		hcl  string
		want string
	}{
		{"ping type", `ping_type = "icmp"`, `ping_type must be one of either "udp" or "socket"`},
		{"ping type case", `ping_type = "UDP"`, `ping_type must be one of either "udp" or "socket"`},
		{"probe interval", `node_probe_interval = "999ms"`, `node_probe_interval cannot be lower than 1 second`},
		{"probe interval negative", `node_probe_interval = "-5s"`, `node_probe_interval cannot be lower than 1 second`},
		{"probe port negative", `node_probe_port = -1`,
			`node_probe_port -1 is not a valid port: must be between 1 and 65535, or 0 to ping with ICMP`},
		{"probe port range", `node_probe_port = 65536`,
			`node_probe_port 65536 is not a valid port: must be between 1 and 65535, or 0 to ping with ICMP`},
		{"passing threshold", `passing_threshold = -1`, `passing_threshold cannot be negative`},
		{"critical threshold", `critical_threshold = -2`, `critical_threshold cannot be negative`},
		{"log level", `log_level = "verbose"`,
			`invalid log_level "verbose": must be one of TRACE, DEBUG, INFO, WARN, ERR, ERROR (case-insensitive)`},
		{"log level empty", `log_level = ""`,
			`invalid log_level "": must be one of TRACE, DEBUG, INFO, WARN, ERR, ERROR (case-insensitive)`},
		{"empty service", `consul_service = ""`, `consul_service cannot be empty`},
		{"blank service", `consul_service = "  "`, `consul_service cannot be empty`},
		{"empty node meta", "external_node_meta {\n}\n", `external_node_meta cannot be empty: it selects which nodes are external`},
		{"negative reconnect", `node_reconnect_timeout = "-1h"`, `node_reconnect_timeout cannot be negative`},
		{"negative rotate", `log_rotate_duration = "-1s"`, `log_rotate_duration cannot be negative`},
		{"negative check update", `check_update_interval = "-1s"`, `check_update_interval cannot be negative`},
		{"ttl refresh too short", `instance_ttl_refresh = "10ms"`, `instance_ttl_refresh "10ms" must be at least 100ms`},
		{"ttl under two refreshes", "instance_ttl = \"5s\"\ninstance_ttl_refresh = \"3s\"", `instance_ttl "5s" must be at least twice instance_ttl_refresh (3s)`},
		{"session ttl too short", `session_ttl = "500ms"`, `session_ttl "500ms" must be between 1s and 24h0m0s`},
		{"session ttl too long", `session_ttl = "25h"`, `session_ttl "25h0m0s" must be between 1s and 24h0m0s`},
		{"negative lock delay", `lock_delay = "-1s"`, `lock_delay "-1s" must be between 0s and 1m0s`},
		{"lock delay too long", `lock_delay = "61s"`, `lock_delay "1m1s" must be between 0s and 1m0s`},
		{"negative tls expiry warning", `tls_expiry_warning = "-1h"`,
			`tls_expiry_warning "-1h0m0s" cannot be negative: it is how long before a certificate expires its checks turn warning (0 turns this off)`},
		{"negative retention", "telemetry {\n prometheus_retention_time = \"-1m\"\n}", `telemetry.prometheus_retention_time cannot be negative`},
		{"client address no port", `client_address = "127.0.0.1"`,
			`client_address "127.0.0.1" is not a valid host:port: address 127.0.0.1: missing port in address`},
		{"client address bad port", `client_address = "127.0.0.1:http"`,
			`client_address "127.0.0.1:http" is not a valid host:port: invalid port "http"`},
		{"client address port range", `client_address = "127.0.0.1:70000"`,
			`client_address "127.0.0.1:70000" is not a valid host:port: invalid port "70000"`},
		{"syslog facility", `syslog_facility = "LOCAL9"`,
			`invalid syslog_facility "LOCAL9": must be one of KERN, USER, MAIL, DAEMON, AUTH, SYSLOG, LPR, NEWS, UUCP, CRON, AUTHPRIV, FTP, LOCAL0, LOCAL1, LOCAL2, LOCAL3, LOCAL4, LOCAL5, LOCAL6, LOCAL7 (case-insensitive)`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := writeConfigFile(t, t.TempDir(), "v.hcl", tc.hcl+"\n")
			_, err := LoadConfig([]string{p})
			var ve *ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("got %v (%T), want a *ValidationError", err, err)
			}
			var le *LoadError
			if errors.As(err, &le) {
				t.Fatalf("validation error is also a *LoadError: %v", err)
			}
			if err.Error() != tc.want {
				t.Fatalf("got  %q\nwant %q", err.Error(), tc.want)
			}
		})
	}

	// Validate also works on a config built in code.
	c := DefaultConfig()
	c.PingType = "tcp"
	if err := c.Validate(); err == nil || err.Error() != `ping_type must be one of either "udp" or "socket"` {
		t.Fatalf("Validate: %v", err)
	}

	valid := []struct {
		name  string
		hcl   string
		check func(c *Config) bool
	}{
		{"log level case-insensitive", `log_level = "warn"`, func(c *Config) bool { return c.LogLevel == "WARN" }},
		{"log level ERR means ERROR", `log_level = "err"`, func(c *Config) bool { return c.LogLevel == "ERROR" }},
		{"log level trace", `log_level = "Trace"`, func(c *Config) bool { return c.LogLevel == "TRACE" }},
		{"probe interval 1s", `node_probe_interval = "1s"`, func(c *Config) bool { return c.NodeProbeInterval == time.Second }},
		{"thresholds zero", "passing_threshold = 0\ncritical_threshold = 0", func(c *Config) bool { return true }},
		{"client address any host", `client_address = ":8080"`, func(c *Config) bool { return c.ClientAddress == ":8080" }},
		{"client address ipv6", `client_address = "[::1]:8080"`, func(c *Config) bool { return true }},
		{"syslog facility lower", `syslog_facility = "daemon"`, func(c *Config) bool { return c.SyslogFacility == "daemon" }},
		{"syslog default facility", `enable_syslog = true`, func(c *Config) bool { return c.SyslogFacility == "LOCAL0" }},
		{"syslog facility kept", "enable_syslog = true\nsyslog_facility = \"USER\"", func(c *Config) bool { return c.SyslogFacility == "USER" }},
		{"negative batch flush is default", `batch_flush_interval = "-1s"`, func(c *Config) bool { return c.BatchFlushInterval == 500*time.Millisecond }},
		{"batch flush zero disables", `batch_flush_interval = "0"`, func(c *Config) bool { return c.BatchFlushInterval == 0 }},
		{"check update zero", `check_update_interval = "0s"`, func(c *Config) bool { return c.CheckUpdateInterval == 0 }},
	}
	for _, tc := range valid {
		t.Run(tc.name, func(t *testing.T) {
			p := writeConfigFile(t, t.TempDir(), "v.hcl", tc.hcl+"\n")
			c := mustLoad(t, p)
			if !tc.check(c) {
				t.Fatalf("unexpected config: %+v", c)
			}
		})
	}
}

func TestConfigKVPathSlash(t *testing.T) {
	clearConfigEnv(t)
	for in, want := range map[string]string{
		"esm":         "esm/",
		"esm/":        "esm/",
		"a/b/c":       "a/b/c/",
		"consul-esm/": "consul-esm/",
	} {
		p := writeConfigFile(t, t.TempDir(), "kv.hcl", fmt.Sprintf("consul_kv_path = %q\n", in))
		if got := mustLoad(t, p).KVPath; got != want {
			t.Errorf("consul_kv_path %q: got %q, want %q", in, got, want)
		}
	}
	if got := mustLoad(t).KVPath; got != "consul-esm/" {
		t.Errorf("default kv path %q", got)
	}
}

func TestConfigTelemetry(t *testing.T) {
	clearConfigEnv(t)
	dir := t.TempDir()

	p := writeConfigFile(t, dir, "t.hcl", `
telemetry {
  prefix_filter = ["+esm.agent", "", "esm.nodes", "-esm.checks", "+", "-runtime"]
  prometheus_retention_time = "30s"
}
`)
	c := mustLoad(t, p)
	tel := c.Telemetry
	if !reflect.DeepEqual(tel.AllowedPrefixes, []string{"esm.agent", ""}) {
		t.Errorf("allowed = %q", tel.AllowedPrefixes)
	}
	if !reflect.DeepEqual(tel.BlockedPrefixes, []string{"esm.checks", "runtime"}) {
		t.Errorf("blocked = %q", tel.BlockedPrefixes)
	}
	if !tel.FilterDefault {
		t.Error("filter_default should default to true inside a telemetry block")
	}
	if tel.PrometheusRetentionTime != 30*time.Second {
		t.Errorf("retention %v", tel.PrometheusRetentionTime)
	}
	wantWarn := []string{
		"Cannot have empty filter rule in prefix_filter",
		`Filter rule must begin with either '+' or '-': "esm.nodes"`,
	}
	if !reflect.DeepEqual(c.Warnings, wantWarn) {
		t.Errorf("warnings = %q, want %q", c.Warnings, wantWarn)
	}

	// No warnings without bad rules; filter_default can be turned off explicitly.
	p2 := writeConfigFile(t, dir, "t2.json", `{"telemetry": {"filter_default": false, "prefix_filter": "+esm"}}`)
	c = mustLoad(t, p2)
	if len(c.Warnings) != 0 || c.Telemetry.FilterDefault ||
		!reflect.DeepEqual(c.Telemetry.AllowedPrefixes, []string{"esm"}) {
		t.Errorf("got %+v warnings %q", c.Telemetry, c.Warnings)
	}

	// Warnings of every file are kept.
	c = mustLoad(t, p, p2)
	if !reflect.DeepEqual(c.Warnings, wantWarn) {
		t.Errorf("warnings after two files = %q", c.Warnings)
	}

	// Bad retention: the original's message, wrapped with the file.
	bad := writeConfigFile(t, dir, "bad.hcl", "telemetry {\n  prometheus_retention_time = \"soon\"\n}\n")
	_, err := LoadConfig([]string{bad})
	want := fmt.Sprintf(`error in %q: prometheus_retention_time: invalid duration: "soon": time: invalid duration "soon"`, bad)
	if err == nil || err.Error() != want {
		t.Fatalf("got %v\nwant %s", err, want)
	}
}

func TestConfigEnableAgentlessEnv(t *testing.T) {
	clearConfigEnv(t)
	dir := t.TempDir()
	on := writeConfigFile(t, dir, "on.hcl", "enable_agentless = true\n")
	off := writeConfigFile(t, dir, "off.hcl", "enable_agentless = false\n")
	other := writeConfigFile(t, dir, "other.hcl", "consul_service = \"x\"\n")

	cases := []struct {
		name  string
		env   string // "-" = unset
		paths []string
		want  bool
	}{
		{"unset, no file", "-", nil, false},
		{"env true, no file", "true", nil, true},
		{"env 1", "1", []string{other}, true},
		{"env TRUE", "TRUE", nil, true},
		{"env false", "false", nil, false},
		{"env empty", "", nil, false},
		{"file false wins over env true", "true", []string{off}, false},
		{"file true wins over env false", "false", []string{on}, true},
		{"file true, env unset", "-", []string{on}, true},
		{"set in an earlier file still wins", "true", []string{off, other}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("CONSUL_ENABLEAGENTLESS", tc.env)
			if tc.env == "-" {
				os.Unsetenv("CONSUL_ENABLEAGENTLESS")
			}
			c := mustLoad(t, tc.paths...)
			if c.EnableAgentless != tc.want {
				t.Fatalf("EnableAgentless = %v, want %v", c.EnableAgentless, tc.want)
			}
		})
	}

	t.Run("invalid env", func(t *testing.T) {
		t.Setenv("CONSUL_ENABLEAGENTLESS", "sometimes")
		_, err := LoadConfig(nil)
		var ve *ValidationError
		if !errors.As(err, &ve) || !strings.Contains(err.Error(), `CONSUL_ENABLEAGENTLESS value "sometimes"`) {
			t.Fatalf("got %v", err)
		}
		// A file that sets the key makes the env irrelevant.
		if _, err := LoadConfig([]string{on}); err != nil {
			t.Fatalf("got %v", err)
		}
	})
}

func TestConfigAPIConfigEnvPrecedence(t *testing.T) {
	type env map[string]string
	cases := []struct {
		name string
		env  env
		hcl  string
		want func(t *testing.T, c *Config)
	}{
		{
			name: "defaults",
			want: func(t *testing.T, c *Config) {
				a := c.APIConfig()
				if a.Address != api.DefaultConfig().Address || a.Token != "" || a.TLSConfig.CAFile != "" || a.Datacenter != "" || a.Partition != "" {
					t.Fatalf("unexpected defaults: %+v", a)
				}
			},
		},
		{
			name: "env used when config empty",
			env: env{"CONSUL_HTTP_ADDR": "127.0.0.1:9500", "CONSUL_HTTP_TOKEN": "env-token",
				"CONSUL_CACERT": "/env/ca.pem", "CONSUL_CAPATH": "/env/cas", "CONSUL_CLIENT_CERT": "/env/c.pem",
				"CONSUL_CLIENT_KEY": "/env/k.pem", "CONSUL_TLS_SERVER_NAME": "env.server", "CONSUL_PARTITION": "envpart"},
			want: func(t *testing.T, c *Config) {
				a := c.APIConfig()
				if a.Address != "127.0.0.1:9500" || a.Token != "env-token" || a.TLSConfig.CAFile != "/env/ca.pem" ||
					a.TLSConfig.CAPath != "/env/cas" || a.TLSConfig.CertFile != "/env/c.pem" ||
					a.TLSConfig.KeyFile != "/env/k.pem" || a.TLSConfig.Address != "env.server" || a.Partition != "envpart" {
					t.Fatalf("env not used: %+v tls %+v", a, a.TLSConfig)
				}
			},
		},
		{
			name: "config wins when set",
			env: env{"CONSUL_HTTP_ADDR": "127.0.0.1:9500", "CONSUL_HTTP_TOKEN": "env-token",
				"CONSUL_CACERT": "/env/ca.pem", "CONSUL_CAPATH": "/env/cas", "CONSUL_CLIENT_CERT": "/env/c.pem",
				"CONSUL_CLIENT_KEY": "/env/k.pem", "CONSUL_TLS_SERVER_NAME": "env.server", "CONSUL_PARTITION": "envpart"},
			hcl: `
http_addr = "https://127.0.0.1:8501"
token = "cfg-token"
datacenter = "dc9"
ca_file = "/cfg/ca.pem"
ca_path = "/cfg/cas"
cert_file = "/cfg/c.pem"
key_file = "/cfg/k.pem"
tls_server_name = "cfg.server"
partition = "cfgpart"
`,
			want: func(t *testing.T, c *Config) {
				a := c.APIConfig()
				if a.Address != "https://127.0.0.1:8501" || a.Token != "cfg-token" || a.Datacenter != "dc9" ||
					a.TLSConfig.CAFile != "/cfg/ca.pem" || a.TLSConfig.CAPath != "/cfg/cas" ||
					a.TLSConfig.CertFile != "/cfg/c.pem" || a.TLSConfig.KeyFile != "/cfg/k.pem" ||
					a.TLSConfig.Address != "cfg.server" || a.Partition != "cfgpart" {
					t.Fatalf("config did not win: %+v tls %+v", a, a.TLSConfig)
				}
			},
		},
		{
			name: "mixed: only the set values override",
			env:  env{"CONSUL_HTTP_ADDR": "127.0.0.1:9500", "CONSUL_HTTP_TOKEN": "env-token", "CONSUL_CACERT": "/env/ca.pem"},
			hcl:  `token = "cfg-token"`,
			want: func(t *testing.T, c *Config) {
				a := c.APIConfig()
				if a.Address != "127.0.0.1:9500" || a.Token != "cfg-token" || a.TLSConfig.CAFile != "/env/ca.pem" {
					t.Fatalf("got %+v", a)
				}
			},
		},
		{
			name: "token file from env, token from config",
			env:  env{"CONSUL_HTTP_TOKEN_FILE": "/env/token"},
			hcl:  `token = "cfg-token"`,
			want: func(t *testing.T, c *Config) {
				a := c.APIConfig()
				if a.Token != "cfg-token" || a.TokenFile != "" {
					t.Fatalf("got token %q file %q", a.Token, a.TokenFile)
				}
			},
		},
		{
			name: "token file from env, no config token",
			env:  env{"CONSUL_HTTP_TOKEN_FILE": "/env/token"},
			want: func(t *testing.T, c *Config) {
				if a := c.APIConfig(); a.TokenFile != "/env/token" {
					t.Fatalf("got token file %q", a.TokenFile)
				}
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			clearConfigEnv(t)
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			var paths []string
			if tc.hcl != "" {
				paths = append(paths, writeConfigFile(t, t.TempDir(), "c.hcl", tc.hcl))
			}
			tc.want(t, mustLoad(t, paths...))
		})
	}
}

// configFileKeys lists every key a config file may set, from the loader's own tables: the top-level
// keys (the blocks external_node_meta and telemetry included) in documentation order, then
// "telemetry.<key>" for each telemetry key. Tests hold the README, the reload classification and
// the round-trip table against it.
func configFileKeys() []string {
	keys := make([]string, 0, len(configRootKeyList)+2+len(configTelemetryKeyList))
	for _, s := range configRootKeyList {
		if s.name == "partition" {
			keys = append(keys, "external_node_meta") // documentation order
		}
		keys = append(keys, s.name)
	}
	keys = append(keys, "telemetry")
	for _, s := range configTelemetryKeyList {
		keys = append(keys, "telemetry."+s.name)
	}
	return keys
}

func TestConfigKeysList(t *testing.T) {
	t.Parallel()
	keys := configFileKeys()
	seen := map[string]bool{}
	for _, k := range keys {
		if seen[k] {
			t.Errorf("duplicate key %q", k)
		}
		seen[k] = true
	}
	for _, k := range []string{"log_level", "external_node_meta", "telemetry", "check_update_interval",
		"stale_read_nodes", "telemetry.prefix_filter", "telemetry.statsd_address", "telemetry.statsite_address"} {
		if !seen[k] {
			t.Errorf("missing %q", k)
		}
	}
	if len(keys) != 44+1+23 {
		t.Errorf("got %d keys, want %d (44 top-level + telemetry + 23 telemetry keys)", len(keys), 44+1+23)
	}
}

// writeTestCert writes a self-signed CA-capable certificate and its key as PEM files.
func writeTestCert(t *testing.T, dir, name string) (certPath, keyPath string) {
	t.Helper()
	certPEM, keyPEM := newTestCertPEM(t, name, time.Now().Add(time.Hour))
	certPath = writeConfigFile(t, dir, name+".pem", string(certPEM))
	keyPath = writeConfigFile(t, dir, name+"-key.pem", string(keyPEM))
	return certPath, keyPath
}

// newTestCertPEM makes a self-signed CA-capable certificate for the loopback addresses (127.0.0.1,
// ::1, localhost) that expires at notAfter, and its key, PEM-encoded.
func newTestCertPEM(t *testing.T, name string, notAfter time.Time) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             notAfter.Add(-365 * 24 * time.Hour),
		NotAfter:              notAfter,
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
}

func TestConfigHTTPSTLSConfig(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	caCert, _ := writeTestCert(t, dir, "ca")
	cert, key := writeTestCert(t, dir, "client")
	caDir := filepath.Join(dir, "cas")
	if err := os.Mkdir(caDir, 0o755); err != nil {
		t.Fatal(err)
	}
	writeTestCert(t, caDir, "other")
	junk := writeConfigFile(t, dir, "junk.pem", "not a certificate")

	if tc, err := DefaultConfig().HTTPSTLSConfig(); tc != nil || err != nil {
		t.Fatalf("nothing set: got %v, %v", tc, err)
	}

	cases := []struct {
		name    string
		set     func(c *Config)
		wantErr string
		check   func(t *testing.T, tc *tlsConfigView)
	}{
		{"ca file", func(c *Config) { c.HTTPSCAFile = caCert }, "", func(t *testing.T, v *tlsConfigView) {
			if !v.hasRoots || v.certs != 0 {
				t.Fatalf("got %+v", v)
			}
		}},
		{"ca path", func(c *Config) { c.HTTPSCAPath = caDir }, "", func(t *testing.T, v *tlsConfigView) {
			if !v.hasRoots {
				t.Fatalf("got %+v", v)
			}
		}},
		{"cert and key", func(c *Config) { c.HTTPSCertFile, c.HTTPSKeyFile = cert, key }, "", func(t *testing.T, v *tlsConfigView) {
			if v.hasRoots || v.certs != 1 {
				t.Fatalf("got %+v", v)
			}
		}},
		{"everything", func(c *Config) {
			c.HTTPSCAFile, c.HTTPSCAPath, c.HTTPSCertFile, c.HTTPSKeyFile = caCert, caDir, cert, key
		}, "", func(t *testing.T, v *tlsConfigView) {
			if !v.hasRoots || v.certs != 1 {
				t.Fatalf("got %+v", v)
			}
		}},
		{"cert without key", func(c *Config) { c.HTTPSCertFile = cert }, "https_cert_file is set but https_key_file is not", nil},
		{"key without cert", func(c *Config) { c.HTTPSKeyFile = key }, "https_key_file is set but https_cert_file is not", nil},
		{"missing ca file", func(c *Config) { c.HTTPSCAFile = filepath.Join(dir, "missing.pem") }, "https_ca_file: open ", nil},
		{"junk ca file", func(c *Config) { c.HTTPSCAFile = junk }, "https_ca_file: no PEM certificates found", nil},
		{"empty ca dir", func(c *Config) { c.HTTPSCAPath = t.TempDir() }, "https_ca_path: no PEM certificates found", nil},
		{"mismatched pair", func(c *Config) { c.HTTPSCertFile, c.HTTPSKeyFile = cert, junk }, "https_cert_file/https_key_file: ", nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := DefaultConfig()
			tc.set(c)
			got, err := c.HTTPSTLSConfig()
			if tc.wantErr != "" {
				if err == nil || !strings.HasPrefix(err.Error(), tc.wantErr) {
					t.Fatalf("got %v, want prefix %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || got == nil {
				t.Fatalf("got %v, %v", got, err)
			}
			tc.check(t, &tlsConfigView{hasRoots: got.RootCAs != nil, certs: len(got.Certificates)})
		})
	}
}

type tlsConfigView struct {
	hasRoots bool
	certs    int
}
