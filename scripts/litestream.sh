#!/usr/bin/env bash
# Installs Litestream (pinned) for the compatibility test, which checks that
# Litestream can restore what lfuse replicates. Built once from the Go module
# proxy and cached outside the clone; prints the binary's path.
set -euo pipefail
version=v0.5.18
dir=${LFUSE_TOOLS:-$HOME/.cache/lfuse-tools}/litestream-$version
if [ ! -x "$dir/litestream" ]; then
	echo "litestream: building $version into $dir (once)" >&2
	mkdir -p "$dir"
	GOBIN=$dir go install "github.com/benbjohnson/litestream/cmd/litestream@$version" >&2
fi
echo "$dir/litestream"
