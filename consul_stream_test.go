package main

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/hashicorp/consul/api"
)

// TestStreamingTransport drives the Consul API client against a stand-in server: a 200 body goes
// to the consumer while the API client still reads the index header; errors keep the API client's
// own text; a consumer's error fails the query.
func TestStreamingTransport(t *testing.T) {
	srv := newHTTPServer(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/ok":
			w.Header().Set("X-Consul-Index", "42")
			io.WriteString(w, `[1,2,3]`)
		default:
			http.Error(w, "Permission denied: token lacks node:read", http.StatusForbidden)
		}
	})
	cfg := DefaultConfig()
	cfg.HTTPAddr = strings.TrimPrefix(srv.URL, "http://")
	client, _, err := newConsulClientHTTP(cfg)
	if err != nil {
		t.Fatal(err)
	}
	var got string
	consume := func(body io.Reader) error {
		b, err := io.ReadAll(body)
		got = string(b)
		return err
	}
	q := (&api.QueryOptions{}).WithContext(withStreamBody(context.Background(), consume))
	meta, err := client.Raw().Query("/v1/ok", &struct{}{}, q)
	if err != nil || got != `[1,2,3]` || meta.LastIndex != 42 {
		t.Fatalf("got body %q, index %v, err %v", got, meta, err)
	}

	got = ""
	_, err = client.Raw().Query("/v1/denied", &struct{}{}, q)
	if err == nil || !strings.Contains(err.Error(), "Permission denied") || got != "" {
		t.Fatalf("403: err %v, consumer saw %q", err, got)
	}

	boom := errors.New("boom")
	q = (&api.QueryOptions{}).WithContext(withStreamBody(context.Background(), func(io.Reader) error { return boom }))
	if _, err = client.Raw().Query("/v1/ok", &struct{}{}, q); !errors.Is(err, boom) {
		t.Fatalf("consumer error: got %v", err)
	}

	// Without the context value the API client decodes as usual.
	var nums []int
	if _, err := client.Raw().Query("/v1/ok", &nums, nil); err != nil || len(nums) != 3 {
		t.Fatalf("plain query: %v, %v", nums, err)
	}
}
