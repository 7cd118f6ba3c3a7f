package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lfuse/lfuse/replicate"
	"github.com/superfly/ltx"
)

// Every way SQLite can change a database in WAL mode is captured through the
// mount: the local log rebuilds each database page for page, without ever
// losing continuity unless the case itself breaks it.
func TestCaptureCases(t *testing.T) {
	cases := []struct {
		name string
		dbs  []string
		run  func(t *testing.T, e *env)
		// snapshots is how many times continuity is expected to be lost
		// and restored with a snapshot (beyond the first of each database).
		resnapshots int
		logs        []string // lines lfuse must log
	}{
		// SQLite writes page 1 of this one under a rollback journal
		// before it sets the WAL flag.
		{name: "auto_vacuum set before WAL", dbs: []string{"av.db"}, run: func(t *testing.T, e *env) {
			sqliteCLI(t, e.path("av.db"), "PRAGMA auto_vacuum=INCREMENTAL; PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB); INSERT INTO t(v) VALUES(randomblob(5000));")
			sqliteCLI(t, e.path("av.db"), "DELETE FROM t; PRAGMA incremental_vacuum;")
		}},
		{name: "page sizes", dbs: []string{"p512.db", "p1024.db", "p4096.db", "p16384.db", "p65536.db"}, run: func(t *testing.T, e *env) {
			for _, ps := range []int{512, 1024, 4096, 16384, 65536} {
				path := e.path(fmt.Sprintf("p%d.db", ps))
				sqliteCLI(t, path, fmt.Sprintf("PRAGMA page_size=%d; PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);", ps))
				db := openDB(t, path)
				defer db.Close()
				for i := 0; i < 200; i++ {
					mustExec(t, db, "INSERT INTO t(v) VALUES(randomblob(?))", 50+i*13)
					if i%50 == 49 {
						mustExec(t, db, "PRAGMA wal_checkpoint(PASSIVE)")
					}
				}
			}
		}},
		{name: "checkpoints of every mode and WAL restarts", dbs: []string{"ck.db"}, run: func(t *testing.T, e *env) {
			db := openDB(t, e.path("ck.db"))
			defer db.Close()
			mustExec(t, db, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
			for round := 0; round < 40; round++ {
				for i := 0; i < 25; i++ {
					mustExec(t, db, "INSERT INTO t(v) VALUES(?)", strings.Repeat("r", round*10+i))
				}
				mustExec(t, db, "PRAGMA wal_checkpoint("+checkpointModes[round%4]+")")
			}
		}},
		{name: "automatic checkpoints every few pages", dbs: []string{"auto.db"}, run: func(t *testing.T, e *env) {
			db := openDB(t, e.path("auto.db"), "_wal_autocheckpoint=5")
			defer db.Close()
			db.SetMaxOpenConns(1)
			mustExec(t, db, "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
			for i := 0; i < 2000; i++ {
				mustExec(t, db, "INSERT INTO t(v) VALUES(randomblob(300))")
			}
		}},
		{name: "vacuum and a shrinking database", dbs: []string{"shrink.db"}, run: func(t *testing.T, e *env) {
			db := openDB(t, e.path("shrink.db"))
			defer db.Close()
			mustExec(t, db, "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
			mustExec(t, db, "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < 3000) INSERT INTO t(v) SELECT randomblob(800) FROM s")
			mustExec(t, db, "DELETE FROM t WHERE id > 100")
			mustExec(t, db, "VACUUM")
			mustExec(t, db, "PRAGMA wal_checkpoint(TRUNCATE)")
			mustExec(t, db, "PRAGMA auto_vacuum=INCREMENTAL")
			mustExec(t, db, "VACUUM")
			mustExec(t, db, "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < 500) INSERT INTO t(v) SELECT randomblob(800) FROM s")
			mustExec(t, db, "DELETE FROM t")
			mustExec(t, db, "PRAGMA incremental_vacuum")
			mustExec(t, db, "INSERT INTO t(v) VALUES('last')")
		}},
		{name: "transaction larger than the page cache", dbs: []string{"big.db"}, run: func(t *testing.T, e *env) {
			db := openDB(t, e.path("big.db"), "_cache_size=10")
			defer db.Close()
			db.SetMaxOpenConns(1)
			mustExec(t, db, "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
			mustExec(t, db, "CREATE INDEX t_v ON t(v)")
			tx, err := db.Begin()
			if err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 5000; i++ {
				if _, err := tx.Exec("INSERT INTO t(v) VALUES(randomblob(500))"); err != nil {
					t.Fatal(err)
				}
			}
			// Change pages that already spilled into the WAL.
			if _, err := tx.Exec("UPDATE t SET v = randomblob(510) WHERE id % 11 = 0"); err != nil {
				t.Fatal(err)
			}
			if err := tx.Commit(); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "exclusive locking mode", dbs: []string{"excl.db"}, run: func(t *testing.T, e *env) {
			db := openDB(t, e.path("excl.db"), "_locking_mode=EXCLUSIVE")
			defer db.Close()
			db.SetMaxOpenConns(1)
			mustExec(t, db, "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
			for i := 0; i < 300; i++ {
				mustExec(t, db, "INSERT INTO t(v) VALUES(randomblob(700))")
				if i%100 == 99 {
					mustExec(t, db, "PRAGMA wal_checkpoint(RESTART)")
				}
			}
			db.Close()
		}},
		{name: "nested directories and several databases", dbs: []string{"top.db", "a/one.db", "a/b/c/two.db"}, run: func(t *testing.T, e *env) {
			if err := os.MkdirAll(e.path("a/b/c"), 0o755); err != nil {
				t.Fatal(err)
			}
			var workers []*workerProc
			for i, rel := range []string{"top.db", "a/one.db", "a/b/c/two.db"} {
				sqliteCLI(t, e.path(rel), "PRAGMA journal_mode=WAL;\n"+bankSchema)
				workers = append(workers, startWorker(t, "bank-writer", "DB="+e.path(rel), "N=400", fmt.Sprintf("SEED=%d", i), "NAME=w", "CKPT=100"))
			}
			for _, w := range workers {
				if err := w.wait(t, 5*time.Minute); err != nil {
					t.Fatalf("%v\n%s", err, w.out)
				}
			}
		}},
		{name: "switch to a rollback journal and back", dbs: []string{"sw.db"}, resnapshots: 1,
			logs: []string{"switched to a rollback journal", "changed while it had no WAL"},
			run: func(t *testing.T, e *env) {
				path := e.path("sw.db")
				sqliteCLI(t, path, "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES(1);")
				sqliteCLI(t, path, "PRAGMA journal_mode=DELETE; INSERT INTO t VALUES(2); INSERT INTO t VALUES(3);")
				sqliteCLI(t, path, "PRAGMA journal_mode=WAL; INSERT INTO t VALUES(4);")
			}},
		{name: "deleted and created again", dbs: []string{"again.db"}, resnapshots: 1, logs: []string{"database file was deleted"},
			run: func(t *testing.T, e *env) {
				path := e.path("again.db")
				sqliteCLI(t, path, "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES(1);")
				if err := os.Remove(path); err != nil {
					t.Fatal(err)
				}
				sqliteCLI(t, path, "PRAGMA journal_mode=WAL; CREATE TABLE u(y); INSERT INTO u VALUES(2);")
			}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t)
			lf := e.mount()
			c.run(t, e)
			for _, rel := range c.dbs {
				integrityCheck(t, e.path(rel))
				checkpointTruncate(t, e.path(rel))
			}
			lf.stop()
			for _, rel := range c.dbs {
				assertLogMatches(t, e, rel)
			}
			if got := lf.log.count("needs a new snapshot"); got != c.resnapshots {
				t.Fatalf("lost continuity %d times, want %d:\n%s", got, c.resnapshots, lf.log)
			}
			journal := false
			for _, want := range c.logs {
				if lf.log.count(want) == 0 {
					t.Fatalf("lfuse did not log %q:\n%s", want, lf.log)
				}
				journal = journal || strings.Contains(want, "rollback journal")
			}
			// SQLite creates a WAL database under a rollback journal
			// first; that alone is not worth a warning.
			if n := lf.log.count("rollback journal"); !journal && n > 0 {
				t.Fatalf("lfuse warned %d times of a rollback journal:\n%s", n, lf.log)
			}
		})
	}
}

// Each commit is captured exactly once: N commits add exactly N TXIDs.
func TestCaptureExactlyOnce(t *testing.T) {
	e := newEnv(t)
	lf := e.mount()
	path := e.path("once.db")
	sqliteCLI(t, path, "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);")
	lf.stop()
	before := lastTXID(t, e, "once.db")

	lf = e.mount()
	db := openDB(t, path)
	defer db.Close()
	const n = 1000
	for i := 0; i < n; i++ {
		mustExec(t, db, "INSERT INTO t(v) VALUES(?)", fmt.Sprint(i))
		if i%97 == 96 {
			mustExec(t, db, "PRAGMA wal_checkpoint("+checkpointModes[i%4]+")")
		}
	}
	// A rolled-back transaction and a read-only one commit nothing.
	tx, _ := db.Begin()
	tx.Exec("INSERT INTO t(v) VALUES('rolled back')")
	tx.Rollback()
	var count int
	db.QueryRow("SELECT count(*) FROM t").Scan(&count)
	db.Close()
	lf.stop()
	if got := lastTXID(t, e, "once.db") - before; got != n {
		t.Fatalf("%d commits became %d captured transactions", n, got)
	}
}

// A database that never uses WAL mode passes through and is reported once.
func TestRollbackJournalDatabase(t *testing.T) {
	e := newEnv(t)
	lf := e.mount()
	path := e.path("legacy.db")
	sqliteCLI(t, path, "CREATE TABLE t(x);")
	for i := 0; i < 5; i++ {
		sqliteCLI(t, path, fmt.Sprintf("INSERT INTO t VALUES(%d);", i))
	}
	if got := sqliteCLI(t, path, "SELECT count(*) FROM t;"); got != "5" {
		t.Fatalf("count %s", got)
	}
	integrityCheck(t, path)
	lf.stop()
	if n := lf.log.count("uses a rollback journal: not replicated"); n != 1 {
		t.Fatalf("rollback-journal database reported %d times, want once:\n%s", n, lf.log)
	}
}

// lfuse's own state is invisible and unreachable through the mount.
func TestStateIsHidden(t *testing.T) {
	e := newEnv(t)
	lf := e.mount()
	sqliteCLI(t, e.path("h.db"), "PRAGMA journal_mode=WAL; CREATE TABLE t(x);")
	// The database's state is made when capture takes it up, after the
	// command returned.
	if err := lf.log.wait("snapshot taken", time.Minute, lf.done); err != nil {
		t.Fatalf("%v\n%s", err, lf.log)
	}
	ents, err := os.ReadDir(e.mnt)
	if err != nil {
		t.Fatal(err)
	}
	for _, ent := range ents {
		if ent.Name() == ".lfuse" {
			t.Fatal(".lfuse is listed in the mount")
		}
	}
	if _, err := os.Stat(e.path(".lfuse")); !os.IsNotExist(err) {
		t.Fatalf("stat .lfuse through the mount: %v", err)
	}
	if err := os.Mkdir(e.path(".lfuse"), 0o755); err == nil {
		t.Fatal("created .lfuse through the mount")
	}
	if _, err := os.Stat(filepath.Join(e.state, "dbs")); err != nil {
		t.Fatalf("state directory missing in the backing directory: %v", err)
	}
}

func lastTXID(t *testing.T, e *env, rel string) ltx.TXID {
	t.Helper()
	l, err := replicate.OpenLog(replicate.LogDir(e.state, rel))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	rec, ok := l.Last()
	if !ok {
		t.Fatalf("no log for %s", rel)
	}
	return rec.TXID()
}
