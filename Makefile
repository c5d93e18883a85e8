# consul-esm build, test and demo entry points. Every target works on a machine that has only Go:
# `make consul` builds a real Consul from the Go module proxy when none (>= 1.22) is installed.

GO          ?= go
BIN         := $(CURDIR)/bin
VERSION     := $(shell sed -n 's/^\tVersion *= *"\(.*\)"/\1/p' version.go)
GIT_COMMIT  := $(shell git rev-parse --short HEAD 2>/dev/null)
GIT_DIRTY   := $(shell test -n "`git status --porcelain 2>/dev/null`" && echo "+CHANGES")
LDFLAGS     := -s -w -X 'main.GitCommit=$(GIT_COMMIT)$(GIT_DIRTY)'
TEST_TIMEOUT ?= 15m
# Tests wait on Consul and timers far more than they compute, so more of them run at once than go
# test's default (GOMAXPROCS, two on a 2-core machine) allows.
TEST_PARALLEL ?= 12
TESTARGS    ?=

# Tests exec `consul` from PATH (sdk/testutil); bin/ goes first so the one we built wins.
export PATH := $(BIN):$(PATH)

.PHONY: all build consul test lint fmt demo bench soak clean version

all: build

version:
	@echo $(VERSION)

build:
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN)/consul-esm .

consul:
	@scripts/ensure-consul

test: consul
	$(GO) test -race -parallel $(TEST_PARALLEL) -timeout $(TEST_TIMEOUT) $(TESTARGS) ./...

# A throwaway Consul dev agent, a sample service and consul-esm, all on 127.0.0.1, with a live table of
# the checks turning passing, then critical; Ctrl-C stops everything and cleans up. DEMOARGS passes
# flags (e.g. DEMOARGS=-non-interactive for plain lines that end when the scenario is done, or -keep,
# -probe; see `go run ./examples/demo -h`).
DEMOARGS    ?=
demo: build consul
	$(GO) run ./examples/demo -consul "$$(command -v consul)" -esm $(BIN)/consul-esm $(DEMOARGS)

# Load benchmark of bin/consul-esm against a fresh dev Consul per run (see README "Benchmark").
# BENCH_ARGS passes flags, e.g. BENCH_ARGS="-size 10k -json bench/results/10k.json" or
# BENCH_ARGS="-compare /path/to/original/consul-esm"; `go run ./bench -h` lists them all.
BENCH_ARGS  ?= -size 1k
bench: build consul
	$(GO) run ./bench -consul "$$(command -v consul)" -esm $(BIN)/consul-esm $(BENCH_ARGS)

# Soak test (not part of `make test`): the consul-esm binary with 10k HTTP checks against a dev Consul
# for 10 minutes, sampled every 30s (RSS, heap, goroutines, CPU, missed intervals, unwritten changes)
# and printed as a table. ESM_SOAK_DURATION=3m (a Go duration) shortens or lengthens it.
soak: consul
	ESM_SOAK=1 $(GO) test -count=1 -v -run '^TestSoak$$' -timeout 20m .

lint:
	$(GO) vet ./...
	@out="$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))"; \
	if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

fmt:
	gofmt -w $$(git ls-files '*.go')

clean:
	rm -rf $(BIN)/consul-esm dist/
