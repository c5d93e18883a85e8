package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

// What SIGHUP can change in a running agent. Everything else a file sets (service identity, KV
// path, Consul address and TLS, logging sinks, telemetry sinks, probe settings, ...) keeps its
// running value until a restart, so no loop ever sees half of a change; changed restart-only keys are
// named in one WARN line.
//
// reloadableFields are Config field names applied on reload, with their file keys.
var reloadableFields = map[string]string{
	"LogLevel":            "log_level",
	"Token":               "token",
	"PassingThreshold":    "passing_threshold",
	"CriticalThreshold":   "critical_threshold",
	"CheckUpdateInterval": "check_update_interval",
	"TLSExpiryWarning":    "tls_expiry_warning",
	"NodeProbePort":       "node_probe_port",
	"HTTPSCAFile":         "https_ca_file",
	"HTTPSCAPath":         "https_ca_path",
	"HTTPSCertFile":       "https_cert_file",
	"HTTPSKeyFile":        "https_key_file",
}

// restartOnlyFields are Config field names that need a restart, with their file keys.
var restartOnlyFields = map[string]string{
	"LogJSON":              "log_json",
	"EnableSyslog":         "enable_syslog",
	"SyslogFacility":       "syslog_facility",
	"LogFile":              "log_file",
	"LogRotateBytes":       "log_rotate_bytes",
	"LogRotateMaxFiles":    "log_rotate_max_files",
	"LogRotateDuration":    "log_rotate_duration",
	"EnableDebug":          "enable_debug",
	"EnableAgentless":      "enable_agentless",
	"InstanceID":           "instance_id",
	"Service":              "consul_service",
	"Tag":                  "consul_service_tag",
	"KVPath":               "consul_kv_path",
	"NodeMeta":             "external_node_meta",
	"Partition":            "partition",
	"NodeReconnectTimeout": "node_reconnect_timeout",
	"NodeProbeInterval":    "node_probe_interval",
	"BatchFlushInterval":   "batch_flush_interval",
	// The TTLs and the lock delay are part of the registration and of the sessions, made at start.
	"AgentTTL":                 "instance_ttl",
	"TTLRefreshInterval":       "instance_ttl_refresh",
	"SessionTTL":               "session_ttl",
	"LockDelay":                "lock_delay",
	"HTTPAddr":                 "http_addr",
	"Datacenter":               "datacenter",
	"CAFile":                   "ca_file",
	"CAPath":                   "ca_path",
	"CertFile":                 "cert_file",
	"KeyFile":                  "key_file",
	"TLSServerName":            "tls_server_name",
	"ClientAddress":            "client_address",
	"PingType":                 "ping_type",
	"DisableCoordinateUpdates": "disable_coordinate_updates",
	"StaleReadNodes":           "stale_read_nodes",
}

// notFromFiles are Config fields no file can set (load warnings and internal timings; tests shorten
// the timings, and a reload must keep those).
var notFromFiles = []string{
	"Warnings", "NodeHealthRefreshInterval", "PingTimeout", "DeregisterAfter", "RetryInterval",
	"QueryWaitTime", "KeeperInterval", "ReapInterval",
}

// reloadableTelemetryFields can change at runtime: go-metrics swaps its prefix filter atomically, and
// the per-check series are read at scrape time. Every other telemetry key builds sinks and needs a
// restart.
var reloadableTelemetryFields = map[string]string{
	"PerCheckMetrics": "per_check_metrics",
	"PrefixFilter":    "prefix_filter",
	"AllowedPrefixes": "prefix_filter",
	"BlockedPrefixes": "prefix_filter",
}

// reloadMu serializes reloads: main delivers SIGHUPs one at a time, but tests call Reload directly.
var reloadMu sync.Mutex

// reloadTokenCheckTimeout bounds the call that tries a new ACL token right after a reload.
const reloadTokenCheckTimeout = 5 * time.Second

// reloadPlan is a validated reload, computed before anything is applied so that a bad file (or an
// unreadable TLS or token file) leaves the agent exactly as it was.
type reloadPlan struct {
	next        *Config
	level       hclog.Level
	token       string
	tls         *tls.Config
	changed     []string // reloadable keys whose value changed
	restartKeys []string // restart-only keys whose value changed (ignored)
}

