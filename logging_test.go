package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	gsyslog "github.com/hashicorp/go-syslog"
)

func TestLoggingJSONLines(t *testing.T) {
	var out bytes.Buffer
	cfg := DefaultConfig()
	cfg.LogJSON = true
	logger, closeLogs, err := setupLogging(cfg, &out)
	if err != nil {
		t.Fatal(err)
	}
	defer closeLogs()
	logger.Info("Obtained leadership")
	logger.Named("checks").Warn("Check is now critical", "check", "web:http")
	logger.Debug("hidden at INFO")

	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("want 2 lines, got %d:\n%s", len(lines), out.String())
	}
	for i, want := range []struct{ level, msg, module string }{
		{"info", "Obtained leadership", "consul-esm"},
		{"warn", "Check is now critical", "consul-esm.checks"},
	} {
		var m map[string]any
		if err := json.Unmarshal([]byte(lines[i]), &m); err != nil {
			t.Fatalf("line %d is not JSON: %v: %s", i, err, lines[i])
		}
		if m["@level"] != want.level || m["@message"] != want.msg || m["@module"] != want.module {
			t.Errorf("line %d = %v, want level %q message %q module %q", i, m, want.level, want.msg, want.module)
		}
		if _, err := time.Parse("2006-01-02T15:04:05.000Z0700", fmt.Sprint(m["@timestamp"])); err != nil {
			t.Errorf("line %d @timestamp %v: %v", i, m["@timestamp"], err)
		}
	}
	if !strings.Contains(lines[1], `"check":"web:http"`) {
		t.Errorf("field missing: %s", lines[1])
	}
}

func TestLoggingTextAndLevels(t *testing.T) {
	var out bytes.Buffer
	cfg := DefaultConfig()
	cfg.LogLevel = "warn"
	prevStdLog := log.Writer()
	logger, closeLogs, err := setupLogging(cfg, &out)
	if err != nil {
		t.Fatal(err)
	}
	defer closeLogs()
	sub := logger.Named("leader")
	logger.Info("not shown")
	logger.Warn("Failed to deregister service", "error", "boom")
	logger.SetLevel(hclog.Debug) // what SIGHUP does; sub-loggers follow
	sub.Debug("Updating external node list")

	text := out.String()
	if strings.Contains(text, "not shown") {
		t.Errorf("INFO line written at WARN level:\n%s", text)
	}
	for _, want := range []string{
		"[WARN]  consul-esm: Failed to deregister service: error=boom",
		"[DEBUG] consul-esm.leader: Updating external node list",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("output lacks %q:\n%s", want, text)
		}
	}

	// The standard library logger (go-metrics' statsd sink, net/http) lands in hclog with its level.
	log.Printf("[ERR] Error connecting to statsd! Err: refused")
	if !strings.Contains(out.String(), "[ERROR] consul-esm: Error connecting to statsd! Err: refused") {
		t.Errorf("std log line not routed through hclog:\n%s", out.String())
	}
	closeLogs()
	if log.Writer() != prevStdLog {
		log.SetOutput(prevStdLog)
		t.Errorf("closeLogs did not restore the standard logger")
	}
}

