# An overlay for -config-dir: files are applied in name order, each setting only the keys it names.
#   consul-esm -config-file=consul-esm.hcl -config-dir=conf.d
telemetry {
  statsd_address            = "127.0.0.1:8125"
  prometheus_retention_time = "5m"
  disable_hostname          = true
}