// reloadConfig re-reads the config paths (SIGHUP) and applies the reloadable settings: log level,
// ACL token, anti-flapping thresholds, check_update_interval, the TLS material of HTTPS/TLS checks
// (re-read even when the paths are unchanged, so rotated certificates are picked up) and
// telemetry.prefix_filter. On any error the running config stays untouched.
func (a *Agent) reloadConfig() {
	reloadMu.Lock()
	defer reloadMu.Unlock()

	a.logger.Info("Reloading configuration", "paths", strings.Join(a.opts.ConfigPaths, ", "))
	loaded, err := LoadConfig(a.opts.ConfigPaths)
	if err != nil {
		a.logger.Error("Failed to reload configuration, keeping the running configuration", "error", err)
		return
	}
	plan, err := planReload(a.config(), loaded)
	if err != nil {
		a.logger.Error("Failed to reload configuration, keeping the running configuration", "error", err)
		return
	}
	for _, w := range loaded.Warnings {
		a.logger.Warn(w)
	}
	a.applyReload(plan)
}

// planReload builds the config the agent runs with after the reload: the running config with only the
// reloadable fields taken from loaded.
func planReload(running, loaded *Config) (*reloadPlan, error) {
	level, err := parseLogLevel(loaded.LogLevel)
	if err != nil {
		return nil, err
	}
	next := *running
	next.Warnings = nil
	next.LogLevel = loaded.LogLevel
	next.Token = loaded.Token
	next.PassingThreshold = loaded.PassingThreshold
	next.CriticalThreshold = loaded.CriticalThreshold
	next.CheckUpdateInterval = loaded.CheckUpdateInterval
	next.TLSExpiryWarning = loaded.TLSExpiryWarning
	next.NodeProbePort = loaded.NodeProbePort
	next.HTTPSCAFile, next.HTTPSCAPath = loaded.HTTPSCAFile, loaded.HTTPSCAPath
	next.HTTPSCertFile, next.HTTPSKeyFile = loaded.HTTPSCertFile, loaded.HTTPSKeyFile
	next.Telemetry.PrefixFilter = loaded.Telemetry.PrefixFilter
	next.Telemetry.PerCheckMetrics = loaded.Telemetry.PerCheckMetrics
	next.Telemetry.AllowedPrefixes = loaded.Telemetry.AllowedPrefixes
	next.Telemetry.BlockedPrefixes = loaded.Telemetry.BlockedPrefixes

	tlsCfg, err := next.HTTPSTLSConfig()
	if err != nil {
		return nil, fmt.Errorf("loading TLS files for health checks: %w", err)
	}
	token, err := resolveToken(&next)
	if err != nil {
		return nil, err
	}
	plan := &reloadPlan{next: &next, level: level, token: token, tls: tlsCfg}
	plan.changed, plan.restartKeys = diffConfig(running, loaded)
	return plan, nil
}

// resolveToken is the ACL token the client sends for cfg: the token key, else CONSUL_HTTP_TOKEN, else
// the contents of CONSUL_HTTP_TOKEN_FILE (re-read on every reload, so a rotated file is picked up).
func resolveToken(cfg *Config) (string, error) {
	conf := cfg.APIConfig()
	if conf.Token == "" && conf.TokenFile != "" {
		return readTokenFile(conf.TokenFile)
	}
	return conf.Token, nil
}

// diffConfig names the file keys whose values differ between the running and the loaded config,
// split into reloadable and restart-only ones. Fields no file can set are skipped.
func diffConfig(running, loaded *Config) (reloadable, restartOnly []string) {
	rv, lv := reflect.ValueOf(running).Elem(), reflect.ValueOf(loaded).Elem()
	typ := rv.Type()
	add := func(list *[]string, key string) {
		if !slices.Contains(*list, key) {
			*list = append(*list, key)
		}
	}
	for i := range typ.NumField() {
		name := typ.Field(i).Name
		if slices.Contains(notFromFiles, name) {
			continue
		}
		if name == "Telemetry" {
			r, o := diffTelemetry(running.Telemetry, loaded.Telemetry)
			for _, k := range r {
				add(&reloadable, k)
			}
			for _, k := range o {
				add(&restartOnly, k)
			}
			continue
		}
		if name == "InstanceID" && loaded.InstanceID == "" {
			continue // unset in the files: the running one was generated at startup
		}
		if reflect.DeepEqual(rv.Field(i).Interface(), lv.Field(i).Interface()) {
			continue
		}
		if key, ok := reloadableFields[name]; ok {
			add(&reloadable, key)
		} else if key, ok := restartOnlyFields[name]; ok {
			add(&restartOnly, key)
		} else {
			add(&restartOnly, name) // a field added without a key mapping: still never half-applied
		}
	}
	slices.Sort(reloadable)
	slices.Sort(restartOnly)
	return reloadable, restartOnly
}

