package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	gsyslog "github.com/hashicorp/go-syslog"
)

// setupLogging builds the root logger named "consul-esm" writing to stdout plus, when configured, a
// rotating log file and syslog. The returned func flushes and closes the extra sinks.
func setupLogging(cfg *Config, stdout io.Writer) (hclog.InterceptLogger, func(), error) {
	level, err := parseLogLevel(cfg.LogLevel)
	if err != nil {
		return nil, nil, err
	}
	writers := []io.Writer{stdout}
	var closers []io.Closer

	if cfg.LogFile != "" {
		fw, err := newRotatingFile(cfg.LogFile, cfg.LogRotateBytes, cfg.LogRotateMaxFiles, cfg.LogRotateDuration)
		if err != nil {
			return nil, nil, err
		}
		writers = append(writers, fw)
		closers = append(closers, fw)
	}
	if cfg.EnableSyslog {
		facility := cfg.SyslogFacility
		if facility == "" {
			facility = "LOCAL0"
		}
		sl, err := gsyslog.NewLogger(gsyslog.LOG_NOTICE, facility, "consul-esm")
		if err != nil {
			return nil, nil, fmt.Errorf("setting up syslog (facility %q): %w", facility, err)
		}
		writers = append(writers, &syslogWriter{l: sl})
		closers = append(closers, sl)
	}

	logger := hclog.NewInterceptLogger(&hclog.LoggerOptions{
		Name:            "consul-esm",
		Level:           level,
		JSONFormat:      cfg.LogJSON,
		Output:          io.MultiWriter(writers...),
		TimeFormat:      "2006-01-02T15:04:05.000Z0700",
		IncludeLocation: false,
	})
	return logger, func() {
		for _, c := range closers {
			_ = c.Close()
		}
	}, nil
}

// parseLogLevel accepts the original's level names (case-insensitive; ERR is ERROR).
func parseLogLevel(s string) (hclog.Level, error) {
	switch strings.ToUpper(strings.TrimSpace(s)) {
	case "TRACE":
		return hclog.Trace, nil
	case "DEBUG":
		return hclog.Debug, nil
	case "", "INFO":
		return hclog.Info, nil
	case "WARN":
		return hclog.Warn, nil
	case "ERR", "ERROR":
		return hclog.Error, nil
	}
	return hclog.NoLevel, fmt.Errorf("invalid log_level %q: must be one of TRACE, DEBUG, INFO, WARN, ERR, ERROR", s)
}

// syslogWriter maps hclog's "[LEVEL]" text to syslog priorities so WARN and ERROR lines are not all
// filed under NOTICE.
type syslogWriter struct {
	mu sync.Mutex
	l  gsyslog.Syslogger
}

func (w *syslogWriter) Write(p []byte) (int, error) {
	prio := gsyslog.LOG_NOTICE
	switch {
	case strings.Contains(string(p), "[ERROR]"), strings.Contains(string(p), `"@level":"error"`):
		prio = gsyslog.LOG_ERR
	case strings.Contains(string(p), "[WARN]"), strings.Contains(string(p), `"@level":"warn"`):
		prio = gsyslog.LOG_WARNING
	case strings.Contains(string(p), "[DEBUG]"), strings.Contains(string(p), "[TRACE]"),
		strings.Contains(string(p), `"@level":"debug"`), strings.Contains(string(p), `"@level":"trace"`):
		prio = gsyslog.LOG_DEBUG
	case strings.Contains(string(p), "[INFO]"), strings.Contains(string(p), `"@level":"info"`):
		prio = gsyslog.LOG_INFO
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.l.WriteLevel(prio, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// rotatingFile is the log_file sink with Consul's rotation semantics: a path ending in "/" logs to
// consul.log in that directory; files rotate by size (log_rotate_bytes) and age (log_rotate_duration,
// default 24h) into <name>-<unix-nanos>.<ext>, keeping log_rotate_max_files old files (0 = all).
type rotatingFile struct {
	mu       sync.Mutex
	dir      string
	base     string
	ext      string
	maxBytes int
	maxFiles int
	maxAge   time.Duration
	f        *os.File
	size     int
	opened   time.Time
}

func newRotatingFile(path string, maxBytes, maxFiles int, maxAge time.Duration) (*rotatingFile, error) {
	if strings.HasSuffix(path, "/") {
		path += "consul.log"
	}
	if maxAge <= 0 {
		maxAge = 24 * time.Hour
	}
	ext := filepath.Ext(path)
	r := &rotatingFile{
		dir:      filepath.Dir(path),
		base:     strings.TrimSuffix(filepath.Base(path), ext),
		ext:      ext,
		maxBytes: maxBytes,
		maxFiles: maxFiles,
		maxAge:   maxAge,
	}
	if err := r.open(); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *rotatingFile) path() string { return filepath.Join(r.dir, r.base+r.ext) }

func (r *rotatingFile) open() error {
	if err := os.MkdirAll(r.dir, 0o755); err != nil {
		return fmt.Errorf("creating log directory %q: %w", r.dir, err)
	}
	f, err := os.OpenFile(r.path(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return fmt.Errorf("opening log_file %q: %w", r.path(), err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("opening log_file %q: %w", r.path(), err)
	}
	r.f, r.size, r.opened = f, int(st.Size()), time.Now()
	return nil
}

func (r *rotatingFile) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if (r.maxBytes > 0 && r.size+len(p) > r.maxBytes && r.size > 0) || time.Since(r.opened) > r.maxAge {
		if err := r.rotate(); err != nil {
			return 0, err
		}
	}
	n, err := r.f.Write(p)
	r.size += n
	return n, err
}

func (r *rotatingFile) rotate() error {
	r.f.Close()
	rotated := filepath.Join(r.dir, fmt.Sprintf("%s-%d%s", r.base, time.Now().UnixNano(), r.ext))
	if err := os.Rename(r.path(), rotated); err != nil {
		return fmt.Errorf("rotating log_file: %w", err)
	}
	r.prune()
	return r.open()
}

// prune removes the oldest rotated files beyond maxFiles.
func (r *rotatingFile) prune() {
	if r.maxFiles <= 0 {
		return
	}
	old, _ := filepath.Glob(filepath.Join(r.dir, r.base+"-*"+r.ext))
	sort.Strings(old)
	for len(old) > r.maxFiles {
		_ = os.Remove(old[0])
		old = old[1:]
	}
}

func (r *rotatingFile) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.f.Close()
}
