package main

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
)

// leaseAgent is an Agent with a client for srv and nothing running: enough for sessions and terms.
func leaseAgent(t *testing.T, srv *testConsul) *Agent {
	t.Helper()
	// A session is bound to the agent's node, which the server registers shortly after it leads:
	// creating one earlier fails with "Missing node registration".
	srv.WaitForSerfCheck(t)
	cfg := testConfig(srv)
	cfg.SessionTTL = time.Second // the test server's session_ttl_min
	client, _, err := newConsulClientHTTP(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return &Agent{logger: hclog.NewNullLogger(), cfg: cfg, client: client, status: newAgentStatus()}
}

func testSessionEntry(a *Agent) *api.SessionEntry {
	return &api.SessionEntry{TTL: a.config().SessionTTL.String(), Behavior: api.SessionBehaviorRelease}
}

// waitClosed fails the test unless ch closes within timeout.
func waitClosed(t *testing.T, ch <-chan struct{}, timeout time.Duration, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(timeout):
		t.Fatalf("%s did not happen within %s", what, timeout)
	}
}

func sessionExists(t *testing.T, srv *testConsul, id string) bool {
	t.Helper()
	entry, _, err := srv.Client.Session().Info(id, nil)
	if err != nil {
		t.Fatal(err)
	}
	return entry != nil
}

func TestSessionContract(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t)
	a := leaseAgent(t, srv)
	ctx := context.Background()

	t.Run("renewal outlives the TTL", func(t *testing.T) {
		s, err := newSession(ctx, a, testSessionEntry(a))
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close(ctx)
		// Negative window: Consul invalidates an unrenewed session within twice its TTL.
		select {
		case <-s.Done():
			t.Fatalf("session stopped being refreshed: %v", s.Err())
		case <-time.After(3 * a.config().SessionTTL):
		}
		if !sessionExists(t, srv, s.ID()) {
			t.Fatal("renewed session is gone")
		}
		if s.Err() != nil {
			t.Errorf("Err before Done = %v, want nil", s.Err())
		}
	})

	t.Run("Done closes when the session is destroyed elsewhere", func(t *testing.T) {
		s, err := newSession(ctx, a, testSessionEntry(a))
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close(ctx)
		if _, err := srv.Client.Session().Destroy(s.ID(), nil); err != nil {
			t.Fatal(err)
		}
		waitClosed(t, s.Done(), 2*a.config().SessionTTL, "Done after an outside destroy")
		if err := s.Err(); err == nil || !strings.Contains(err.Error(), "session was invalidated") {
			t.Errorf("Err = %v, want session was invalidated", err)
		}
	})

	t.Run("Close stops the renewal and destroys the session", func(t *testing.T) {
		s, err := newSession(ctx, a, testSessionEntry(a))
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Close(ctx); err != nil {
			t.Fatal(err)
		}
		waitClosed(t, s.Done(), time.Second, "Done after Close")
		if sessionExists(t, srv, s.ID()) {
			t.Error("session still exists after Close")
		}
	})

	t.Run("ctx ended: Done closes, Close leaves the session to expire", func(t *testing.T) {
		sctx, cancel := context.WithCancel(ctx)
		s, err := newSession(sctx, a, testSessionEntry(a))
		if err != nil {
			t.Fatal(err)
		}
		defer srv.Client.Session().Destroy(s.ID(), nil)
		cancel()
		waitClosed(t, s.Done(), time.Second, "Done after ctx ended")
		if !errors.Is(s.Err(), context.Canceled) {
			t.Errorf("Err = %v, want context.Canceled", s.Err())
		}
		if err := s.Close(sctx); !errors.Is(err, context.Canceled) {
			t.Errorf("Close with an ended ctx = %v, want context.Canceled", err)
		}
		if !sessionExists(t, srv, s.ID()) {
			t.Error("Close with an ended ctx destroyed the session")
		}
	})
}
