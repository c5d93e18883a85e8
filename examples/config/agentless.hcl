# consul-esm without a local agent: it talks to the Consul servers directly, registers itself in the
# catalog with a session-backed health check, and batches its check writes into transactions.
# (CONSUL_ENABLEAGENTLESS=true in the environment does the same as enable_agentless.)
enable_agentless = true

# A Consul server, or a load balancer in front of the servers, over HTTPS.
http_addr       = "https://127.0.0.1:8501"
ca_file         = "/etc/consul-esm.d/tls/consul-agent-ca.pem"
tls_server_name = "server.dc1.consul"
datacenter      = "dc1"

# Read node and health lists from any server, sparing the leader.
stale_read_nodes = true

# How long check writes are collected into one transaction (0 writes each at once).
batch_flush_interval = "500ms"

consul_service = "consul-esm"
consul_kv_path = "consul-esm/"
client_address = "127.0.0.1:8080"
