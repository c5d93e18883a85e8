package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/hcl"
	"github.com/hashicorp/hcl/hcl/ast"
	"github.com/hashicorp/hcl/hcl/token"
)

// Config is the complete runtime configuration of consul-esm.
//
// The exported fields down to Telemetry are settable from config files (see ConfigKeys for the file
// key names). The timings after Telemetry are internal: DefaultConfig sets them, files cannot, and
// tests shorten them.
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
		ReapInterval:              30 * time.Second,
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

// LoadConfig builds the config from defaults overlaid by each path in order. A path may be a file or
// a directory (non-recursive, entries sorted by name, sub-directories skipped); only files ending in
// .hcl or .json are read and empty files are skipped. Afterwards "/" is appended to KVPath, the
// CONSUL_ENABLEAGENTLESS environment variable applies unless a file set enable_agentless, and the
// result is validated. Errors are *LoadError or *ValidationError.
func LoadConfig(paths []string) (*Config, error) {
	c := DefaultConfig()
	st := &configLoadState{cfg: c}
	for _, p := range paths {
		if err := configVisit(p, st.loadFile); err != nil {
			return nil, err
		}
	}

	if !strings.HasSuffix(c.KVPath, "/") {
		c.KVPath += "/"
	}

	if !st.agentlessSet {
		if v, ok := os.LookupEnv(enableAgentlessEnv); ok && strings.TrimSpace(v) != "" {
			b, err := strconv.ParseBool(strings.TrimSpace(v))
			if err != nil {
				return nil, &ValidationError{Msg: fmt.Sprintf(
					"invalid %s value %q: must be a boolean (true or false)", enableAgentlessEnv, v)}
			}
			c.EnableAgentless = b
		}
	}

	if c.BatchFlushInterval < 0 {
		c.BatchFlushInterval = defaultBatchFlushInterval
	}
	if c.EnableSyslog && c.SyslogFacility == "" {
		c.SyslogFacility = defaultSyslogFacility
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}

	c.LogLevel = strings.ToUpper(strings.TrimSpace(c.LogLevel))
	if c.LogLevel == "ERR" {
		c.LogLevel = "ERROR"
	}
	return c, nil
}

// Validate checks the values that decoding cannot. It returns a *ValidationError.
func (c *Config) Validate() error {
	fail := func(format string, args ...any) error {
		return &ValidationError{Msg: fmt.Sprintf(format, args...)}
	}

	level := strings.ToUpper(strings.TrimSpace(c.LogLevel))
	if !configContains(validLogLevels, level) {
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
	if c.NodeProbePort < 0 || c.NodeProbePort > 65535 {
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
	if c.SyslogFacility != "" && !configContains(validSyslogFacilities, strings.ToUpper(c.SyslogFacility)) {
		return fail("invalid syslog_facility %q: must be one of %s (case-insensitive)",
			c.SyslogFacility, strings.Join(validSyslogFacilities, ", "))
	}
	return nil
}

func configCheckHostPort(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("invalid port %q", port)
	}
	return nil
}

func configContains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
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

// HTTPSTLSConfig builds the TLS config for HTTPS, TCP+TLS and gRPC+TLS health checks from the https_*
// keys. It returns nil, nil when none is set. Callers clone it before setting per-check options.
func (c *Config) HTTPSTLSConfig() (*tls.Config, error) {
	if c.HTTPSCAFile == "" && c.HTTPSCAPath == "" && c.HTTPSCertFile == "" && c.HTTPSKeyFile == "" {
		return nil, nil
	}
	tc := &tls.Config{}
	if c.HTTPSCAFile != "" || c.HTTPSCAPath != "" {
		pool := x509.NewCertPool()
		if c.HTTPSCAFile != "" {
			if err := configAddPEMFile(pool, c.HTTPSCAFile); err != nil {
				return nil, fmt.Errorf("https_ca_file: %w", err)
			}
		}
		if c.HTTPSCAPath != "" {
			if err := configAddPEMDir(pool, c.HTTPSCAPath); err != nil {
				return nil, fmt.Errorf("https_ca_path: %w", err)
			}
		}
		tc.RootCAs = pool
	}
	switch {
	case c.HTTPSCertFile != "" && c.HTTPSKeyFile != "":
		cert, err := tls.LoadX509KeyPair(c.HTTPSCertFile, c.HTTPSKeyFile)
		if err != nil {
			return nil, fmt.Errorf("https_cert_file/https_key_file: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	case c.HTTPSCertFile != "":
		return nil, errors.New("https_cert_file is set but https_key_file is not")
	case c.HTTPSKeyFile != "":
		return nil, errors.New("https_key_file is set but https_cert_file is not")
	}
	return tc, nil
}

func configAddPEMFile(pool *x509.CertPool, path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if !pool.AppendCertsFromPEM(data) {
		return fmt.Errorf("no PEM certificates found in %q", path)
	}
	return nil
}

func configAddPEMDir(pool *x509.CertPool, dir string) error {
	found := false
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if pool.AppendCertsFromPEM(data) {
			found = true
		}
		return nil
	})
	if err != nil {
		return err
	}
	if !found {
		return fmt.Errorf("no PEM certificates found in %q", dir)
	}
	return nil
}

// ---------------------------------------------------------------------------------------------
// Walking paths

// configVisit calls fn for path if it is a file, or for every entry of path (sorted by name,
// sub-directories skipped) if it is a directory. Errors come back as *LoadError.
func configVisit(path string, fn func(string) error) error {
	f, err := os.Open(path)
	if err != nil {
		return &LoadError{Op: "reading", Path: path, Err: err}
	}
	defer f.Close()

	fi, err := f.Stat()
	if err != nil {
		return &LoadError{Op: "checking", Path: path, Err: err}
	}
	if !fi.IsDir() {
		if err := fn(path); err != nil {
			return &LoadError{Op: "in", Path: path, Err: err}
		}
		return nil
	}

	entries, err := f.ReadDir(-1)
	if err != nil {
		return &LoadError{Op: "listing", Path: path, Err: err}
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].Name() < entries[j].Name() })
	for _, e := range entries {
		full := filepath.Join(path, e.Name())
		if e.IsDir() {
			continue
		}
		if e.Type()&fs.ModeSymlink != 0 {
			if target, err := os.Stat(full); err == nil && target.IsDir() {
				continue
			}
		}
		if err := fn(full); err != nil {
			return &LoadError{Op: "in", Path: full, Err: err}
		}
	}
	return nil
}

