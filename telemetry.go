package main

import (
	"context"

	"github.com/hashicorp/go-hclog"
)

// telemetry owns the metrics sinks. (Placeholder until telemetry lands.)
type telemetry struct{}

func newTelemetry(cfg *Config, logger hclog.Logger) (*telemetry, error) { return &telemetry{}, nil }

// runHTTP serves the operator endpoints on client_address. (Placeholder until telemetry lands.)
func (a *Agent) runHTTP(ctx context.Context) { <-ctx.Done() }
