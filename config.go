package main

import (
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
)

// Config types, defaults and validation. Reading files into a Config (HCL v1 and JSON, directory
// walks, overlays, the environment) is config_decode.go; the TLS material of checks is tlsconfig.go.

// Config is the complete runtime configuration of consul-esm.
//
// The exported fields down to Telemetry are settable from config files (the key tables in
// config_decode.go name their file keys). The timings after Telemetry are internal: DefaultConfig
// sets them, files cannot, and tests shorten them.
type Config struct {
	LogLevel          string
	LogJSON           bool
	EnableSyslog      bool
	SyslogFacility    string
	LogFile           string
	LogRotateBytes    int
	LogRotateMaxFiles int
	LogRotateDuration time.Duration

	EnableDebug     bool
	EnableAgentless bool

	InstanceID string
	Service    string
	Tag        string
	KVPath     string
	NodeMeta   map[string]string // external_node_meta
	Partition  string

	NodeReconnectTimeout time.Duration
	NodeProbeInterval    time.Duration
	NodeProbePort        int // 0: ICMP; else a TCP connect to this port (node meta external-probe-port wins)
	BatchFlushInterval   time.Duration

	HTTPAddr      string
	Token         string
	Datacenter    string
	CAFile        string
	CAPath        string
	CertFile      string
	KeyFile       string
	TLSServerName string

	HTTPSCAFile   string
	HTTPSCAPath   string
	HTTPSCertFile string
	HTTPSKeyFile  string

	ClientAddress            string
	PingType                 string
	DisableCoordinateUpdates bool
	StaleReadNodes           bool

	PassingThreshold  int
	CriticalThreshold int

	// CheckUpdateInterval defers writes of output-only check changes (key check_update_interval,
	// default 5m; 0 writes every output change).
	CheckUpdateInterval time.Duration

	// TLSExpiryWarning turns a passing check whose TLS certificate expires within this window into
	// warning (key tls_expiry_warning, default 0: off).
	TLSExpiryWarning time.Duration

	Telemetry TelemetryConfig

	// Warnings collects non-fatal problems found while loading (for example ignored prefix_filter
	// rules). Each entry is a message without a level prefix; main logs them at WARN.
	Warnings []string

	// Failure detection (see README "Running several instances"): how soon peers notice that this
	// instance died, and how long a stall they forgive.
	AgentTTL           time.Duration // instance_ttl, 7s: TTL of the instance's check (agent mode)
	TTLRefreshInterval time.Duration // instance_ttl_refresh, 1.5s: how often that check is passed
	SessionTTL         time.Duration // session_ttl, 15s (the original's): TTL of the leader session (and agentless health session), renewed every half TTL
	LockDelay          time.Duration // lock_delay, 500ms: lock delay of the leader session

	// Internal timings, not settable from files.
	NodeHealthRefreshInterval time.Duration // 1h: debounce of the externalNodeHealth status writes
	PingTimeout               time.Duration // 5s
	DeregisterAfter           time.Duration // 30m: DeregisterCriticalServiceAfter of the own TTL check
	RetryInterval             time.Duration // 10s: pause after errors
	QueryWaitTime             time.Duration // 45s: wait time of every blocking query
	KeeperInterval            time.Duration // 30s: registration keeper
	ReapInterval              time.Duration // 30s: DeregisterCriticalServiceAfter reaper
}

// TelemetryConfig is the telemetry block. PrefixFilter holds the rules as written; AllowedPrefixes
// and BlockedPrefixes are the valid "+" and "-" rules without their sign.
type TelemetryConfig struct {
	CirconusAPIApp                     string
	CirconusAPIToken                   string
	CirconusAPIURL                     string
	CirconusBrokerID                   string
	CirconusBrokerSelectTag            string
	CirconusCheckDisplayName           string
	CirconusCheckForceMetricActivation string
	CirconusCheckID                    string
	CirconusCheckInstanceID            string
	CirconusCheckSearchTag             string
	CirconusCheckTags                  string
	CirconusSubmissionInterval         string
	CirconusSubmissionURL              string
	DisableHostname                    bool
	DogstatsdAddr                      string
	DogstatsdTags                      []string
	FilterDefault                      bool
	PrefixFilter                       []string
	AllowedPrefixes                    []string
	BlockedPrefixes                    []string
	MetricsPrefix                      string
	PerCheckMetrics                    bool
	PrometheusRetentionTime            time.Duration
	StatsdAddr                         string
	StatsiteAddr                       string
}

