package main

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// TestTimeHeap: values come out earliest first, positions reported to moved stay true, and a value
// removed from the middle never comes out.
func TestTimeHeap(t *testing.T) {
	type item struct {
		id    int
		index int
	}
	base := time.Now()
	h := timeHeap[*item]{moved: func(it *item, i int) { it.index = i }}
	if _, ok := h.peek(); ok {
		t.Fatal("empty heap has a first value")
	}
	items := make([]*item, 200)
	at := make(map[int]time.Time)
	for i, off := range rand.Perm(len(items)) {
		items[i] = &item{id: i}
		at[i] = base.Add(time.Duration(off) * time.Millisecond)
		h.push(at[i], items[i])
	}
	for _, it := range items {
		if h.items[it.index].v != it {
			t.Fatalf("item %d reported at %d, not there", it.id, it.index)
		}
	}
	removed := map[int]bool{}
	for _, i := range []int{3, 50, 199, 0} {
		h.removeAt(items[i].index)
		removed[i] = true
		if items[i].index != -1 {
			t.Fatalf("removed item %d still has index %d", i, items[i].index)
		}
	}
	var got []time.Time
	for h.Len() > 0 {
		first, _ := h.peek()
		it := h.pop()
		if removed[it.id] {
			t.Fatalf("removed item %d came out", it.id)
		}
		if !at[it.id].Equal(first) || it.index != -1 {
			t.Fatalf("item %d: peek said %v, due %v, index %d", it.id, first, at[it.id], it.index)
		}
		got = append(got, first)
	}
	if len(got) != len(items)-len(removed) || !slices.IsSortedFunc(got, func(a, b time.Time) int { return a.Compare(b) }) {
		t.Fatalf("popped %d values, sorted %v", len(got), slices.IsSortedFunc(got, func(a, b time.Time) int { return a.Compare(b) }))
	}
}

// TestTimeHeapPushReportsFirst: push says whether the owner must re-arm its timer.
func TestTimeHeapPushReportsFirst(t *testing.T) {
	base := time.Now()
	var h timeHeap[string]
	for _, tc := range []struct {
		at    time.Duration
		first bool
	}{{5, true}, {7, false}, {3, true}, {3, true}, {4, false}} {
		if got := h.push(base.Add(tc.at), "x"); got != tc.first {
			t.Errorf("push at +%d: first %v, want %v", tc.at, got, tc.first)
		}
	}
}