func diffTelemetry(running, loaded TelemetryConfig) (reloadable, restartOnly []string) {
	rv, lv := reflect.ValueOf(running), reflect.ValueOf(loaded)
	typ := rv.Type()
	keys := telemetryKeysByField()
	for i := range typ.NumField() {
		name := typ.Field(i).Name
		if reflect.DeepEqual(rv.Field(i).Interface(), lv.Field(i).Interface()) {
			continue
		}
		if key, ok := reloadableTelemetryFields[name]; ok {
			if !slices.Contains(reloadable, "telemetry."+key) {
				reloadable = append(reloadable, "telemetry."+key)
			}
			continue
		}
		key := keys[name]
		if key == "" {
			key = name
		}
		restartOnly = append(restartOnly, "telemetry."+key)
	}
	return reloadable, restartOnly
}

// telemetryKeysByField maps TelemetryConfig field names to file keys: the snake_case of the field
// name, except for the two addresses the original spelled differently and one double acronym.
func telemetryKeysByField() map[string]string {
	m := map[string]string{
		"StatsdAddr":     "statsd_address",
		"StatsiteAddr":   "statsite_address",
		"CirconusAPIURL": "circonus_api_url",
	}
	typ := reflect.TypeOf(TelemetryConfig{})
	for i := range typ.NumField() {
		name := typ.Field(i).Name
		if _, ok := m[name]; !ok {
			m[name] = snakeCase(name)
		}
	}
	return m
}

// snakeCase turns a Go field name into a config key, keeping acronyms whole
// (CirconusAPIToken → circonus_api_token, CirconusSubmissionURL → circonus_submission_url).
func snakeCase(s string) string {
	rs := []rune(s)
	isUpper := func(r rune) bool { return r >= 'A' && r <= 'Z' }
	var b strings.Builder
	for i, r := range rs {
		if isUpper(r) && i > 0 && (!isUpper(rs[i-1]) || (i+1 < len(rs) && !isUpper(rs[i+1]))) {
			b.WriteByte('_')
		}
		if isUpper(r) {
			r += 'a' - 'A'
		}
		b.WriteRune(r)
	}
	return b.String()
}

// applyReload switches the agent to plan.next. Order matters only for logging: the level first, so
// the lines about the rest of the reload already obey it.
func (a *Agent) applyReload(plan *reloadPlan) {
	a.logger.SetLevel(plan.level)

	oldToken := a.client.Headers().Get("X-Consul-Token")
	tokenChanged := oldToken != plan.token
	if tokenChanged {
		setClientToken(a.client, plan.token)
	}

	a.runner.SetTLS(plan.tls)
	a.runner.Reload(plan.next)
	a.telemetry.metrics.UpdateFilter(plan.next.Telemetry.AllowedPrefixes, plan.next.Telemetry.BlockedPrefixes)

	a.cfgMu.Lock()
	a.cfg = plan.next
	a.cfgMu.Unlock()

	if len(plan.restartKeys) > 0 {
		a.logger.Warn("Config changes that need a restart were ignored", "keys", strings.Join(plan.restartKeys, ", "))
	}
	a.logger.Info("Configuration reloaded", "changed", strings.Join(plan.changed, ", "),
		"log_level", plan.next.LogLevel, "token_changed", tokenChanged)
	if tokenChanged {
		a.tryToken()
	}
}

// tryToken makes one authenticated call right after an ACL token change, so a rejected token shows up
// in the log and on /health at once instead of at the next TTL refresh. In agent mode the call is the
// TTL refresh itself (it needs exactly the write permission the agent lives on); agentless instances
// read their assignment key.
func (a *Agent) tryToken() {
	agentless := a.config().EnableAgentless
	if !agentless && !a.status.registered.Load() {
		return // still starting (or re-registering): the registration itself uses the new token
	}
	ctx, cancel := context.WithTimeout(context.Background(), reloadTokenCheckTimeout)
	defer cancel()
	var err error
	if agentless {
		_, _, err = a.client.KV().Get(a.assignmentKey(), a.queryOptions(ctx))
	} else {
		err = a.client.Agent().UpdateTTLOpts(a.ttlCheckID, "", api.HealthPassing, a.queryOptions(ctx))
	}
	if err != nil {
		a.status.failed(err)
		a.logger.Warn("Request to Consul with the reloaded ACL token failed", "error", err)
		return
	}
	a.status.contact()
	if !agentless {
		a.status.setRegistered(true) // the TTL check exists, so the registration does
	}
}
