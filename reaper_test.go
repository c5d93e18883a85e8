package main

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestReaper: a service whose check stays critical past DeregisterCriticalServiceAfter is
// deregistered; node checks never reap.
func TestReaper(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	c := srv.Client

	r := crStart(t, srv, nil, nil)
	chk := catalogRegisterCheck{CheckID: "dead-tcp", Status: statusCritical, Definition: checkDefinition{
		TCP: "127.0.0.1:1", Interval: durationField(200 * time.Millisecond), Timeout: durationField(time.Second),
		DeregisterCriticalServiceAfter: durationField(time.Second)}}
	crRegister(t, c, "cr-reap", "doomed", chk)
	crRegister(t, c, "cr-reap", "", catalogRegisterCheck{CheckID: "node-level", Status: statusCritical, Definition: checkDefinition{
		TCP: "127.0.0.1:1", Interval: durationField(200 * time.Millisecond), DeregisterCriticalServiceAfter: durationField(time.Second)}})
	start := time.Now()
	r.SetNodes([]string{"cr-reap"})
	waitFor(t, 15*time.Second, func() error {
		svcs, _, err := c.Catalog().NodeServiceList("cr-reap", nil)
		if err != nil {
			return err
		}
		for _, s := range svcs.Services {
			if s.ID == "doomed" {
				return errors.New("service still registered")
			}
		}
		return nil
	})
	if d := time.Since(start); d < time.Second {
		t.Fatalf("deregistered after %s, before the 1s timeout", d)
	}
	// The reaper logs once Consul has answered the deregistration, which the poll above can see
	// first.
	waitFor(t, 5*time.Second, func() error {
		if !strings.Contains(r.logs.String(), "agent has been critical for too long, deregistered service") {
			return fmt.Errorf("missing reaper log line:\n%s", r.logs)
		}
		return nil
	})
	// Node checks never reap.
	if ch, _ := crGetCheck(c, "cr-reap", "node-level"); ch == nil {
		t.Fatal("node-level check was removed")
	}
}
