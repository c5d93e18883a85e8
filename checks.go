package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"time"
)

// Check definitions as the catalog stores them, and Consul's status strings. The probes that run
// them are in probe.go (the shared part) and one probe_<protocol>.go per protocol.

// Consul's health status strings, as the catalog stores them.
const (
	statusPassing  = "passing"
	statusWarning  = "warning"
	statusCritical = "critical"
)

// durationField is a duration in a check definition. Consul writes Interval/Timeout/
// DeregisterCriticalServiceAfter as strings ("10s") but TTL as integer nanoseconds, and accepts
// either when reading, so both forms are decoded; it is always written back as a string.
type durationField time.Duration

func (d durationField) String() string { return time.Duration(d).String() }

// MarshalJSON writes the duration in Go's string form, which Consul parses back.
func (d durationField) MarshalJSON() ([]byte, error) {
	return json.Marshal(time.Duration(d).String())
}

// UnmarshalJSON accepts a duration string ("10s", "" meaning zero), a number of nanoseconds or null.
func (d *durationField) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	if bytes.Equal(b, []byte("null")) {
		return nil
	}
	if len(b) > 0 && b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return fmt.Errorf("duration: %w", err)
		}
		if s == "" {
			*d = 0
			return nil
		}
		v, err := time.ParseDuration(s)
		if err != nil {
			return fmt.Errorf("duration: %w", err)
		}
		*d = durationField(v)
		return nil
	}
	if n, err := strconv.ParseInt(string(b), 10, 64); err == nil {
		*d = durationField(n)
		return nil
	}
	// Consul itself decodes numbers as float64, so "1e9" style values are legal on the wire.
	f, err := strconv.ParseFloat(string(b), 64)
	if err != nil {
		return fmt.Errorf("duration: invalid value %s", b)
	}
	*d = durationField(f)
	return nil
}

// checkDefinition mirrors the Definition object of a catalog health check as Consul's HTTP API
// returns it in /v1/health/state/any (Consul's structs.HealthCheckDefinition). Field names are
// Consul's so the struct round-trips through JSON and can be written back unchanged.
type checkDefinition struct {
	HTTP             string              `json:",omitempty"`
	Header           map[string][]string `json:",omitempty"`
	Method           string              `json:",omitempty"`
	Body             string              `json:",omitempty"`
	TLSServerName    string              `json:",omitempty"`
	TLSSkipVerify    bool                `json:",omitempty"`
	DisableRedirects bool                `json:",omitempty"`

	TCP       string `json:",omitempty"`
	TCPUseTLS bool   `json:",omitempty"`

	UDP string `json:",omitempty"`

	H2PING       string `json:",omitempty"`
	H2PingUseTLS bool   `json:",omitempty"`

	OSService string `json:",omitempty"`

	GRPC       string `json:",omitempty"`
	GRPCUseTLS bool   `json:",omitempty"`

	Interval                       durationField `json:",omitempty"`
	Timeout                        durationField `json:",omitempty"`
	DeregisterCriticalServiceAfter durationField `json:",omitempty"`
	OutputMaxSize                  int           `json:",omitempty"`

	ScriptArgs        []string      `json:",omitempty"`
	DockerContainerID string        `json:",omitempty"`
	Shell             string        `json:",omitempty"`
	AliasNode         string        `json:",omitempty"`
	AliasService      string        `json:",omitempty"`
	SessionName       string        `json:",omitempty"`
	TTL               durationField `json:",omitempty"`

	// Per-check anti-flapping thresholds, named as in Consul's check definitions. Consul 1.22's
	// catalog does not store them (they exist only in agent check definitions), so today they
	// arrive only from a catalog or proxy that keeps them; when present they override
	// passing_threshold/critical_threshold for this check.
	SuccessBeforePassing   int `json:",omitempty"`
	FailuresBeforeWarning  int `json:",omitempty"`
	FailuresBeforeCritical int `json:",omitempty"`
}

// kind returns the probe type for a definition ESM can run, or "" and the reason it cannot.
// Runnable types win over the rest in Consul's own order, so a definition carrying stray fields
// of an unsupported type still runs.
func (d *checkDefinition) kind() (kind string, unsupported string) {
	switch {
	case d.HTTP != "":
		return "http", ""
	case d.TCP != "":
		return "tcp", ""
	case d.UDP != "":
		return "udp", ""
	case d.GRPC != "":
		return "grpc", ""
	case d.H2PING != "":
		return "h2ping", ""
	case d.TTL != 0:
		return "", "TTL checks are updated by the service itself, not run by ESM"
	case d.AliasNode != "" || d.AliasService != "":
		return "", "alias checks are not supported by ESM"
	case d.DockerContainerID != "":
		return "", "docker checks are not supported by ESM"
	case len(d.ScriptArgs) > 0:
		return "", "script checks are not supported by ESM"
	case d.OSService != "":
		return "", "OS service checks are not supported by ESM"
	case d.SessionName != "":
		return "", "session checks are not supported by ESM"
	default:
		return "", "definition has no HTTP, TCP, UDP, GRPC or H2PING target"
	}
}
