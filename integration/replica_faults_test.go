package integration

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends/file"
	"github.com/lfuse/lfuse/replicate"
)

// restoreLatest restores the newest state of app.db from repl with the CLI
// and checks it equals want byte for byte.
func restoreLatest(t *testing.T, e *env, repl string, want []byte) {
	t.Helper()
	out := filepath.Join(e.root, fmt.Sprintf("restored-%d.db", time.Now().UnixNano()))
	if code, log := runLfuse(t, "restore", "-o", out, "file://"+repl+"/app.db"); code != 0 {
		t.Fatalf("restore exited %d:\n%s", code, log)
	}
	got, _ := os.ReadFile(out)
	if !bytes.Equal(got, want) {
		t.Fatalf("restored %d bytes differ from the expected %d at %s", len(got), len(want), firstDiff(got, want))
	}
	integrityCheck(t, out)
}

func snapshotCount(t *testing.T, repl string) int {
	t.Helper()
	files, err := file.New(filepath.Join(repl, "app.db")).LTXFiles(context.Background(), replicate.SnapshotLevel)
	if err != nil {
		t.Fatal(err)
	}
	return len(files)
}

// seqSchema creates the table of the seq workload.
const seqSchema = "CREATE TABLE seq(k INTEGER PRIMARY KEY, v BLOB);\n"

// createSeq creates a WAL-mode database with the seq table.
func createSeq(t *testing.T, path string) {
	t.Helper()
	sqliteCLI(t, path, "PRAGMA journal_mode=WAL;\n"+seqSchema)
}

// replicateSeq mounts with the config at cfgPath, writes seq rows 1..rows
// into app.db, checkpoints it and stops lfuse, which ships everything.
func (e *env) replicateSeq(cfgPath string, rows int) {
	e.t.Helper()
	lf := e.mount("-config", cfgPath)
	dbPath := e.path("app.db")
	createSeq(e.t, dbPath)
	seqWrite(e.t, dbPath, 1, rows)
	checkpointTruncate(e.t, dbPath)
	lf.stop()
}

func seqWrite(t *testing.T, dbPath string, from, to int) {
	t.Helper()
	w := startWorker(t, "seq-writer", "DB="+dbPath, fmt.Sprint("FROM=", from), fmt.Sprint("TO=", to), "PAUSE=2ms")
	if err := w.wait(t, 5*time.Minute); err != nil {
		t.Fatalf("seq-writer: %v\n%s", err, w.out.String())
	}
}

func liveBytes(t *testing.T, e *env) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(e.data, "app.db"))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Restarts: an unbroken chain resumes without a new snapshot; a database
// changed behind lfuse's back, or rolled back behind the replica with its
// state lost, starts a new snapshot — and every restore stays exact.
func TestReplicaRestarts(t *testing.T) {
	e := newEnv(t)
	cfgPath, repl := e.replicaConfig("")
	// No periodic snapshots here: every snapshot is a decision.
	os.WriteFile(cfgPath, []byte(fmt.Sprintf("[[replicas]]\nurl = %q\nsync-interval = \"100ms\"\n", "file://"+repl)), 0o644)
	dbPath := e.path("app.db")

	lf := e.mount("-config", cfgPath)
	createSeq(t, dbPath)
	seqWrite(t, dbPath, 1, 100)
	checkpointTruncate(t, dbPath)
	lf.stop()
	restoreLatest(t, e, repl, liveBytes(t, e))
	if n := snapshotCount(t, repl); n != 1 {
		t.Fatalf("%d snapshots after the first run", n)
	}
	rolledBack := liveBytes(t, e)

	// Unbroken chain.
	lf = e.mount("-config", cfgPath)
	seqWrite(t, dbPath, 101, 200)
	checkpointTruncate(t, dbPath)
	lf.stop()
	if n := snapshotCount(t, repl); n != 1 {
		t.Fatalf("a restart with an unbroken chain uploaded a new snapshot (%d now):\n%s", n, lf.log)
	}
	restoreLatest(t, e, repl, liveBytes(t, e))

	// Changed while lfuse was not running.
	sqliteCLI(t, filepath.Join(e.data, "app.db"), "INSERT INTO seq(k, v) VALUES(1000, 'outside');")
	lf = e.mount("-config", cfgPath)
	seqWrite(t, dbPath, 201, 250)
	checkpointTruncate(t, dbPath)
	lf.stop()
	if n := snapshotCount(t, repl); n != 2 {
		t.Fatalf("a broken chain gave %d snapshots, want 2:\n%s", n, lf.log)
	}
	restoreLatest(t, e, repl, liveBytes(t, e))

	// Rolled back behind the replica (an old copy put back) with lfuse's
	// state lost: the replica must not get a second history under TXIDs it
	// already holds.
	if err := os.WriteFile(filepath.Join(e.data, "app.db"), rolledBack, 0o644); err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(e.state)
	lf = e.mount("-config", cfgPath)
	seqWrite(t, dbPath, 101, 120)
	checkpointTruncate(t, dbPath)
	lf.stop()
	if lf.log.count("beyond the local TXID") == 0 {
		t.Fatalf("lfuse did not notice the database is behind its replica:\n%s", lf.log)
	}
	restoreLatest(t, e, repl, liveBytes(t, e))
}

