package main

import (
	"slices"
	"testing"
)

func TestTxnBatches(t *testing.T) {
	big := maxTxnBytes // alone it cannot share with anything
	for _, tc := range []struct {
		name     string
		sizes    []int
		maxOps   int
		reserved int
		want     [][2]int
	}{
		{"empty", nil, 64, 0, nil},
		{"by ops", []int{1, 1, 1, 1, 1}, 2, 0, [][2]int{{0, 2}, {2, 4}, {4, 5}}},
		{"by bytes", []int{200 << 10, 200 << 10, 200 << 10}, 64, 0, [][2]int{{0, 2}, {2, 3}}},
		{"reserved counts", []int{240 << 10, 240 << 10}, 64, 100, [][2]int{{0, 1}, {1, 2}}},
		{"oversized alone", []int{10, big, 10, 10}, 64, 0, [][2]int{{0, 1}, {1, 2}, {2, 4}}},
	} {
		if got := txnBatches(tc.sizes, tc.maxOps, tc.reserved); !slices.Equal(got, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
		}
	}
}
