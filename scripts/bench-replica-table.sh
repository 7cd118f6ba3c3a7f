#!/usr/bin/env bash
# Puts the replication benchmarks (go test -bench BenchmarkReplica output in
# $1) into the "replica" block of the benchmarks document $2; the prose
# around it is kept.
set -euo pipefail
out=$1 doc=$2
metric() { grep -E "^$1(-[0-9]+)?\s" "$out" | tr '\t' '\n' | grep " $2\$" | awk '{print $1+0}' | head -1; }
{
	echo "Generated $(date -u +%Y-%m-%d) at $(git rev-parse --short HEAD 2>/dev/null || echo '?')."
	echo
	cat <<EOF
From \`BenchmarkReplicaRestore\`, \`BenchmarkReplicaLag\` and \`BenchmarkReplicaLagDuringSnapshot\` (\`integration/bench_replica_test.go\`),
a file replica on the same disk, the page cache dropped before each copy and each restore:

| measure | value | target |
|---|---:|---:|
| database restored | $(metric BenchmarkReplicaRestore db-MB) MB, ~100,000 transactions of history | |
| \`cp\` of the database file | $(metric BenchmarkReplicaRestore cp-s) s | |
| \`lfuse restore\` (latest) | $(metric BenchmarkReplicaRestore restore-s) s | |
| restore ÷ cp | $(metric BenchmarkReplicaRestore x-cp)× | ≤ 1.5× |
| \`cp\` then \`sync\` of the copy (durable, as a restore's output is) | $(metric BenchmarkReplicaRestore cp-sync-s) s | |
| restore ÷ (cp + sync) | $(metric BenchmarkReplicaRestore x-cp-sync)× | |
| peak RSS of \`lfuse restore\`: anonymous (heap, stacks) / total with the binary's pages | $(metric BenchmarkReplicaRestore restore-peak-anon-MB) MB / $(metric BenchmarkReplicaRestore restore-peak-RSS-MB) MB | ≤ 64 MB above the page cache |
| lag from commit to durable in the replica, p50 (worst commit of each sync) | $(metric BenchmarkReplicaLag lag-p50-ms) ms | |
| lag p99 | $(metric BenchmarkReplicaLag lag-p99-ms) ms | ≤ sync-interval + 50 ms = 1050 ms |
| lag while snapshots of the $(metric BenchmarkReplicaRestore db-MB) MB database upload, one every 15 s ($(metric BenchmarkReplicaLagDuringSnapshot snapshots) in the minute, $(metric BenchmarkReplicaLagDuringSnapshot syncs) syncs): p50 / p99 / max | $(metric BenchmarkReplicaLagDuringSnapshot lag-p50-ms) / $(metric BenchmarkReplicaLagDuringSnapshot lag-p99-ms) / $(metric BenchmarkReplicaLagDuringSnapshot lag-max-ms) ms | |
| files written per hour at 10 tx/s (PUT-equivalents, default intervals) | $(metric BenchmarkReplicaLag files-per-hour) | |
| peak RSS of \`lfuse mount\` capturing and shipping that database (its load in ten transactions, a snapshot, the history): anonymous / total | $(metric BenchmarkReplicaRestore mount-peak-anon-MB) MB / $(metric BenchmarkReplicaRestore mount-peak-RSS-MB) MB | ≤ 64 MB above the page cache |
| peak RSS of \`lfuse mount\` replicating at 10 tx/s: anonymous / total | $(metric BenchmarkReplicaLag lfuse-peak-anon-MB) MB / $(metric BenchmarkReplicaLag lfuse-peak-RSS-MB) MB | ≤ 64 MB above the page cache |
| \`lfuse restore\` of the same database from S3 (versitygw on loopback) | $(metric BenchmarkReplicaRestoreS3 restore-s) s, $(metric BenchmarkReplicaRestoreS3 restore-MB/s) MB/s | |
| parallel download of the same $(metric BenchmarkReplicaRestoreS3 objects-MB) MB of objects | $(metric BenchmarkReplicaRestoreS3 download-s) s | |
| restore ÷ download | $(metric BenchmarkReplicaRestoreS3 x-download)× | |

Requests per hour by kind at 10 tx/s with the default intervals, counted by
lfuse over a minute of the steady state (\`BenchmarkReplicaRequests\`; a
delete counts per file):

| backend | PUT | GET | LIST | DELETE |
|---|---:|---:|---:|---:|
EOF
for be in file s3 gs abs sftp; do
	row=$(grep "^BenchmarkReplicaRequests/$be" "$out" || true)
	[ -n "$row" ] || continue
	v() { echo "$row" | tr '\t' '\n' | grep " $1/h\$" | awk '{printf "%d", $1}'; }
	echo "| $be | $(v PUT) | $(v GET) | $(v LIST) | $(v DELETE) |"
done
} | "$(dirname "$0")/bench-splice.sh" "$doc" replica
echo "updated the replication tables in $doc"
