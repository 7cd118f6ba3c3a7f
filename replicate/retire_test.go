package replicate

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends/file"
	"github.com/superfly/ltx"
)

// A deleted database is released once its replica holds all of it: its
// state directory goes, and it is not loaded again at the next start. Until
// then (the replica unreachable) it stays. A database made again at the
// same path is a new one whose history continues the replica above the
// old, and both stay restorable.
func TestDeletedDatabaseReleased(t *testing.T) {
	fastRetire(t, 10*time.Millisecond)
	var client *failingWrites
	rs := newWrappedReplicaSetup(t, ReplicaOptions{SyncInterval: 10 * time.Millisecond},
		func(c ReplicaClient) ReplicaClient { client = &failingWrites{ReplicaClient: c}; return client })
	execSQL(t, rs.db, "CREATE TABLE t(v)")
	rs.m.Opened("app.db-wal", true)
	for i := 0; i < 5; i++ {
		execSQL(t, rs.db, "INSERT INTO t VALUES (randomblob(300))")
	}
	rs.m.SyncAll()
	client.down.Store(true)
	execSQL(t, rs.db, "INSERT INTO t VALUES ('last before the delete')")
	checkpoint(t, rs.m, rs.db, "TRUNCATE")
	rs.db.Close()
	before, err := os.ReadFile(rs.path)
	if err != nil {
		t.Fatal(err)
	}
	old := rs.m.DB("app.db")
	deleteDB(rs.m, filepath.Dir(rs.path))
	stateDir := filepath.Join(rs.state, "dbs", "app.db")

	// Its last commit is not in the replica yet: nothing is released.
	time.Sleep(20 * retireEvery) // the absence of an event: given time to happen, it must not
	if rs.m.DB("app.db") == nil {
		t.Fatal("released before the replica held its last commit")
	}
	if _, err := os.Stat(stateDir); err != nil {
		t.Fatalf("state removed before the replica held its last commit: %v", err)
	}

	if _, ok, err := ReadDeletion(context.Background(), file.New(filepath.Join(rs.repl, "app.db"))); ok || err != nil {
		t.Fatalf("deletion recorded before the replica held the last commit (%v)", err)
	}
	client.down.Store(false)
	deadline := time.Now().Add(10 * time.Second)
	for rs.m.DB("app.db") != nil {
		if time.Now().After(deadline) {
			t.Fatal("deleted database not released after its replica caught up")
		}
		time.Sleep(retireEvery)
	}
	if _, err := os.Stat(stateDir); !os.IsNotExist(err) {
		t.Fatalf("state directory left: %v", err)
	}
	// A sync that was under way as its state directory moved aside fails
	// without counting (or logging) as an outage. (An adversarial run saw
	// "replica sync failed" errors logged at releases.)
	r := old.Replicas()[0]
	errs := r.errs.Load()
	r.mu.Lock()
	r.syncResult(fmt.Errorf("local log: open %s: %w", stateDir, os.ErrNotExist))
	r.mu.Unlock()
	if r.errs.Load() != errs {
		t.Fatal("a sync failing under a release counted as a replica error")
	}
	replica := file.New(filepath.Join(rs.repl, "app.db"))
	oldPlan := mustPlan(t, replica)
	out := filepath.Join(t.TempDir(), "old.db")
	if _, err := Restore(context.Background(), replica, oldPlan, out, RestoreOptions{}); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(out); string(got) != string(before) {
		t.Fatal("the replica does not restore the deleted database as it was")
	}
	// The replica says it was deleted, after its last commit: restores of
	// every database leave it out, unless to a time before.
	del, ok, err := ReadDeletion(context.Background(), replica)
	if err != nil || !ok || del.TXID != oldPlan.TXID || del.At.Before(oldPlan.Timestamp) {
		t.Fatalf("deletion recorded: %+v, %v, %v; last commit %s at %s", del, ok, err, oldPlan.TXID, oldPlan.Timestamp)
	}
	hides := func(plan Plan, target Target) bool {
		t.Helper()
		h, err := del.Hides(context.Background(), replica, plan, target)
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	if !hides(oldPlan, Target{}) || hides(oldPlan, Target{Time: del.At.Add(-time.Millisecond)}) || hides(oldPlan, Target{TXID: oldPlan.TXID}) {
		t.Fatal("the deletion hides the wrong restores")
	}
	// Nor a history that ends elsewhere: the same TXID with another
	// checksum, or another TXID.
	other := del
	other.PostApplyChecksum ^= 1
	if h, err := other.Hides(context.Background(), replica, oldPlan, Target{}); h || err != nil {
		t.Fatalf("a record of another checksum hides the database (%v)", err)
	}
	other = del
	other.TXID++
	if h, err := other.Hides(context.Background(), replica, oldPlan, Target{}); h || err != nil {
		t.Fatalf("a record of another TXID hides the database (%v)", err)
	}

	// Made again: a new history above the old one.
	db, err := sql.Open("sqlite3", rs.path+"?_journal_mode=WAL")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	execSQL(t, db, "CREATE TABLE u(w)")
	rs.m.Opened("app.db-wal", true)
	execSQL(t, db, "INSERT INTO u VALUES ('new')")
	rs.m.SyncAll()
	d := rs.m.DB("app.db")
	if d == nil {
		t.Fatal("the new database is not captured")
	}
	checkpoint(t, rs.m, db, "TRUNCATE")
	// The replica finds the new database's first TXIDs taken by the old
	// history, and it starts a new one above.
	lastTXID := func() ltx.TXID {
		d.Sync()
		d.mu.Lock()
		defer d.mu.Unlock()
		if rec, ok := d.log.Last(); ok {
			return rec.TXID()
		}
		return 0
	}
	for pos := d.replicas[0].Pos(); pos <= oldPlan.TXID || pos < lastTXID(); pos = d.replicas[0].Pos() {
		if time.Now().After(deadline.Add(10 * time.Second)) {
			t.Fatalf("replica at %s, local log at %s; the old history ends at %s", pos, lastTXID(), oldPlan.TXID)
		}
		time.Sleep(retireEvery)
	}
	restoresToDatabase(t, rs, replica)
	if newPlan := mustPlan(t, replica); hides(newPlan, Target{}) {
		t.Fatalf("the database made again (TXID %s) is hidden by the deletion at %s", newPlan.TXID, del.TXID)
	}
	out2 := filepath.Join(t.TempDir(), "old-again.db")
	if _, err := Restore(context.Background(), replica, mustPlanAt(t, replica, oldPlan.TXID), out2, RestoreOptions{}); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(out2); string(got) != string(before) {
		t.Fatal("the old database is no longer restorable at its last TXID")
	}
	if err := rs.m.Close(); err != nil {
		t.Fatal(err)
	}
}

func mustPlanAt(t *testing.T, client ReplicaClient, txid ltx.TXID) Plan {
	t.Helper()
	plan, err := PlanRestore(context.Background(), client, Target{TXID: txid})
	if err != nil {
		t.Fatal(err)
	}
	return plan
}

// goneSetup is a data directory, a state directory and a file replica
// (behind failingWrites) for tests of databases that go away.
type goneSetup struct {
	t                 *testing.T
	data, state, repl string
	fw                *failingWrites
}

func newGoneSetup(t *testing.T, every time.Duration) *goneSetup {
	fastRetire(t, every)
	return &goneSetup{t, t.TempDir(), t.TempDir(), t.TempDir(), &failingWrites{}}
}

func (s *goneSetup) manager(replicas bool) *Manager {
	m := NewManager(s.data, s.state, slog.New(slog.NewTextHandler(&logBuffer{}, nil)))
	m.ShutdownTimeout = 100 * time.Millisecond
	if replicas {
		m.Replicas = func(rel string) []ReplicaSpec {
			s.fw.ReplicaClient = file.New(filepath.Join(s.repl, rel))
			return []ReplicaSpec{{Client: s.fw, Options: ReplicaOptions{SyncInterval: 10 * time.Millisecond}}}
		}
	}
	if err := m.Open(context.Background()); err != nil {
		s.t.Fatal(err)
	}
	return m
}

// sqlite runs q on app.db with SQLite, telling no manager.
func (s *goneSetup) sqlite(q string) {
	db, _ := sql.Open("sqlite3", filepath.Join(s.data, "app.db")+"?_journal_mode=WAL")
	defer db.Close()
	db.SetMaxOpenConns(1)
	if _, err := db.Exec(q); err != nil {
		s.t.Fatal(err)
	}
}

// write runs q on app.db and has m capture and ship it.
func (s *goneSetup) write(m *Manager, q string) {
	s.sqlite(q)
	m.Opened("app.db-wal", true)
	m.SyncAll()
}

// replica is app.db's file replica.
func (s *goneSetup) replica() *file.Client { return file.New(filepath.Join(s.repl, "app.db")) }

func (s *goneSetup) del(m *Manager) { deleteDB(m, s.data) }

// fastRetire checks deleted databases every period during the test.
func fastRetire(t *testing.T, period time.Duration) {
	old := retireEvery
	retireEvery = period
	t.Cleanup(func() { retireEvery = old })
}

// deleteDB removes app.db and its WAL and shared memory under data, as the
// FUSE layer would: each unlink reported to m.
func deleteDB(m *Manager, data string) {
	for _, name := range []string{"app.db-wal", "app.db-shm", "app.db"} {
		release := m.BeforeUnlink(name)
		err := os.Remove(filepath.Join(data, name))
		if release != nil {
			release(err == nil)
		}
	}
}

func (s *goneSetup) logGone() bool {
	_, err := os.Stat(filepath.Join(s.state, "dbs", "app.db", "log"))
	return os.IsNotExist(err)
}

// A database deleted, made again and deleted again before its release has
// one goroutine waiting to release it, which ends with the release. (Found
// in review: a second one waited forever, holding the database.)
func TestReleaseWaitsOnce(t *testing.T) {
	s := newGoneSetup(t, 300*time.Millisecond)
	m := s.manager(false)
	defer m.Close()
	s.write(m, "CREATE TABLE t(v)")
	s.del(m)
	s.write(m, "CREATE TABLE u(w)") // revives the same *DB
	s.del(m)
	for deadline := time.Now().Add(5 * time.Second); m.DB("app.db") != nil; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("not released")
		}
	}
	time.Sleep(5 * retireEvery)
	var b strings.Builder
	pprof.Lookup("goroutine").WriteTo(&b, 1)
	if n := strings.Count(b.String(), "retireWhenShipped.func1"); n != 0 {
		t.Errorf("%d release goroutine(s) left after the release", n)
	}
}

