# consul-esm beside a local Consul agent: the everyday setup.
#
# Copy it to /etc/consul-esm.d/ (the directory the systemd unit in packaging/systemd reads) and adjust.
# Keys left out keep their defaults; the README's "Configuration reference" lists every key. The same
# settings in JSON are in consul-esm.json.

# Consul's HTTP API: the local agent. CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE and
# CONSUL_CACERT in the environment work too; a value set here wins. Keep the ACL token out of this
# file: set CONSUL_HTTP_TOKEN_FILE in /etc/consul-esm.d/consul-esm.env (see the systemd unit).
http_addr = "127.0.0.1:8500"

log_level = "INFO"
log_json  = false

# Instances with the same service name, tag and KV path share the external nodes between them.
consul_service     = "consul-esm"
consul_service_tag = ""
consul_kv_path     = "consul-esm/"

# The node meta that marks a catalog node as external (every pair must match).
external_node_meta {
  "external-node" = "true"
}

# Nodes registered with external-probe = "true" are pinged every node_probe_interval and removed
# from the catalog after node_reconnect_timeout without an answer. ping_type "udp" needs
# net.ipv4.ping_group_range to include consul-esm's group; "socket" needs root or CAP_NET_RAW
# (the systemd unit grants CAP_NET_RAW).
ping_type              = "udp"
node_probe_interval    = "10s"
node_reconnect_timeout = "72h"

# Anti-flapping: 0 writes every status change at once.
passing_threshold  = 0
critical_threshold = 0

# A change of a check's output alone (same status) is written at most this often.
check_update_interval = "5m"

# consul-esm's own HTTP server: /health for load balancers and orchestrators, /metrics for Prometheus.
client_address = "127.0.0.1:8080"

telemetry {
  prometheus_retention_time = "1m"
  disable_hostname          = true
}
