package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// pingType picks consul-esm's ping_type for -probe: "udp" (unprivileged ICMP) when the kernel allows
// it to our group, else "socket" (raw ICMP) when we are root, else an error that says what to do.
func pingType() (string, error) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ping_group_range")
	if err == nil {
		f := strings.Fields(string(b))
		if len(f) == 2 {
			lo, err1 := strconv.Atoi(f[0])
			hi, err2 := strconv.Atoi(f[1])
			if gid := os.Getegid(); err1 == nil && err2 == nil && lo <= gid && gid <= hi {
				return "udp", nil
			}
		}
	}
	if os.Geteuid() == 0 {
		return "socket", nil
	}
	return "", fmt.Errorf("-probe needs ICMP: this kernel allows unprivileged ping only to the groups in "+
		"net.ipv4.ping_group_range (%q); allow yours with: sudo sysctl -w net.ipv4.ping_group_range=\"0 2147483647\"",
		strings.TrimSpace(string(b)))
}
