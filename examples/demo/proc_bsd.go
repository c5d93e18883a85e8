//go:build unix && !linux

package main

import "syscall"

// setParentDeathSignal: only Linux has a parent-death signal; elsewhere the demo's own cleanup
// (run on Ctrl-C and SIGTERM) is what stops the children.
func setParentDeathSignal(*syscall.SysProcAttr) {}
