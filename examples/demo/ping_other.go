//go:build !linux

package main

// pingType: outside Linux unprivileged ICMP ("udp") needs no setup (macOS) or is all there is.
func pingType() (string, error) { return "udp", nil }
