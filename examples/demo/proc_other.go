//go:build !unix

package main

import (
	"os"
	"os/exec"
)

func setProcAttrs(*exec.Cmd) {}

func signalGroup(cmd *exec.Cmd, _ os.Signal) { _ = cmd.Process.Kill() }

func killGroup(cmd *exec.Cmd) { _ = cmd.Process.Kill() }

func terminalWidth(*os.File) int { return 0 }

func isTerminal(*os.File) bool { return false }
