package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	gsyslog "github.com/hashicorp/go-syslog"
)

// setupLogging builds the root logger named "consul-esm" writing to stdout plus, when configured, a
// rotating log file and syslog. It also routes the standard library logger (used by go-metrics'
// statsd sinks and net/http) into it, levels inferred from "[ERR]"-style prefixes. The returned func
// closes the extra sinks and restores the standard logger.
func setupLogging(cfg *Config, stdout io.Writer) (hclog.InterceptLogger, func(), error) {
	level, err := parseLogLevel(cfg.LogLevel)
	if err != nil {
		return nil, nil, err
	}
	writers := []io.Writer{stdout}
	var closers []io.Closer
	closeAll := func() {
		for _, c := range closers {
			_ = c.Close()
		}
	}

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
			facility = defaultSyslogFacility
		}
		sl, err := gsyslog.NewLogger(gsyslog.LOG_NOTICE, facility, "consul-esm")
		if err != nil {
			closeAll()
			return nil, nil, fmt.Errorf("setting up syslog (facility %q): %w", facility, err)
		}
		writers = append(writers, &syslogWriter{l: sl})
		closers = append(closers, sl)
	}

	logger := hclog.NewInterceptLogger(&hclog.LoggerOptions{
		Name:       "consul-esm",
		Level:      level,
		JSONFormat: cfg.LogJSON,
		// Every sink gets every line even when an earlier one fails (a full disk must not silence
		// syslog, nor a dead syslog the file).
		Output:     &teeWriter{writers: writers},
		TimeFormat: "2006-01-02T15:04:05.000Z0700",
	})

	prevOut, prevFlags, prevPrefix := log.Writer(), log.Flags(), log.Prefix()
	log.SetOutput(logger.StandardWriter(&hclog.StandardLoggerOptions{InferLevels: true}))
	log.SetFlags(0)
	log.SetPrefix("")
	return logger, func() {
		log.SetOutput(prevOut)
		log.SetFlags(prevFlags)
		log.SetPrefix(prevPrefix)
		closeAll()
	}, nil
}

// teeWriter writes p to every writer and reports the first error, unlike io.MultiWriter, which stops
// at the first failing writer.
type teeWriter struct{ writers []io.Writer }

func (t *teeWriter) Write(p []byte) (int, error) {
	var first error
	for _, w := range t.writers {
		if _, err := w.Write(p); err != nil && first == nil {
			first = err
		}
	}
	if first != nil {
		return 0, first
	}
	return len(p), nil
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

// syslogWriter maps each hclog line's level to a syslog priority, so WARN and ERROR lines are not
// all filed under one priority.
type syslogWriter struct {
	mu sync.Mutex
	l  gsyslog.Syslogger
}

func (w *syslogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.l.WriteLevel(syslogPriority(p), p); err != nil {
		return 0, fmt.Errorf("writing to syslog: %w", err)
	}
	return len(p), nil
}

// syslogPriority reads the level of one hclog line: the "@level" field of a JSON line, or the
// bracketed label after the timestamp of a text line. Only the line's own level counts, never text
// inside the message.
func syslogPriority(p []byte) gsyslog.Priority {
	var level string
	if bytes.HasPrefix(bytes.TrimSpace(p), []byte("{")) {
		var line struct {
			Level string `json:"@level"`
		}
		if json.Unmarshal(p, &line) == nil {
			level = strings.ToUpper(line.Level)
		}
	} else if i := bytes.IndexByte(p, '['); i >= 0 && i < 64 {
		if j := bytes.IndexByte(p[i:], ']'); j > 0 {
			level = string(p[i+1 : i+j])
		}
	}
	switch level {
	case "ERROR":
		return gsyslog.LOG_ERR
	case "WARN":
		return gsyslog.LOG_WARNING
	case "INFO":
		return gsyslog.LOG_INFO
	case "DEBUG", "TRACE":
		return gsyslog.LOG_DEBUG
	}
	return gsyslog.LOG_NOTICE
}

// rotatingFile is the log_file sink with Consul's rotation semantics: a path ending in "/" logs to
// consul.log in that directory; the file rotates by size (log_rotate_bytes, 0 = never) and age
// (log_rotate_duration, default 24h) into <name>-<unix-nanos><ext>; log_rotate_max_files archives are
// kept (0 = all, -1 = none).
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
	if strings.HasSuffix(path, "/") || strings.HasSuffix(path, string(filepath.Separator)) {
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
	if r.f == nil {
		// An earlier rotation could not reopen the file; try again rather than go silent forever.
		if err := r.open(); err != nil {
			return 0, err
		}
	}
	tooBig := r.maxBytes > 0 && r.size > 0 && r.size+len(p) > r.maxBytes
	tooOld := r.size > 0 && time.Since(r.opened) > r.maxAge
	if tooBig || tooOld {
		if err := r.rotate(); err != nil {
			return 0, err
		}
	}
	n, err := r.f.Write(p)
	r.size += n
	return n, err
}

// rotate archives the current file and opens a fresh one. When the rename fails the current file is
// reopened, so logging goes on (into the oversized file) instead of stopping.
func (r *rotatingFile) rotate() error {
	if err := r.f.Close(); err != nil {
		r.f = nil
		return fmt.Errorf("closing log_file %q for rotation: %w", r.path(), err)
	}
	r.f = nil
	archive := filepath.Join(r.dir, fmt.Sprintf("%s-%d%s", r.base, time.Now().UnixNano(), r.ext))
	renameErr := os.Rename(r.path(), archive)
	if err := r.open(); err != nil {
		return err
	}
	if renameErr != nil {
		return fmt.Errorf("rotating log_file %q: %w", r.path(), renameErr)
	}
	r.prune()
	return nil
}

// prune removes the oldest archives beyond maxFiles. Only names this sink creates
// (<base>-<digits><ext>) are considered, so unrelated files such as consul-template.log sitting next
// to consul.log are never touched.
func (r *rotatingFile) prune() {
	if r.maxFiles == 0 {
		return
	}
	keep := max(r.maxFiles, 0)
	entries, err := os.ReadDir(r.dir)
	if err != nil {
		return
	}
	var archives []string
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || !strings.HasPrefix(name, r.base+"-") || !strings.HasSuffix(name, r.ext) {
			continue
		}
		stamp := strings.TrimSuffix(strings.TrimPrefix(name, r.base+"-"), r.ext)
		if stamp == "" || strings.Trim(stamp, "0123456789") != "" {
			continue
		}
		archives = append(archives, name)
	}
	// Numeric order of the timestamps: shorter first, then lexical.
	slices.SortFunc(archives, func(a, b string) int {
		if len(a) != len(b) {
			return len(a) - len(b)
		}
		return strings.Compare(a, b)
	})
	for len(archives) > keep {
		_ = os.Remove(filepath.Join(r.dir, archives[0]))
		archives = archives[1:]
	}
}

func (r *rotatingFile) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.f == nil {
		return nil
	}
	err := r.f.Close()
	r.f = nil
	return err
}