// LoadError is a problem reading or decoding a config path. Its text follows the original:
// `error reading "<path>": …`, `error checking "<path>": …`, `error listing "<path>": …` and
// `error in "<path>": …`.
type LoadError struct {
	Op   string // "reading", "checking", "listing" or "in"
	Path string
	Err  error
}

func (e *LoadError) Error() string { return fmt.Sprintf("error %s %q: %v", e.Op, e.Path, e.Err) }

func (e *LoadError) Unwrap() error { return e.Err }

// ValidationError is a config that decoded fine but holds an unacceptable value.
type ValidationError struct {
	Msg string
}

func (e *ValidationError) Error() string { return e.Msg }

const (
	defaultBatchFlushInterval = 500 * time.Millisecond
	defaultSyslogFacility     = "LOCAL0"
	enableAgentlessEnv        = "CONSUL_ENABLEAGENTLESS"
)

// validLogLevels is the accepted set of log_level values (compared case-insensitively).
var validLogLevels = []string{"TRACE", "DEBUG", "INFO", "WARN", "ERR", "ERROR"}

// validSyslogFacilities is the set go-syslog accepts (case-insensitively).
var validSyslogFacilities = []string{
	"KERN", "USER", "MAIL", "DAEMON", "AUTH", "SYSLOG", "LPR", "NEWS", "UUCP", "CRON", "AUTHPRIV", "FTP",
	"LOCAL0", "LOCAL1", "LOCAL2", "LOCAL3", "LOCAL4", "LOCAL5", "LOCAL6", "LOCAL7",
}

// DefaultConfig returns the configuration used when no file sets anything.
func DefaultConfig() *Config {
	return &Config{
		LogLevel:             "INFO",
		Service:              "consul-esm",
		KVPath:               "consul-esm/",
		NodeMeta:             map[string]string{"external-node": "true"},
		NodeReconnectTimeout: 72 * time.Hour,
		NodeProbeInterval:    10 * time.Second,
		BatchFlushInterval:   defaultBatchFlushInterval,
		PingType:             "udp",
		CheckUpdateInterval:  5 * time.Minute,
		Telemetry:            defaultTelemetryConfig(),

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
		ReapInterval:              defaultReapInterval,
	}
}

func defaultTelemetryConfig() TelemetryConfig {
	// filter_default is true as in Consul; false with no allow rules would drop every metric.
	return TelemetryConfig{FilterDefault: true}
}

// Bounds of the failure-detection keys. Consul keeps a session's lock delay to at most 60 s and its
// TTL to at most 24 h; below its session_ttl_min (10 s by default) it refuses the session, with
// its own message, when the session is created.
const (
	maxLockDelay  = 60 * time.Second
	maxSessionTTL = 24 * time.Hour
	minSessionTTL = time.Second
	minTTLRefresh = 100 * time.Millisecond
)

// validateFailureDetection checks instance_ttl, instance_ttl_refresh, session_ttl and lock_delay.
// The refresh must fit at least twice into the TTL: otherwise one late refresh lets the check expire
// and peers take this instance's nodes while it is alive.
func (c *Config) validateFailureDetection() error {
	fail := func(format string, args ...any) error { return &ValidationError{Msg: fmt.Sprintf(format, args...)} }
	switch {
	case c.TTLRefreshInterval < minTTLRefresh:
		return fail("instance_ttl_refresh %q must be at least %s", c.TTLRefreshInterval, minTTLRefresh)
	case c.AgentTTL < 2*c.TTLRefreshInterval:
		return fail("instance_ttl %q must be at least twice instance_ttl_refresh (%s)", c.AgentTTL, c.TTLRefreshInterval)
	case c.SessionTTL < minSessionTTL || c.SessionTTL > maxSessionTTL:
		return fail("session_ttl %q must be between %s and %s", c.SessionTTL, minSessionTTL, maxSessionTTL)
	case c.LockDelay < 0 || c.LockDelay > maxLockDelay:
		return fail("lock_delay %q must be between 0s and %s", c.LockDelay, maxLockDelay)
	}
	return nil
}