// A deleted database whose local state could not be opened is not
// released: its log may hold the only copy of commits. (Found in review:
// it counted as shipped and its log was removed.)
func TestReleaseKeepsUnreadableLog(t *testing.T) {
	s := newGoneSetup(t, 10*time.Millisecond)
	s.fw.down.Store(true) // nothing ever reaches the replica
	m := s.manager(true)
	s.write(m, "CREATE TABLE t(v); INSERT INTO t VALUES ('only copy')")
	m.Close()
	sums := filepath.Join(s.state, "dbs", "app.db", "sums")
	os.Remove(sums)
	os.Mkdir(sums, 0o700) // OpenSums fails: openState fails at Open
	m = s.manager(true)
	defer m.Close()
	s.del(m)
	time.Sleep(50 * retireEvery) // the absence of an event: given time to happen, it must not
	if s.logGone() {
		t.Fatal("local log with unshipped commits removed")
	}
}

// A replica that ends beyond the local log's TXID, in another history
// (here a file without a recorded checksum, as Litestream writes), does not
// hold a database deleted while lfuse was stopped: its local log is first
// shipped as a snapshot above that history, and only then released.
// (Found in review: TXIDs alone were compared, and the only copy of the
// commits went.)
func TestReleaseNeedsSameHistory(t *testing.T) {
	s := newGoneSetup(t, 10*time.Millisecond)
	s.fw.down.Store(true)
	m := s.manager(true)
	s.write(m, "CREATE TABLE t(v); INSERT INTO t VALUES ('mine')")
	m.Close()
	for _, n := range []string{"app.db", "app.db-wal", "app.db-shm"} {
		os.Remove(filepath.Join(s.data, n)) // deleted while lfuse is down
	}
	lvl := filepath.Join(s.repl, "app.db", "ltx", "9")
	os.MkdirAll(lvl, 0o700)
	os.WriteFile(filepath.Join(lvl, ltx.FormatFilename(1, 100)), []byte("other history"), 0o600)
	s.fw.down.Store(false)
	m = s.manager(true)
	defer m.Close()
	for deadline := time.Now().Add(10 * time.Second); m.DB("app.db") != nil; time.Sleep(retireEvery) {
		if time.Now().After(deadline) {
			t.Fatal("not released")
		}
	}
	replica := s.replica()
	plan := mustPlan(t, replica)
	if plan.TXID <= 100 {
		t.Fatalf("newest restorable TXID %s: the local history was not shipped above the other one", plan.TXID)
	}
	out := filepath.Join(t.TempDir(), "restored.db")
	if _, err := Restore(context.Background(), replica, plan, out, RestoreOptions{}); err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("sqlite3", out)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var v string
	if err := db.QueryRow("SELECT v FROM t").Scan(&v); err != nil || v != "mine" {
		t.Fatalf("restored %q, %v; want the deleted database's row", v, err)
	}
}

