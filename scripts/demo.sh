#!/usr/bin/env bash
# A two-minute tour: mount a demo directory with lfuse, replicating to a local
# directory; use a SQLite database through it with the sqlite3 shell; look at
# what lfuse captured, including after lfuse is killed and started again; then
# lose the data directory and restore it from the replica.
set -euo pipefail
cd "$(dirname "$0")/.."
LFUSE=$PWD/bin/lfuse
DEMO=${LFUSE_DEMO_DIR:-/tmp/lfuse-demo}

if [ "$(id -u)" -ne 0 ]; then
	echo "demo: lfuse mounts a FUSE filesystem; run as root (or: sudo make demo)" >&2
	exit 1
fi
fusermount3 -uz "$DEMO/mnt" 2>/dev/null || true
rm -rf "$DEMO"
mkdir -p "$DEMO/data" "$DEMO/mnt"
: >"$DEMO/lfuse.log"

ready() { grep -c "mount ready" "$DEMO/lfuse.log" 2>/dev/null || true; }
start() {
	local before
	before=$(ready)
	"$LFUSE" mount -data "$DEMO/data" -replica "$DEMO/replica" "$DEMO/mnt" >>"$DEMO/lfuse.log" 2>&1 &
	LFUSE_PID=$!
	for _ in $(seq 100); do
		[ "$(ready)" -gt "$before" ] && return
		kill -0 "$LFUSE_PID" 2>/dev/null || break
		sleep 0.1
	done
	cat "$DEMO/lfuse.log"; exit 1
}
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "lfuse mount -data $DEMO/data -replica $DEMO/replica $DEMO/mnt"
start
tail -n 2 "$DEMO/lfuse.log"

say "an application writes $DEMO/mnt/app.db (here: the sqlite3 shell)"
sqlite3 "$DEMO/mnt/app.db" <<'SQL'
PRAGMA journal_mode=WAL;
CREATE TABLE orders(id INTEGER PRIMARY KEY, item TEXT, qty INTEGER);
INSERT INTO orders(item, qty) VALUES ('apples', 3);
INSERT INTO orders(item, qty) VALUES ('pears', 5);
UPDATE orders SET qty = qty + 1 WHERE item = 'apples';
SELECT id, item, qty FROM orders;
SQL

say "every commit was captured (lfuse log)"
"$LFUSE" log -data "$DEMO/data"

say "kill -9 lfuse, start it again: it proves the database still continues its log"
kill -9 "$LFUSE_PID"; wait "$LFUSE_PID" 2>/dev/null || true
start
grep -E "verified|snapshot taken|dead mount" "$DEMO/lfuse.log" | tail -n 3
sqlite3 "$DEMO/mnt/app.db" "INSERT INTO orders(item, qty) VALUES ('plums', 7); PRAGMA integrity_check;"

say "stop lfuse (SIGTERM): it captures the last commits, ships them to the replica and unmounts"
kill -TERM "$LFUSE_PID"; wait "$LFUSE_PID"
grep -E "flushed|every captured" "$DEMO/lfuse.log" | tail -n 2
"$LFUSE" log -data "$DEMO/data" -n 3

say "what the replica holds (lfuse ltx $DEMO/replica/app.db)"
"$LFUSE" ltx "$DEMO/replica/app.db"

say "lose the data directory, then restore it from the replica (lfuse restore)"
rm -rf "$DEMO/data"
"$LFUSE" restore -data "$DEMO/data" -replica "$DEMO/replica"
sqlite3 "$DEMO/data/app.db" "SELECT id, item, qty FROM orders; PRAGMA integrity_check;"
echo "lfuse's own output is in $DEMO/lfuse.log"
