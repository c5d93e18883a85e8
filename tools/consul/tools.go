//go:build tools

// Package tools pins the Consul server that tests and the demo build from the Go module proxy.
package tools

import _ "github.com/hashicorp/consul"
