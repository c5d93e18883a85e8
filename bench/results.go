package main

import "time"

// report is everything one harness invocation measured; it is also the JSON document.
type report struct {
	Started  time.Time    `json:"started"`
	Settings settings     `json:"settings"`
	Env      environment  `json:"environment"`
	Binaries []binaryInfo `json:"binaries"`
	Runs     []*runResult `json:"runs"`
	Floor    *floorResult `json:"floor,omitempty"` // -floor: the bare cost of the probes
	Summary  []summaryRow `json:"summary"`
	Goals    []goalResult `json:"goals"`
	WorkDir  string       `json:"work_dir,omitempty"` // kept configs and logs
}

// settings are the options that shape the measurement.
type settings struct {
	Size            string  `json:"size"`
	Nodes           int     `json:"nodes"`
	ChecksPerNode   int     `json:"checks_per_node"`
	Checks          int     `json:"checks"`
	HTTPChecks      int     `json:"http_checks"`
	TCPChecks       int     `json:"tcp_checks"`
	TCPPorts        int     `json:"tcp_ports"`
	IntervalSeconds float64 `json:"interval_seconds"`
	TimeoutSeconds  float64 `json:"timeout_seconds"`
	WindowSeconds   float64 `json:"window_seconds"`
	Flip            int     `json:"flip"`
	Outage          bool    `json:"outage"`
	FailMode        string  `json:"fail_mode"`
	Rounds          int     `json:"rounds"`
}

// environment describes the machine and the Consul the numbers come from.
type environment struct {
	CPUs      int    `json:"cpus"`
	GOOS      string `json:"goos"`
	GOARCH    string `json:"goarch"`
	Consul    string `json:"consul"`
	ConsulBin string `json:"consul_bin"`
	// LoadAvg is /proc/loadavg's 1-minute figure before the first run and after the last: other
	// work on the machine skews every figure, and this shows whether there was any.
	LoadAvgStart num `json:"loadavg_start"`
	LoadAvgEnd   num `json:"loadavg_end"`
}

// binaryInfo is one binary under test: A (-esm) or B (-compare).
type binaryInfo struct {
	Label   string `json:"label"`
	Path    string `json:"path"`
	Version string `json:"version"`
}

// runResult is one run of one binary.
type runResult struct {
	Label  string `json:"label"`
	Binary string `json:"binary"`
	Round  int    `json:"round"`
	Error  string `json:"error,omitempty"` // the run stopped early; later phases are missing

	Checks          int `json:"checks"`
	ScheduledPerSec num `json:"scheduled_checks_per_second"` // N*M/I

	RegisterSeconds   num `json:"register_seconds"`    // registering every node (harness, not consul-esm)
	FirstWriteSeconds num `json:"first_write_seconds"` // consul-esm start until every check was written once
	FirstWritten      int `json:"first_written"`       // checks written at least once (all, unless Error)
	// StartupEndpoints are consul-esm's requests from its start until every check was written once.
	StartupEndpoints []endpointRate `json:"startup_endpoints"`

	Steady *steadyResult     `json:"steady,omitempty"`
	Flip   *transitionResult `json:"flip,omitempty"`
	Outage *transitionResult `json:"outage,omitempty"`

	ESMPeakRSSBytes  int64  `json:"esm_peak_rss_bytes"` // over the whole run
	ESMBytesPerCheck num    `json:"esm_bytes_per_check"`
	StopError        string `json:"stop_error,omitempty"` // consul-esm did not shut down cleanly
}

// steadyResult is the steady-state window: targets healthy, nothing changes.
type steadyResult struct {
	Seconds          num            `json:"seconds"`
	ESMCPUCores      num            `json:"esm_cpu_cores"`
	ESMPeakRSSBytes  int64          `json:"esm_peak_rss_bytes"`
	ESMEndRSSBytes   int64          `json:"esm_end_rss_bytes"`
	ConsulCPUCores   num            `json:"consul_cpu_cores"` // includes the harness's own watchers (idle here)
	ConsulRSSBytes   int64          `json:"consul_end_rss_bytes"`
	ChecksPerSec     num            `json:"checks_per_second"` // target hits, HTTP + TCP
	HTTPPerSec       num            `json:"http_checks_per_second"`
	TCPPerSec        num            `json:"tcp_checks_per_second"`
	ExecutedRatio    num            `json:"executed_ratio"`      // checks_per_second / scheduled
	HTTPChecksNotRun num            `json:"http_checks_not_run"` // HTTP checks with no hit (only if window >= interval)
	RequestsPerSec   num            `json:"requests_per_second"`
	PerKind          map[string]num `json:"requests_per_second_by_kind"`
	BytesOutPerSec   num            `json:"response_bytes_per_second"`
	Endpoints        []endpointRate `json:"endpoints"`
	StatusChanges    int64          `json:"status_changes"`
	Writes           int64          `json:"writes"` // kind "write": no liveness
}

// transitionResult is a flip phase: targets fail, then recover.
type transitionResult struct {
	FloorSeconds num          `json:"floor_seconds"` // interval + timeout
	Fail         changeResult `json:"fail"`
	Recover      changeResult `json:"recover"`
}

// changeResult is one direction of a transition.
type changeResult struct {
	Checks            int            `json:"checks"`  // checks whose target changed
	Latency           latencyStats   `json:"latency"` // target change -> catalog change, seconds
	Seconds           num            `json:"seconds"` // first target change until the catalog showed the last one
	Changes           int64          `json:"status_changes"`
	Requests          int64          `json:"requests"`
	Writes            int64          `json:"writes"`
	RequestsPerChange num            `json:"requests_per_change"`
	WritesPerChange   num            `json:"writes_per_change"`
	ESMCPUCores       num            `json:"esm_cpu_cores"`
	Endpoints         []endpointRate `json:"endpoints"`         // consul-esm's requests during the phase
	GaveUp            string         `json:"gave_up,omitempty"` // why the wait ended before every check changed
}

// summaryRow is one figure: its mean per binary over the rounds, and A/B.
type summaryRow struct {
	Key     string         `json:"key"`
	Section string         `json:"section"`
	Label   string         `json:"label"`
	Unit    string         `json:"unit"`
	Values  map[string]num `json:"values"`
	Ratio   *num           `json:"ratio_a_b,omitempty"`
}

// goalResult is one of the goals set for our consul-esm, judged on binary A's means.
type goalResult struct {
	Goal   string `json:"goal"`
	Value  num    `json:"value"`
	Limit  string `json:"limit"`
	Passed *bool  `json:"passed"` // nil: not measured in this run
	Note   string `json:"note,omitempty"`
}
