package integration

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends/file"
	"github.com/lfuse/lfuse/replicate"
	"github.com/superfly/ltx"
	"golang.org/x/sys/unix"
)

// replicaConfig writes a config that ships every database to a file replica
// on short intervals, so compactions and snapshots happen within a test.
func (e *env) replicaConfig(extra string) (cfgPath, repl string) {
	repl = filepath.Join(e.root, "replica")
	cfgPath = filepath.Join(e.root, "lfuse.toml")
	cfg := fmt.Sprintf(`
[[replicas]]
url = "file://%s"
sync-interval = "100ms"
snapshot-interval = "3s"
compact-intervals = ["1s", "2s"]
%s
`, repl, extra)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		e.t.Fatal(err)
	}
	return cfgPath, repl
}

// seqLog parses a seq-writer's output: the time before each row's commit.
func seqLog(t *testing.T, out string) map[int]time.Time {
	t.Helper()
	before := map[int]time.Time{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		var k int
		var ns int64
		if _, err := fmt.Sscanf(line, "%d %d", &k, &ns); err != nil {
			t.Fatalf("seq-writer output %q: %v", line, err)
		}
		before[k] = time.Unix(0, ns)
	}
	return before
}

// seqRows checks that a restored database holds exactly rows 1..k of the
// seq workload, and returns k.
func seqRows(t *testing.T, path string) int {
	t.Helper()
	integrityCheck(t, path)
	db := openDB(t, path, "mode=ro")
	defer db.Close()
	rows, err := db.Query("SELECT k, v FROM seq ORDER BY k")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	n := 0
	for rows.Next() {
		var k int
		var v []byte
		if err := rows.Scan(&k, &v); err != nil {
			t.Fatal(err)
		}
		n++
		if k != n || !bytes.Equal(v, seqRow(k)) {
			t.Fatalf("%s: row %d is not the row %d the workload wrote", path, n, k)
		}
	}
	return n
}

