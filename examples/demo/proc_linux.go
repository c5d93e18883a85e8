package main

import "syscall"

// setParentDeathSignal has the kernel kill a child when the demo dies, even by SIGKILL (a second
// Ctrl-C, or a test that gave up), so no Consul is left behind.
func setParentDeathSignal(a *syscall.SysProcAttr) { a.Pdeathsig = syscall.SIGKILL }
