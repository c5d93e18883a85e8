package main

import (
	"encoding/json"
	"fmt"
	"strings"

	"github.com/hashicorp/consul/api"
)

const (
	// maxTxnOps is Consul's limit of operations per transaction.
	maxTxnOps = 64

	// maxTxnBytes bounds the encoded body of one transaction. Consul refuses a body over
	// txn_max_req_len (512 KiB by default) with 413 and applies none of it; the 32 KiB margin covers
	// a server configured a little lower and the request's own framing. It is what one instance's
	// assignment must fit in: KV values travel base64-encoded, so 480 KiB carries a value of ~360 KB,
	// 10,000 names like web-server-012345.dc1.example.com.
	maxTxnBytes = 480 << 10
)

// opSize is the number of bytes op adds to a transaction body (the API client sends it as JSON).
func opSize(op *api.TxnOp) int {
	b, err := json.Marshal(op)
	if err != nil {
		return maxTxnBytes + 1 // cannot be sent at all; the caller isolates it
	}
	return len(b)
}

// txnBatches splits ops of the given encoded sizes into consecutive batches of at most maxOps ops
// and, where possible, maxTxnBytes bytes; reserved is what each transaction carries besides them (a
// guard op). An op too large to share a transaction gets one of its own, so it can only fail alone.
// It returns the batches as [start, end) ranges of sizes.
func txnBatches(sizes []int, maxOps, reserved int) [][2]int {
	var out [][2]int
	start, bytes := 0, 0
	for i, s := range sizes {
		// A JSON array: brackets once, a comma between ops.
		if i > start && (i-start >= maxOps || reserved+2+bytes+1+s > maxTxnBytes) {
			out = append(out, [2]int{start, i})
			start, bytes = i, 0
		}
		if i > start {
			bytes++
		}
		bytes += s
	}
	if start < len(sizes) {
		out = append(out, [2]int{start, len(sizes)})
	}
	return out
}

// txnRefused reports whether err is Consul's answer refusing a transaction request (413 for a body
// over txn_max_req_len, 400 for a malformed one) rather than a transport failure: sending the same
// request again gets the same answer.
func txnRefused(err error) bool {
	msg := err.Error()
	return strings.HasPrefix(msg, "Failed request: ") &&
		(strings.Contains(msg, "too large") || strings.Contains(msg, "Failed to parse body"))
}

func txnErrors(resp *api.TxnResponse) string {
	if resp == nil {
		return "no response"
	}
	var parts []string
	for _, e := range resp.Errors {
		parts = append(parts, fmt.Sprintf("op %d: %s", e.OpIndex, e.What))
	}
	return strings.Join(parts, "; ")
}
