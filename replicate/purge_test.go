package replicate

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends"
	"github.com/lfuse/lfuse/backends/file"
)

// replicaFiles counts a replica's LTX files over every level.
func replicaFiles(t *testing.T, c ReplicaClient) int {
	t.Helper()
	n := 0
	for level := 0; level <= SnapshotLevel; level++ {
		files, err := c.LTXFiles(context.Background(), level)
		if err != nil {
			t.Fatal(err)
		}
		n += len(files)
	}
	return n
}

func waitReleased(t *testing.T, m *Manager) {
	t.Helper()
	waitUntil(t, "the deleted database's release", func() bool { return m.DB("app.db") == nil })
}

// A released database's files leave its replica once its deletion is older
// than the retention, and not before; its record goes last, and so does
// the note that kept the purge pending across restarts.
func TestDeletedDatabasePurgedAfterRetention(t *testing.T) {
	s := newGoneSetup(t, 10*time.Millisecond)
	m := s.manager(true)
	s.write(m, "CREATE TABLE t(v); INSERT INTO t VALUES (randomblob(5000))")
	s.write(m, "INSERT INTO t VALUES (1)")
	s.del(m)
	waitReleased(t, m)
	replica := s.replica()
	if replicaFiles(t, replica) == 0 {
		t.Fatal("no files in the replica")
	}
	note := m.purgeNotePath("app.db")
	if _, err := os.Stat(note); err != nil {
		t.Fatalf("no purge noted: %v", err)
	}
	m.purgeDue(context.Background(), time.Now().Add(DefaultRetention-time.Minute))
	if replicaFiles(t, replica) == 0 {
		t.Fatal("purged within the retention")
	}
	m.Close()

	m = s.manager(true) // the note outlives a restart
	defer m.Close()
	m.purgeDue(context.Background(), time.Now().Add(DefaultRetention+time.Minute))
	if n := replicaFiles(t, replica); n != 0 {
		t.Fatalf("%d files left after the retention passed", n)
	}
	if _, ok, err := ReadDeletion(context.Background(), replica); ok || err != nil {
		t.Fatalf("deletion record left (%v)", err)
	}
	if left, _ := os.ReadDir(filepath.Join(s.repl, "app.db")); len(left) > 1 || len(left) == 1 && left[0].Name() != "ltx" {
		t.Fatalf("left in the replica: %v", left)
	}
	if _, err := os.Stat(note); !os.IsNotExist(err) {
		t.Fatalf("purge note left: %v", err)
	}
}

// A replica that goes beyond the deleted history (a database made at the
// path since, by another lfuse or while this one was stopped) keeps every
// file; so does a database captured again at the path, whose history the
// files are now.
func TestPurgeKeepsNewerHistory(t *testing.T) {
	s := newGoneSetup(t, 10*time.Millisecond)
	m := s.manager(true)
	defer m.Close()
	s.write(m, "CREATE TABLE t(v)")
	s.del(m)
	waitReleased(t, m)
	replica := s.replica()
	del, ok, err := ReadDeletion(context.Background(), replica)
	if !ok || err != nil {
		t.Fatalf("no deletion record: %v", err)
	}
	// Another writer's file above the deleted history.
	b := encodeTest(t, del.TXID+1, del.TXID+1, 1, map[uint32]byte{1: 7})
	if err := replica.WriteLTXFile(context.Background(), 0, del.TXID+1, del.TXID+1, bytes.NewReader(b), int64(len(b)), backends.FileMeta{Timestamp: time.Now()}); err != nil {
		t.Fatal(err)
	}
	before := replicaFiles(t, replica)
	m.purgeDue(context.Background(), time.Now().Add(2*DefaultRetention))
	if n := replicaFiles(t, replica); n != before {
		t.Fatalf("%d files of %d left: a newer history was purged", n, before)
	}
	if _, err := os.Stat(m.purgeNotePath("app.db")); !os.IsNotExist(err) {
		t.Fatalf("purge note kept for a replica that is not to be purged: %v", err)
	}

	// Captured again at the path: the note goes, the files stay.
	s2 := newGoneSetup(t, 10*time.Millisecond)
	m2 := s2.manager(true)
	defer m2.Close()
	s2.write(m2, "CREATE TABLE t(v)")
	s2.del(m2)
	waitReleased(t, m2)
	s2.write(m2, "CREATE TABLE u(w)")
	replica2 := file.New(filepath.Join(s2.repl, "app.db"))
	before = replicaFiles(t, replica2)
	m2.purgeDue(context.Background(), time.Now().Add(2*DefaultRetention))
	if n := replicaFiles(t, replica2); n < before {
		t.Fatalf("%d files of %d left: the files of a database captured again were purged", n, before)
	}
	if _, err := os.Stat(m2.purgeNotePath("app.db")); !os.IsNotExist(err) {
		t.Fatalf("purge note kept for a database captured again: %v", err)
	}
}
