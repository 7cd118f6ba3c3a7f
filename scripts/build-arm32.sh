#!/usr/bin/env bash
# Builds lfuse for 32-bit ARM: build-arm32.sh GOARM OUTPUT [LDFLAGS].
#
# go-fuse v2.12.1 does not compile there: its splice package stores
# syscall.Splice's byte count in an int64, which that function returns only
# on 64-bit targets. Until a release fixes it, this builds against a
# temporary copy of the module with the calls routed through a small wrapper
# that converts the count. The repository's go.mod and the module cache are
# left untouched.
set -euo pipefail
goarm=$1 out=$2 ldflags=${3:--s -w}
cd "$(dirname "$0")/.."
go=${GO:-go}
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT

mod=$($go list -m -f '{{.Dir}}' github.com/hanwen/go-fuse/v2)
cp -r "$mod" "$work/go-fuse"
chmod -R u+w "$work/go-fuse"
pair=$work/go-fuse/splice/pair_linux.go
if grep -q 'syscall\.Splice(' "$pair"; then
	sed -i 's/syscall\.Splice(/splice64(/g' "$pair"
	cat >>"$pair" <<'GO'

// splice64 is syscall.Splice with the int64 count of 64-bit targets.
func splice64(rfd int, roff *int64, wfd int, woff *int64, n int, flags int) (int64, error) {
	m, err := syscall.Splice(rfd, roff, wfd, woff, n, flags)
	return int64(m), err
}
GO
fi
cp go.mod "$work/go.mod"
cp go.sum "$work/go.sum"
$go mod edit -modfile="$work/go.mod" -replace "github.com/hanwen/go-fuse/v2=$work/go-fuse"
CGO_ENABLED=0 GOOS=linux GOARCH=arm GOARM=$goarm $go build -modfile="$work/go.mod" -trimpath -ldflags "$ldflags" -o "$out" ./cmd/lfuse
