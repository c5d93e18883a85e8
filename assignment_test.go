package main

import (
	"fmt"
	"math"
	"slices"
	"testing"
)

func makeNodes(n, probeEvery int) []externalNode {
	out := make([]externalNode, n)
	for i := range out {
		out[i] = externalNode{Name: fmt.Sprintf("node-%03d", i), Probe: probeEvery > 0 && i%probeEvery == 0}
	}
	return out
}

func makeInsts(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("consul-esm:inst-%d", i)
	}
	return out
}

// checkCover asserts every node is assigned exactly once, to the right list, with balanced loads.
func checkCover(t *testing.T, nodes []externalNode, got map[string]assignment) {
	t.Helper()
	seen := map[string]string{}
	var minC, maxC, minP, maxP = math.MaxInt, 0, math.MaxInt, 0
	for inst, as := range got {
		for _, n := range as.Nodes {
			if prev, dup := seen[n]; dup {
				t.Fatalf("node %s assigned to %s and %s", n, prev, inst)
			}
			seen[n] = inst
		}
		for _, n := range as.Probes {
			if prev, dup := seen[n]; dup {
				t.Fatalf("node %s assigned to %s and %s", n, prev, inst)
			}
			seen[n] = inst
		}
		minC, maxC = min(minC, len(as.Nodes)), max(maxC, len(as.Nodes))
		minP, maxP = min(minP, len(as.Probes)), max(maxP, len(as.Probes))
	}
	for _, n := range nodes {
		inst, ok := seen[n.Name]
		if !ok {
			t.Fatalf("node %s not assigned", n.Name)
		}
		list := got[inst].Nodes
		if n.Probe {
			list = got[inst].Probes
		}
		if !slices.Contains(list, n.Name) {
			t.Fatalf("node %s (probe=%v) in the wrong list of %s", n.Name, n.Probe, inst)
		}
	}
	if len(seen) != len(nodes) {
		t.Fatalf("assigned %d nodes, want %d", len(seen), len(nodes))
	}
	if len(got) > 0 && (maxC-minC > 1 || maxP-minP > 1) {
		t.Fatalf("unbalanced: checks %d..%d probes %d..%d", minC, maxC, minP, maxP)
	}
}

func moved(before, after map[string]assignment) int {
	owner := map[string]string{}
	for inst, as := range before {
		for _, n := range as.all() {
			owner[n] = inst
		}
	}
	count := 0
	for inst, as := range after {
		for _, n := range as.all() {
			if o, ok := owner[n]; ok && o != inst {
				count++
			}
		}
	}
	return count
}

func TestAssignCoversAndBalances(t *testing.T) {
	for _, tc := range []struct{ nodes, probeEvery, insts int }{
		{0, 0, 1}, {1, 0, 3}, {3, 2, 1}, {3, 2, 2}, {3, 2, 3}, {10, 3, 3}, {100, 4, 7}, {1000, 10, 5},
	} {
		t.Run(fmt.Sprintf("%d_nodes_%d_instances", tc.nodes, tc.insts), func(t *testing.T) {
			nodes := makeNodes(tc.nodes, tc.probeEvery)
			got := assign(nodes, makeInsts(tc.insts), nil)
			if len(got) != tc.insts {
				t.Fatalf("got %d instances, want %d", len(got), tc.insts)
			}
			checkCover(t, nodes, got)
			again := assign(nodes, makeInsts(tc.insts), nil)
			for inst := range got {
				if !got[inst].equal(again[inst]) {
					t.Fatalf("not deterministic for %s", inst)
				}
			}
		})
	}
}

func TestAssignNoInstances(t *testing.T) {
	if got := assign(makeNodes(5, 0), nil, nil); len(got) != 0 {
		t.Fatalf("assigned to no instances: %v", got)
	}
}

func TestAssignMovesFewNodes(t *testing.T) {
	for _, tc := range []struct{ nodes, probeEvery, insts int }{
		{3, 2, 1}, {10, 0, 2}, {10, 3, 3}, {101, 5, 4}, {1000, 7, 9},
	} {
		t.Run(fmt.Sprintf("%d_nodes_%d_to_%d", tc.nodes, tc.insts, tc.insts+1), func(t *testing.T) {
			nodes := makeNodes(tc.nodes, tc.probeEvery)
			before := assign(nodes, makeInsts(tc.insts), nil)
			after := assign(nodes, makeInsts(tc.insts+1), before)
			checkCover(t, nodes, after)
			limit := (tc.nodes+tc.insts)/(tc.insts+1) + 1 // ceil(nodes/instances)+1
			if m := moved(before, after); m > limit {
				t.Fatalf("join moved %d nodes, limit %d", m, limit)
			}
			// Leaving: only the leaver's nodes move.
			leaver := makeInsts(tc.insts + 1)[0]
			left := assign(nodes, makeInsts(tc.insts + 1)[1:], after)
			checkCover(t, nodes, left)
			if m, own := moved(after, left), len(after[leaver].all()); m > own+tc.insts {
				t.Fatalf("leave moved %d nodes, the leaver had %d", m, own)
			}
			// A new node moves nothing else.
			grown := append(slices.Clone(nodes), externalNode{Name: "aaa-first-in-order"})
			withNew := assign(grown, makeInsts(tc.insts+1), after)
			checkCover(t, grown, withNew)
			if m := moved(after, withNew); m > 1 {
				t.Fatalf("adding one node moved %d others", m)
			}
		})
	}
}

func TestAssignmentEncoding(t *testing.T) {
	got := string(assignment{}.encode())
	if got != `{"Nodes":[],"Probes":[]}` {
		t.Fatalf("encode = %s", got)
	}
	as, err := decodeAssignment([]byte(`{"Nodes":null,"Probes":["p1"]}`))
	if err != nil || len(as.Nodes) != 0 || !slices.Equal(as.Probes, []string{"p1"}) {
		t.Fatalf("decode = %+v, %v", as, err)
	}
	if _, err := decodeAssignment([]byte(`{`)); err == nil {
		t.Fatal("bad JSON accepted")
	}
}
