package replicate

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends/file"
	_ "github.com/mattn/go-sqlite3"
	"github.com/superfly/ltx"
)

// logBuffer is a slog handler target the tests can search.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func newTestManager(t *testing.T, data, state string) (*Manager, *logBuffer) {
	t.Helper()
	buf := &logBuffer{}
	m := NewManager(data, state, slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err := m.Open(context.Background()); err != nil {
		t.Fatal(err)
	}
	return m, buf
}

// checkpoint runs a checkpoint as the FUSE layer would see it: the
// truncation that ends it is held until capture is done.
func checkpoint(t *testing.T, m *Manager, db *sql.DB, mode string) {
	t.Helper()
	release := m.BeforeTruncate("app.db")
	var a, b, c int
	err := db.QueryRow("PRAGMA wal_checkpoint("+mode+")").Scan(&a, &b, &c)
	if release != nil {
		release(err == nil)
	}
	if err != nil {
		t.Fatal(err)
	}
}

func replayed(t *testing.T, state, rel string) []byte {
	t.Helper()
	l, err := ReadLog(LogDir(state, rel))
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.CreateTemp(t.TempDir(), "replay")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := l.Restore(f); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(f.Name())
	return b
}

// The Manager fed the events the FUSE layer reports, with SQLite writing the
// files directly: writers, capture passes and holds run concurrently (under
// the race detector), and the log must rebuild the database exactly; then
// restarts must resume, verify, or re-snapshot as the files warrant.
func TestManagerCaptureAndRestart(t *testing.T) {
	data, state := t.TempDir(), filepath.Join(t.TempDir(), "state")
	m, logs := newTestManager(t, data, state)

	path := filepath.Join(data, "app.db")
	db, err := sql.Open("sqlite3", path+"?_journal_mode=WAL&_busy_timeout=5000")
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(1)
	mustExec := func(q string, args ...any) {
		t.Helper()
		if _, err := db.Exec(q, args...); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	mustExec("PRAGMA wal_autocheckpoint=0")
	mustExec("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
	m.Opened("app.db-wal", true)
	// Let discovery's snapshot happen first, so that every insert below is
	// a commit capture must see; under load it otherwise ran hundreds of
	// inserts later and took them in instead.
	m.SyncAll()
	m.DB("app.db").wg.Wait()

	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() { // the inotify side: changes reported while SQLite writes
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
				m.Modified("app.db-wal")
				m.Modified("other-file")
			}
		}
	}()
	for i := 0; i < 600; i++ {
		mustExec("INSERT INTO t(v) VALUES(randomblob(?))", 100+i)
		if i%100 == 99 {
			checkpoint(t, m, db, []string{"PASSIVE", "FULL", "RESTART", "TRUNCATE"}[i/100%4])
		}
	}
	close(stop)
	wg.Wait()
	checkpoint(t, m, db, "TRUNCATE")
	db.Close()
	m.SyncAll()
	st := m.DB("app.db").Stats()
	// The discovery snapshot (TXID 1), then one TXID per insert.
	if st.Status != "tracking" || st.Snapshots != 1 || int64(st.TXID) != 1+st.Captured || st.Captured != 600 {
		t.Fatalf("stats after capture: %+v\n%s", st, logs)
	}
	closeAndReplay(t, m, logs, state, path)
	// A clean stop: the next start trusts the files without reading them.
	m2, logs2 := newTestManager(t, data, state)
	if s := logs2.String(); strings.Contains(s, "verified") || strings.Contains(s, "snapshot taken") {
		t.Fatalf("clean restart re-read the database:\n%s", s)
	}
	m2.Close()

	// Not a clean stop (the marker is gone) but nothing changed: verified.
	os.WriteFile(filepath.Join(state, "dbs", "app.db", "state.json"), []byte(`{"path":"app.db"}`), 0o600)
	m3, logs3 := newTestManager(t, data, state)
	if !strings.Contains(logs3.String(), "verified database against the local log") {
		t.Fatalf("unclean restart did not verify:\n%s", logs3)
	}
	m3.Close()

	// Changed while lfuse was not looking: a new snapshot, with the reason.
	db, _ = sql.Open("sqlite3", path)
	db.Exec("INSERT INTO t(v) VALUES('behind its back')")
	db.Exec("PRAGMA wal_checkpoint(TRUNCATE)")
	db.Close()
	m4, logs4 := newTestManager(t, data, state)
	s := logs4.String()
	if !strings.Contains(s, "changed without lfuse seeing it") || !strings.Contains(s, "snapshot taken") {
		t.Fatalf("a database changed behind lfuse's back was not re-snapshotted:\n%s", s)
	}
	m4.Close()
	want, _ := os.ReadFile(path)
	if got := replayed(t, state, "app.db"); !bytes.Equal(got, want) {
		t.Fatal("log after the re-snapshot does not rebuild the database")
	}

	// Cut to less than a header, then replaced by a file that is not a
	// database, while lfuse was stopped: nothing to capture, and neither
	// a failure nor a crash. (Found by an adversarial run: the start
	// divided by zero, and a replaced database made every stop fail.)
	for _, content := range []string{"short", strings.Repeat("not a database\n", 300)} {
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		os.Remove(path + "-wal")
		m6, logs6 := newTestManager(t, data, state)
		if err := m6.Close(); err != nil {
			t.Fatalf("stop with a %d-byte non-database at a captured path: %v\n%s", len(content), err, logs6)
		}
	}

	// Deleted while lfuse was stopped.
	os.Remove(path)
	m5, logs5 := newTestManager(t, data, state)
	if !strings.Contains(logs5.String(), "deleted while lfuse was not running") {
		t.Fatalf("deletion not noticed:\n%s", logs5)
	}
	m5.Close()
}

