# consul-esm build, test and demo entry points. Every target works on a machine that has only Go:
# `make consul` builds a real Consul from the Go module proxy when none (>= 1.22) is installed.

GO          ?= go
BIN         := $(CURDIR)/bin
VERSION     := $(shell sed -n 's/^\tVersion *= *"\(.*\)"/\1/p' version.go)
GIT_COMMIT  := $(shell git rev-parse --short HEAD 2>/dev/null)
GIT_DIRTY   := $(shell test -n "`git status --porcelain 2>/dev/null`" && echo "+CHANGES")
LDFLAGS     := -s -w -X 'main.GitCommit=$(GIT_COMMIT)$(GIT_DIRTY)'
TEST_TIMEOUT ?= 15m
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
	$(GO) test -race -timeout $(TEST_TIMEOUT) $(TESTARGS) ./...

lint:
	$(GO) vet ./...
	@out="$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))"; \
	if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

fmt:
	gofmt -w $$(git ls-files '*.go')

clean:
	rm -rf $(BIN)/consul-esm dist/
