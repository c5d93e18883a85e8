package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// process is a child the harness started. It runs in its own process group (a terminal's Ctrl-C
// reaches only the harness, which then stops its children in order) and gets SIGKILL if the harness
// dies without cleaning up (Pdeathsig).
type process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	started time.Time
	done    chan struct{}
	err     error // the result of Wait, valid after done is closed
}

// startProcess starts bin with args, stdout and stderr going to logPath.
func startProcess(name, logPath, bin string, args ...string) (*process, error) {
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("creating %s log: %w", name, err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("starting %s (%s): %w", name, bin, err)
	}
	p := &process{name: name, cmd: cmd, logPath: logPath, started: time.Now(), done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logFile.Close()
		close(p.done)
	}()
	return p, nil
}

// pid is the child's process id.
func (p *process) pid() int { return p.cmd.Process.Pid }

// exited reports whether the child has ended.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// exitError describes how the child ended, with the tail of its log.
func (p *process) exitError() error {
	return fmt.Errorf("%s exited unexpectedly (%v); last log lines:\n%s", p.name, p.err, p.logTail(15))
}

// stop sends sig to the child's process group, waits up to grace for it to end, then kills the
// group. It returns the child's exit error unless the harness had to kill it.
func (p *process) stop(sig syscall.Signal, grace time.Duration) error {
	if p.exited() {
		return nil
	}
	_ = syscall.Kill(-p.pid(), sig)
	select {
	case <-p.done:
		return nil
	case <-time.After(grace):
	}
	_ = syscall.Kill(-p.pid(), syscall.SIGKILL)
	<-p.done
	return fmt.Errorf("%s did not stop within %s of %v; killed", p.name, grace, sig)
}

// logTail returns the last n lines of the child's log.
func (p *process) logTail(n int) string {
	data, err := os.ReadFile(p.logPath)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "  " + strings.Join(lines, "\n  ")
}

// commandOutput runs a short command (e.g. `consul version`) and returns its first output line.
func commandOutput(ctx context.Context, bin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	line, _, _ := bytes.Cut(bytes.TrimSpace(out), []byte("\n"))
	if err != nil && len(line) == 0 {
		return "", fmt.Errorf("running %s %s: %w", bin, strings.Join(args, " "), err)
	}
	return string(line), nil
}

// findConsul picks bin/consul (what `make consul` builds) or else consul on PATH.
func findConsul() string {
	if st, err := os.Stat("bin/consul"); err == nil && !st.IsDir() {
		return "bin/consul"
	}
	if p, err := exec.LookPath("consul"); err == nil {
		return p
	}
	return "bin/consul"
}

// checkExecutable fails early, with the flag's name, when a binary given on the command line is
// missing.
func checkExecutable(flagName, path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("%s %s: %w", flagName, path, err)
	}
	if st.IsDir() || st.Mode()&0o111 == 0 {
		return fmt.Errorf("%s %s: not an executable file", flagName, path)
	}
	return nil
}
