package replicate

import (
	"context"
	"database/sql"
	"io"
	"log/slog"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends"
	"github.com/lfuse/lfuse/backends/file"
	"github.com/superfly/ltx"
)

// stallOnce holds the first level-0 upload after it is armed until its
// context ends (a connection that stalls without breaking).
type stallOnce struct {
	ReplicaClient
	armed   atomic.Bool
	started chan struct{}
}

func (c *stallOnce) WriteLTXFile(ctx context.Context, level int, min, max ltx.TXID, r io.Reader, size int64, meta backends.FileMeta) error {
	if level == 0 && c.armed.CompareAndSwap(true, false) {
		close(c.started)
		<-ctx.Done()
		return ctx.Err()
	}
	return c.ReplicaClient.WriteLTXFile(ctx, level, min, max, r, size, meta)
}

// A stop while a deleted database waits for its release and a sync of its
// replica is stalled: the release's wait must end at the stop, not hold
// CloseContext for its whole shutdown timeout (the sync it waits behind is
// only cancelled by the replica's Stop, which comes after that wait).
func TestCloseNotHeldByWaitingRelease(t *testing.T) {
	fastRetire(t, 10*time.Millisecond)
	data, state, repl := t.TempDir(), t.TempDir(), t.TempDir()
	m := NewManager(data, state, slog.New(slog.NewTextHandler(io.Discard, nil)))
	m.ShutdownTimeout = 3 * time.Second
	client := &stallOnce{started: make(chan struct{})}
	m.Replicas = func(rel string) []ReplicaSpec {
		client.ReplicaClient = file.New(filepath.Join(repl, rel))
		return []ReplicaSpec{{Client: client, Options: ReplicaOptions{SyncInterval: 10 * time.Millisecond}}}
	}
	if err := m.Open(context.Background()); err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("sqlite3", filepath.Join(data, "app.db")+"?_journal_mode=WAL")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	if _, err := db.Exec("CREATE TABLE t(v)"); err != nil {
		t.Fatal(err)
	}
	m.Opened("app.db-wal", true)
	m.SyncAll()
	d := m.DB("app.db")
	r := d.Replicas()[0]
	last := func() ltx.TXID { d.mu.Lock(); defer d.mu.Unlock(); l, _ := d.log.Last(); return l.TXID() }
	for deadline := time.Now().Add(10 * time.Second); r.Pos() != last(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("first snapshot not shipped")
		}
	}
	client.armed.Store(true)
	if _, err := db.Exec("INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	m.SyncAll()
	select {
	case <-client.started: // a sync now holds r.mu in a stalled upload
	case <-time.After(10 * time.Second):
		t.Fatal("upload not started")
	}
	deleteDB(m, data)                 // its release now waits for the replica, behind r.mu
	time.Sleep(50 * time.Millisecond) // a few release ticks
	start := time.Now()
	if err := m.Close(); err != nil {
		t.Logf("Close: %v", err)
	}
	if took := time.Since(start); took > m.ShutdownTimeout/2 {
		t.Fatalf("Close took %s with a shutdown timeout of %s: it waited for a release blocked behind a stalled sync", took.Round(time.Millisecond), m.ShutdownTimeout)
	}
}