// A database made again at a released path starts its local log at TXID 1,
// under the old history its replica holds, and takes a new snapshot above
// it once the replica has listed. Deleted before that, it gets that
// snapshot from its local log: its commits reach the replica, it is
// released, and Close succeeds. (Found by an adversarial run: its commits
// reached no replica, it was never released, and every stop failed.)
func TestRecreatedThenDeletedBeforeListing(t *testing.T) {
	fastRetire(t, 10*time.Millisecond)
	var client *unreachableList
	rs := newWrappedReplicaSetup(t, ReplicaOptions{SyncInterval: 10 * time.Millisecond},
		func(c ReplicaClient) ReplicaClient { client = &unreachableList{ReplicaClient: c}; return client })
	del := func() { deleteDB(rs.m, filepath.Dir(rs.path)) }
	waitReleased := func() {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); rs.m.DB("app.db") != nil; time.Sleep(retireEvery) {
			if time.Now().After(deadline) {
				t.Fatal("deleted database not released")
			}
		}
	}
	execSQL(t, rs.db, "CREATE TABLE t(v)")
	rs.m.Opened("app.db-wal", true)
	for i := 0; i < 12; i++ {
		execSQL(t, rs.db, "INSERT INTO t VALUES ('first')")
		rs.m.SyncAll()
	}
	rs.db.Close()
	del()
	waitReleased()

	client.down.Store(true) // the new database's replica cannot list yet
	db, err := sql.Open("sqlite3", rs.path+"?_journal_mode=WAL")
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(1)
	execSQL(t, db, "CREATE TABLE u(w)")
	rs.m.Opened("app.db-wal", true)
	execSQL(t, db, "INSERT INTO u VALUES ('second')")
	rs.m.SyncAll()
	checkpoint(t, rs.m, db, "TRUNCATE")
	db.Close()
	want, err := os.ReadFile(rs.path)
	if err != nil {
		t.Fatal(err)
	}
	del()
	client.down.Store(false)
	waitReleased()

	replica := file.New(filepath.Join(rs.repl, "app.db"))
	out := filepath.Join(t.TempDir(), "restored.db")
	if _, err := Restore(context.Background(), replica, mustPlan(t, replica), out, RestoreOptions{}); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(out); string(got) != string(want) {
		t.Fatal("the replica does not restore the second database as it was deleted")
	}
	rs.m.ShutdownTimeout = time.Second
	if err := rs.m.Close(); err != nil {
		t.Fatal(err)
	}
}

