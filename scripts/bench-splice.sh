#!/usr/bin/env bash
# Replaces what lies between "<!-- make bench: NAME begin -->" and
# "<!-- make bench: NAME end -->" in a document with standard input, leaving
# the prose around it as written. Usage: bench-splice.sh DOC NAME <block
set -euo pipefail
doc=$1 name=$2
begin="<!-- make bench: $name begin -->" end="<!-- make bench: $name end -->"
if ! grep -qxF "$begin" "$doc" || ! grep -qxF "$end" "$doc"; then
	echo "bench-splice: $doc has no \"$begin\" ... \"$end\" block; add the two lines where the tables belong" >&2
	exit 1
fi
block=$(mktemp)
trap 'rm -f "$block" "$doc.tmp"' EXIT
cat >"$block"
awk -v b="$begin" -v e="$end" -v f="$block" '
	$0 == b { print; while ((getline l < f) > 0) print l; skip = 1; next }
	$0 == e { skip = 0 }
	!skip { print }
' "$doc" >"$doc.tmp"
mv "$doc.tmp" "$doc"
