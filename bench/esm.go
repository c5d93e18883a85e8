package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// esmConfig is the config file the harness writes for the binary under test. It sets only keys the
// original consul-esm also knows (the original rejects unknown keys), unless -check-update-interval
// is given. client_address stays unset: no HTTP server, so nothing but checking costs CPU.
func esmConfig(proxyAddr, kvPath, checkUpdateInterval string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "log_level = \"WARN\"\n")
	fmt.Fprintf(&b, "http_addr = %s\n", strconv.Quote(proxyAddr))
	fmt.Fprintf(&b, "consul_kv_path = %s\n", strconv.Quote(kvPath))
	if checkUpdateInterval != "" {
		fmt.Fprintf(&b, "check_update_interval = %s\n", strconv.Quote(checkUpdateInterval))
	}
	return b.String()
}

// startESM writes the config into dir and starts bin with it (and with extraConfig after it, if set).
func startESM(bin, dir, proxyAddr, kvPath string, o options) (*process, error) {
	confPath := filepath.Join(dir, "esm.hcl")
	if err := os.WriteFile(confPath, []byte(esmConfig(proxyAddr, kvPath, o.CheckUpdateInterval)), 0o644); err != nil {
		return nil, fmt.Errorf("writing consul-esm config: %w", err)
	}
	args := []string{"-config-file", confPath}
	if o.ESMConfig != "" {
		abs, err := filepath.Abs(o.ESMConfig)
		if err != nil {
			return nil, err
		}
		args = append(args, "-config-file", abs)
	}
	return startProcess("consul-esm", filepath.Join(dir, "consul-esm.log"), bin, args...)
}