// The whole path on a real mount: several processes write, lfuse ships to a
// file replica with compactions and snapshots, stops cleanly after flushing;
// lfuse restore then gives the live database byte for byte, and exactly the
// state of the time for every TXID and timestamp tried.
func TestReplicateAndRestore(t *testing.T) {
	e := newEnv(t)
	cfgPath, repl := e.replicaConfig("")
	lf := e.mount("-config", cfgPath)
	dbPath := e.path("app.db")
	sqliteCLI(t, dbPath, "PRAGMA journal_mode=WAL;\n"+bankSchema+seqSchema)

	// Several processes at once.
	var workers []*workerProc
	for i := 0; i < 2; i++ {
		workers = append(workers, startWorker(t, "bank-writer", "DB="+dbPath, "N=300", fmt.Sprintf("SEED=%d", i+1), fmt.Sprintf("NAME=go%d", i), "CKPT=100"))
	}
	workers = append(workers, startCLI(t, dbPath, cliTransfers("cli", 300, 7)))
	workers = append(workers, startWorker(t, "bank-reader", "DB="+dbPath, "N=500", "SEED=9"))
	for i, w := range workers {
		if err := w.wait(t, 5*time.Minute); err != nil {
			t.Fatalf("worker %d: %v\n%s", i, err, w.out.String())
		}
	}
	// Then one writer, one row per commit, over several sync intervals,
	// compactions and snapshots.
	const rows = 400
	w := startWorker(t, "seq-writer", "DB="+dbPath, "FROM=1", fmt.Sprint("TO=", rows), "PAUSE=15ms")
	if err := w.wait(t, 5*time.Minute); err != nil {
		t.Fatalf("seq-writer: %v\n%s", err, w.out.String())
	}
	before := seqLog(t, w.out.String())
	checkpointTruncate(t, dbPath)
	lf.stop()
	if lf.log.count("every captured transaction is in every replica") != 1 {
		t.Fatalf("no flush reported at stop:\n%s", lf.log)
	}

	// Latest: byte for byte the live database.
	out := filepath.Join(e.root, "restored.db")
	if code, log := runLfuse(t, "restore", "-o", out, "file://"+repl+"/app.db"); code != 0 {
		t.Fatalf("restore exited %d:\n%s", code, log)
	}
	live, _ := os.ReadFile(filepath.Join(e.data, "app.db"))
	got, _ := os.ReadFile(out)
	if !bytes.Equal(got, live) {
		t.Fatalf("restored %d bytes differ from the live %d bytes at %s", len(got), len(live), firstDiff(got, live))
	}
	if k := seqRows(t, out); k != rows {
		t.Fatalf("latest restore holds %d seq rows, want %d", k, rows)
	}

	// What the replica holds: every level used, and a latest restore that
	// reads few files however many L0 files there are.
	ctx := context.Background()
	client := file.New(filepath.Join(repl, "app.db"))
	var all []ltx.FileInfo
	for _, level := range []int{0, 1, 2, replicate.SnapshotLevel} {
		files, err := client.LTXFiles(ctx, level)
		if err != nil {
			t.Fatal(err)
		}
		if len(files) == 0 || (level == replicate.SnapshotLevel && len(files) < 2) {
			t.Fatalf("level %d holds %d files", level, len(files))
		}
		all = append(all, files...)
	}
	plan, err := replicate.PlanRestore(ctx, client, replicate.Target{})
	if err != nil {
		t.Fatal(err)
	}
	l0, _ := client.LTXFiles(ctx, 0)
	if len(plan.Files) > 15 || len(plan.Files) > len(l0)/3 {
		t.Fatalf("a latest restore reads %d files (%d L0 files in the replica)", len(plan.Files), len(l0))
	}
	latest := plan.TXID
	offset := latest - rows // TXID of seq row k is offset+k: one TXID per commit

	// Point in time by TXID: file ends of every level, seq phase only.
	var points []ltx.TXID
	seen := map[ltx.TXID]bool{}
	for _, f := range all {
		if f.MaxTXID > offset && !seen[f.MaxTXID] {
			points, seen[f.MaxTXID] = append(points, f.MaxTXID), true
		}
	}
	slices.Sort(points)
	rng := rand.New(rand.NewSource(1))
	rng.Shuffle(len(points), func(i, j int) { points[i], points[j] = points[j], points[i] })
	var snapshots []ltx.TXID
	for _, f := range all {
		if f.Level == replicate.SnapshotLevel && f.MaxTXID > offset {
			snapshots = append(snapshots, f.MaxTXID, f.MaxTXID+1)
		}
	}
	tried := append(snapshots, points[:min(20, len(points))]...)
	for _, txid := range tried {
		if !seen[txid] {
			continue // right after a snapshot: only if a file ends there
		}
		os.Remove(out)
		if code, log := runLfuse(t, "restore", "-o", out, "-txid", txid.String(), "file://"+repl+"/app.db"); code != 0 {
			t.Fatalf("restore -txid %s exited %d:\n%s", txid, code, log)
		}
		if k := seqRows(t, out); k != int(txid-offset) {
			t.Fatalf("restore -txid %s holds rows 1..%d, want 1..%d", txid, k, txid-offset)
		}
	}

	// Point in time by timestamp: the newest restorable state committed
	// at or before it.
	first, last := before[1], before[rows]
	for i := 0; i < 10; i++ {
		ts := first.Add(200*time.Millisecond + time.Duration(rng.Int63n(int64(last.Sub(first)))))
		os.Remove(out)
		code, log := runLfuse(t, "restore", "-o", out, "-timestamp", ts.UTC().Format(time.RFC3339Nano), "file://"+repl+"/app.db")
		if code != 0 {
			t.Fatalf("restore -timestamp %s exited %d:\n%s", ts, code, log)
		}
		k := seqRows(t, out)
		if before[k].After(ts.Add(time.Millisecond)) {
			t.Fatalf("restore -timestamp %s holds rows 1..%d, committed after it (%s)", ts.Format(time.RFC3339Nano), k, before[k].Format(time.RFC3339Nano))
		}
		// The next restorable point was committed after ts.
		for _, f := range l0 {
			if f.MaxTXID > offset+ltx.TXID(k) {
				if !f.CreatedAt.After(ts) {
					t.Fatalf("restore -timestamp %s stopped at row %d, but %s (committed %s) was restorable", ts.Format(time.RFC3339Nano), k, f.MaxTXID, f.CreatedAt.Format(time.RFC3339Nano))
				}
				break
			}
		}
	}
	t.Logf("%d L0, latest plan %d files, %d TXIDs and 10 timestamps restored", len(l0), len(plan.Files), len(tried))
}

