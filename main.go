// Command consul-esm is the External Service Monitor for HashiCorp Consul: it health-checks external
// nodes (catalog nodes without a Consul agent), writes their status into the catalog, keeps their
// network coordinates and reaps nodes that stay dead. It is a drop-in replacement for HashiCorp's
// consul-esm: same flags, config files, KV layout, check IDs and metric names.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

// Exit codes are the original's: every fatal path exits 11.
const (
	ExitCodeOK    = 0
	ExitCodeError = 11
)

func main() {
	os.Exit(realMain(os.Args[1:], os.Stdout, os.Stderr))
}

// pathList collects -config-file and -config-dir into one ordered list, so files and directories are
// overlaid in exactly the order they appear on the command line.
type pathList struct{ paths *[]string }

func (p pathList) String() string {
	if p.paths == nil {
		return ""
	}
	return strings.Join(*p.paths, ",")
}

func (p pathList) Set(v string) error {
	*p.paths = append(*p.paths, v)
	return nil
}

const usageHeader = `Usage: consul-esm [options]

  A config file is optional, and can be either HCL or JSON format.
`

func realMain(args []string, stdout, stderr io.Writer) int {
	var paths []string
	var showVersion bool
	fs := flag.NewFlagSet("consul-esm", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Var(pathList{&paths}, "config-file", "A config file to use. Can be either .hcl or .json\nformat. Can be specified multiple times.")
	fs.Var(pathList{&paths}, "config-dir", "A directory to look for .hcl or .json config files in.\nCan be specified multiple times.")
	fs.BoolVar(&showVersion, "version", false, "Print the version of this daemon.")
	fs.BoolVar(&showVersion, "v", false, "Print the version of this daemon.")

	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, usageHeader+"\n")
			fs.SetOutput(stdout)
			fs.PrintDefaults()
			return ExitCodeError
		}
		fmt.Fprintf(stdout, "error parsing flags: %v\n", err)
		return ExitCodeError
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stdout, "error parsing flags: unexpected argument %q\n", fs.Arg(0))
		return ExitCodeError
	}
	if showVersion {
		fmt.Fprintln(stdout, versionString())
		return ExitCodeOK
	}

	cfg, err := LoadConfig(paths)
	if err != nil {
		var verr *ValidationError
		if errors.As(err, &verr) {
			fmt.Fprintf(stdout, "Error parsing config: %v\n", err)
		} else {
			fmt.Fprintf(stdout, "Error loading config: %v\n", err)
		}
		return ExitCodeError
	}
	for _, w := range cfg.Warnings {
		fmt.Fprintf(stdout, "[WARN] %s\n", w)
	}

	logger, closeLogs, err := setupLogging(cfg, stdout)
	if err != nil {
		fmt.Fprintf(stdout, "Error setting up logging: %v\n", err)
		return ExitCodeError
	}
	defer closeLogs()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	agent, err := NewAgent(cfg, logger, AgentOptions{
		ConfigPaths: paths,
		Banner:      stdout,
	})
	if err != nil {
		fmt.Fprintf(stderr, "Error creating agent: %v\n", err)
		return ExitCodeError
	}

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	done := make(chan struct{})
	defer close(done)
	go handleSignals(done, sigs, agent, cancel)

	if err := agent.Run(ctx); err != nil {
		fmt.Fprintf(stderr, "%v\n", err)
		return ExitCodeError
	}
	return ExitCodeOK
}

// handleSignals turns the first SIGINT/SIGTERM into a graceful shutdown and a second one into an
// immediate exit, so an operator is never stuck behind a hung Consul; SIGHUP reloads the config.
// It returns when done is closed (realMain is returning).
func handleSignals(done <-chan struct{}, sigs <-chan os.Signal, agent *Agent, cancel context.CancelFunc) {
	shuttingDown := false
	for {
		select {
		case <-done:
			return
		case sig := <-sigs:
			agent.logger.Debug("Caught signal:" + sig.String())
			switch sig {
			case syscall.SIGHUP:
				agent.Reload()
			default:
				if shuttingDown {
					agent.logger.Warn("Second signal received, exiting immediately")
					os.Exit(ExitCodeError)
				}
				shuttingDown = true
				agent.logger.Info("Shutting down...")
				cancel()
			}
		}
	}
}
