#!/usr/bin/env bash
# Puts the tables of a "go test -bench" output file (the FUSE workloads) into
# the "front" block of the benchmarks document; the prose around it is kept.
set -euo pipefail
out=$1 doc=$2
{
	echo "Generated $(date -u +%Y-%m-%d) at $(git rev-parse --short HEAD 2>/dev/null || echo '?') on $(nproc) CPUs, $(uname -r), $(go version | cut -d' ' -f3)."
	echo
	go run ./integration/benchtable <"$out"
} | "$(dirname "$0")/bench-splice.sh" "$doc" front
echo "updated the FUSE workload tables in $doc"