func TestLoggingInvalidSettings(t *testing.T) {
	cfg := DefaultConfig()
	cfg.LogLevel = "LOUD"
	if _, _, err := setupLogging(cfg, &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), `invalid log_level "LOUD"`) {
		t.Fatalf("bad level error = %v", err)
	}

	cfg = DefaultConfig()
	cfg.EnableSyslog = true
	cfg.SyslogFacility = "LOCAL9"
	_, _, err := setupLogging(cfg, &bytes.Buffer{})
	if err == nil || !strings.Contains(err.Error(), `syslog (facility "LOCAL9")`) || !strings.Contains(err.Error(), "invalid syslog facility") {
		t.Fatalf("bad facility error = %v", err)
	}

	// The same mistake in a file is caught while loading, with the accepted values listed.
	dir := t.TempDir()
	path := filepath.Join(dir, "esm.hcl")
	if err := os.WriteFile(path, []byte("enable_syslog = true\nsyslog_facility = \"LOCAL9\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = LoadConfig([]string{path})
	var verr *ValidationError
	if !errors.As(err, &verr) || !strings.Contains(err.Error(), `invalid syslog_facility "LOCAL9"`) || !strings.Contains(err.Error(), "LOCAL7") {
		t.Fatalf("LoadConfig error = %v", err)
	}
}

// A working syslog needs a syslog socket; where the machine has one, a line must go through.
func TestLoggingSyslog(t *testing.T) {
	if _, err := os.Stat("/dev/log"); err != nil {
		t.Skip("no /dev/log on this machine")
	}
	cfg := DefaultConfig()
	cfg.EnableSyslog = true
	cfg.SyslogFacility = "local3"
	logger, closeLogs, err := setupLogging(cfg, &bytes.Buffer{})
	if err != nil {
		t.Fatalf("syslog with a valid facility: %v", err)
	}
	defer closeLogs()
	logger.Info("consul-esm syslog test line")
}

type fakeSyslog struct{ prios []gsyslog.Priority }

func (f *fakeSyslog) WriteLevel(p gsyslog.Priority, _ []byte) error {
	f.prios = append(f.prios, p)
	return nil
}
func (f *fakeSyslog) Write(b []byte) (int, error) { return len(b), nil }
func (f *fakeSyslog) Close() error                { return nil }

func TestLoggingSyslogPriorities(t *testing.T) {
	for _, json := range []bool{false, true} {
		fake := &fakeSyslog{}
		logger := hclog.New(&hclog.LoggerOptions{
			Name: "consul-esm", Level: hclog.Trace, JSONFormat: json, Output: &syslogWriter{l: fake},
		})
		logger.Error("Failed to shutdown http interface")
		logger.Warn("message mentioning [ERROR] in its text")
		logger.Info("Obtained leadership")
		logger.Debug("Caught signal:hangup")
		logger.Trace("loop stopped")
		want := []gsyslog.Priority{gsyslog.LOG_ERR, gsyslog.LOG_WARNING, gsyslog.LOG_INFO, gsyslog.LOG_DEBUG, gsyslog.LOG_DEBUG}
		if fmt.Sprint(fake.prios) != fmt.Sprint(want) {
			t.Errorf("json=%v priorities %v, want %v", json, fake.prios, want)
		}
	}
	if p := syslogPriority([]byte("no level here")); p != gsyslog.LOG_NOTICE {
		t.Errorf("unlabelled line priority %v", p)
	}
}

func listDir(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	slices.Sort(names)
	return names
}

// Rotation by size keeps log_rotate_max_files archives, never touches look-alike files, and every
// line ends up in exactly one file.
func TestLoggingFileRotationBySize(t *testing.T) {
	dir := t.TempDir()
	for _, name := range []string{"esm-template.log", "esm-1.txt", "esm-notes.log"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("keep me\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cfg := DefaultConfig()
	cfg.LogFile = filepath.Join(dir, "esm.log")
	cfg.LogRotateBytes = 300
	cfg.LogRotateMaxFiles = 2
	var stdout bytes.Buffer
	logger, closeLogs, err := setupLogging(cfg, &stdout)
	if err != nil {
		t.Fatal(err)
	}
	const lines = 40
	for i := range lines {
		logger.Info("Updated checks", "n", i)
	}
	closeLogs()

	var archives []string
	total := 0
	for _, name := range listDir(t, dir) {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case name == "esm.log":
		case strings.HasPrefix(name, "esm-") && strings.HasSuffix(name, ".log") && string(b) != "keep me\n":
			archives = append(archives, name)
		default:
			if string(b) != "keep me\n" {
				t.Errorf("unrelated file %s changed: %q", name, b)
			}
			continue
		}
		if len(b) > 300 {
			t.Errorf("%s has %d bytes, limit 300", name, len(b))
		}
		total += strings.Count(string(b), "Updated checks")
	}
	if len(archives) != 2 {
		t.Fatalf("archives = %v, want 2 (log_rotate_max_files)", archives)
	}
	if total >= lines || total == 0 {
		t.Fatalf("%d lines survive; older archives should have been pruned", total)
	}
	for _, keep := range []string{"esm-template.log", "esm-1.txt", "esm-notes.log"} {
		if _, err := os.Stat(filepath.Join(dir, keep)); err != nil {
			t.Errorf("unrelated file removed: %v", err)
		}
	}
	if strings.Count(stdout.String(), "Updated checks") != lines {
		t.Errorf("stdout lost lines")
	}
}

// log_rotate_max_files = -1 discards archives; a directory path logs to consul.log as the original.
func TestLoggingFileRotationDiscardAndDirectory(t *testing.T) {
	dir := t.TempDir()
	r, err := newRotatingFile(dir+"/", 100, -1, 0)
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		if _, err := r.Write([]byte(strings.Repeat("x", 40) + "\n")); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if names := listDir(t, dir); len(names) != 1 || names[0] != "consul.log" {
		t.Fatalf("files = %v, want only consul.log", names)
	}
}

func TestLoggingFileRotationByAge(t *testing.T) {
	dir := t.TempDir()
	r, err := newRotatingFile(filepath.Join(dir, "esm.log"), 0, 0, 20*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	waitFor(t, 5*time.Second, func() error {
		if _, err := r.Write([]byte("tick\n")); err != nil {
			return err
		}
		if n := len(listDir(t, dir)); n < 2 {
			return fmt.Errorf("%d files", n)
		}
		return nil
	})
}

// The banner goes to stdout in text mode and is suppressed with log_json, whose stdout must stay
// parseable JSON.
func TestLoggingBannerSuppressedWithJSON(t *testing.T) {
	for _, jsonLogs := range []bool{false, true} {
		var banner bytes.Buffer
		cfg := DefaultConfig()
		cfg.HTTPAddr = "127.0.0.1:1"
		cfg.LogJSON = jsonLogs
		a, err := NewAgent(cfg, hclog.NewNullLogger(), AgentOptions{Banner: &banner})
		if err != nil {
			t.Fatal(err)
		}
		a.printBanner()
		a.telemetry.Close()
		if got := strings.Contains(banner.String(), "Consul ESM running!"); got == jsonLogs {
			t.Errorf("log_json=%v: banner printed = %v:\n%s", jsonLogs, got, banner.String())
		}
	}
}