// configLoadState carries what must be known across files.
type configLoadState struct {
	cfg          *Config
	agentlessSet bool // some file set enable_agentless; the environment then does not apply
}

// loadFile overlays one file onto the running config. Files without a .hcl or .json extension and
// empty files are skipped.
func (st *configLoadState) loadFile(path string) error {
	ext := filepath.Ext(path)
	if ext != ".hcl" && ext != ".json" {
		return nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if len(data) == 0 {
		return nil
	}
	return st.decode(data)
}

// parseHCL wraps hcl.ParseBytes, whose JSON scanner panics on some malformed escapes (found by
// FuzzConfigDecode): a broken config file must be an error message, not a crash.
func parseHCL(data []byte) (file *ast.File, err error) {
	defer func() {
		if r := recover(); r != nil {
			file, err = nil, fmt.Errorf("malformed input: %v", r)
		}
	}()
	return hcl.ParseBytes(data)
}

// decode parses one file's content (HCL v1 or JSON) and applies every key it sets.
func (st *configLoadState) decode(data []byte) error {
	file, err := parseHCL(data)
	if err != nil {
		return fmt.Errorf("error parsing: %v", err)
	}
	root, ok := file.Node.(*ast.ObjectList)
	if !ok {
		return errors.New("error parsing: root should be an object")
	}

	// Unknown keys first, so a typo is reported before anything else.
	var unknown []string
	addUnknown := func(name string) {
		if !configContains(unknown, name) {
			unknown = append(unknown, name)
		}
	}
	var metaBlocks, telemetryBlocks []*ast.ObjectType
	for _, item := range root.Items {
		name := configKeyName(item)
		if _, ok := configRootSpecs[name]; ok {
			continue
		}
		switch name {
		case "external_node_meta":
			blocks, err := configBlocks(item)
			if err != nil {
				return err
			}
			metaBlocks = append(metaBlocks, blocks...)
		case "telemetry":
			blocks, err := configBlocks(item)
			if err != nil {
				return err
			}
			telemetryBlocks = append(telemetryBlocks, blocks...)
			for _, b := range blocks {
				for _, sub := range b.List.Items {
					if sub := configKeyName(sub); configTelemetrySpecs[sub] == nil {
						addUnknown("telemetry." + sub)
					}
				}
			}
		default:
			addUnknown(name)
		}
	}
	switch {
	case len(unknown) == 1:
		return fmt.Errorf("unknown key %q", unknown[0])
	case len(unknown) > 1:
		quoted := make([]string, len(unknown))
		for i, u := range unknown {
			quoted[i] = strconv.Quote(u)
		}
		return fmt.Errorf("unknown keys %s", strings.Join(quoted, ", "))
	}
	if len(metaBlocks) > 1 {
		return errors.New("only one node_meta block allowed")
	}
	if len(telemetryBlocks) > 1 {
		return errors.New("only one telemetry block allowed")
	}

	// Decode everything into a scratch copy so a failing file leaves nothing half-applied.
	next := *st.cfg
	agentlessSet := false
	for _, item := range root.Items {
		name := configKeyName(item)
		set, ok := configRootSpecs[name]
		if !ok {
			continue
		}
		if err := configNoLabels(item); err != nil {
			return err
		}
		if err := set(&next, item.Val); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		if name == "enable_agentless" {
			agentlessSet = true
		}
	}
	if len(metaBlocks) == 1 {
		meta, err := configDecodeMap(metaBlocks[0])
		if err != nil {
			return fmt.Errorf("external_node_meta: %w", err)
		}
		next.NodeMeta = meta
	}
	if len(telemetryBlocks) == 1 {
		tel, warnings, err := configDecodeTelemetry(telemetryBlocks[0])
		if err != nil {
			return err
		}
		next.Telemetry = tel
		next.Warnings = append(append([]string(nil), next.Warnings...), warnings...)
	}

	*st.cfg = next
	if agentlessSet {
		st.agentlessSet = true
	}
	return nil
}

func configDecodeTelemetry(block *ast.ObjectType) (TelemetryConfig, []string, error) {
	tel := defaultTelemetryConfig()
	for _, item := range block.List.Items {
		name := configKeyName(item)
		if err := configNoLabels(item); err != nil {
			return tel, nil, fmt.Errorf("telemetry.%w", err)
		}
		if err := configTelemetrySpecs[name](&tel, item.Val); err != nil {
			return tel, nil, fmt.Errorf("%s: %w", name, err)
		}
	}
	var warnings []string
	for _, rule := range tel.PrefixFilter {
		switch {
		case rule == "":
			warnings = append(warnings, "Cannot have empty filter rule in prefix_filter")
		case rule[0] == '+':
			tel.AllowedPrefixes = append(tel.AllowedPrefixes, rule[1:])
		case rule[0] == '-':
			tel.BlockedPrefixes = append(tel.BlockedPrefixes, rule[1:])
		default:
			warnings = append(warnings, fmt.Sprintf("Filter rule must begin with either '+' or '-': %q", rule))
		}
	}
	return tel, warnings, nil
}

// configKeyName is the first key of an item, unquoted.
func configKeyName(item *ast.ObjectItem) string {
	if len(item.Keys) == 0 {
		return ""
	}
	if s, ok := configTokenString(item.Keys[0].Token); ok {
		return s
	}
	return item.Keys[0].Token.Text
}

// configNoLabels rejects `key "label" { … }` forms (and JSON objects flattened into them).
func configNoLabels(item *ast.ObjectItem) error {
	if len(item.Keys) > 1 {
		label, _ := configTokenString(item.Keys[1].Token)
		return fmt.Errorf("%s: unexpected nested key %q", configKeyName(item), label)
	}
	return nil
}

// configBlocks returns the object(s) a block key holds: `k { … }`, `k = { … }` or a list of objects.
func configBlocks(item *ast.ObjectItem) ([]*ast.ObjectType, error) {
	name := configKeyName(item)
	if err := configNoLabels(item); err != nil {
		return nil, err
	}
	switch v := item.Val.(type) {
	case *ast.ObjectType:
		return []*ast.ObjectType{v}, nil
	case *ast.ListType:
		var out []*ast.ObjectType
		for _, elem := range v.List {
			obj, ok := elem.(*ast.ObjectType)
			if !ok {
				return nil, fmt.Errorf("%s: expected a block, got %s", name, configDescribe(elem))
			}
			out = append(out, obj)
		}
		return out, nil
	}
	return nil, fmt.Errorf("%s: expected a block, got %s", name, configDescribe(item.Val))
}

// ---------------------------------------------------------------------------------------------
// Key tables

type configSetter[T any] func(*T, ast.Node) error

type configSpec[T any] struct {
	name string
	set  configSetter[T]
}

func configStr[T any](field func(*T) *string) configSetter[T] {
	return func(t *T, n ast.Node) error {
		v, err := configDecodeString(n)
		if err == nil {
			*field(t) = v
		}
		return err
	}
}

func configBool[T any](field func(*T) *bool) configSetter[T] {
	return func(t *T, n ast.Node) error {
		v, err := configDecodeBool(n)
		if err == nil {
			*field(t) = v
		}
		return err
	}
}

func configInt[T any](field func(*T) *int) configSetter[T] {
	return func(t *T, n ast.Node) error {
		v, err := configDecodeInt(n)
		if err == nil {
			*field(t) = v
		}
		return err
	}
}

func configDuration[T any](field func(*T) *time.Duration) configSetter[T] {
	return func(t *T, n ast.Node) error {
		s, err := configDecodeString(n)
		if err != nil {
			return err
		}
		d, err := time.ParseDuration(s)
		if err != nil {
			return fmt.Errorf("invalid duration: %q: %v", s, err)
		}
		*field(t) = d
		return nil
	}
}

func configStrings[T any](field func(*T) *[]string) configSetter[T] {
	return func(t *T, n ast.Node) error {
		v, err := configDecodeStringList(n)
		if err == nil {
			*field(t) = v
		}
		return err
	}
}

// configRootKeyList lists the scalar top-level keys in documentation order. The two blocks,
// external_node_meta and telemetry, are handled apart.
var configRootKeyList = []configSpec[Config]{
	{"log_level", configStr(func(c *Config) *string { return &c.LogLevel })},
	{"log_json", configBool(func(c *Config) *bool { return &c.LogJSON })},
	{"enable_syslog", configBool(func(c *Config) *bool { return &c.EnableSyslog })},
	{"syslog_facility", configStr(func(c *Config) *string { return &c.SyslogFacility })},
	{"log_file", configStr(func(c *Config) *string { return &c.LogFile })},
	{"log_rotate_bytes", configInt(func(c *Config) *int { return &c.LogRotateBytes })},
	{"log_rotate_max_files", configInt(func(c *Config) *int { return &c.LogRotateMaxFiles })},
	{"log_rotate_duration", configDuration(func(c *Config) *time.Duration { return &c.LogRotateDuration })},
	{"enable_debug", configBool(func(c *Config) *bool { return &c.EnableDebug })},
	{"enable_agentless", configBool(func(c *Config) *bool { return &c.EnableAgentless })},
	{"instance_id", configStr(func(c *Config) *string { return &c.InstanceID })},
	{"consul_service", configStr(func(c *Config) *string { return &c.Service })},
	{"consul_service_tag", configStr(func(c *Config) *string { return &c.Tag })},
	{"consul_kv_path", configStr(func(c *Config) *string { return &c.KVPath })},
	{"partition", configStr(func(c *Config) *string { return &c.Partition })},
	{"node_reconnect_timeout", configDuration(func(c *Config) *time.Duration { return &c.NodeReconnectTimeout })},
	{"node_probe_interval", configDuration(func(c *Config) *time.Duration { return &c.NodeProbeInterval })},
	{"node_probe_port", configInt(func(c *Config) *int { return &c.NodeProbePort })},
	{"batch_flush_interval", configDuration(func(c *Config) *time.Duration { return &c.BatchFlushInterval })},
	{"http_addr", configStr(func(c *Config) *string { return &c.HTTPAddr })},
	{"token", configStr(func(c *Config) *string { return &c.Token })},
	{"datacenter", configStr(func(c *Config) *string { return &c.Datacenter })},
	{"ca_file", configStr(func(c *Config) *string { return &c.CAFile })},
	{"ca_path", configStr(func(c *Config) *string { return &c.CAPath })},
	{"cert_file", configStr(func(c *Config) *string { return &c.CertFile })},
	{"key_file", configStr(func(c *Config) *string { return &c.KeyFile })},
	{"tls_server_name", configStr(func(c *Config) *string { return &c.TLSServerName })},
	{"https_ca_file", configStr(func(c *Config) *string { return &c.HTTPSCAFile })},
	{"https_ca_path", configStr(func(c *Config) *string { return &c.HTTPSCAPath })},
	{"https_cert_file", configStr(func(c *Config) *string { return &c.HTTPSCertFile })},
	{"https_key_file", configStr(func(c *Config) *string { return &c.HTTPSKeyFile })},
	{"client_address", configStr(func(c *Config) *string { return &c.ClientAddress })},
	{"ping_type", configStr(func(c *Config) *string { return &c.PingType })},
	{"disable_coordinate_updates", configBool(func(c *Config) *bool { return &c.DisableCoordinateUpdates })},
	{"stale_read_nodes", configBool(func(c *Config) *bool { return &c.StaleReadNodes })},
	{"passing_threshold", configInt(func(c *Config) *int { return &c.PassingThreshold })},
	{"critical_threshold", configInt(func(c *Config) *int { return &c.CriticalThreshold })},
	{"check_update_interval", configDuration(func(c *Config) *time.Duration { return &c.CheckUpdateInterval })},
	{"instance_ttl", configDuration(func(c *Config) *time.Duration { return &c.AgentTTL })},
	{"instance_ttl_refresh", configDuration(func(c *Config) *time.Duration { return &c.TTLRefreshInterval })},
	{"session_ttl", configDuration(func(c *Config) *time.Duration { return &c.SessionTTL })},
	{"lock_delay", configDuration(func(c *Config) *time.Duration { return &c.LockDelay })},
	{"tls_expiry_warning", configDuration(func(c *Config) *time.Duration { return &c.TLSExpiryWarning })},
}

var configTelemetryKeyList = []configSpec[TelemetryConfig]{
	{"circonus_api_app", configStr(func(t *TelemetryConfig) *string { return &t.CirconusAPIApp })},
	{"circonus_api_token", configStr(func(t *TelemetryConfig) *string { return &t.CirconusAPIToken })},
	{"circonus_api_url", configStr(func(t *TelemetryConfig) *string { return &t.CirconusAPIURL })},
	{"circonus_broker_id", configStr(func(t *TelemetryConfig) *string { return &t.CirconusBrokerID })},
	{"circonus_broker_select_tag", configStr(func(t *TelemetryConfig) *string { return &t.CirconusBrokerSelectTag })},
	{"circonus_check_display_name", configStr(func(t *TelemetryConfig) *string { return &t.CirconusCheckDisplayName })},
	{"circonus_check_force_metric_activation", configStr(func(t *TelemetryConfig) *string { return &t.CirconusCheckForceMetricActivation })},
	{"circonus_check_id", configStr(func(t *TelemetryConfig) *string { return &t.CirconusCheckID })},
	{"circonus_check_instance_id", configStr(func(t *TelemetryConfig) *string { return &t.CirconusCheckInstanceID })},
	{"circonus_check_search_tag", configStr(func(t *TelemetryConfig) *string { return &t.CirconusCheckSearchTag })},
	{"circonus_check_tags", configStr(func(t *TelemetryConfig) *string { return &t.CirconusCheckTags })},
	{"circonus_submission_interval", configStr(func(t *TelemetryConfig) *string { return &t.CirconusSubmissionInterval })},
	{"circonus_submission_url", configStr(func(t *TelemetryConfig) *string { return &t.CirconusSubmissionURL })},
	{"disable_hostname", configBool(func(t *TelemetryConfig) *bool { return &t.DisableHostname })},
	{"dogstatsd_addr", configStr(func(t *TelemetryConfig) *string { return &t.DogstatsdAddr })},
	{"dogstatsd_tags", configStrings(func(t *TelemetryConfig) *[]string { return &t.DogstatsdTags })},
	{"filter_default", configBool(func(t *TelemetryConfig) *bool { return &t.FilterDefault })},
	{"prefix_filter", configStrings(func(t *TelemetryConfig) *[]string { return &t.PrefixFilter })},
	{"metrics_prefix", configStr(func(t *TelemetryConfig) *string { return &t.MetricsPrefix })},
	{"per_check_metrics", configBool(func(t *TelemetryConfig) *bool { return &t.PerCheckMetrics })},
	{"prometheus_retention_time", configDuration(func(t *TelemetryConfig) *time.Duration { return &t.PrometheusRetentionTime })},
	{"statsd_address", configStr(func(t *TelemetryConfig) *string { return &t.StatsdAddr })},
	{"statsite_address", configStr(func(t *TelemetryConfig) *string { return &t.StatsiteAddr })},
}

var (
	configRootSpecs      = configSpecMap(configRootKeyList)
	configTelemetrySpecs = configSpecMap(configTelemetryKeyList)
)

func configSpecMap[T any](list []configSpec[T]) map[string]configSetter[T] {
	m := make(map[string]configSetter[T], len(list))
	for _, s := range list {
		m[s.name] = s.set
	}
	return m
}

// ConfigKeys returns every key a config file may set: the top-level keys (including the blocks
// external_node_meta and telemetry) followed by "telemetry.<key>" for each telemetry key.
func ConfigKeys() []string {
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

// ---------------------------------------------------------------------------------------------
// Value decoding from the HCL AST (HCL and JSON files produce the same node types).

// configTokenString returns the string value of a STRING, HEREDOC or IDENT token.
func configTokenString(t token.Token) (s string, ok bool) {
	switch t.Type {
	case token.STRING, token.HEREDOC, token.IDENT:
	default:
		return "", false
	}
	defer func() {
		if recover() != nil {
			s, ok = t.Text, true
		}
	}()
	v, isStr := t.Value().(string)
	return v, isStr
}

func configDescribe(n ast.Node) string {
	switch v := n.(type) {
	case *ast.LiteralType:
		switch v.Token.Type {
		case token.NUMBER:
			return "a number"
		case token.FLOAT:
			return "a float"
		case token.BOOL:
			return "a boolean"
		case token.STRING, token.HEREDOC:
			return "a string"
		}
		return strings.ToLower(v.Token.Type.String())
	case *ast.ListType:
		return "a list"
	case *ast.ObjectType, *ast.ObjectList:
		return "a block"
	}
	return fmt.Sprintf("%T", n)
}

func configDecodeString(n ast.Node) (string, error) {
	if lit, ok := n.(*ast.LiteralType); ok {
		switch lit.Token.Type {
		case token.STRING, token.HEREDOC:
			if s, ok := configTokenString(lit.Token); ok {
				return s, nil
			}
		case token.NUMBER, token.FLOAT:
			return lit.Token.Text, nil
		}
	}
	return "", fmt.Errorf("expected a string, got %s", configDescribe(n))
}

func configDecodeBool(n ast.Node) (bool, error) {
	if lit, ok := n.(*ast.LiteralType); ok {
		switch lit.Token.Type {
		case token.BOOL:
			return lit.Token.Text == "true", nil
		case token.STRING:
			if s, ok := configTokenString(lit.Token); ok {
				if b, err := strconv.ParseBool(s); err == nil {
					return b, nil
				}
				return false, fmt.Errorf("expected a boolean, got %q", s)
			}
		}
	}
	return false, fmt.Errorf("expected a boolean, got %s", configDescribe(n))
}

func configDecodeInt(n ast.Node) (int, error) {
	if lit, ok := n.(*ast.LiteralType); ok {
		text := ""
		switch lit.Token.Type {
		case token.NUMBER:
			text = lit.Token.Text
		case token.STRING:
			s, ok := configTokenString(lit.Token)
			if !ok {
				break
			}
			text = s
		default:
			return 0, fmt.Errorf("expected an integer, got %s", configDescribe(n))
		}
		v, err := strconv.ParseInt(strings.TrimSpace(text), 0, strconv.IntSize)
		if err != nil {
			return 0, fmt.Errorf("expected an integer, got %q", text)
		}
		return int(v), nil
	}
	return 0, fmt.Errorf("expected an integer, got %s", configDescribe(n))
}

// configDecodeStringList accepts a list of strings, or a single string as a one-element list.
func configDecodeStringList(n ast.Node) ([]string, error) {
	switch v := n.(type) {
	case *ast.ListType:
		out := make([]string, 0, len(v.List))
		for i, elem := range v.List {
			s, err := configDecodeString(elem)
			if err != nil {
				return nil, fmt.Errorf("element %d: %w", i, err)
			}
			out = append(out, s)
		}
		return out, nil
	case *ast.LiteralType:
		if s, err := configDecodeString(v); err == nil {
			return []string{s}, nil
		}
	}
	return nil, fmt.Errorf("expected a list of strings, got %s", configDescribe(n))
}

// configDecodeMap decodes a block of string pairs (external_node_meta).
func configDecodeMap(obj *ast.ObjectType) (map[string]string, error) {
	out := make(map[string]string, len(obj.List.Items))
	for _, item := range obj.List.Items {
		if err := configNoLabels(item); err != nil {
			return nil, err
		}
		key := configKeyName(item)
		v, err := configDecodeString(item.Val)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", key, err)
		}
		out[key] = v
	}
	return out, nil
}
