package main

import "strings"

// Version information. Release builds stamp GitCommit (and may override Version/Prerelease) with
// -ldflags "-X main.GitCommit=...".
var (
	Version    = "0.11.0"
	Prerelease = "dev"
	GitCommit  = ""
)

// versionString renders the `-version` line in the original's format: consul-esm v<ver>[-<pre>][ (<commit>)].
func versionString() string {
	v := "v" + Version
	if Prerelease != "" {
		v += "-" + Prerelease
	}
	s := "consul-esm " + v
	if c := strings.Trim(GitCommit, "'"); c != "" {
		s += " (" + c + ")"
	}
	return s
}
