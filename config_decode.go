package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/hcl"
	"github.com/hashicorp/hcl/hcl/ast"
	"github.com/hashicorp/hcl/hcl/token"
)

// Config decoding: LoadConfig walks the paths, parses each file (HCL v1 or JSON, one AST for both),
// rejects unknown keys, overlays the file's keys onto the running config through the key tables,
// then applies the environment and validates. The key tables decode each value from the AST, so
// every error names its key; a file that fails leaves the config as it was.
//
// Why values are decoded from hcl's AST here instead of by hcl.DecodeObject into the struct: HCL v1's
// decoder has no way to reject unknown keys (a typo would be ignored silently), its errors do not
// name the key and file an operator must fix, and a key a later file sets to its zero value looks like
// one it leaves out unless every field is a pointer, while the overlay of -config-dir files needs the
// difference. Parsing stays hcl's.

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
	slices.SortFunc(entries, func(a, b fs.DirEntry) int { return strings.Compare(a.Name(), b.Name()) })
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
		if !slices.Contains(unknown, name) {
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
