package main

import (
	"context"
	"encoding/json"
	"testing"
	"time"
)

// FuzzConfigDecode feeds arbitrary bytes to the config decoder: it must return an error or a config,
// never panic, and a decoded config must validate or fail validation cleanly.
func FuzzConfigDecode(f *testing.F) {
	for _, seed := range []string{
		``,
		`log_level = "DEBUG"`,
		"external_node_meta {\n a = \"b\"\n}\n",
		"telemetry {\n prefix_filter = [\"+esm\", \"-esm.checks\"]\n prometheus_retention_time = \"1m\"\n}\n",
		`{"node_probe_interval": "10s", "passing_threshold": 3, "telemetry": {"dogstatsd_tags": ["a:b"]}}`,
		`{"external_node_meta": [{"a": "1"}, {"b": "2"}]}`,
		`node_reconnect_timeout = 72`,
		`stuff = [1, {a = 2}]`,
		`{"a" "b"}`,
		"telemetry {\n telemetry {\n }\n}\n",
		`client_address = "127.0.0.1:99999"`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		st := &configLoadState{cfg: DefaultConfig()}
		if err := st.decode(data); err != nil {
			if err.Error() == "" {
				t.Fatal("empty error message")
			}
			return
		}
		if err := st.cfg.Validate(); err != nil && err.Error() == "" {
			t.Fatal("empty validation message")
		}
	})
}

// FuzzCheckDefinition decodes arbitrary check definitions as they would arrive from the catalog and
// builds their probes: decoding, kind dispatch and probe construction must never panic, and a
// decoded definition must survive a JSON round trip unchanged.
func FuzzCheckDefinition(f *testing.F) {
	for _, seed := range []string{
		`{}`,
		`{"HTTP":"http://127.0.0.1:1/x","Method":"POST","Header":{"Host":["h"]},"Body":"b","Interval":"1s","Timeout":"100ms"}`,
		`{"HTTP":"::not a url","Interval":"-5s"}`,
		`{"HTTP":"http://127.0.0.1:1","OutputMaxSize":-1,"Timeout":"0s"}`,
		`{"TCP":"127.0.0.1","TCPUseTLS":true,"Interval":0}`,
		`{"UDP":"[::1]:1","Timeout":1e9}`,
		`{"GRPC":"127.0.0.1:1/svc","GRPCUseTLS":true}`,
		`{"H2PING":"127.0.0.1:1","H2PingUseTLS":false}`,
		`{"TTL":"30s"}`,
		`{"ScriptArgs":["/bin/true"]}`,
		`{"Interval":"9999999999h"}`,
		`{"Header":{"X":null}}`,
	} {
		f.Add([]byte(seed))
	}
	p := newProbeBuilder(nil)
	f.Fuzz(func(t *testing.T, data []byte) {
		var d checkDefinition
		if err := json.Unmarshal(data, &d); err != nil {
			return
		}
		out, err := json.Marshal(&d)
		if err != nil {
			t.Fatalf("re-encoding a decoded definition: %v", err)
		}
		var again checkDefinition
		if err := json.Unmarshal(out, &again); err != nil {
			t.Fatalf("decoding our own encoding %s: %v", out, err)
		}
		if again2, _ := json.Marshal(&again); string(again2) != string(out) {
			t.Fatalf("round trip changed the definition:\n%s\n%s", out, again2)
		}
		kind, reason := d.kind()
		probe, err := p.newProbe(&d, 50*time.Millisecond)
		if (kind == "") != (err != nil) {
			t.Fatalf("kind %q (%s) but newProbe error %v", kind, reason, err)
		}
		_ = probe
	})
}

// TestHostileProbeTargets runs probes against targets that misbehave; each must come back critical
// (or as Consul defines) within its timeout, with a bounded output.
func TestHostileProbeTargets(t *testing.T) {
	t.Parallel()
	p := newProbeBuilder(nil)
	for _, tc := range []struct {
		name string
		def  checkDefinition
	}{
		{"invalid URL", checkDefinition{HTTP: "http://[::1"}},
		{"unsupported scheme", checkDefinition{HTTP: "ftp://127.0.0.1/"}},
		{"bad method", checkDefinition{HTTP: "http://127.0.0.1:1/", Method: "BAD METHOD"}},
		{"huge header", checkDefinition{HTTP: "http://127.0.0.1:1/", Header: map[string][]string{"X-Big": {string(make([]byte, 1<<20))}}}},
		{"tcp without port", checkDefinition{TCP: "127.0.0.1"}},
		{"udp without port", checkDefinition{UDP: "127.0.0.1"}},
		{"grpc garbage", checkDefinition{GRPC: "::::/x"}},
		{"h2ping garbage", checkDefinition{H2PING: "[::1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			probe, err := p.newProbe(&tc.def, 500*time.Millisecond)
			if err != nil {
				t.Fatalf("newProbe: %v", err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			start := time.Now()
			status, output := probe(ctx, nil)
			if status != statusCritical || output == "" {
				t.Fatalf("status %q output %q", status, output)
			}
			if len(output) > 4096+256 {
				t.Fatalf("output of %d bytes", len(output))
			}
			if el := time.Since(start); el > time.Second {
				t.Fatalf("took %s", el)
			}
		})
	}
}
