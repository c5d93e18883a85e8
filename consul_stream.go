package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
)

// streamBodyKey carries a streamBody in a request's context.
type streamBodyKey struct{}

// streamBody consumes a successful response body as it arrives.
type streamBody func(body io.Reader) error

// withStreamBody returns a context under which the Consul API client's 200 response body goes to
// consume instead of being decoded by the API client, which reads a whole JSON value into memory
// before decoding it: for the health of 10,000 checks that is a 10 MB buffer plus a second full
// copy as structs, every load. The API client still builds the request and reads the X-Consul-*
// headers; it then decodes an empty body (pass a pointer to a struct as its output).
func withStreamBody(ctx context.Context, consume streamBody) context.Context {
	return context.WithValue(ctx, streamBodyKey{}, consume)
}

// streamingTransport wraps the Consul API client's transport to honour withStreamBody.
type streamingTransport struct {
	base http.RoundTripper
}

func (t *streamingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(req)
	if err != nil {
		return resp, err
	}
	consume, ok := req.Context().Value(streamBodyKey{}).(streamBody)
	if !ok || resp.StatusCode != http.StatusOK {
		return resp, nil
	}
	err = consume(resp.Body)
	resp.Body.Close()
	if err != nil {
		return nil, fmt.Errorf("reading %s %s: %w", req.Method, req.URL.Path, err)
	}
	resp.Body = io.NopCloser(strings.NewReader("null"))
	resp.ContentLength = int64(len("null"))
	return resp, nil
}

// CloseIdleConnections passes http.Client.CloseIdleConnections on to the wrapped transport; without
// it a stopped agent would leave its kept-alive connections to Consul (two goroutines each) behind.
func (t *streamingTransport) CloseIdleConnections() {
	if c, ok := t.base.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}
