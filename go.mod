module github.com/consul-esm/consul-esm

go 1.26
