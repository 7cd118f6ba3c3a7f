# lfuse — see README.md. The two commands a newcomer needs:
#   make demo   build lfuse and watch it capture a SQLite database on a demo directory
#   make test   install what the tests need and run them all

GO ?= go
BIN := bin/lfuse

.PHONY: build demo test deps unit integration fuzz torture bench release clean

build:
	$(GO) build -o $(BIN) ./cmd/lfuse

demo: deps build
	./scripts/demo.sh

# Packages the tests use: fuse3 (fusermount3), the sqlite3 shell. The tests
# also build Litestream once (scripts/litestream.sh) to check it can restore
# lfuse's replicas, and start real storage servers on 127.0.0.1 for the
# backends (scripts/servers.sh: versitygw, fake-gcs-server, Azurite, sshd).
deps:
	./scripts/deps.sh

# Litestream and the servers build side by side: most of a cold start.
test: deps
	./scripts/litestream.sh >/dev/null & pid=$$!; ./scripts/servers.sh start && wait $$pid
	$(GO) vet ./...
	$(MAKE) unit integration fuzz

# Packages with goroutines run under the race detector.
unit:
	$(GO) test -race -count=1 ./internal/... ./walcapture/... ./replicate/... ./backends/... ./fs/... ./cmd/...

# Real mounts: needs root and /dev/fuse (skipped otherwise, unless
# LFUSE_REQUIRE_FUSE=1). The lfuse binary under test is built with -race.
integration:
	LFUSE_RACE=1 $(GO) test -count=1 -timeout 30m ./integration/...

# Minimizing an interesting input (60 s by default) of tens of kilobytes
# took the whole run: 1-8k executions in 15 s, against ~130k with 1 s.
# Budgets are execution counts (about 5-15 s each here), not durations: with
# a duration, Go 1.26's fuzz coordinator can fail a healthy run with
# "context deadline exceeded" as the time runs out (go.dev/issue/75804,
# fixed in Go 1.27); FuzzCRCUpdate failed that way once in CI.
# The WAL parser, the restore planner given arbitrary listings, the restore's
# LTX decoder and CRC-64, the replica URL parser and the config loader.
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzScan -fuzztime 150000x -fuzzminimizetime 1s ./walcapture
	$(GO) test -run '^$$' -fuzz FuzzPlanRestore -fuzztime 90000x -fuzzminimizetime 1s ./replicate
	$(GO) test -run '^$$' -fuzz FuzzDecodeLTX -fuzztime 40000x -fuzzminimizetime 1s ./replicate
	$(GO) test -run '^$$' -fuzz FuzzCRCUpdate -fuzztime 100000x -fuzzminimizetime 1s ./internal/crc64iso
	$(GO) test -run '^$$' -fuzz FuzzParseReplicaURL -fuzztime 300x -fuzzminimizetime 1s ./cmd/lfuse
	$(GO) test -run '^$$' -fuzz FuzzLoadConfig -fuzztime 300x -fuzzminimizetime 1s ./cmd/lfuse

# Randomized crash-and-fault trials (integration/torture_test.go, described
# in docs/TORTURE.md): TORTURE_TRIALS trials from TORTURE_SEED, trial i with
# seed SEED+i, TORTURE_PARALLEL at a time. A failed trial prints its seed and
# keeps its files in /tmp/lfuse-torture/seed-N; the same seed replays it:
#   make torture TORTURE_SEED=N TORTURE_TRIALS=1 [TORTURE_FAULTS=a,b]
# The summary table goes to torture.md. `make test` runs four trials from
# seed 1 that between them inject every fault.
TORTURE_TRIALS ?= 100
TORTURE_SEED ?= 1
TORTURE_PARALLEL ?= 2
TORTURE_FAULTS ?=
torture: deps
	./scripts/servers.sh start
	TORTURE_TRIALS=$(TORTURE_TRIALS) TORTURE_SEED=$(TORTURE_SEED) TORTURE_PARALLEL=$(TORTURE_PARALLEL) TORTURE_FAULTS=$(TORTURE_FAULTS) TORTURE_REPORT=$(CURDIR)/torture.md \
		$(GO) test -count=1 -timeout 0 -run '^TestTorture$$' ./integration

# Native directory vs the mount in each mode, five rounds; within a round the
# three setups of a workload run back to back, so drift on a noisy machine
# hits them alike. The medians go into docs/BENCHMARKS.md.
BENCH_ROUNDS ?= 5
bench: deps
	rm -f bench.out bench-replica.out
	for i in $$(seq $(BENCH_ROUNDS)); do \
		$(GO) test ./integration -run '^$$' -bench '^Benchmark(SmallWrites|PointReads|BulkInsert|ColdScan)$$' -benchtime 2s -count 1 -timeout 60m | tee -a bench.out || exit 1; \
	done
	$(GO) test ./integration -run '^$$' -bench '^BenchmarkReplica(Restore|Lag|LagDuringSnapshot|RestoreS3)$$' -benchtime 3x -count 1 -timeout 60m | tee bench-replica.out
	$(GO) test ./integration -run '^$$' -bench '^BenchmarkReplicaRequests$$' -benchtime 1x -count 1 -timeout 60m | tee -a bench-replica.out
	./scripts/bench-table.sh bench.out docs/BENCHMARKS.md
	./scripts/bench-replica-table.sh bench-replica.out docs/BENCHMARKS.md

# Static Linux binaries (lfuse needs no cgo) for amd64, arm64, armv7 and
# armv6, with SHA-256 sums, in dist/. VERSION defaults to git describe.
# 32-bit ARM goes through scripts/build-arm32.sh, which works around a
# go-fuse v2.12.1 build failure there (see the script).
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION) -X main.commit=$(shell git rev-parse HEAD 2>/dev/null) -X main.date=$(shell date -u +%Y-%m-%dT%H:%M:%SZ)
release:
	rm -rf dist && mkdir -p dist
	CGO_ENABLED=0 GOOS=linux GOARCH=amd64 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o dist/lfuse-linux-amd64 ./cmd/lfuse
	CGO_ENABLED=0 GOOS=linux GOARCH=arm64 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o dist/lfuse-linux-arm64 ./cmd/lfuse
	GO=$(GO) ./scripts/build-arm32.sh 7 dist/lfuse-linux-armv7 '$(LDFLAGS)'
	GO=$(GO) ./scripts/build-arm32.sh 6 dist/lfuse-linux-armv6 '$(LDFLAGS)'
	cd dist && sha256sum lfuse-linux-* > SHA256SUMS

clean:
	rm -rf bin dist bench.out bench-replica.out torture.md
