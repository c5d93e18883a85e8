package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// esmBinary builds consul-esm once per test run into a temp dir and returns its path.
func esmBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "consul-esm-bin-")
		if err != nil {
			buildErr = err
			return
		}
		builtBin = filepath.Join(dir, "consul-esm")
		cmd := exec.Command("go", "build", "-o", builtBin, "-ldflags", "-X main.GitCommit=testcommit", ".")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = errors.New(string(out))
		}
	})
	if buildErr != nil {
		t.Fatalf("building consul-esm: %v", buildErr)
	}
	return builtBin
}

func runBinary(t *testing.T, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(esmBinary(t), args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	code := 0
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		code = exit.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), code
}

func TestMainVersion(t *testing.T) {
	for _, flag := range []string{"-v", "-version", "--version"} {
		out, code := runBinary(t, flag)
		if code != 0 {
			t.Fatalf("%s exit %d", flag, code)
		}
		want := "consul-esm v" + Version + "-" + Prerelease + " (testcommit)\n"
		if out != want {
			t.Fatalf("%s printed %q, want %q", flag, out, want)
		}
		if f := strings.Fields(out); f[1] != "v"+Version+"-"+Prerelease {
			t.Fatalf("field 2 = %q", f[1])
		}
	}
}

func TestMainHelp(t *testing.T) {
	out, code := runBinary(t, "-h")
	if code != ExitCodeError {
		t.Fatalf("-h exit %d, want 11", code)
	}
	for _, want := range []string{"Usage: consul-esm [options]", "A config file is optional, and can be either HCL or JSON format.", "-config-file", "-config-dir", "-version"} {
		if !strings.Contains(out, want) {
			t.Errorf("usage lacks %q:\n%s", want, out)
		}
	}
}

func TestMainBadFlagsAndConfig(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	unknown := write("unknown.hcl", "stuff = 1\n")
	badDur := write("baddur.json", `{"node_reconnect_timeout": "72 hours"}`)
	badPing := write("badping.hcl", `ping_type = "tcp"`)
	badLevel := write("badlevel.hcl", `log_level = "LOUD"`)

	for _, tc := range []struct {
		name string
		args []string
		want []string
	}{
		{"unknown flag", []string{"-nope"}, []string{"error parsing flags:"}},
		{"positional", []string{"extra"}, []string{"error parsing flags:"}},
		{"unknown key", []string{"-config-file", unknown}, []string{"Error loading config:", unknown, "stuff"}},
		{"bad duration", []string{"-config-dir", dir + "/baddur.json"}, []string{"Error loading config:", badDur, "node_reconnect_timeout"}},
		{"bad ping_type", []string{"-config-file=" + badPing}, []string{"Error parsing config:", `ping_type must be one of either "udp" or "socket"`}},
		{"bad log_level", []string{"-config-file", badLevel}, []string{"Error parsing config:", "LOUD"}},
		{"missing file", []string{"-config-file", filepath.Join(dir, "missing.hcl")}, []string{"Error loading config:", "missing.hcl"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, code := runBinary(t, tc.args...)
			if code != ExitCodeError {
				t.Fatalf("exit %d, want 11; output:\n%s", code, out)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
		})
	}
}
