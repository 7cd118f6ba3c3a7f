package replicate

import (
	"bytes"
	"database/sql"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func walHeader(t *testing.T, path string) []byte {
	t.Helper()
	f, err := os.Open(path + "-wal")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 32)
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// noTimedPasses keeps armPass from starting timers for d until the test
// ends, so that only the passes the test runs itself capture: a 3 ms timer
// otherwise races the test's own steps.
func noTimedPasses(t *testing.T, d *DB) {
	d.mu.Lock()
	d.passArmed = true
	d.mu.Unlock()
	t.Cleanup(func() {
		d.mu.Lock()
		d.passArmed = false
		d.mu.Unlock()
	})
}

// insertRows commits one transaction of n rows of 1,000 random bytes.
func insertRows(t *testing.T, db *sql.DB, n int) {
	t.Helper()
	q := "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < ?) INSERT INTO t(v) SELECT randomblob(1000) FROM s"
	if _, err := db.Exec(q, n); err != nil {
		t.Fatal(err)
	}
}

// A checkpoint that ends while a large transaction is not yet captured
// lets SQLite go ahead at once: its frames are copied aside, and capture
// later reads them from the copy even though SQLite has since restarted
// the WAL and written over them.
func TestCheckpointCopiesFramesAside(t *testing.T) {
	data, state := t.TempDir(), filepath.Join(t.TempDir(), "state")
	m, logs := newTestManager(t, data, state)
	path := filepath.Join(data, "app.db")
	db, d := trackedDB(t, m, data, "app.db", "_journal_mode=WAL&_busy_timeout=5000",
		"PRAGMA wal_autocheckpoint=0; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
	noTimedPasses(t, d)

	// 3 MB committed that no pass has seen: nothing reported the writes.
	insertRows(t, db, 3000)
	before := walHeader(t, path)
	release := m.BeforeTruncate("app.db")
	if d.aside == nil {
		t.Fatal("the hold at the end of a checkpoint captured a 3 MB backlog instead of copying it aside")
	}
	if _, err := db.Exec("PRAGMA wal_checkpoint(FULL)"); err != nil {
		t.Fatal(err)
	}
	release(true)

	// The next transaction restarts the WAL over the copied frames.
	insertRows(t, db, 1500)
	if bytes.Equal(walHeader(t, path), before) {
		t.Fatal("SQLite did not restart the WAL; the test proves nothing")
	}
	if n := d.captured.Load(); n != 0 {
		t.Fatalf("%d transactions captured before the pass that should find them", n)
	}
	m.SyncAll()
	if d.aside != nil {
		t.Fatal("the copy outlived the pass that captured it")
	}
	if _, err := os.Stat(d.asidePath()); !os.IsNotExist(err) {
		t.Fatalf("copy aside left in the state directory: %v", err)
	}
	if n := d.captured.Load(); n != 2 {
		t.Fatalf("captured %d transactions, want the copied one and the one after the restart", n)
	}
	if st := d.Stats(); st.Holds < 1 || st.Copies != 1 || st.Held <= 0 {
		t.Fatalf("stats after one checkpoint that copied aside: %d holds, %d copies, %v held", st.Holds, st.Copies, st.Held)
	}
	db.Close()
	closeAndReplay(t, m, logs, state, path)
}

// A copy aside that a stopped lfuse did not capture held commits the
// restarted WAL no longer has: the next start must not resume as if the
// log were complete.
func TestLostCopyAsideForcesSnapshot(t *testing.T) {
	data, state := t.TempDir(), filepath.Join(t.TempDir(), "state")
	m, _ := newTestManager(t, data, state)
	db, d := trackedDB(t, m, data, "app.db", "_journal_mode=WAL&_busy_timeout=5000",
		"PRAGMA wal_autocheckpoint=0; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
	insertRows(t, db, 3000)
	release := m.BeforeTruncate("app.db")
	if d.aside == nil {
		t.Fatal("no copy aside")
	}
	copied, err := os.ReadFile(d.asidePath())
	if err != nil {
		t.Fatal(err)
	}
	asidePath := d.asidePath()
	if _, err := db.Exec("PRAGMA wal_checkpoint(FULL)"); err != nil {
		t.Fatal(err)
	}
	release(true)
	insertRows(t, db, 10)
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	// As if the process had died before capturing the copy.
	if err := os.WriteFile(asidePath, copied, 0o600); err != nil {
		t.Fatal(err)
	}

	m2, logs := newTestManager(t, data, state)
	defer m2.Close()
	m2.Opened("app.db-wal", false)
	m2.SyncAll()
	m2.DB("app.db").wg.Wait()
	if !strings.Contains(logs.String(), "copied aside before a checkpoint were not captured") {
		t.Fatalf("restart with a lost copy aside did not start again from a snapshot:\n%s", logs)
	}
	if _, err := os.Stat(asidePath); !os.IsNotExist(err) {
		t.Fatalf("lost copy aside left in the state directory: %v", err)
	}
}
