# The ACL policy consul-esm's token needs (change consul-esm/ if you set consul_kv_path):
#   consul acl policy create -name consul-esm -rules @examples/acl-policy.hcl
#   consul acl token create -description consul-esm -policy-name consul-esm
# On Consul Enterprise also grant: namespace_prefix "" { acl = "read" }
agent_prefix "" {
  policy = "read"
}
key_prefix "consul-esm/" {
  policy = "write"
}
node_prefix "" {
  policy = "write"
}
service_prefix "" {
  policy = "write"
}
session_prefix "" {
  policy = "write"
}