// A database's directory renamed, or the database with its WAL renamed,
// while the application keeps it open and goes on writing: the commits
// after the rename reach the replica under the new path. (Found by an
// adversarial run: after a directory rename every later commit was lost
// from the replica, silently, and a database copied to the old path was
// appended to the first one's history.)
func TestRenameWhileOpen(t *testing.T) {
	e := newEnv(t)
	cfgPath, repl := e.replicaConfig("")
	lf := e.mount("-config", cfgPath)
	// The directory.
	if err := os.Mkdir(e.path("d1"), 0o755); err != nil {
		t.Fatal(err)
	}
	db := openDB(t, e.path("d1/app.db"))
	db.SetMaxOpenConns(1)
	if _, err := db.Exec("CREATE TABLE t(v)"); err != nil {
		t.Fatal(err)
	}
	insertRows(t, db, 1)
	shipped := func(rel string) {
		t.Helper()
		if err := lf.log.wait(`msg="snapshot uploaded" db=`+rel+" ", time.Minute, lf.done); err != nil {
			t.Fatalf("%v\n%s", err, lf.log)
		}
	}
	shipped("d1/app.db") // else the rename comes before it has a history
	if err := os.Rename(e.path("d1"), e.path("d2")); err != nil {
		t.Fatal(err)
	}
	insertRows(t, db, 100)

	// The database file and its WAL, in the two orders.
	other := openDB(t, e.path("a.db"))
	other.SetMaxOpenConns(1)
	if _, err := other.Exec("CREATE TABLE t(v)"); err != nil {
		t.Fatal(err)
	}
	insertRows(t, other, 1)
	shipped("a.db")
	for _, suffix := range []string{"", "-wal", "-shm"} {
		if err := os.Rename(e.path("a.db"+suffix), e.path("b.db"+suffix)); err != nil {
			t.Fatal(err)
		}
	}
	insertRows(t, other, 50)
	for _, suffix := range []string{"-wal", "", "-shm"} {
		if err := os.Rename(e.path("b.db"+suffix), e.path("c.db"+suffix)); err != nil {
			t.Fatal(err)
		}
	}
	insertRows(t, other, 50)
	db.Close()
	other.Close()
	lf.stop()

	if n := countRows(t, restoreRel(t, e, repl, "d1/app.db")); n != 1 {
		t.Errorf("d1/app.db restored with %d rows, want the 1 before the rename", n)
	}
	if n := countRows(t, restoreRel(t, e, repl, "d2/app.db")); n != 101 {
		t.Errorf("d2/app.db restored with %d rows, want 101", n)
	}
	if n := countRows(t, restoreRel(t, e, repl, "a.db")); n != 1 {
		t.Errorf("a.db restored with %d rows, want the 1 before the renames", n)
	}
	if n := countRows(t, restoreRel(t, e, repl, "c.db")); n != 101 {
		t.Errorf("c.db restored with %d rows, want 101", n)
	}
	if n := countRows(t, filepath.Join(e.data, "d2", "app.db")); n != 101 {
		t.Errorf("the live d2/app.db has %d rows", n)
	}
}

