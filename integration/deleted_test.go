package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A database the application deletes stays deleted: the restore-if-missing
// of the next start, and restore -data after the machine is lost, leave it
// out, saying so; it is still restorable as it was last (restore -o,
// -include-deleted, or a time before the deletion), and a database made
// again at its path comes back. (Before, every restart of a container
// with restore-if-missing brought deleted databases back.)
func TestDeletedDatabaseStaysDeleted(t *testing.T) {
	e := newEnv(t)
	cfgPath, repl := e.replicaConfig("")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf("restore-if-missing = true\n[[replicas]]\nurl = %q\nsync-interval = \"50ms\"\n", "file://"+repl)), 0o644)
	lf := e.mount("-config", cfgPath)
	for _, db := range []string{"keep.db", "gone.db", "soon.db", "again.db"} {
		createSeq(t, e.path(db))
		seqWrite(t, e.path(db), 1, 20)
		checkpointTruncate(t, e.path(db))
	}
	removeDB := func(db string) {
		for _, suffix := range []string{"-wal", "-shm", ""} {
			if err := os.Remove(e.path(db + suffix)); err != nil && !os.IsNotExist(err) {
				t.Fatal(err)
			}
		}
	}
	removeDB("gone.db")
	removeDB("again.db")
	if err := lf.log.waitCount("recorded the deletion in the replica", 2, 30*time.Second, lf.done); err != nil {
		t.Fatalf("%v\n%s", err, lf.log)
	}
	beforeDelete := time.Now()
	time.Sleep(10 * time.Millisecond) // the restore target below falls between two events a clock orders
	createSeq(t, e.path("again.db"))
	seqWrite(t, e.path("again.db"), 1, 3)
	checkpointTruncate(t, e.path("again.db"))
	removeDB("soon.db") // at the stop: not yet released
	lf.stop()
	if strings.Count(lf.log.String(), "recorded the deletion in the replica") != 3 {
		t.Fatalf("want three deletions recorded:\n%s", lf.log)
	}

	// The next start: the deleted databases stay deleted.
	lf = e.mount("-config", cfgPath)
	for _, db := range []string{"gone.db", "soon.db"} {
		if _, err := os.Stat(filepath.Join(e.data, db)); !os.IsNotExist(err) {
			t.Fatalf("%s came back at the next start (%v):\n%s", db, err, lf.log)
		}
	}
	if k := seqRows(t, e.path("again.db")); k != 3 {
		t.Fatalf("again.db has %d rows, want the 3 of the database made again", k)
	}
	lf.stop()

	// The machine is lost.
	out := filepath.Join(e.root, "restored")
	code, log := runLfuse(t, "restore", "-data", out, "-replica", "file://"+repl)
	if code != 0 {
		t.Fatalf("restore -data: exit %d\n%s", code, log)
	}
	for db, rows := range map[string]int{"keep.db": 20, "again.db": 3} {
		if k := seqRows(t, filepath.Join(out, db)); k != rows {
			t.Fatalf("%s restored with %d rows, want %d\n%s", db, k, rows, log)
		}
	}
	for _, db := range []string{"gone.db", "soon.db"} {
		if _, err := os.Stat(filepath.Join(out, db)); !os.IsNotExist(err) {
			t.Fatalf("deleted %s restored by restore -data:\n%s", db, log)
		}
		said := false
		for _, line := range strings.Split(log, "\n") {
			said = said || strings.Contains(line, "not restored: the database was deleted") && strings.Contains(line, " db="+db+" ")
		}
		if !said {
			t.Fatalf("restore -data did not say it left %s out:\n%s", db, log)
		}
	}
	if n := strings.Count(log, "not restored: the database was deleted"); n != 2 {
		t.Fatalf("%d databases said deleted, want 2:\n%s", n, log)
	}
	code, list := runLfuse(t, "databases", "-replica", "file://"+repl)
	if code != 0 || strings.Count(list, ", deleted ") != 2 {
		t.Fatalf("lfuse databases: exit %d, want two deleted:\n%s", code, list)
	}

	// Still restorable as they were last.
	all := filepath.Join(e.root, "all")
	if code, log := runLfuse(t, "restore", "-data", all, "-include-deleted", "-replica", "file://"+repl); code != 0 {
		t.Fatalf("restore -data -include-deleted: exit %d\n%s", code, log)
	}
	for _, db := range []string{"keep.db", "gone.db", "soon.db", "again.db"} {
		want := 20
		if db == "again.db" {
			want = 3
		}
		if k := seqRows(t, filepath.Join(all, db)); k != want {
			t.Fatalf("-include-deleted: %s restored with %d rows, want %d", db, k, want)
		}
	}
	one := filepath.Join(e.root, "one.db")
	if code, log := runLfuse(t, "restore", "-o", one, "file://"+filepath.Join(repl, "gone.db")); code != 0 || seqRows(t, one) != 20 {
		t.Fatalf("restore -o of a deleted database: exit %d\n%s", code, log)
	}
	then := filepath.Join(e.root, "then")
	if code, log := runLfuse(t, "restore", "-data", then, "-timestamp", beforeDelete.UTC().Format(time.RFC3339Nano), "-replica", "file://"+repl); code != 0 {
		t.Fatalf("restore -data -timestamp before the deletions: exit %d\n%s", code, log)
	}
	if k := seqRows(t, filepath.Join(then, "soon.db")); k != 20 {
		t.Fatalf("soon.db, deleted after the target time, restored with %d rows", k)
	}
	if _, err := os.Stat(filepath.Join(then, "gone.db")); !os.IsNotExist(err) {
		t.Fatal("gone.db, deleted before the target time, restored")
	}

	// Brought back into the data directory as it was: the mount takes it
	// up at the restored position and uploads nothing, and the record goes,
	// or it would stay hidden from every later restore while it is live.
	if code, log := runLfuse(t, "restore", "-data", e.data, "-include-deleted", "-if-db-not-exists", "-replica", "file://"+repl); code != 0 {
		t.Fatalf("restore -include-deleted into the data directory: exit %d\n%s", code, log)
	}
	lf = e.mount("-config", cfgPath)
	if err := lf.log.waitCount("removed the replica's record of an earlier deletion", 2, 30*time.Second, lf.done); err != nil {
		t.Fatalf("%v\n%s", err, lf.log)
	}
	lf.stop()
	back := filepath.Join(e.root, "back")
	if code, log := runLfuse(t, "restore", "-data", back, "-replica", "file://"+repl); code != 0 || seqRows(t, filepath.Join(back, "gone.db")) != 20 {
		t.Fatalf("restore -data after the deleted databases came back: exit %d\n%s", code, log)
	}
}

