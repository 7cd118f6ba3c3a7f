package replicate

import (
	"bytes"
	"context"
	"crypto/sha256"
	"database/sql"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends"
	"github.com/lfuse/lfuse/backends/file"
	"github.com/superfly/ltx"
)

func fileHash(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// A database captured through the Manager is shipped to a file replica;
// restoring at every TXID the replica offers gives exactly the database as
// it was then, through L0 files, compactions and a second snapshot.
func TestReplicaRestoreEveryPoint(t *testing.T) {
	rs := newReplicaSetup(t, ReplicaOptions{
		SyncInterval:     time.Hour, // this test drives every pass itself
		SnapshotInterval: time.Hour,
		CompactIntervals: []time.Duration{time.Hour, time.Hour},
	})
	m, db, path, repl := rs.m, rs.db, rs.path, rs.repl
	exec := func(q string, args ...any) {
		t.Helper()
		if _, err := db.Exec(q, args...); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	exec("PRAGMA wal_autocheckpoint=0")
	exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
	m.Opened("app.db-wal", true)
	m.SyncAll()
	r := m.DB("app.db").Replicas()[0]
	ctx := context.Background()

	// The state after each sync, by the TXID the replica then held.
	states := map[ltx.TXID][32]byte{}
	snapshotDB := func() [32]byte {
		// The database as a reader sees it: checkpoint a copy.
		dir := t.TempDir()
		for _, s := range []string{"", "-wal"} {
			if b, err := os.ReadFile(path + s); err == nil {
				os.WriteFile(filepath.Join(dir, "x.db"+s), b, 0o600)
			}
		}
		c, err := sql.Open("sqlite3", filepath.Join(dir, "x.db"))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Exec("PRAGMA wal_checkpoint(TRUNCATE)"); err != nil {
			t.Fatal(err)
		}
		c.Close()
		return fileHash(t, filepath.Join(dir, "x.db"))
	}
	step := func() {
		m.SyncAll()
		if err := r.Flush(ctx); err != nil {
			t.Fatal(err)
		}
		states[r.Pos()] = snapshotDB()
	}
	step()
	for i := 0; i < 60; i++ {
		for j := 0; j <= i%3; j++ {
			exec("INSERT INTO t(v) VALUES(randomblob(?))", 50+i*97%3000)
		}
		if i%7 == 0 {
			exec("DELETE FROM t WHERE id % 5 = ?", i%5) // shrink and reuse pages
		}
		if i%10 == 9 {
			checkpoint(t, m, db, "TRUNCATE")
		}
		step()
		var err error
		switch i {
		case 20, 40, 59:
			err = r.compact(ctx, 1)
		case 30:
			err = r.compact(ctx, 2)
		case 45:
			r.opts.SnapshotInterval = time.Nanosecond
			err = r.snapshot(ctx, time.Now())
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	client := r.Client()
	for _, level := range []int{0, 1, 2, SnapshotLevel} {
		files, err := client.LTXFiles(ctx, level)
		if err != nil || len(files) == 0 {
			t.Fatalf("level %d: %d files, %v", level, len(files), err)
		}
	}
	if n := len(mustList(t, client, SnapshotLevel)); n != 2 {
		t.Fatalf("%d snapshots, want 2", n)
	}

	out := filepath.Join(t.TempDir(), "restored.db")
	latest, err := PlanRestore(ctx, client, Target{})
	if err != nil {
		t.Fatal(err)
	}
	if len(latest.Files) != 2 {
		t.Errorf("latest restore reads %d files after a snapshot and compactions", len(latest.Files))
	}
	for txid, want := range states {
		plan, err := PlanRestore(ctx, client, Target{TXID: txid})
		if err != nil {
			t.Fatalf("plan TXID %s: %v", txid, err)
		}
		os.Remove(out)
		if _, err := Restore(ctx, client, plan, out, RestoreOptions{Parallelism: 1}); err != nil {
			t.Fatalf("restore TXID %s: %v", txid, err)
		}
		if got := fileHash(t, out); got != want {
			t.Fatalf("restore at TXID %s (%d files) differs from the database then", txid, len(plan.Files))
		}
	}

	// A flipped byte in a file the plan needs is refused, naming the file.
	lastFile := latest.Files[len(latest.Files)-1]
	name := ltx.FormatFilename(lastFile.MinTXID, lastFile.MaxTXID)
	victim := filepath.Join(repl, "app.db", "ltx", strconv.Itoa(lastFile.Level), name)
	b, _ := os.ReadFile(victim)
	b[len(b)/2] ^= 0xff
	os.WriteFile(victim, b, 0o600)
	os.Remove(out)
	_, err = Restore(ctx, client, latest, out, RestoreOptions{})
	if err == nil || !strings.Contains(err.Error(), name) {
		t.Fatalf("restore through a corrupt file: %v", err)
	}
	if _, err := os.Stat(out); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a failed restore left %s behind", out)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
}

// replicaSetup is a Manager that ships the databases of data to file
// replicas under repl, and a connection to data/app.db (WAL mode).
type replicaSetup struct {
	m                 *Manager
	db                *sql.DB
	path, state, repl string
	logs              *logBuffer
}

func newReplicaSetup(t *testing.T, opts ReplicaOptions) *replicaSetup {
	t.Helper()
	return newWrappedReplicaSetup(t, opts, func(c ReplicaClient) ReplicaClient { return c })
}

// newWrappedReplicaSetup is newReplicaSetup with the file replica's client
// passed through wrap.
func newWrappedReplicaSetup(t *testing.T, opts ReplicaOptions, wrap func(ReplicaClient) ReplicaClient) *replicaSetup {
	t.Helper()
	return newReplicaSetupIn(t, t.TempDir(), opts, wrap)
}

// newReplicaSetupIn is newWrappedReplicaSetup with its replicas under repl,
// which another setup may share.
func newReplicaSetupIn(t *testing.T, repl string, opts ReplicaOptions, wrap func(ReplicaClient) ReplicaClient) *replicaSetup {
	t.Helper()
	data := t.TempDir()
	rs := &replicaSetup{path: filepath.Join(data, "app.db"), state: filepath.Join(t.TempDir(), "state"), repl: repl, logs: &logBuffer{}}
	rs.m = NewManager(data, rs.state, slog.New(slog.NewTextHandler(rs.logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	rs.m.Replicas = func(rel string) []ReplicaSpec {
		return []ReplicaSpec{{Client: wrap(file.New(filepath.Join(rs.repl, rel))), Options: opts}}
	}
	if err := rs.m.Open(context.Background()); err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("sqlite3", rs.path+"?_journal_mode=WAL&_busy_timeout=5000")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	db.SetMaxOpenConns(1)
	rs.db = db
	return rs
}

// logSegments counts the segment files of app.db's local log under state.
func logSegments(state string) int {
	ents, _ := os.ReadDir(LogDir(state, "app.db"))
	n := 0
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".seg") {
			n++
		}
	}
	return n
}

func mustList(t *testing.T, c ReplicaClient, level int) []ltx.FileInfo {
	t.Helper()
	files, err := c.LTXFiles(context.Background(), level)
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// The local log folds old segments into its snapshot once every replica has
// shipped them, and never past what a replica still needs.
func TestLocalLogFolds(t *testing.T) {
	defer func(n int64) { maxSegment = n }(maxSegment)
	maxSegment = 32 << 10
	rs := newReplicaSetup(t, ReplicaOptions{SyncInterval: time.Hour})
	m, db, path, state := rs.m, rs.db, rs.path, rs.state
	db.Exec("CREATE TABLE t(v BLOB)")
	m.Opened("app.db-wal", true)
	m.SyncAll()
	d := m.DB("app.db")
	r := d.Replicas()[0]
	for i := 0; i < 300; i++ {
		if _, err := db.Exec("INSERT INTO t VALUES(randomblob(3000))"); err != nil {
			t.Fatal(err)
		}
		m.SyncAll()
	}
	segments := func() int { return logSegments(state) }
	before := segments()
	if before < 5 {
		t.Fatalf("only %d segments", before)
	}
	// The replica has shipped nothing yet: nothing may be folded.
	if err := d.compactLog(); err != nil {
		t.Fatal(err)
	}
	if segments() != before {
		t.Fatalf("the log folded records a replica still needs")
	}
	if err := r.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := d.compactLog(); err != nil {
		t.Fatal(err)
	}
	if n := segments(); n != 1 {
		t.Fatalf("%d segments after folding, want 1 (the one being appended to)", n)
	}
	// More commits after the fold still ship and restore exactly.
	for i := 0; i < 20; i++ {
		db.Exec("INSERT INTO t VALUES(randomblob(100))")
	}
	checkpoint(t, m, db, "TRUNCATE")
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile(path)
	if got := replayed(t, state, "app.db"); !bytes.Equal(got, want) {
		t.Fatal("the folded log no longer rebuilds the database")
	}
	plan, err := PlanRestore(context.Background(), r.Client(), Target{})
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "r.db")
	if _, err := Restore(context.Background(), r.Client(), plan, out, RestoreOptions{}); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(out); !bytes.Equal(got, want) {
		t.Fatal("restore after folding differs")
	}
}

// What a replica found in the local log stays readable while a fold
// replaces those files with a new snapshot: a torture trial saw a replica's
// periodic snapshot fail with "no such file" when the fold, running in the
// background, removed the segment it was reading.
func TestRefsOutliveFold(t *testing.T) {
	defer func(n int64) { maxSegment = n }(maxSegment)
	maxSegment = 32 << 10
	rs := newReplicaSetup(t, ReplicaOptions{SyncInterval: time.Hour})
	defer rs.m.Close()
	rs.db.Exec("CREATE TABLE t(v BLOB)")
	rs.m.Opened("app.db-wal", true)
	rs.m.SyncAll()
	for i := 0; i < 300; i++ {
		if _, err := rs.db.Exec("INSERT INTO t VALUES(randomblob(3000))"); err != nil {
			t.Fatal(err)
		}
		rs.m.SyncAll()
	}
	d := rs.m.DB("app.db")
	r := d.Replicas()[0]
	if err := r.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	reader := NewLogReader(LogDir(rs.state, "app.db"))
	snap, err := reader.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	refs, err := reader.Refs(snap.TXID(), r.Pos())
	if err != nil {
		t.Fatal(err)
	}
	defer releaseRefs(append(refs, snap)...)
	if err := d.compactLog(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(refs[0].Path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the fold kept %s (%v): this test needs it gone", refs[0].Path, err)
	}
	srcs := []source{refSource(snap)}
	for _, ref := range refs {
		srcs = append(srcs, refSource(ref))
	}
	hdr, err := mergeSources(context.Background(), io.Discard, srcs, t.TempDir(), false)
	if err != nil {
		t.Fatalf("reading what the log held before the fold: %v", err)
	}
	if hdr.MaxTXID != r.Pos() {
		t.Fatalf("merged up to %s, want %s", hdr.MaxTXID, r.Pos())
	}
}

// foldHeld writes to rs's table t (created here) in small log segments
// until a fold of the local log begins, and holds that fold in the middle
// until release is closed.
func foldHeld(t *testing.T, rs *replicaSetup) (release chan struct{}) {
	t.Helper()
	oldSegment := maxSegment
	maxSegment = 32 << 10
	started, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	foldHook = func() {
		once.Do(func() { close(started) })
		<-release
	}
	t.Cleanup(func() {
		select {
		case <-release:
		default:
			close(release) // a test that failed before it let the fold go
		}
		foldHook, maxSegment = nil, oldSegment
	})
	rs.db.Exec("CREATE TABLE t(v BLOB)")
	rs.m.Opened("app.db-wal", true)
	for i := 0; i < 300; i++ {
		if _, err := rs.db.Exec("INSERT INTO t VALUES(randomblob(3000))"); err != nil {
			t.Fatal(err)
		}
		rs.m.SyncAll()
		select {
		case <-started:
			return release
		default:
		}
	}
	select {
	case <-started:
	case <-time.After(time.Minute):
		t.Fatal("the log never folded")
	}
	return release
}

// Folding the local log takes seconds on a large database; a replica's
// syncs must go on meanwhile.
func TestSyncsWhileLogFolds(t *testing.T) {
	rs := newReplicaSetup(t, ReplicaOptions{SyncInterval: 10 * time.Millisecond})
	release := foldHeld(t, rs)
	defer rs.m.Close()
	defer close(release)
	// The fold is stuck in the middle; commits must still ship.
	for i := 0; i < 5; i++ {
		if _, err := rs.db.Exec("INSERT INTO t VALUES(randomblob(3000))"); err != nil {
			t.Fatal(err)
		}
		rs.m.SyncAll()
	}
	d := rs.m.DB("app.db")
	want := d.Stats().TXID
	r := d.Replicas()[0]
	deadline := time.Now().Add(10 * time.Second)
	for r.Pos() < want {
		if time.Now().After(deadline) {
			t.Fatalf("the replica stayed at TXID %s while the log folded; the database is at %s", r.Pos(), want)
		}
		time.Sleep(5 * time.Millisecond) // the replica's own ticker drives it; nothing to wait on
	}
}

// A stop does not wait for a fold of the local log under way (seconds on a
// large database, past a short shutdown timeout): the fold is dropped, and
// the log it would have replaced is whole.
func TestStopDropsFold(t *testing.T) {
	rs := newReplicaSetup(t, ReplicaOptions{SyncInterval: 10 * time.Millisecond})
	release := foldHeld(t, rs)
	closed := make(chan error, 1)
	go func() { closed <- rs.m.Close() }()
	<-rs.m.closing
	close(release) // the fold goes on only now that the stop has begun
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Close did not return")
	}
	if strings.Contains(rs.logs.String(), "folded the local log") {
		t.Fatal("the fold ran to its end after the stop began")
	}
	if tmps, _ := filepath.Glob(filepath.Join(rs.state, "dbs", "*", "fold-*")); len(tmps) > 0 {
		t.Fatalf("the dropped fold left %v", tmps)
	}
	// The next start continues the log it left.
	m2, logs := newTestManager(t, filepath.Dir(rs.path), rs.state)
	m2.Opened("app.db-wal", false)
	m2.SyncAll()
	if err := m2.Close(); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(logs.String(), "needs a new snapshot") || strings.Contains(logs.String(), "starting from a snapshot") {
		t.Fatalf("the log was not whole after the dropped fold:\n%s", logs)
	}
}

// Compaction intervals run on across restarts: an lfuse restarted more
// often than a level's interval still compacts that level.
func TestCompactionIntervalsSurviveRestart(t *testing.T) {
	opts := ReplicaOptions{SyncInterval: time.Hour, CompactIntervals: []time.Duration{time.Hour}}
	rs := newReplicaSetup(t, opts)
	rs.db.Exec("CREATE TABLE t(v BLOB)")
	rs.m.Opened("app.db-wal", true)
	for range 3 {
		if _, err := rs.db.Exec("INSERT INTO t VALUES(randomblob(300))"); err != nil {
			t.Fatal(err)
		}
		rs.m.SyncAll()
		if err := rs.m.DB("app.db").Replicas()[0].Flush(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if err := rs.m.Close(); err != nil {
		t.Fatal(err)
	}
	client := file.New(filepath.Join(rs.repl, "app.db"))
	if n := len(mustList(t, client, 0)); n < 2 {
		t.Fatalf("%d level-0 files, want 2 or more", n)
	}

	restart := func() *Replica {
		t.Helper()
		m := NewManager(filepath.Dir(rs.path), rs.state, slog.New(slog.DiscardHandler))
		m.Replicas = func(rel string) []ReplicaSpec {
			return []ReplicaSpec{{Client: file.New(filepath.Join(rs.repl, rel)), Options: opts}}
		}
		if err := m.Open(context.Background()); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		m.Opened("app.db-wal", false)
		m.SyncAll()
		r := m.DB("app.db").Replicas()[0]
		if err := r.Flush(context.Background()); err != nil {
			t.Fatal(err)
		}
		return r
	}
	// Level 1 was never written: it is due at once, not an hour after start.
	r := restart()
	if err := r.maintain(context.Background(), time.Now()); err != nil {
		t.Fatal(err)
	}
	l1 := mustList(t, client, 1)
	if len(l1) != 1 {
		t.Fatalf("after a restart, %d level-1 files, want the level-0 files compacted into one", len(l1))
	}
	// Just written, it is not due again, after a restart either.
	r = restart()
	if err := r.maintain(context.Background(), time.Now()); err != nil {
		t.Fatal(err)
	}
	if n := len(mustList(t, client, 1)); n != 1 {
		t.Fatalf("level 1 compacted again right after a restart: %d files", n)
	}
}

// latestRows restores the latest state of c and counts the rows of t.
func latestRows(t *testing.T, c ReplicaClient) int {
	t.Helper()
	ctx := context.Background()
	plan, err := PlanRestore(ctx, c, Target{})
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "restored.db")
	if _, err := Restore(ctx, c, plan, out, RestoreOptions{}); err != nil {
		t.Fatal(err)
	}
	rdb, err := sql.Open("sqlite3", out)
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	var n int
	if err := rdb.QueryRow("SELECT count(*) FROM t").Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// failingL0 refuses level-0 uploads while on, and notes their ranges.
type failingL0 struct {
	ReplicaClient
	on       atomic.Bool
	mu       sync.Mutex
	attempts [][2]ltx.TXID
}

func (c *failingL0) WriteLTXFile(ctx context.Context, level int, min, max ltx.TXID, r io.Reader, size int64, meta backends.FileMeta) error {
	if level == 0 && c.on.Load() {
		c.mu.Lock()
		c.attempts = append(c.attempts, [2]ltx.TXID{min, max})
		c.mu.Unlock()
		return errors.New("injected: replica down")
	}
	return c.ReplicaClient.WriteLTXFile(ctx, level, min, max, r, size, meta)
}

// During an outage a sync's retries send the file the first try built,
// rather than merge the whole, growing backlog again each time; once the
// replica is back, the commits made since follow in a file of their own.
func TestOutageRetriesReuseTheBuiltFile(t *testing.T) {
	fail := &failingL0{}
	rs := newWrappedReplicaSetup(t, ReplicaOptions{SyncInterval: time.Hour}, func(c ReplicaClient) ReplicaClient { fail.ReplicaClient = c; return fail })
	defer rs.m.Close()
	rs.db.Exec("CREATE TABLE t(v BLOB)")
	rs.m.Opened("app.db-wal", true)
	rs.m.SyncAll()
	r := rs.m.DB("app.db").Replicas()[0]
	ctx := context.Background()
	if err := r.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	fail.on.Store(true)
	for range 5 {
		if _, err := rs.db.Exec("INSERT INTO t VALUES(randomblob(3000))"); err != nil {
			t.Fatal(err)
		}
		rs.m.SyncAll()
		r.mu.Lock()
		err := r.syncLocked(ctx)
		r.mu.Unlock()
		if err == nil {
			t.Fatal("a sync succeeded with the replica down")
		}
	}
	if len(fail.attempts) != 5 {
		t.Fatalf("%d level-0 attempts, want 5", len(fail.attempts))
	}
	for _, a := range fail.attempts[1:] {
		if a != fail.attempts[0] {
			t.Fatalf("retries built new files: %v", fail.attempts)
		}
	}
	fail.on.Store(false)
	if err := r.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if want := rs.m.DB("app.db").Stats().TXID; r.Pos() != want {
		t.Fatalf("replica at %s after the outage, database at %s", r.Pos(), want)
	}
	l0 := mustList(t, r.Client(), 0)
	if !slices.ContainsFunc(l0, func(f ltx.FileInfo) bool { return f.MinTXID == fail.attempts[0][0] && f.MaxTXID == fail.attempts[0][1] }) {
		t.Fatalf("the kept file %v is not in the replica: %v", fail.attempts[0], l0)
	}
	uploads := func() []string {
		tmps, _ := filepath.Glob(filepath.Join(rs.state, "dbs", "*", "upload-*"))
		return tmps
	}
	if tmps := uploads(); len(tmps) > 0 {
		t.Fatalf("upload files left after the outage: %v", tmps)
	}
	if n := latestRows(t, r.Client()); n != 5 {
		t.Fatalf("restored %d rows, want 5", n)
	}

	// A stop during an outage does not leave the kept file behind.
	fail.on.Store(true)
	if _, err := rs.db.Exec("INSERT INTO t VALUES(randomblob(3000))"); err != nil {
		t.Fatal(err)
	}
	rs.m.SyncAll()
	r.mu.Lock()
	r.syncLocked(ctx)
	r.mu.Unlock()
	if len(uploads()) != 1 {
		t.Fatalf("no file kept for the retry: %v", uploads())
	}
	rs.m.ShutdownTimeout = 100 * time.Millisecond
	if err := rs.m.Close(); err == nil {
		t.Fatal("a stop with the replica down reported every commit shipped")
	}
	if tmps := uploads(); len(tmps) > 0 {
		t.Fatalf("the kept file outlived the stop: %v", tmps)
	}
}

// gatedClient holds snapshot uploads, once armed, until released.
type gatedClient struct {
	ReplicaClient
	armed    atomic.Bool
	started  chan struct{} // closed when a held upload begins
	release  chan struct{}
	finished chan error // the held upload's result
}

func (c *gatedClient) WriteLTXFile(ctx context.Context, level int, min, max ltx.TXID, r io.Reader, size int64, meta backends.FileMeta) error {
	if level != SnapshotLevel || !c.armed.CompareAndSwap(true, false) {
		return c.ReplicaClient.WriteLTXFile(ctx, level, min, max, r, size, meta)
	}
	close(c.started)
	select {
	case <-c.release:
	case <-ctx.Done():
		c.finished <- ctx.Err()
		return ctx.Err()
	}
	err := c.ReplicaClient.WriteLTXFile(ctx, level, min, max, r, size, meta)
	c.finished <- err
	return err
}

// newSnapshottingSetup is a replica, its client passed through wrap, that
// syncs every 10 ms and always has a scheduled snapshot due, with table t
// created and the first snapshot shipped.
func newSnapshottingSetup(t *testing.T, wrap func(ReplicaClient) ReplicaClient) (*replicaSetup, *Replica) {
	t.Helper()
	rs := newWrappedReplicaSetup(t, ReplicaOptions{
		SyncInterval: 10 * time.Millisecond, SnapshotInterval: time.Millisecond,
		CompactIntervals: []time.Duration{time.Hour},
	}, wrap)
	rs.db.Exec("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
	rs.m.Opened("app.db-wal", true)
	rs.m.SyncAll()
	r := rs.m.DB("app.db").Replicas()[0]
	if err := r.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	return rs, r
}

// A scheduled snapshot can take minutes to upload for a large database;
// commits made meanwhile must keep reaching the replica, not wait for it.
func TestSyncsContinueDuringSnapshot(t *testing.T) {
	gate := &gatedClient{started: make(chan struct{}), release: make(chan struct{}), finished: make(chan error, 1)}
	rs, r := newSnapshottingSetup(t, func(c ReplicaClient) ReplicaClient { gate.ReplicaClient = c; return gate })
	m, db := rs.m, rs.db
	defer m.Close()
	var releaseOnce sync.Once
	defer releaseOnce.Do(func() { close(gate.release) })
	ctx := context.Background()
	gate.armed.Store(true)
	insert := func(k int) {
		t.Helper()
		if _, err := db.Exec("INSERT INTO t VALUES(?, randomblob(3000))", k); err != nil {
			t.Fatal(err)
		}
		m.SyncAll()
	}
	insert(1)
	select {
	case <-gate.started:
	case <-time.After(30 * time.Second):
		t.Fatal("no scheduled snapshot began")
	}
	for k := 2; k <= 5; k++ {
		insert(k)
		flushed := make(chan error, 1)
		go func() {
			fctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			flushed <- r.Flush(fctx)
		}()
		select {
		case err := <-flushed:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("a sync waited for the snapshot being uploaded")
		}
		if want := m.DB("app.db").Stats().TXID; r.Pos() != want {
			t.Fatalf("replica at TXID %s while the snapshot uploads, database at %s", r.Pos(), want)
		}
	}
	releaseOnce.Do(func() { close(gate.release) })
	if err := <-gate.finished; err != nil {
		t.Fatal(err)
	}
	if snaps := mustList(t, r.Client(), SnapshotLevel); len(snaps) != 2 {
		t.Fatalf("%d snapshots in the replica, want 2", len(snaps))
	}
	// The latest restore still gives every row.
	if n := latestRows(t, r.Client()); n != 5 {
		t.Fatalf("restored %d rows, want 5", n)
	}
}

// failingSnapshots fails snapshot uploads while on.
type failingSnapshots struct {
	ReplicaClient
	on atomic.Bool
}

func (c *failingSnapshots) WriteLTXFile(ctx context.Context, level int, min, max ltx.TXID, r io.Reader, size int64, meta backends.FileMeta) error {
	if level == SnapshotLevel && c.on.Load() {
		return errors.New("injected: snapshot upload refused")
	}
	return c.ReplicaClient.WriteLTXFile(ctx, level, min, max, r, size, meta)
}

// A compaction, snapshot or retention pass that keeps failing while syncs
// succeed shows in status and metrics, and clears when it succeeds again.
func TestMaintenanceFailureShows(t *testing.T) {
	fail := &failingSnapshots{}
	rs, r := newSnapshottingSetup(t, func(c ReplicaClient) ReplicaClient { fail.ReplicaClient = c; return fail })
	m, db := rs.m, rs.db
	defer m.Close()
	fail.on.Store(true)
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(20 * time.Second); !cond(); {
			if time.Now().After(deadline) {
				t.Fatalf("%s: stats %+v", what, r.Stats())
			}
			// The replica's own loops drive it; nothing to wait on.
			db.Exec("INSERT INTO t(v) VALUES(randomblob(100))")
			m.SyncAll()
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitFor("a failing snapshot is not reported", func() bool { return r.Stats().Failing })
	fail.on.Store(false)
	waitFor("the replica still reported failing after a good snapshot", func() bool { return !r.Stats().Failing })
}

// Status and metrics must answer while a sync is in progress: during an
// outage one can last as long as the S3 client's retries (lfuse status
// timed out in a torture trial with the S3 server down).
func TestStatsDuringSync(t *testing.T) {
	rs := newReplicaSetup(t, ReplicaOptions{SyncInterval: time.Hour})
	defer rs.m.Close()
	rs.db.Exec("CREATE TABLE t(v)")
	rs.m.Opened("app.db-wal", true)
	rs.m.SyncAll()
	r := rs.m.DB("app.db").Replicas()[0]
	r.mu.Lock() // a sync in progress
	r.syncResult(errors.New("connection refused"))
	done := make(chan ReplicaStats, 1)
	go func() { done <- r.Stats() }()
	select {
	case st := <-done:
		if !st.Failing {
			t.Error("a failing replica is not reported as failing")
		}
	case <-time.After(5 * time.Second):
		t.Error("Stats waited for the sync in progress")
	}
	r.mu.Unlock()
}

// The same for a database busy with a snapshot, a capture or a fold:
// lfuse status waited up to a minute behind one of a thousand databases.
func TestDBStatsWhileBusy(t *testing.T) {
	rs := newReplicaSetup(t, ReplicaOptions{SyncInterval: time.Hour})
	defer rs.m.Close()
	rs.db.Exec("CREATE TABLE t(v)")
	rs.m.Opened("app.db-wal", true)
	rs.m.SyncAll()
	d := rs.m.DB("app.db")
	before := d.Stats()
	d.mu.Lock() // a long operation under way
	done := make(chan Stats, 1)
	go func() { done <- d.Stats() }()
	select {
	case st := <-done:
		if st.Status != before.Status || st.TXID != before.TXID || st.TXID == 0 {
			t.Errorf("while busy: %s at TXID %s, before: %s at TXID %s", st.Status, st.TXID, before.Status, before.TXID)
		}
	case <-time.After(5 * time.Second):
		t.Error("Stats waited for the database")
	}
	// Scrapes during one long hold queue one waiter for it, not one each.
	g0 := runtime.NumGoroutine()
	for range 20 {
		d.Stats()
	}
	if n := runtime.NumGoroutine() - g0; n > 5 {
		t.Errorf("20 more Stats calls during one hold left %d more goroutines", n)
	}
	d.mu.Unlock()
}

// Retention deletes what no point in the window needs, and nothing that one
// does: every state committed within the window restores exactly.
func TestRetention(t *testing.T) {
	const retention = 1500 * time.Millisecond
	// The deletions are watched for their order: see retentionOrder.
	var order *retentionOrder
	rs := newWrappedReplicaSetup(t, ReplicaOptions{
		SyncInterval: time.Hour, SnapshotInterval: 400 * time.Millisecond, Retention: retention,
		CompactIntervals: []time.Duration{200 * time.Millisecond},
	}, func(c ReplicaClient) ReplicaClient { order = &retentionOrder{ReplicaClient: c}; return order })
	m, db := rs.m, rs.db
	defer m.Close()
	db.Exec("PRAGMA wal_autocheckpoint=0")
	db.Exec("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
	m.Opened("app.db-wal", true)
	ctx := context.Background()
	r := m.DB("app.db").Replicas()[0]

	type point struct {
		txid ltx.TXID
		at   time.Time
		rows int
	}
	var points []point
	start := time.Now()
	for k := 1; time.Since(start) < 4*time.Second; k++ {
		if _, err := db.Exec("INSERT INTO t VALUES(?, randomblob(500))", k); err != nil {
			t.Fatal(err)
		}
		if k%20 == 0 {
			checkpoint(t, m, db, "TRUNCATE")
		}
		m.SyncAll()
		r.mu.Lock()
		err := r.syncLocked(ctx)
		r.mu.Unlock()
		if err == nil {
			err = r.maintain(ctx, time.Now())
		}
		if err != nil {
			t.Fatal(err)
		}
		points = append(points, point{r.Pos(), time.Now(), k})
		time.Sleep(20 * time.Millisecond)
	}
	// Something was deleted...
	snaps := mustList(t, r.Client(), SnapshotLevel)
	l0 := mustList(t, r.Client(), 0)
	if snaps[0].MaxTXID <= 2 || l0[0].MinTXID <= 2 {
		t.Fatalf("nothing deleted: oldest snapshot %s, oldest L0 %s", snaps[0].MaxTXID, l0[0].MinTXID)
	}
	// ...snapshots first, so that a restore listing the replica meanwhile
	// never sees an old snapshot without the files after it...
	order.mu.Lock()
	if order.deletes == 0 || order.violated != "" {
		t.Fatalf("%d deletions: %s", order.deletes, order.violated)
	}
	order.mu.Unlock()
	// ...and every point inside the window still restores exactly.
	cutoff := time.Now().Add(-retention)
	out := filepath.Join(t.TempDir(), "r.db")
	tried := 0
	for _, p := range points {
		if p.at.Before(cutoff) {
			continue
		}
		plan, err := PlanRestore(ctx, r.Client(), Target{TXID: p.txid})
		if err != nil {
			t.Fatalf("TXID %s (committed %s ago, inside the window): %v", p.txid, time.Since(p.at), err)
		}
		os.Remove(out)
		if _, err := Restore(ctx, r.Client(), plan, out, RestoreOptions{}); err != nil {
			t.Fatal(err)
		}
		c, _ := sql.Open("sqlite3", out+"?mode=ro")
		var n, max int
		c.QueryRow("SELECT count(*), max(k) FROM t").Scan(&n, &max)
		c.Close()
		if n != p.rows || max != p.rows {
			t.Fatalf("TXID %s restored %d rows, want %d", p.txid, n, p.rows)
		}
		tried++
	}
	if tried < 10 {
		t.Fatalf("only %d points inside the window", tried)
	}
}