// execSQL runs q on db or fails the test.
func execSQL(t *testing.T, db *sql.DB, q string) {
	t.Helper()
	if _, err := db.Exec(q); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
}

// A database deleted just before a stop, too recently to be released, is
// recorded as deleted by the stop's flush: the restore-if-missing of the
// next start would bring it back otherwise. One deleted while its replica
// cannot be written is not, and its state stays to try again.
func TestDeletedJustBeforeStopIsMarked(t *testing.T) {
	s := newGoneSetup(t, time.Hour)
	m := s.manager(true)
	s.write(m, "CREATE TABLE t(v); INSERT INTO t VALUES ('gone')")
	s.del(m)
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	replica := s.replica()
	del, ok, err := ReadDeletion(context.Background(), replica)
	if err != nil || !ok {
		t.Fatalf("no deletion recorded at the stop: %v", err)
	}
	if plan := mustPlan(t, replica); !hidesLatest(t, del, replica, plan) {
		t.Fatalf("the deletion (TXID %s) does not hide the latest state (TXID %s)", del.TXID, plan.TXID)
	}

	s2 := newGoneSetup(t, time.Hour)
	m = s2.manager(true)
	s2.write(m, "CREATE TABLE t(v)")
	s2.fw.down.Store(true)
	s2.del(m)
	m.Close()
	if _, ok, _ := ReadDeletion(context.Background(), file.New(filepath.Join(s2.repl, "app.db"))); ok {
		t.Fatal("deletion recorded in a replica that could not be written")
	}
	if s2.logGone() {
		t.Fatal("state of a deleted database released at a stop")
	}
}

