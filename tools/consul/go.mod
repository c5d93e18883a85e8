module github.com/consul-esm/consul-esm/tools/consul

go 1.26