// kill -9 of lfuse while the app writes and lfuse uploads, then a restart:
// every commit the app saw succeed is in the replica.
func TestReplicaKillDuringUpload(t *testing.T) {
	e := newEnv(t)
	cfgPath, repl := e.replicaConfig("")
	dbPath := e.path("app.db")
	lf := e.mount("-config", cfgPath)
	createSeq(t, dbPath)
	w := startWorker(t, "seq-writer", "DB="+dbPath, "FROM=1", "TO=100000", "PAUSE=1ms")
	if err := w.out.wait("300 ", time.Minute, w.done); err != nil {
		t.Fatal(err)
	}
	lf.kill()
	w.wait(t, time.Minute) // the app now sees I/O errors: expected
	lf = e.mount("-config", cfgPath)
	checkpointTruncate(t, dbPath)
	lf.stop()
	integrityCheck(t, filepath.Join(e.data, "app.db"))
	restoreLatest(t, e, repl, liveBytes(t, e))
}

// The replica unwritable for a while: the app never notices, lfuse logs the
// outage once and its end once, and nothing is lost.
func TestReplicaOutage(t *testing.T) {
	e := newEnv(t)
	cfgPath, repl := e.replicaConfig("")
	dbPath := e.path("app.db")
	lf := e.mount("-config", cfgPath)
	createSeq(t, dbPath)
	seqWrite(t, dbPath, 1, 50)
	if err := lf.log.wait("snapshot uploaded", time.Minute, lf.done); err != nil {
		t.Fatal(err)
	}
	// A regular file where the replica's level directory was: every write
	// fails (root ignores permissions, so chmod would not do).
	l0 := filepath.Join(repl, "app.db", "ltx", "0")
	aside := l0 + ".aside"
	if err := os.Rename(l0, aside); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(l0, nil, 0o644)
	seqWrite(t, dbPath, 51, 300)
	if err := lf.log.wait("replica sync failed", time.Minute, lf.done); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second) // an outage of some seconds: retries must not flood the log
	os.Remove(l0)
	if err := os.Rename(aside, l0); err != nil {
		t.Fatal(err)
	}
	if err := lf.log.wait("replica recovered", time.Minute, lf.done); err != nil {
		t.Fatal(err)
	}
	checkpointTruncate(t, dbPath)
	lf.stop()
	if a, b := lf.log.count("replica sync failed"), lf.log.count("replica recovered"); a != 1 || b != 1 {
		t.Fatalf("outage logged %d times and its end %d times, want once each:\n%s", a, b, lf.log)
	}
	restoreLatest(t, e, repl, liveBytes(t, e))
}

// Databases that an application makes and deletes do not pile up in lfuse:
// once the replica holds all of one, its open files and its state are
// released, and a restart does not load it again. The replica still
// restores it. (Each used to keep two descriptors, two goroutines and its
// local log for as long as lfuse ran, and to be loaded at every start.)
func TestDeletedDatabasesReleased(t *testing.T) {
	e := newEnv(t)
	repl := filepath.Join(e.root, "replica")
	lf := e.mount("-replica", "file://"+repl)
	const n = 12
	for i := range n {
		sqliteCLI(t, e.path(fmt.Sprintf("tmp%d.db", i)), fmt.Sprintf("PRAGMA journal_mode=WAL; CREATE TABLE t(v); INSERT INTO t VALUES (%d);", i))
	}
	if err := lf.log.waitCount("snapshot uploaded", n, time.Minute, lf.done); err != nil {
		t.Fatal(err)
	}
	fds := func() int {
		ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", lf.cmd.Process.Pid))
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	before := fds()
	for i := range n {
		for _, suffix := range []string{"-wal", "-shm", ""} {
			if err := os.Remove(e.path(fmt.Sprintf("tmp%d.db%s", i, suffix))); err != nil && !os.IsNotExist(err) {
				t.Fatal(err)
			}
		}
	}
	if err := lf.log.waitCount("released deleted database", n, time.Minute, lf.done); err != nil {
		t.Fatal(err)
	}
	if after := fds(); after > before-n {
		t.Errorf("lfuse holds %d descriptors after %d databases were released, %d before", after, n, before)
	}
	if left, _ := os.ReadDir(filepath.Join(e.state, "dbs")); len(left) != 0 {
		t.Errorf("state left for deleted databases: %v", left)
	}
	lf.stop()
	lf = e.mount("-replica", "file://"+repl)
	if c := lf.log.count("db=tmp"); c != 0 {
		t.Errorf("a restart loaded deleted databases:\n%s", lf.log)
	}
	out := filepath.Join(e.root, "tmp5.db")
	if code, log := runLfuse(t, "restore", "-o", out, "file://"+filepath.Join(repl, "tmp5.db")); code != 0 {
		t.Fatalf("restore exited %d:\n%s", code, log)
	}
	if got := sqliteCLI(t, out, "SELECT v FROM t;"); strings.TrimSpace(got) != "5" {
		t.Fatalf("restored a deleted database with %q, want 5", got)
	}
}
