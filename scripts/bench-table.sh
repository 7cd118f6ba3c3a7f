#!/usr/bin/env bash
# Writes docs/BENCHMARKS.md from a "go test -bench" output file.
set -euo pipefail
out=$1 doc=$2
{
	cat <<HEAD
# Benchmarks

\`make bench\` runs every workload in several rounds on a native directory and
through the mount in each mode, against the same files (the three setups of a
workload back to back in each round), and this table holds the medians. Generated $(date -u +%Y-%m-%d) on $(nproc) CPUs, $(uname -r), $(go version | cut -d' ' -f3).

- **passthrough**: the default where the kernel offers it: SQLite's WAL and
  shared-memory files in kernel passthrough, the database file through the page cache.
- **cached**: everything through lfuse and the page cache (the fallback, \`-passthrough off\`).

HEAD
	go run ./integration/benchtable <"$out"
	cat <<'TAIL'

Workloads (`integration/bench_test.go`): one connection doing single-row insert
transactions (WAL, `synchronous` NORMAL and FULL); point reads by primary key on a
200,000-row table in the OS cache, without and with `mmap_size`; one
transaction inserting 200,000 rows; `SELECT sum(length(v))` over a ~200 MB
database after dropping the page cache.
TAIL
} >"$doc"
echo "wrote $doc"
