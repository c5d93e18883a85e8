package main

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestCheckDefinitionJSONRoundTrip(t *testing.T) {
	t.Parallel()
	full := checkDefinition{
		HTTP: "https://x/health", Header: map[string][]string{"A": {"1", "2"}}, Method: "POST", Body: "b",
		TLSServerName: "x", TLSSkipVerify: true, DisableRedirects: true,
		TCP: "x:1", TCPUseTLS: true, UDP: "x:2", H2PING: "x:3", H2PingUseTLS: true, OSService: "svc",
		GRPC: "x:4/s", GRPCUseTLS: true,
		Interval: durationField(10 * time.Second), Timeout: durationField(1500 * time.Millisecond),
		DeregisterCriticalServiceAfter: durationField(time.Hour), OutputMaxSize: 100,
		ScriptArgs: []string{"/bin/true", "-v"}, DockerContainerID: "c", Shell: "/bin/sh",
		AliasNode: "n", AliasService: "s", SessionName: "sess", TTL: durationField(30 * time.Second),
		SuccessBeforePassing: 2, FailuresBeforeWarning: 1, FailuresBeforeCritical: 3,
	}
	// Every field must be set, so a field added without a JSON mapping is caught here.
	v := reflect.ValueOf(full)
	for i := 0; i < v.NumField(); i++ {
		if v.Field(i).IsZero() {
			t.Fatalf("test value leaves %s zero", v.Type().Field(i).Name)
		}
	}
	b, err := json.Marshal(&full)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"Interval":"10s"`, `"Timeout":"1.5s"`, `"DeregisterCriticalServiceAfter":"1h0m0s"`, `"TTL":"30s"`, `"H2PING":"x:3"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("%s missing from %s", want, b)
		}
	}
	var back checkDefinition
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(full, back) {
		t.Fatalf("round trip lost data:\n%+v\n%+v", full, back)
	}
	// A zero definition writes nothing at all.
	if b, _ := json.Marshal(checkDefinition{}); string(b) != "{}" {
		t.Fatalf("zero definition encodes as %s", b)
	}
}

func TestCheckDefinitionDurationDecoding(t *testing.T) {
	t.Parallel()
	cases := []struct {
		in   string
		want time.Duration
		err  bool
	}{
		{`"10s"`, 10 * time.Second, false},
		{`""`, 0, false},
		{`null`, 0, false},
		{`30000000000`, 30 * time.Second, false},
		{`1e9`, time.Second, false},
		{`"ten"`, 0, true},
		{`true`, 0, true},
	}
	for _, tc := range cases {
		var d checkDefinition
		err := json.Unmarshal([]byte(`{"Interval":`+tc.in+`,"TTL":`+tc.in+`}`), &d)
		if (err != nil) != tc.err {
			t.Errorf("%s: err %v", tc.in, err)
			continue
		}
		if !tc.err && (time.Duration(d.Interval) != tc.want || time.Duration(d.TTL) != tc.want) {
			t.Errorf("%s: got %v/%v want %v", tc.in, d.Interval, d.TTL, tc.want)
		}
	}
	// As /v1/health/state/any serves it: durations as strings except TTL in nanoseconds.
	var d checkDefinition
	wire := `{"HTTP":"http://x","Interval":"30s","Timeout":"","DeregisterCriticalServiceAfter":"1m0s","TTL":0,"Header":{"X":["y"]}}`
	if err := json.Unmarshal([]byte(wire), &d); err != nil {
		t.Fatal(err)
	}
	if d.Interval != durationField(30*time.Second) || d.Timeout != 0 || d.DeregisterCriticalServiceAfter != durationField(time.Minute) || d.Header["X"][0] != "y" {
		t.Fatalf("decoded %+v", d)
	}
}

func TestCheckKind(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name        string
		def         checkDefinition
		kind        string
		unsupported bool
	}{
		{"http", checkDefinition{HTTP: "http://x"}, "http", false},
		{"tcp", checkDefinition{TCP: "x:1"}, "tcp", false},
		{"tcp tls", checkDefinition{TCP: "x:1", TCPUseTLS: true}, "tcp", false},
		{"udp", checkDefinition{UDP: "x:1"}, "udp", false},
		{"grpc", checkDefinition{GRPC: "x:1"}, "grpc", false},
		{"h2ping", checkDefinition{H2PING: "x:1"}, "h2ping", false},
		{"http wins", checkDefinition{HTTP: "http://x", TCP: "x:1", GRPC: "x:2"}, "http", false},
		{"tcp before udp", checkDefinition{TCP: "x:1", UDP: "x:2"}, "tcp", false},
		{"script", checkDefinition{ScriptArgs: []string{"true"}}, "", true},
		{"docker", checkDefinition{DockerContainerID: "c", ScriptArgs: []string{"true"}}, "", true},
		{"alias", checkDefinition{AliasService: "s"}, "", true},
		{"ttl", checkDefinition{TTL: durationField(time.Second)}, "", true},
		{"os service", checkDefinition{OSService: "svc"}, "", true},
		{"session", checkDefinition{SessionName: "s"}, "", true},
		{"empty", checkDefinition{}, "", true},
	}
	p := newProbeBuilder(nil)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			kind, why := tc.def.kind()
			if kind != tc.kind || (why != "") != tc.unsupported {
				t.Fatalf("kind() = (%q, %q)", kind, why)
			}
			probe, err := p.newProbe(&tc.def, time.Second)
			if tc.unsupported != (err != nil) || tc.unsupported != (probe == nil) {
				t.Fatalf("newProbe: probe %v err %v", probe != nil, err)
			}
			if err != nil && !strings.Contains(err.Error(), why) {
				t.Fatalf("error %q lacks reason %q", err, why)
			}
		})
	}
}
