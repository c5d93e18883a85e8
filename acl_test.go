package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/consul/sdk/testutil"
)

// readmeACLPolicy returns the policy the README tells operators to use, so the test proves the
// documented policy is enough.
func readmeACLPolicy(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i := strings.Index(s, "## ACL policy")
	if i < 0 {
		t.Fatal("README has no ACL policy section")
	}
	s = s[i:]
	start := strings.Index(s, "```hcl\n")
	end := strings.Index(s[start+7:], "```")
	if start < 0 || end < 0 {
		t.Fatal("README ACL policy has no hcl block")
	}
	return s[start+7 : start+7+end]
}

func TestACLMinimalPolicyAndTokenRotation(t *testing.T) {
	t.Parallel()
	srv := newTestConsul(t, func(c *testutil.TestServerConfig) {
		c.ACL.Enabled = true
		c.ACL.DefaultPolicy = "deny"
		c.ACL.Tokens.InitialManagement = "root"
		c.ACL.Tokens.Agent = "root"
	})
	root, err := api.NewClient(&api.Config{Address: srv.HTTPAddr, Token: "root"})
	if err != nil {
		t.Fatal(err)
	}
	var policy *api.ACLPolicy
	waitFor(t, 15*time.Second, func() error { // the ACL system bootstraps shortly after the leader
		policy, _, err = root.ACL().PolicyCreate(&api.ACLPolicy{Name: "consul-esm", Rules: readmeACLPolicy(t)}, nil)
		return err
	})
	newToken := func() string {
		tok, _, err := root.ACL().TokenCreate(&api.ACLToken{Policies: []*api.ACLTokenPolicyLink{{ID: policy.ID}}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		return tok.SecretID
	}

	target := newFlipTarget(t)
	registerHTTPCheck(t, root, "acl-ext", "web", "web-http", target.URL, 300*time.Millisecond)
	checkStatus := func() string {
		checks, _, err := root.Health().Checks("web", nil)
		if err != nil || len(checks) == 0 {
			return ""
		}
		return checks[0].Status
	}

	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "esm.hcl")
	writeCfg := func(token string) {
		body := fmt.Sprintf("http_addr = %q\ntoken = %q\ncheck_update_interval = \"0s\"\n", srv.HTTPAddr, token)
		if err := os.WriteFile(cfgPath, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	first := newToken()
	writeCfg(first)
	cfg, err := LoadConfig([]string{cfgPath})
	if err != nil {
		t.Fatal(err)
	}
	tc := testConfig(srv)
	cfg.AgentTTL, cfg.TTLRefreshInterval, cfg.RetryInterval = tc.AgentTTL, tc.TTLRefreshInterval, tc.RetryInterval
	cfg.SessionTTL, cfg.LockDelay, cfg.QueryWaitTime = tc.SessionTTL, tc.LockDelay, tc.QueryWaitTime
	ra := startAgentOpts(t, cfg, AgentOptions{ConfigPaths: []string{cfgPath}})

	// The README's policy is enough: registration, leadership, assignment, check writes.
	waitFor(t, 20*time.Second, func() error {
		if _, ok := ra.health(time.Now()); !ok {
			r, _ := ra.health(time.Now())
			return fmt.Errorf("not healthy: %+v", r)
		}
		if !ra.status.leader.Load() {
			return errNotYet
		}
		if s := checkStatus(); s != api.HealthPassing {
			return fmt.Errorf("check %q", s)
		}
		return nil
	})

	// The token is revoked: /health turns unhealthy and says why.
	if _, err := root.ACL().TokenDelete(tokenAccessor(t, root, first), nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 15*time.Second, func() error {
		r, ok := ra.health(time.Now())
		if ok {
			return errNotYet
		}
		if !strings.Contains(r.ConsulError, "ACL not found") && !strings.Contains(r.ConsulError, "403") {
			return fmt.Errorf("consul_error %q does not say why", r.ConsulError)
		}
		return nil
	})

	// SIGHUP with a new token recovers without a restart, and status changes are written again.
	writeCfg(newToken())
	ra.Reload()
	waitFor(t, 15*time.Second, func() error {
		if r, ok := ra.health(time.Now()); !ok {
			return fmt.Errorf("not healthy after reload: %+v", r)
		}
		return nil
	})
	target.healthy.Store(false)
	waitFor(t, 15*time.Second, func() error {
		if s := checkStatus(); s != api.HealthCritical {
			return fmt.Errorf("check %q after the token rotation", s)
		}
		return nil
	})
}

func tokenAccessor(t *testing.T, c *api.Client, secret string) string {
	t.Helper()
	list, _, err := c.ACL().TokenList(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tok := range list {
		if tok.SecretID == secret {
			return tok.AccessorID
		}
	}
	t.Fatalf("token not found")
	return ""
}