// A deleted database's files leave the replica once its deletion is older
// than the retention: here at the next start, one retention later.
func TestDeletedDatabasePurged(t *testing.T) {
	e := newEnv(t)
	cfgPath, repl := e.replicaConfig("")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf("[[replicas]]\nurl = %q\nsync-interval = \"50ms\"\nretention = \"1s\"\n", "file://"+repl)), 0o644)
	lf := e.mount("-config", cfgPath)
	for _, db := range []string{"keep.db", "gone.db"} {
		createSeq(t, e.path(db))
		seqWrite(t, e.path(db), 1, 20)
	}
	for _, suffix := range []string{"-wal", "-shm", ""} {
		os.Remove(e.path("gone.db" + suffix))
	}
	if err := lf.log.wait("released deleted database", 30*time.Second, lf.done); err != nil {
		t.Fatalf("%v\n%s", err, lf.log)
	}
	lf.stop()
	ltxFiles := func(db string) int {
		m, _ := filepath.Glob(filepath.Join(repl, db, "ltx", "*", "*.ltx"))
		return len(m)
	}
	if ltxFiles("gone.db") == 0 {
		t.Fatal("the deleted database's files went before its retention")
	}
	time.Sleep(1100 * time.Millisecond) // the retention itself: what the purge waits for
	lf = e.mount("-config", cfgPath)
	if err := lf.log.wait("purged a deleted database from its replica", 30*time.Second, lf.done); err != nil {
		t.Fatalf("%v\n%s", err, lf.log)
	}
	if n := ltxFiles("gone.db"); n != 0 {
		t.Fatalf("%d files of the deleted database left", n)
	}
	if _, err := os.Stat(filepath.Join(repl, "gone.db", "lfuse-deleted.json")); !os.IsNotExist(err) {
		t.Fatalf("deletion record left: %v", err)
	}
	if k := seqRows(t, e.path("keep.db")); k != 20 {
		t.Fatalf("keep.db has %d rows", k)
	}
	lf.stop()
	out := filepath.Join(e.root, "restored")
	code, log := runLfuse(t, "restore", "-data", out, "-include-deleted", "-replica", "file://"+repl)
	if code != 0 || seqRows(t, filepath.Join(out, "keep.db")) != 20 {
		t.Fatalf("restore -data: exit %d\n%s", code, log)
	}
	if _, err := os.Stat(filepath.Join(out, "gone.db")); !os.IsNotExist(err) {
		t.Fatalf("purged database restored:\n%s", log)
	}
}