// A stop whose clean-stop marker cannot be written (a full state
// directory) has still shipped everything: it succeeds, and the next start
// verifies the database instead of trusting it. (Found by an adversarial
// run: the stop exited 1 after "every captured transaction is in every
// replica".)
func TestStopWithoutCleanMarker(t *testing.T) {
	rs := newReplicaSetup(t, ReplicaOptions{})
	if _, err := rs.db.Exec("CREATE TABLE t(v); INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	rs.m.Opened("app.db-wal", true)
	rs.m.SyncAll()
	marker := rs.m.DB("app.db").statePath()
	os.Remove(marker)
	if err := os.MkdirAll(filepath.Join(marker, "in the way"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := rs.m.Close(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if n := restoredRows(t, file.New(filepath.Join(rs.repl, "app.db")), Target{}); n != 1 {
		t.Fatalf("restored %d rows, want 1", n)
	}
}

// Files that are not databases cost nothing and are left alone.
func TestManagerIgnoresOtherFiles(t *testing.T) {
	data, state := t.TempDir(), filepath.Join(t.TempDir(), "state")
	m, _ := newTestManager(t, data, state)
	os.WriteFile(filepath.Join(data, "notes-wal"), []byte("not a WAL"), 0o644)
	os.WriteFile(filepath.Join(data, "notes"), []byte("not a database"), 0o644)
	m.Opened("notes-wal", true)
	m.Opened("readme.txt", false)
	if r := m.BeforeTruncate("readme.txt"); r != nil {
		t.Fatal("a hold for a file that is no database")
	}
	if r := m.BeforeUnlink("notes-wal"); r != nil {
		t.Fatal("a hold for a file that is no database's WAL")
	}
	if len(m.DBs()) != 0 {
		t.Fatalf("tracked %d databases", len(m.DBs()))
	}
	m.Close()
	if _, err := os.Stat(filepath.Join(state, "dbs")); !os.IsNotExist(err) {
		t.Fatal(fmt.Sprint("state written for files that are no database: ", err))
	}
}

// A commit SQLite counts (in its WAL index) that capture cannot validate
// means capture is stuck: lfuse must say so and start again from a
// snapshot, not wait silently while commits never reach a replica. Here a
// committed frame is damaged before lfuse reads it.
func TestCaptureStallIsDetected(t *testing.T) {
	data, state := t.TempDir(), filepath.Join(t.TempDir(), "state")
	m, logs := newTestManager(t, data, state)
	defer m.Close()
	path := filepath.Join(data, "app.db")
	// Discovery starts a capture pass of its own, which trackedDB waits
	// for; were it to run between the insert and the damage, it would
	// capture the commit intact.
	db, _ := trackedDB(t, m, data, "app.db", "_journal_mode=WAL", "CREATE TABLE t(v)")
	if strings.Contains(logs.String(), "WAL index counts") {
		t.Fatalf("a healthy capture was reported stuck:\n%s", logs)
	}
	if _, err := db.Exec("INSERT INTO t VALUES(randomblob(100))"); err != nil {
		t.Fatal(err)
	}
	wal, err := os.OpenFile(path+"-wal", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	fi, _ := wal.Stat()
	var b [1]byte
	wal.ReadAt(b[:], fi.Size()-100)
	b[0] ^= 0xff
	wal.WriteAt(b[:], fi.Size()-100) // inside the last frame's page
	wal.Close()
	m.SyncAll()
	if !strings.Contains(logs.String(), "WAL index counts") {
		t.Fatalf("a commit capture could not validate went unreported:\n%s", logs)
	}
}

// Capture passes resume a long unfinished transaction where the last one
// stopped instead of re-validating it from its start (that made capture
// quadratic in its size), so a commit written over its frames after a
// rollback must be found another way. Here the transaction also grew past
// the remembered point before it was rolled back, so the pass after the
// commit validates those stale frames as if the transaction went on, and
// no event follows the commit's own. Three ways find the commit:
//   - index: SQLite's WAL index counts it, and the same pass re-validates;
//   - timer: exclusive locking mode keeps the index in the writer's memory,
//     and a recheck comes a moment later;
//   - hold: an operation that could destroy frames re-validates first, even
//     as the first pass to see any of it.
func TestManagerRechecksUnfinishedTransaction(t *testing.T) {
	for _, by := range []string{"index", "timer", "hold"} {
		t.Run(by, func(t *testing.T) {
			if by != "timer" {
				defer func(d time.Duration) { recheckAfter = d }(recheckAfter)
				recheckAfter = time.Hour
			}
			testRecheck(t, by)
		})
	}
}

func testRecheck(t *testing.T, by string) {
	data, state := t.TempDir(), filepath.Join(t.TempDir(), "state")
	m, logs := newTestManager(t, data, state)
	path := filepath.Join(data, "app.db")
	locking := map[string]string{"index": "NORMAL", "timer": "EXCLUSIVE", "hold": "EXCLUSIVE"}[by]
	db, d := trackedDB(t, m, data, "app.db", "_journal_mode=WAL&_locking_mode="+locking+"&_cache_size=5",
		"PRAGMA wal_autocheckpoint=0; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
	pass := func() { // one capture pass for a reported change, finished
		t.Helper()
		d.kick()
		d.wg.Wait()
	}
	before := d.Stats().Captured

	tx, err := db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	insert := func(n int) {
		for i := 0; i < n; i++ {
			if _, err := tx.Exec("INSERT INTO t(v) VALUES(randomblob(1000))"); err != nil {
				t.Fatal(err)
			}
		}
	}
	insert(2000)
	pass()
	insert(200)
	if err := tx.Rollback(); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec("INSERT INTO t(v) VALUES('after the rollback')"); err != nil {
		t.Fatal(err)
	}
	switch by {
	case "index":
		pass() // the event of the commit's write
		if n := d.Stats().Captured - before; n != 1 {
			t.Fatalf("after the pass: captured %d transactions, want 1", n)
		}
	case "timer":
		pass()
	case "hold": // the first pass to see the commit
		release := m.BeforeTruncate("app.db")
		release(true)
		if n := d.Stats().Captured - before; n != 1 {
			t.Fatalf("after a hold: captured %d transactions, want 1", n)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for d.Stats().Captured == before {
		if time.Now().After(deadline) {
			t.Fatalf("the commit after the rollback was not captured:\n%s", logs)
		}
		time.Sleep(5 * time.Millisecond) // the recheck timer has no event to wait for
	}
	if n := d.Stats().Captured - before; n != 1 {
		t.Fatalf("captured %d transactions, want 1", n)
	}
	if _, err := db.Exec("PRAGMA wal_checkpoint(TRUNCATE)"); err != nil {
		t.Fatal(err)
	}
	db.Close()
	closeAndReplay(t, m, logs, state, path)
}

// trackedDB opens the database rel under data with the DSN parameters, runs
// setup, reports its WAL to m and waits until the discovery (a snapshot and
// a capture pass) is over.
func trackedDB(t *testing.T, m *Manager, data, rel, params, setup string) (*sql.DB, *DB) {
	t.Helper()
	db, err := sql.Open("sqlite3", filepath.Join(data, rel)+"?"+params)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	db.SetMaxOpenConns(1)
	if _, err := db.Exec(setup); err != nil {
		t.Fatal(err)
	}
	m.Opened(rel+"-wal", true)
	m.SyncAll()
	d := m.DB(rel)
	d.wg.Wait()
	return db, d
}

// closeAndReplay closes m and checks that its log rebuilds the database at
// path exactly, without ever having lost continuity.
func closeAndReplay(t *testing.T, m *Manager, logs *logBuffer, state, path string) {
	t.Helper()
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile(path)
	if got := replayed(t, state, filepath.Base(path)); !bytes.Equal(got, want) {
		t.Fatalf("log rebuilds %d bytes, database is %d bytes", len(got), len(want))
	}
	if strings.Contains(logs.String(), "needs a new snapshot") {
		t.Fatalf("lost continuity:\n%s", logs)
	}
}

// What a killed lfuse left of its temporary files (each up to the size of
// the database) is removed when the database is next opened, and nothing
// else is. (Found by an audit: eight kill -9 rounds left 900 MB of them.)
func TestLeftoversSwept(t *testing.T) {
	data, state := t.TempDir(), filepath.Join(t.TempDir(), "state")
	m, _ := newTestManager(t, data, state)
	db, err := sql.Open("sqlite3", filepath.Join(data, "app.db")+"?_journal_mode=WAL")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec("CREATE TABLE t(v)"); err != nil {
		t.Fatal(err)
	}
	m.Opened("app.db-wal", true)
	m.SyncAll()
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Dir(LogDir(state, "app.db"))
	before, _ := os.ReadDir(dir)
	leftovers := []string{"snapshot-123.tmp", "fold-9.tmp", "upload-1.ltx", "download-2.ltx", "merge-3.ltx", ".ltx-page-index-4.tmp", "state.json.5.tmp"}
	for _, name := range leftovers {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	m, _ = newTestManager(t, data, state)
	defer m.Close()
	m.Opened("app.db-wal", false)
	m.SyncAll()
	after, _ := os.ReadDir(dir)
	var names, kept []string
	for _, e := range after {
		names = append(names, e.Name())
	}
	for _, e := range before {
		kept = append(kept, e.Name())
	}
	if !slices.Equal(names, kept) {
		t.Fatalf("state directory holds %v, want %v", names, kept)
	}
}

// A FIFO renamed inside the mount, or found by the start-up walk, is not
// opened to read its head: that blocked until a writer came, and held the
// rename, its directory and the walk with it.
func TestFIFONotOpened(t *testing.T) {
	data, state := t.TempDir(), filepath.Join(t.TempDir(), "state")
	m, _ := newTestManager(t, data, state)
	defer m.Close()
	if err := syscall.Mkfifo(filepath.Join(data, "q"), 0o644); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if after := m.BeforeRename("p", "q"); after != nil {
			after(true)
		}
		m.Discover(context.Background())
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		f, _ := os.OpenFile(filepath.Join(data, "q"), os.O_WRONLY, 0) // let it go
		f.Close()
		t.Fatal("a FIFO was opened for its head, and blocked")
	}
}

// overwriteWith copies a new database over the file at path in place, as
// cp does (the same inode, truncated and written), reporting it to m as the
// mount would.
func overwriteWith(t *testing.T, m *Manager, path string) {
	t.Helper()
	backup := filepath.Join(t.TempDir(), "backup.db")
	bdb, err := sql.Open("sqlite3", backup+"?_journal_mode=WAL")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bdb.Exec("CREATE TABLE b(v); INSERT INTO b VALUES('from the backup')"); err != nil {
		t.Fatal(err)
	}
	bdb.Close()
	content, err := os.ReadFile(backup)
	if err != nil {
		t.Fatal(err)
	}
	m.BeforeTruncate(filepath.Base(path))(true)
	if err := os.WriteFile(path, content, 0o644); err != nil {
		t.Fatal(err)
	}
	m.Modified(filepath.Base(path))
}

// closeLast closes the last connection to a tracked database: SQLite
// checkpoints and removes the WAL, which the mount reports.
func closeLast(t *testing.T, m *Manager, db *sql.DB, path string) {
	t.Helper()
	release := m.BeforeUnlink(filepath.Base(path) + "-wal")
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	release(true)
	if _, err := os.Stat(path + "-wal"); !os.IsNotExist(err) {
		t.Fatalf("the WAL is still there: %v", err)
	}
}

// closedDB makes app.db of 200 rows, tracked and captured, then closes its
// last connection: the file is as the log ends, with no WAL.
func closedDB(t *testing.T) (data, state, path string, m *Manager, logs *logBuffer, d *DB) {
	t.Helper()
	data, state = t.TempDir(), filepath.Join(t.TempDir(), "state")
	m, logs = newTestManager(t, data, state)
	path = filepath.Join(data, "app.db")
	db, d := trackedDB(t, m, data, "app.db", "_journal_mode=WAL",
		"CREATE TABLE t(v); WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < 200) INSERT INTO t SELECT randomblob(500) FROM s")
	m.SyncAll()
	closeLast(t, m, db, path)
	return data, state, path, m, logs, d
}

// A database file overwritten while it has no WAL (a backup copied over
// it) is not the file the log describes: it is taken as a new snapshot,
// once it has been left alone and at the latest when lfuse stops, also
// when lfuse started with the database closed. Before, the stop recorded
// it as matching the log, and the next commit was captured onto the old
// content: a restore gave a malformed database.
func TestOverwrittenWithoutWAL(t *testing.T) {
	for _, when := range []string{"running", "at the stop", "after a restart"} {
		data, state, path, m, logs, d := closedDB(t)
		if when == "after a restart" {
			if err := m.Close(); err != nil {
				t.Fatal(err)
			}
			m, logs = newTestManager(t, data, state)
			d = m.DB("app.db")
		}
		overwriteWith(t, m, path)
		if when == "running" {
			// Left alone, the file is taken up by a pass of its own.
			for deadline := time.Now().Add(20 * time.Second); !strings.Contains(logs.String(), "changed while it had no WAL"); {
				if time.Now().After(deadline) {
					t.Fatalf("the overwritten file was never taken as a snapshot:\n%s", logs)
				}
				time.Sleep(20 * time.Millisecond) // a timer drives the pass; nothing to wait on
			}
			d.wg.Wait()
		}
		if err := m.Close(); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(logs.String(), "changed while it had no WAL") {
			t.Fatalf("%s: the overwrite went unnoticed:\n%s", when, logs)
		}
		want, _ := os.ReadFile(path)
		if got := replayed(t, state, "app.db"); !bytes.Equal(got, want) {
			t.Fatalf("%s: the log rebuilds %d bytes, the database is %d bytes", when, len(got), len(want))
		}

		// The next start continues from the new content.
		m2, _ := newTestManager(t, data, state)
		db2, _ := trackedDB(t, m2, data, "app.db", "_journal_mode=WAL", "INSERT INTO b VALUES('after the restart')")
		db2.Close()
		if err := m2.Close(); err != nil {
			t.Fatal(err)
		}
		want, _ = os.ReadFile(path)
		if got := replayed(t, state, "app.db"); !bytes.Equal(got, want) {
			t.Fatalf("%s: after a restart the log rebuilds %d bytes, the database is %d bytes", when, len(got), len(want))
		}
	}
}

// chmod, chown or touch of a closed database change its attributes, not its
// pages: no snapshot, running or at the stop. Before, each one uploaded the
// whole database again. A real overwrite after them is still caught.
func TestAttributesChangedWithoutWAL(t *testing.T) {
	data, state, path, m, logs, d := closedDB(t)
	snapshot := func() ltx.TXID {
		t.Helper()
		l, err := ReadLog(LogDir(state, "app.db"))
		if err != nil {
			t.Fatal(err)
		}
		return l.SnapshotTXID()
	}
	before := snapshot()

	for _, change := range []func() error{
		func() error { return os.Chmod(path, 0o600) },
		func() error { return os.Chown(path, os.Getuid(), os.Getgid()+1) },
		func() error {
			later := time.Now().Add(time.Hour)
			return os.Chtimes(path, later, later)
		},
	} {
		if err := change(); err != nil {
			t.Fatal(err)
		}
		d.mu.Lock()
		d.checkNoWAL(true)
		d.mu.Unlock()
	}
	if err := os.Chmod(path, 0o644); err != nil { // left for the stop
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(logs.String(), "changed while it had no WAL") || snapshot() != before {
		t.Fatalf("a change of attributes was taken as a new snapshot (log starts at TXID %s, was %s):\n%s", snapshot(), before, logs)
	}

	// The next lfuse keeps watching from the file as it is now.
	m, logs = newTestManager(t, data, state)
	if err := os.Chmod(path, 0o640); err != nil {
		t.Fatal(err)
	}
	overwriteWith(t, m, path)
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "changed while it had no WAL") || snapshot() == before {
		t.Fatalf("the overwrite after a chmod went unnoticed:\n%s", logs)
	}
	want, _ := os.ReadFile(path)
	if got := replayed(t, state, "app.db"); !bytes.Equal(got, want) {
		t.Fatalf("the log rebuilds %d bytes, the database is %d bytes", len(got), len(want))
	}
}

// SQLite writing the database file with its WAL present (checkpoints) or
// with a rollback journal that leaves no file (journal_mode=MEMORY) is not
// an overwrite: neither takes a snapshot of the file as it is.
func TestNoWALCheckLeavesSQLiteAlone(t *testing.T) {
	data, state := t.TempDir(), filepath.Join(t.TempDir(), "state")
	m, logs := newTestManager(t, data, state)
	path := filepath.Join(data, "app.db")
	check := func(d *DB) {
		d.mu.Lock()
		d.checkNoWAL(true) // as a stop would: no quiet to wait for
		d.mu.Unlock()
	}

	// Deleted with its WAL gone, then created again before its old
	// state was released.
	db, d := trackedDB(t, m, data, "app.db", "_journal_mode=WAL", "CREATE TABLE t(v)")
	closeLast(t, m, db, path)
	m.BeforeUnlink("app.db")(true)
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	db2, d2 := trackedDB(t, m, data, "app.db", "_journal_mode=WAL&_busy_timeout=5000", "PRAGMA wal_autocheckpoint=0; CREATE TABLE u(v)")
	if d2 != d {
		t.Skip("the deleted database was released already")
	}
	for range 3 {
		if _, err := db2.Exec("INSERT INTO u VALUES(randomblob(5000))"); err != nil {
			t.Fatal(err)
		}
		m.Modified("app.db-wal")
		checkpoint(t, m, db2, "PASSIVE")
		m.Modified("app.db")
		check(d)
	}
	if strings.Contains(logs.String(), "changed while it had no WAL") {
		t.Fatalf("a checkpoint of the database created again was taken for an overwrite:\n%s", logs)
	}

	// journal_mode=MEMORY: SQLite writes the file in place, no journal.
	release := m.BeforeUnlink("app.db-wal")
	if _, err := db2.Exec("PRAGMA journal_mode=MEMORY"); err != nil {
		t.Fatal(err)
	}
	release(true)
	for range 3 {
		if _, err := db2.Exec("INSERT INTO u VALUES(randomblob(5000))"); err != nil {
			t.Fatal(err)
		}
		m.Modified("app.db")
		check(d)
	}
	if strings.Contains(logs.String(), "changed while it had no WAL") {
		t.Fatalf("a rollback-journal database was snapshotted as it was written:\n%s", logs)
	}
	if st := d.Stats(); st.Status != statusRollback.String() {
		t.Fatalf("status %q in journal_mode=MEMORY", st.Status)
	}
	db2.Close()
}

// Reading a file's head to see whether it is a database leaves its atime
// as it was.
func TestReadHeadKeepsAtime(t *testing.T) {
	path := filepath.Join(t.TempDir(), "app.db")
	if err := os.WriteFile(path, []byte("SQLite format 3\x00"), 0o644); err != nil {
		t.Fatal(err)
	}
	// Older than a day: relatime would update it on a read.
	old := time.Now().Add(-48 * time.Hour).Truncate(time.Second)
	atime := func() time.Time {
		t.Helper()
		var st syscall.Stat_t
		if err := syscall.Stat(path, &st); err != nil {
			t.Fatal(err)
		}
		return time.Unix(st.Atim.Unix())
	}
	if err := os.Chtimes(path, old, old); err != nil {
		t.Fatal(err)
	}
	if _, err := os.ReadFile(path); err != nil {
		t.Fatal(err)
	}
	if atime().Equal(old) {
		t.Skip("this filesystem does not update atimes (noatime): nothing to prove")
	}
	if err := os.Chtimes(path, old, old); err != nil {
		t.Fatal(err)
	}
	if len(readHead(path)) == 0 {
		t.Fatal("read nothing")
	}
	if got := atime(); !got.Equal(old) {
		t.Fatalf("atime %v after reading the head, was %v", got, old)
	}
}