// Two open databases swap places with renameat2(RENAME_EXCHANGE), as
// `mv --exchange` does: their directories, or the files themselves one
// after another. Each path's replica must go on with what the path now
// holds, not append the other database's pages to its old history.
func TestExchangeWhileOpen(t *testing.T) {
	e := newEnv(t)
	cfgPath, repl := e.replicaConfig("")
	lf := e.mount("-config", cfgPath)
	exchange := func(a, b string) {
		t.Helper()
		if err := unix.Renameat2(unix.AT_FDCWD, e.path(a), unix.AT_FDCWD, e.path(b), unix.RENAME_EXCHANGE); err != nil {
			t.Fatalf("exchange %s and %s: %v", a, b, err)
		}
	}
	open := func(rel string, rows int) *sql.DB {
		t.Helper()
		db := openDB(t, e.path(rel))
		db.SetMaxOpenConns(1)
		mustExec(t, db, "CREATE TABLE t(v)")
		insertRows(t, db, rows)
		if err := lf.log.wait(`msg="snapshot uploaded" db=`+rel+" ", time.Minute, lf.done); err != nil {
			t.Fatalf("%v\n%s", err, lf.log)
		}
		// The WAL then holds only what comes after the exchange.
		mustExec(t, db, "PRAGMA wal_checkpoint(TRUNCATE)")
		return db
	}
	for _, dir := range []string{"d1", "d2"} {
		if err := os.Mkdir(e.path(dir), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// Large enough that a path's replica taking the other database's
	// changed pages onto its own history would restore a mix.
	d1, d2 := open("d1/app.db", 400), open("d2/app.db", 300)
	a, b := open("a.db", 200), open("b.db", 100)

	exchange("d1", "d2")
	insertRows(t, d1, 10) // d1's database, now at d2/app.db
	insertRows(t, d2, 20)
	for _, suffix := range []string{"", "-wal", "-shm"} {
		exchange("a.db"+suffix, "b.db"+suffix)
	}
	insertRows(t, a, 30) // a's database, now at b.db
	insertRows(t, b, 40)
	for _, db := range []*sql.DB{d1, d2, a, b} {
		db.Close()
	}
	lf.stop()

	for rel, want := range map[string]int{"d2/app.db": 410, "d1/app.db": 320, "b.db": 230, "a.db": 140} {
		live := filepath.Join(e.data, rel)
		if n := countRows(t, live); n != want {
			t.Errorf("the live %s has %d rows, want %d", rel, n, want)
		}
		restored := restoreRel(t, e, repl, rel)
		if n := countRows(t, restored); n != want {
			t.Errorf("%s restored with %d rows, want %d", rel, n, want)
		}
		got, err := os.ReadFile(restored)
		if err != nil {
			t.Fatal(err)
		}
		if wantBytes, _ := os.ReadFile(live); !bytes.Equal(got, wantBytes) {
			t.Errorf("restored %s differs from the live file: %s", rel, firstDiff(got, wantBytes))
		}
	}
}

func restoreRel(t *testing.T, e *env, repl, rel string) string {
	t.Helper()
	out := filepath.Join(e.root, fmt.Sprintf("restored-%d.db", time.Now().UnixNano()))
	if code, log := runLfuse(t, "restore", "-o", out, "file://"+filepath.Join(repl, rel)); code != 0 {
		t.Fatalf("restore of %s exited %d:\n%s", rel, code, log)
	}
	return out
}

func countRows(t *testing.T, path string) int {
	t.Helper()
	db := openDB(t, path, "mode=ro")
	defer db.Close()
	var n int
	if err := db.QueryRow("SELECT count(*) FROM t").Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func insertRows(t *testing.T, db *sql.DB, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		mustExec(t, db, "INSERT INTO t VALUES (randomblob(50))")
	}
}

// A database moved into a directory where no WAL had been opened while the
// application goes on writing: its commits reach the replica while lfuse
// runs. (Found by an adversarial run: nothing watched the new directory,
// so they were captured only at the next checkpoint or stop.)
func TestMoveIntoNewDirectory(t *testing.T) {
	e := newEnv(t)
	cfgPath, repl := e.replicaConfig("")
	lf := e.mount("-config", cfgPath)
	db := openDB(t, e.path("app.db"))
	db.SetMaxOpenConns(1)
	mustExec(t, db, "CREATE TABLE t(v)")
	insertRows(t, db, 3)
	if err := lf.log.wait(`msg="snapshot uploaded" db=app.db `, time.Minute, lf.done); err != nil {
		t.Fatalf("%v\n%s", err, lf.log)
	}
	if err := os.Mkdir(e.path("new"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, suffix := range []string{"", "-wal", "-shm"} {
		if err := os.Rename(e.path("app.db"+suffix), e.path("new/app.db"+suffix)); err != nil {
			t.Fatal(err)
		}
	}
	if err := lf.log.wait(`msg="snapshot uploaded" db=new/app.db `, time.Minute, lf.done); err != nil {
		t.Fatalf("new/app.db was not taken up at its new path: %v\n%s", err, lf.log)
	}
	insertRows(t, db, 20)
	out := filepath.Join(e.root, "restored.db")
	// Each sync of the moved database may be the one with every row.
	for synced := 1; ; synced++ {
		if err := lf.log.waitCount(`msg=synced db=new/app.db `, synced, 30*time.Second, lf.done); err != nil {
			t.Fatalf("the commits after the move did not reach the replica: %v\n%s", err, lf.log)
		}
		// A compaction may remove a file the restore listed: then the
		// next sync's restore.
		os.Remove(out)
		if code, _ := runLfuse(t, "restore", "-o", out, "file://"+filepath.Join(repl, "new/app.db")); code == 0 && countRows(t, out) == 23 {
			break
		}
	}
	db.Close()
	lf.stop()
}

// Databases that no application opens through the mount are replicated
// too: one already in the data directory when lfuse starts, and one
// renamed while closed. Each was once in no replica until an application
// opened it, and lost with the disk.
func TestUnopenedDatabasesAreReplicated(t *testing.T) {
	e := newEnv(t)
	cfgPath, repl := e.replicaConfig("")
	pre := filepath.Join(e.data, "sub", "pre.db")
	os.MkdirAll(filepath.Dir(pre), 0o755)
	createSeq(t, pre) // written before lfuse runs, closed: no -wal left
	seqWrite(t, pre, 1, 20)
	lf := e.mount("-config", cfgPath)
	if err := lf.log.wait("took up databases that no application has opened yet", time.Minute, lf.done); err != nil {
		t.Fatalf("%v\n%s", err, lf.log)
	}
	createSeq(t, e.path("old.db"))
	seqWrite(t, e.path("old.db"), 1, 30)
	if err := os.Rename(e.path("old.db"), e.path("new.db")); err != nil {
		t.Fatal(err)
	}
	lf.stop()
	for db, rows := range map[string]int{"sub/pre.db": 20, "new.db": 30} {
		out := filepath.Join(e.root, strings.ReplaceAll(db, "/", "_")+".restored")
		if code, log := runLfuse(t, "restore", "-o", out, "file://"+repl+"/"+db); code != 0 {
			t.Fatalf("restore %s exited %d:\n%s\nlfuse:\n%s", db, code, log, lf.log)
		}
		if n := seqRows(t, out); n != rows {
			t.Fatalf("%s restored with %d rows, want %d", db, n, rows)
		}
	}
}
