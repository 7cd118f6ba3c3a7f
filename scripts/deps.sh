#!/usr/bin/env bash
# Installs what lfuse's tests and demo need, if it is missing: fusermount3
# (fuse3), the sqlite3 shell and qemu-arm (qemu-user). Go and a C compiler
# (for go-sqlite3) are expected on the machine already.
set -euo pipefail

missing=()
command -v fusermount3 >/dev/null || missing+=(fuse3)
command -v sqlite3 >/dev/null || missing+=(sqlite3)
command -v setpriv >/dev/null || missing+=(util-linux)
# The 32-bit ARM release builds are tested under emulation.
command -v qemu-arm >/dev/null || missing+=(qemu-user)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
	echo "deps: please install: ${missing[*]}" >&2
	exit 1
fi
echo "deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
