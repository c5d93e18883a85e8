package main

import (
	"container/heap"
	"time"
)

// timeHeap is a min-heap of values ordered by a due time, earliest first: the scheduler's next runs
// and the writer's deferred output writes. It is not safe for concurrent use; its owner guards it.
//
// moved, when set, is told every value's new position after it moves, and -1 when it leaves the
// heap, so the owner can remove a value from the middle (removeAt) without a search.
type timeHeap[T any] struct {
	items []timedValue[T]
	moved func(v T, index int)
}

type timedValue[T any] struct {
	at time.Time
	v  T
}

// push adds v, due at at. It reports whether nothing is due before v, so the owner knows to re-arm
// its timer (on a tie that wake is redundant but harmless).
func (h *timeHeap[T]) push(at time.Time, v T) (first bool) {
	heap.Push(h, timedValue[T]{at: at, v: v})
	return !h.items[0].at.Before(at)
}

// peek returns the earliest due time; ok is false when the heap is empty.
func (h *timeHeap[T]) peek() (at time.Time, ok bool) {
	if len(h.items) == 0 {
		return time.Time{}, false
	}
	return h.items[0].at, true
}

// pop removes and returns the earliest value.
func (h *timeHeap[T]) pop() T { return heap.Pop(h).(timedValue[T]).v }

// removeAt removes the value at index i (as last reported to moved).
func (h *timeHeap[T]) removeAt(i int) { heap.Remove(h, i) }

// Len, Less, Swap, Push and Pop implement heap.Interface; use push, pop and removeAt instead.
func (h *timeHeap[T]) Len() int           { return len(h.items) }
func (h *timeHeap[T]) Less(i, j int) bool { return h.items[i].at.Before(h.items[j].at) }
func (h *timeHeap[T]) Swap(i, j int) {
	h.items[i], h.items[j] = h.items[j], h.items[i]
	if h.moved != nil {
		h.moved(h.items[i].v, i)
		h.moved(h.items[j].v, j)
	}
}

func (h *timeHeap[T]) Push(x any) {
	e := x.(timedValue[T])
	if h.moved != nil {
		h.moved(e.v, len(h.items))
	}
	h.items = append(h.items, e)
}

func (h *timeHeap[T]) Pop() any {
	n := len(h.items)
	e := h.items[n-1]
	h.items[n-1] = timedValue[T]{}
	h.items = h.items[:n-1]
	if h.moved != nil {
		h.moved(e.v, -1)
	}
	return e
}