// Validate checks the values that decoding cannot. It returns a *ValidationError.
func (c *Config) Validate() error {
	fail := func(format string, args ...any) error {
		return &ValidationError{Msg: fmt.Sprintf(format, args...)}
	}

	level := strings.ToUpper(strings.TrimSpace(c.LogLevel))
	if !slices.Contains(validLogLevels, level) {
		return fail("invalid log_level %q: must be one of %s (case-insensitive)",
			c.LogLevel, strings.Join(validLogLevels, ", "))
	}
	if strings.TrimSpace(c.Service) == "" {
		return fail("consul_service cannot be empty")
	}
	if len(c.NodeMeta) == 0 {
		// An empty filter would match every node in the catalog, agent nodes included, and ESM would
		// start writing their checks.
		return fail("external_node_meta cannot be empty: it selects which nodes are external")
	}
	if c.PingType != "udp" && c.PingType != "socket" {
		return fail(`ping_type must be one of either "udp" or "socket"`)
	}
	if c.NodeProbeInterval < time.Second {
		return fail("node_probe_interval cannot be lower than 1 second")
	}
	if c.NodeProbePort < 0 || c.NodeProbePort > maxPort {
		return fail("node_probe_port %d is not a valid port: must be between 1 and 65535, or 0 to ping with ICMP", c.NodeProbePort)
	}
	if c.PassingThreshold < 0 {
		return fail("passing_threshold cannot be negative")
	}
	if c.CriticalThreshold < 0 {
		return fail("critical_threshold cannot be negative")
	}
	for _, d := range []struct {
		key string
		val time.Duration
	}{
		{"node_reconnect_timeout", c.NodeReconnectTimeout},
		{"log_rotate_duration", c.LogRotateDuration},
		{"check_update_interval", c.CheckUpdateInterval},
		{"telemetry.prometheus_retention_time", c.Telemetry.PrometheusRetentionTime},
	} {
		if d.val < 0 {
			return fail("%s cannot be negative", d.key)
		}
	}
	if err := c.validateFailureDetection(); err != nil {
		return err
	}
	if c.TLSExpiryWarning < 0 {
		return fail("tls_expiry_warning %q cannot be negative: it is how long before a certificate expires its checks turn warning (0 turns this off)",
			c.TLSExpiryWarning.String())
	}
	if c.ClientAddress != "" {
		if err := configCheckHostPort(c.ClientAddress); err != nil {
			return fail("client_address %q is not a valid host:port: %v", c.ClientAddress, err)
		}
	}
	if c.SyslogFacility != "" && !slices.Contains(validSyslogFacilities, strings.ToUpper(c.SyslogFacility)) {
		return fail("invalid syslog_facility %q: must be one of %s (case-insensitive)",
			c.SyslogFacility, strings.Join(validSyslogFacilities, ", "))
	}
	return nil
}

// maxPort is the largest TCP or UDP port number.
const maxPort = 65535

// configCheckHostPort checks that addr is a host:port with a port in range.
func configCheckHostPort(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 0 || n > maxPort {
		return fmt.Errorf("invalid port %q", port)
	}
	return nil
}

// APIConfig returns the Consul API client config: api.DefaultConfig() (which reads CONSUL_HTTP_ADDR,
// CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE, CONSUL_CACERT, … from the environment) overlaid by every
// non-empty config value.
func (c *Config) APIConfig() *api.Config {
	cfg := api.DefaultConfig()
	if c.HTTPAddr != "" {
		cfg.Address = c.HTTPAddr
	}
	if c.Token != "" {
		cfg.Token = c.Token
		cfg.TokenFile = "" // the configured token wins over CONSUL_HTTP_TOKEN_FILE
	}
	if c.Datacenter != "" {
		cfg.Datacenter = c.Datacenter
	}
	if c.CAFile != "" {
		cfg.TLSConfig.CAFile = c.CAFile
	}
	if c.CAPath != "" {
		cfg.TLSConfig.CAPath = c.CAPath
	}
	if c.CertFile != "" {
		cfg.TLSConfig.CertFile = c.CertFile
	}
	if c.KeyFile != "" {
		cfg.TLSConfig.KeyFile = c.KeyFile
	}
	if c.TLSServerName != "" {
		cfg.TLSConfig.Address = c.TLSServerName
	}
	if c.Partition != "" {
		cfg.Partition = c.Partition
	}
	return cfg
}