func hidesLatest(t *testing.T, del Deletion, client ReplicaClient, plan Plan) bool {
	t.Helper()
	h, err := del.Hides(context.Background(), client, plan, Target{})
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// Only a deletion lfuse saw, through the running mount, is recorded. One
// found at start happened while lfuse was stopped, and may be a data
// volume not mounted yet: recorded, it would be purged from the replicas
// after the retention. A deletion seen, whose record could not be written
// before the stop, is recorded at the next start, and the state directory
// tells a restore before the mount not to bring it back meanwhile.
func TestOnlySeenDeletionsRecorded(t *testing.T) {
	s := newGoneSetup(t, 10*time.Millisecond)
	m := s.manager(true)
	s.write(m, "CREATE TABLE t(v); INSERT INTO t VALUES (1)")
	m.Close()
	for _, suffix := range []string{"", "-wal", "-shm"} {
		os.Remove(filepath.Join(s.data, "app.db"+suffix))
	}
	m = s.manager(true)
	waitReleased(t, m)
	m.Close()
	replica := s.replica()
	if _, ok, err := ReadDeletion(context.Background(), replica); ok || err != nil {
		t.Fatalf("a deletion made while lfuse was stopped was recorded (%v)", err)
	}
	if _, err := os.Stat(filepath.Join(s.state, deletedDir)); !os.IsNotExist(err) {
		t.Fatalf("a purge was noted for a deletion lfuse did not see: %v", err)
	}

	s2 := newGoneSetup(t, 10*time.Millisecond)
	m = s2.manager(true)
	s2.write(m, "CREATE TABLE t(v); INSERT INTO t VALUES (1)")
	s2.fw.down.Store(true)
	s2.del(m)
	m.Close()
	if !DeletedThroughMount(s2.state, "app.db") {
		t.Fatal("the state directory does not say the mount saw the deletion")
	}
	s2.fw.down.Store(false)
	m = s2.manager(true)
	waitReleased(t, m)
	m.Close()
	if _, ok, err := ReadDeletion(context.Background(), file.New(filepath.Join(s2.repl, "app.db"))); !ok || err != nil {
		t.Fatalf("a deletion seen before the stop was not recorded at the next start (%v)", err)
	}
	if DeletedThroughMount(s2.state, "app.db") {
		t.Fatal("the deletion note outlived the release")
	}
}

// A database copied to a deleted database's path and not opened yet is
// not a deletion: nothing is recorded, and it is taken up as the database.
func TestCopiedInAfterDeleteNotRecorded(t *testing.T) {
	s := newGoneSetup(t, 10*time.Millisecond)
	m := s.manager(true)
	s.write(m, "CREATE TABLE t(v); INSERT INTO t VALUES ('old')")
	backup := filepath.Join(t.TempDir(), "backup.db")
	db, err := sql.Open("sqlite3", backup+"?_journal_mode=WAL")
	if err != nil {
		t.Fatal(err)
	}
	execSQL(t, db, "CREATE TABLE t(v); INSERT INTO t VALUES ('backup')")
	db.Close()
	s.del(m)
	b, err := os.ReadFile(backup)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(s.data, "app.db"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	time.Sleep(30 * retireEvery) // the absence of an event: given time to happen, it must not
	if m.DB("app.db") == nil {
		t.Fatal("released with a database at its path")
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	replica := s.replica()
	if _, ok, _ := ReadDeletion(context.Background(), replica); ok {
		t.Fatal("deletion recorded with a database at the path")
	}
	// Taken up as the database, unopened: the replica has it.
	restoresToDatabase(t, &replicaSetup{path: filepath.Join(s.data, "app.db")}, replica)
}

// A deleted database restored as it was (restore -include-deleted, with
// its restored position noted) continues the deleted history exactly and
// uploads nothing: its replica removes the deletion record at start, which
// would hide the live database from every restore of all databases.
func TestRestoredDeletedDatabaseDropsRecord(t *testing.T) {
	s := newGoneSetup(t, 10*time.Millisecond)
	m := s.manager(true)
	s.write(m, "CREATE TABLE t(v); INSERT INTO t VALUES (1)")
	s.del(m)
	waitReleased(t, m)
	m.Close()
	replica := s.replica()
	if _, ok, err := ReadDeletion(context.Background(), replica); !ok || err != nil {
		t.Fatalf("no deletion recorded: %v", err)
	}
	plan := mustPlan(t, replica)
	if _, err := Restore(context.Background(), replica, plan, filepath.Join(s.data, "app.db"), RestoreOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := NoteRestored(s.state, "app.db", plan.TXID); err != nil {
		t.Fatal(err)
	}
	m = s.manager(true)
	waitUntil(t, "the deletion record to leave the replica of a live database", func() bool {
		_, ok, err := ReadDeletion(context.Background(), replica)
		return !ok && err == nil
	})
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if after := mustPlan(t, replica); after.TXID != plan.TXID {
		t.Fatalf("replica at TXID %s after the start, %s before: the restored database was uploaded again", after.TXID, plan.TXID)
	}
}

// A stop does not wait past its timeout to record a database deleted just
// before it, when the replica's requests ignore their context: the stop
// used to hang for as long as the replica did.
func TestStopNotHeldByStuckDeletionRecord(t *testing.T) {
	s := newGoneSetup(t, time.Hour)
	m := s.manager(true)
	s.write(m, "CREATE TABLE t(v); INSERT INTO t VALUES (1)")
	stall := make(chan struct{})
	s.fw.markerStall = stall
	s.del(m)
	done := make(chan struct{})
	go func() { m.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the stop waits for a stuck replica to take a deletion record")
	}
	if !DeletedThroughMount(s.state, "app.db") {
		t.Fatal("the deletion is not kept for the next start")
	}
	// The abandoned request ends once the replica answers: it records the
	// deletion and notes its purge, which the test's cleanup must follow.
	close(stall)
	waitUntil(t, "the abandoned record to be written once the replica answers", func() bool {
		_, err := os.Stat(m.purgeNotePath("app.db"))
		return err == nil
	})
}

// A stale deletion record that cannot be removed (a store that allows no
// deletes) costs a warning, not replication: the listing it is found in
// used to fail, and with it every sync.
func TestUndeletableRecordDoesNotStopReplication(t *testing.T) {
	s := newGoneSetup(t, 10*time.Millisecond)
	s.fw.noMarkerDeletes = true
	m := s.manager(true)
	s.write(m, "CREATE TABLE t(v); INSERT INTO t VALUES (1)")
	m.Close()
	replica := s.replica()
	plan := mustPlan(t, replica)
	last := plan.Files[len(plan.Files)-1]
	meta, err := replica.FileMeta(context.Background(), last.Level, last.MinTXID, last.MaxTXID)
	if err != nil {
		t.Fatal(err)
	}
	// A record of exactly the state the database is at: the replica tries
	// to remove it at its first pass.
	if err := writeDeletion(context.Background(), replica, Deletion{TXID: plan.TXID, PostApplyChecksum: meta.PostApplyChecksum, At: time.Now()}); err != nil {
		t.Fatal(err)
	}
	m = s.manager(true)
	r := m.DB("app.db").Replicas()[0]
	waitUntil(t, "the replica to check for a stale record", func() bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.staleChecked
	})
	if _, ok, _ := ReadDeletion(context.Background(), replica); !ok {
		t.Fatal("the record was removed through a store that allows no deletes")
	}
	s.write(m, "INSERT INTO t VALUES (2)")
	if err := m.Close(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	restoresToDatabase(t, &replicaSetup{path: filepath.Join(s.data, "app.db")}, replica)
}

// A database made at a released database's path, and deleted before it
// captured anything, leaves the released one's deletion record alone: its
// replica used to remove it at its first listing, and with the second
// database recording nothing, restore -data brought the first back.
func TestNewDatabaseKeepsOldDeletionRecord(t *testing.T) {
	s := newGoneSetup(t, 10*time.Millisecond)
	m := s.manager(true)
	defer m.Close()
	s.write(m, "CREATE TABLE t(v); INSERT INTO t VALUES ('X')")
	s.del(m)
	waitReleased(t, m)
	replica := s.replica()
	if _, ok, _ := ReadDeletion(context.Background(), replica); !ok {
		t.Fatal("not recorded")
	}
	snapshotFault = func() error { return errors.New("injected: snapshot fails") }
	defer func() { snapshotFault = nil }()
	s.sqlite("CREATE TABLE u(v)")
	m.Opened("app.db-wal", true)
	d := m.DB("app.db")
	if d == nil {
		t.Fatal("the new database is not captured")
	}
	r := d.Replicas()[0]
	waitUntil(t, "the new database's replica to list", func() bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.listed
	})
	s.del(m)
	waitReleased(t, m)
	if _, ok, err := ReadDeletion(context.Background(), replica); !ok || err != nil {
		t.Fatalf("the first database's deletion record is gone (%v): restore -data would bring it back", err)
	}
}

// A database taken up at start from a state directory whose log is empty
// loses the note that it was deleted: it is here.
func TestLiveDatabaseLosesGoneNote(t *testing.T) {
	s := newGoneSetup(t, time.Hour)
	m := s.manager(false)
	d := m.newDB("app.db")
	d.mu.Lock()
	if err := d.openState(); err != nil {
		t.Fatal(err)
	}
	d.closeLocked()
	d.mu.Unlock()
	m.Close()
	b, _ := time.Now().UTC().MarshalText()
	if err := os.WriteFile(filepath.Join(s.state, "dbs", "app.db", goneName), b, 0o600); err != nil {
		t.Fatal(err)
	}
	s.sqlite("CREATE TABLE t(v); INSERT INTO t VALUES (1)")
	m = s.manager(true)
	defer m.Close()
	if DeletedThroughMount(s.state, "app.db") {
		t.Fatal("a live database's state directory says the mount saw it deleted: restore -data leaves it out")
	}
}

// A database deleted before its state directory exists logs no warning
// about a note it has no reason to write.
func TestDeletedBeforeStateNoWarning(t *testing.T) {
	s := newGoneSetup(t, 10*time.Millisecond)
	buf := &logBuffer{}
	m := NewManager(s.data, s.state, slog.New(slog.NewTextHandler(buf, nil)))
	if err := m.Open(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	s.sqlite("CREATE TABLE t(v); INSERT INTO t VALUES (1)")
	m.Opened("app.db-wal", true)
	deleteDB(m, s.data)
	waitReleased(t, m)
	if strings.Contains(buf.String(), "cannot note the deletion") {
		t.Fatalf("spurious warning:\n%s", buf.String())
	}
}

// waitUntil polls cond until it holds, failing the test after 10 s.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}
