# ferry: checkpoint, restore and migrate Linux process trees.
#   make demo   build, provision CRIU, run the end-to-end demo
#   make test   build, provision CRIU, run every test (root needed for most)

GO        ?= go
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT    ?= $(shell git rev-parse --short HEAD 2>/dev/null)
LDFLAGS   := -X main.version=$(VERSION) -X main.gitCommit=$(COMMIT)
BIN       := bin/ferry
# urfave_cli_no_docs drops the CLI's man-page generator, whose markdown
# package took 0.6-1.8 ms (10 under load) to initialise in every ferry
# process (a restore starts two: ferry and the job's shim).
GOFLAGS_BUILD := -trimpath -tags urfave_cli_no_docs -ldflags "$(LDFLAGS)"
TEST_TIMEOUT ?= 20m

.DEFAULT_GOAL := build
.PHONY: all build deps test-deps slurm-deps conform test chaos unit-test integration demo bench lint fmt clean help proto check-proto

all: build ## same as build

build: bin/ferry-init ## build bin/ferry (static, no cgo) and bin/ferry-init (the jobs' small pid 1, static C)
	CGO_ENABLED=0 $(GO) build $(GOFLAGS_BUILD) -o $(BIN) ./cmd/ferry

# The jobs' pid 1 (internal/job/cinit): the system C compiler, installed
# from Debian's packages when missing (as root).
bin/ferry-init: internal/job/cinit/ferry-init.c
	@mkdir -p bin
	@command -v $(CC) >/dev/null || bash scripts/provision-cc.sh
	$(CC) -static -O2 -Wall -Wextra -o $@ $<

deps: ## provision CRIU >= 4.2 into .deps/ when the system has none (changes nothing else)
	@bash scripts/provision-criu.sh

# The conformance programs (test/conform/*.c, one per kind of kernel state),
# built with the system C compiler; scripts/provision-cc.sh installs
# Debian's gcc and libc6-dev when there is no cc (as root, like deps).
CONFORM_BINS := $(patsubst test/conform/%.c,bin/conform/%,$(wildcard test/conform/*.c))
CONFORM_CFLAGS ?= -O2 -Wall -static -pthread

conform: $(CONFORM_BINS) ## build the conformance programs of test/conform into bin/conform/

bin/conform/%: test/conform/%.c test/conform/conform.h
	@command -v $(CC) >/dev/null || bash scripts/provision-cc.sh
	@mkdir -p bin/conform
	$(CC) $(CONFORM_CFLAGS) -o $@ $<


test-deps: deps slurm-deps ## also build the S3 server the tests start (versitygw, from the Go module proxy) into .deps/bin, and unpack Slurm
	@bash scripts/provision-versitygw.sh

slurm-deps: ## unpack Debian's slurm-wlm and munge into .deps/slurm for the Slurm test (from the Debian mirror apt uses; a few seconds)
	@bash scripts/provision-slurm.sh

test: test-deps build conform ## run unit and integration tests (as root: real CRIU, cgroups, namespaces, a real S3 server, a real Slurm), then a short fuzz run
	FERRY_BIN=$(CURDIR)/$(BIN) $(GO) test -count=1 -timeout $(TEST_TIMEOUT) ./...
	$(GO) test -run='^$$' -fuzz=FuzzReader -fuzztime=5000x -parallel=1 ./image/

chaos: test-deps build conform ## the chaos runs alone (make test runs them too): real migrations with kill -9 and cut links at seeded random moments (FERRY_CHAOS_SEED replays, FERRY_CHAOS_RUNS)
	FERRY_BIN=$(CURDIR)/$(BIN) $(GO) test -count=1 -timeout 30m -run TestMigrateChaos -v ./test/

unit-test: ## unit tests only (no root, no CRIU)
	$(GO) test -short -race -count=1 ./...

demo: deps build ## run the demo end to end on built-in defaults
	CGO_ENABLED=0 $(GO) build -o bin/ferry-demo-workload ./test/workload
	@bash scripts/demo.sh

bench: test-deps build ## measure ferry against the CRIU reference, and the snapshot store on S3 (a local versitygw) next to a directory
	@bash scripts/bench.sh
	$(GO) test -run '^$$' -bench Backends -benchtime 3x ./store/

lint: ## gofmt (tracked and new files), go vet, shellcheck (when installed; .ci/run installs it)
	@files=$$(git ls-files --cached --others --exclude-standard '*.go' | grep -v '\.pb\.go$$'); \
	bad=$$(gofmt -l $$files); test -z "$$bad" || { echo "$$bad"; echo "gofmt: files above need formatting"; exit 1; }
	$(GO) vet ./...
	@if command -v shellcheck >/dev/null; then shellcheck scripts/*.sh .ci/run; else echo "shellcheck not installed: skipped"; fi

proto: ## regenerate proto/*.pb.go (protoc from Debian's protobuf-compiler, installed if missing; protoc-gen-go pinned in go.mod)
	$(GO) build -o bin/protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go
	bash scripts/protoc.sh --plugin=protoc-gen-go=bin/protoc-gen-go --go_out=. --go_opt=paths=source_relative proto/*.proto

check-proto: proto ## fail if the generated protobuf code is not current
	@git diff --exit-code -- proto/ || { echo "proto/*.pb.go is stale: run make proto and commit" >&2; exit 1; }

fmt: ## format the Go sources
	gofmt -w $$(git ls-files '*.go' | grep -v '\.pb\.go$$')

clean: ## remove build output (keeps the provisioned CRIU; rm -rf .deps for that)
	rm -rf bin

help: ## list targets
	@awk 'BEGIN {FS = ":.*?## "} /^[a-zA-Z_-]+:.*?## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
