package main

import (
	"fmt"
	"os"
	"path/filepath"
)

// esmConfig is the consul-esm config the demo writes; every key is explained in the README's
// configuration reference.
const esmConfig = `# Written by the consul-esm demo.
http_addr             = %q
instance_id           = "demo"
consul_service        = "consul-esm"
consul_kv_path        = "consul-esm/"
log_level             = "DEBUG"

# /health, /metrics (and pprof with enable_debug) are served here.
client_address        = %q

# Write every change of a check's output at once (the default, 5m, spares Consul in production).
check_update_interval = "0s"

# Ping external-probe nodes every second (only used with -probe).
node_probe_interval   = "1s"
ping_type             = %q

telemetry {
  prometheus_retention_time = "1m"
  disable_hostname          = true
}
`

type esmProcess struct {
	proc       *proc
	configPath string
	clientAddr string
}

// startESM writes the config into dir and starts consul-esm with it, its output going to
// dir/consul-esm.log. On error the returned process, if not nil, still has to be stopped.
func startESM(bin, dir, consulAddr, ping string) (*esmProcess, error) {
	ports, err := freePorts(1)
	if err != nil {
		return nil, err
	}
	e := &esmProcess{configPath: filepath.Join(dir, "consul-esm.hcl"), clientAddr: loopback(ports[0])}
	if err := os.WriteFile(e.configPath, fmt.Appendf(nil, esmConfig, consulAddr, e.clientAddr, ping), 0o644); err != nil {
		return nil, err
	}
	e.proc, err = startProc("consul-esm", bin, []string{"-config-file=" + e.configPath}, dir,
		filepath.Join(dir, "consul-esm.log"), nil)
	if err != nil {
		return nil, err
	}
	return e, nil
}
