package main

import (
	"cmp"
	"encoding/json"
	"hash/fnv"
	"slices"
)

// assignment is one instance's share of the external nodes, stored as JSON at
// <kv>agents/<serviceID> in the original's format so old and new instances can share a cluster.
type assignment struct {
	Nodes  []string
	Probes []string
}

func (as assignment) equal(o assignment) bool {
	return slices.Equal(as.Nodes, o.Nodes) && slices.Equal(as.Probes, o.Probes)
}

// all returns every node of the assignment: checks run on probe nodes too.
func (as assignment) all() []string {
	out := make([]string, 0, len(as.Nodes)+len(as.Probes))
	out = append(out, as.Nodes...)
	return append(out, as.Probes...)
}

func (as assignment) encode() []byte {
	if as.Nodes == nil {
		as.Nodes = []string{}
	}
	if as.Probes == nil {
		as.Probes = []string{}
	}
	b, _ := json.Marshal(as)
	return b
}

func decodeAssignment(b []byte) (assignment, error) {
	var as assignment
	if len(b) == 0 {
		return as, nil
	}
	err := json.Unmarshal(b, &as)
	return as, err
}

// externalNode is what the leader needs to know about a node to assign it.
type externalNode struct {
	Name  string
	Probe bool // node meta external-probe = "true": pinged, and listed under Probes
}

// assign splits nodes across instances. It is deterministic, balanced (per class, instance loads
// differ by at most one) and sticky: a node stays with its current owner unless that owner is gone or
// above its share, so when one instance joins only the nodes it takes over move, and when one leaves
// only its own nodes move. Check nodes and probe nodes are balanced separately because pings and
// checks cost differently.
func assign(nodes []externalNode, instances []string, current map[string]assignment) map[string]assignment {
	out := make(map[string]assignment, len(instances))
	if len(instances) == 0 {
		return out
	}
	insts := slices.Clone(instances)
	slices.Sort(insts)
	insts = slices.Compact(insts)

	var checkNodes, probeNodes []string
	for _, n := range nodes {
		if n.Probe {
			probeNodes = append(probeNodes, n.Name)
		} else {
			checkNodes = append(checkNodes, n.Name)
		}
	}
	curChecks := make(map[string]string)
	curProbes := make(map[string]string)
	for inst, as := range current {
		for _, n := range as.Nodes {
			curChecks[n] = inst
		}
		for _, n := range as.Probes {
			curProbes[n] = inst
		}
	}
	checks := balance(checkNodes, insts, curChecks)
	probes := balance(probeNodes, insts, curProbes)
	for _, inst := range insts {
		out[inst] = assignment{Nodes: checks[inst], Probes: probes[inst]}
	}
	return out
}

// balance assigns names to insts (sorted, unique), keeping current owners where the balance allows.
func balance(names []string, insts []string, current map[string]string) map[string][]string {
	live := make(map[string]bool, len(insts))
	for _, i := range insts {
		live[i] = true
	}
	held := make(map[string][]string, len(insts))
	var free []string
	for _, n := range names {
		if owner, ok := current[n]; ok && live[owner] {
			held[owner] = append(held[owner], n)
		} else {
			free = append(free, n)
		}
	}

	// Targets: every instance gets floor(N/M); the N mod M extra slots go to the instances holding the
	// most already (ties by ID), which keeps moves to the minimum.
	base, extra := len(names)/len(insts), len(names)%len(insts)
	order := slices.Clone(insts)
	slices.SortStableFunc(order, func(x, y string) int { return cmp.Compare(len(held[y]), len(held[x])) })
	target := make(map[string]int, len(insts))
	for i, inst := range order {
		target[inst] = base
		if i < extra {
			target[inst]++
		}
	}

	// Over-target instances shed the nodes they rank lowest on.
	for _, inst := range insts {
		h := held[inst]
		if len(h) <= target[inst] {
			continue
		}
		slices.SortFunc(h, func(x, y string) int { return cmp.Compare(score(y, inst), score(x, inst)) })
		free = append(free, h[target[inst]:]...)
		held[inst] = h[:target[inst]]
	}

	// Free nodes go to the under-target instance that ranks them highest (rendezvous order).
	slices.Sort(free)
	for _, n := range free {
		best, bestScore := "", uint64(0)
		for _, inst := range insts {
			if len(held[inst]) >= target[inst] {
				continue
			}
			if s := score(n, inst); best == "" || s > bestScore {
				best, bestScore = inst, s
			}
		}
		held[best] = append(held[best], n)
	}
	for _, inst := range insts {
		slices.Sort(held[inst])
	}
	return held
}

// score is the rendezvous weight of node on inst.
func score(node, inst string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(node))
	h.Write([]byte{0})
	h.Write([]byte(inst))
	return h.Sum64()
}
