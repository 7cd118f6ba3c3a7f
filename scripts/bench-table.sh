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

Bulk insert stays just under its 0.9 target because of the checkpoint that
SQLite runs at the end of the commit: the commit passes
`wal_autocheckpoint`, so it copies the transaction's ~1,420 pages into the
database file, one write each, and the database file goes through lfuse
(docs/CAPTURE.md says why). Measured on a quiet machine: 1,422 4 KB
`pwrite`s take 18 µs each through the mount against 2.4 µs natively, and
the `sqlite3` shell's `COMMIT` of the same 200,000 rows takes 60–78 ms
through the mount against 18–20 ms natively. The transaction itself takes
0.35–0.5 s. Capture is not what is left: a build of lfuse that captures
nothing ran the same insert at 0.82× native against 0.84× for the real one
(same run, 8 rounds each). Nearly all the time of a FUSE round trip here is the
kernel switching to lfuse's thread and back. A kernel writeback cache would
merge those writes, but DESIGN rules it out (a killed lfuse would lose
checkpointed pages), and passthrough for the database file cost point reads
three quarters of their speed.

lfuse's own CPU time (the last table) matters on a machine with one CPU.
Capture once re-validated a long transaction from its first frame on every
scan: a 200,000-row insert cost 2.3 µs of lfuse CPU per row (2.30–2.35 in
three runs of `BenchmarkBulkInsert`), and a 3,000,000-row insert cost 7.9 s
of lfuse CPU (read from /proc around one insert). Capture now resumes where
the last scan stopped and re-validates about once per 20 ms or more
(docs/CAPTURE.md): 1.0 µs per row and 3.3 s. On this 2-CPU machine the
application's rate did not move beyond the noise, because the second core
absorbed the work.
TAIL
} >"$doc"
echo "wrote $doc"
