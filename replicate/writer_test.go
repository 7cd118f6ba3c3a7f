package replicate

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends/file"
	"github.com/superfly/ltx"
)

// twoWriters is two lfuse (Managers, each with its own data and state
// directories) shipping app.db to one replica directory, driven by hand.
func twoWriters(t *testing.T, opts ReplicaOptions) (a, b *replicaSetup, repl *file.Client) {
	t.Helper()
	dir := t.TempDir()
	same := func(c ReplicaClient) ReplicaClient { return c }
	a = newReplicaSetupIn(t, dir, opts, same)
	b = newReplicaSetupIn(t, dir, opts, same)
	return a, b, file.New(filepath.Join(dir, "app.db"))
}

// takenOver is twoWriters after a wrote a1 and then b took the replica
// over with b1, a still running.
func takenOver(t *testing.T, opts ReplicaOptions) (a, b *replicaSetup, repl *file.Client) {
	t.Helper()
	a, b, repl = twoWriters(t, opts)
	if err := a.writeAndFlush(t, "CREATE TABLE t(v); INSERT INTO t VALUES ('a1')"); err != nil {
		t.Fatal(err)
	}
	if err := b.writeAndFlush(t, "CREATE TABLE t(v); INSERT INTO t VALUES ('b1')"); err != nil {
		t.Fatal(err)
	}
	return a, b, repl
}

// restart opens a new Manager on rs's directories and replicas, as an
// lfuse started again after rs.m stopped.
func (rs *replicaSetup) restart(t *testing.T) *Manager {
	t.Helper()
	m := NewManager(filepath.Dir(rs.path), rs.state, rs.m.logger)
	m.Replicas = rs.m.Replicas
	if err := m.Open(context.Background()); err != nil {
		t.Fatal(err)
	}
	rs.m = m
	return m
}

// write runs q on rs's database and ships it through Flush.
func (rs *replicaSetup) writeAndFlush(t *testing.T, q string) error {
	t.Helper()
	if _, err := rs.db.Exec(q); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
	rs.m.Opened("app.db-wal", true)
	rs.m.SyncAll()
	return rs.m.DB("app.db").Replicas()[0].Flush(context.Background())
}

// replicaFiles names every file of the replica directory with its size and
// modification time: what changes when anything is written there.
func dirState(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	filepath.WalkDir(dir, func(p string, e os.DirEntry, err error) error {
		if err == nil && !e.IsDir() {
			fi, _ := e.Info()
			out = append(out, fmt.Sprint(p, " ", fi.ModTime(), " ", fi.Size()))
		}
		return nil
	})
	slices.Sort(out)
	return out
}

// restoredValues restores the replica's latest state and lists t's values.
func restoredValues(t *testing.T, client ReplicaClient) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "r.db")
	if _, err := Restore(context.Background(), client, mustPlan(t, client), out, RestoreOptions{}); err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("sqlite3", out)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var s string
	if err := db.QueryRow("SELECT group_concat(v, ',') FROM (SELECT v FROM t ORDER BY v)").Scan(&s); err != nil {
		t.Fatal(err)
	}
	return s
}

// A second lfuse that starts shipping to a replica takes it over: the first
// notices at its next check, says so once, writes nothing more there (not
// even its final flush), and its stop fails naming the other. The replica
// then holds the second one's history alone, which a restore gives back.
// Before, both wrote over each other and both stopped saying every commit
// was in the replica.
func TestSecondWriterTakesTheReplicaOver(t *testing.T) {
	opts := ReplicaOptions{SyncInterval: time.Hour, SnapshotInterval: time.Hour, CompactIntervals: []time.Duration{time.Hour},
		WriterCheckInterval: time.Nanosecond}
	a, b, client := takenOver(t, opts)
	ra := a.m.DB("app.db").Replicas()[0]
	// a has not looked yet: its commit lands, under TXIDs far below b's.
	if err := a.writeAndFlush(t, "INSERT INTO t VALUES ('a2')"); err != nil {
		t.Fatal(err)
	}
	var taken *TakenOverError
	if err := ra.maintain(context.Background(), time.Now()); !errors.As(err, &taken) || taken.By.PID != os.Getpid() {
		t.Fatalf("maintenance of a replica taken over: %v", err)
	}
	if st := ra.Stats(); !st.Failing || !strings.Contains(st.TakenOverBy, "pid") {
		t.Fatalf("stats of a replica taken over: %+v", st)
	}
	before := dirState(t, b.repl)
	if _, err := a.db.Exec("INSERT INTO t VALUES ('a3')"); err != nil {
		t.Fatal(err)
	}
	a.m.SyncAll()
	ra.tick(context.Background())
	if err := a.m.Close(); err == nil || !strings.Contains(err.Error(), "took this replica over") {
		t.Fatalf("the stop of an lfuse whose replica was taken over: %v", err)
	}
	if after := dirState(t, b.repl); !slices.Equal(before, after) {
		t.Fatalf("an lfuse wrote to a replica after it was taken over:\n%v\n%v", before, after)
	}
	if n := strings.Count(a.logs.String(), "another lfuse took this replica over"); n != 1 {
		t.Fatalf("the takeover logged %d times, want once:\n%s", n, a.logs.String())
	}
	if strings.Contains(a.logs.String(), "will retry") {
		t.Fatalf("a takeover logged as an outage:\n%s", a.logs.String())
	}
	if err := b.writeAndFlush(t, "INSERT INTO t VALUES ('b2')"); err != nil {
		t.Fatal(err)
	}
	if got := restoredValues(t, client); got != "b1,b2" {
		t.Fatalf("restored %q, want the second writer's b1,b2", got)
	}
	if err := b.m.Close(); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(b.logs.String(), "took this replica over") {
		t.Fatalf("the lfuse that claimed last saw a takeover:\n%s", b.logs.String())
	}
}

// The check is one GET, and only for a replica being written: an idle
// database costs no request however often maintenance runs.
func TestWriterCheckOnlyWhileWriting(t *testing.T) {
	opts := ReplicaOptions{SyncInterval: time.Hour, SnapshotInterval: time.Hour, CompactIntervals: []time.Duration{time.Hour},
		WriterCheckInterval: time.Nanosecond}
	rs := newReplicaSetup(t, opts)
	if err := rs.writeAndFlush(t, "CREATE TABLE t(v); INSERT INTO t VALUES ('x')"); err != nil {
		t.Fatal(err)
	}
	r := rs.m.DB("app.db").Replicas()[0]
	// Its own loops would take the check this test counts.
	r.Stop()
	r.waitMaintenance()
	if err := rs.writeAndFlush(t, "INSERT INTO t VALUES ('y')"); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	gets := func() int64 { return r.Stats().Ops[OpGet] }
	g0 := gets()
	if err := r.maintain(ctx, time.Now()); err != nil {
		t.Fatal(err)
	}
	if n := gets() - g0; n != 1 {
		t.Fatalf("%d GETs to check a replica just written, want 1", n)
	}
	g1 := gets()
	for range 3 {
		if err := r.maintain(ctx, time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	if n := gets() - g1; n != 0 {
		t.Fatalf("%d GETs for an idle replica", n)
	}
	if err := rs.m.Close(); err != nil {
		t.Fatal(err)
	}
}

// An lfuse restarted on its own state claims the replica again and goes on
// with no takeover: only another running lfuse is one.
func TestRestartClaimsAgain(t *testing.T) {
	opts := ReplicaOptions{SyncInterval: time.Hour, SnapshotInterval: time.Hour, CompactIntervals: []time.Duration{time.Hour},
		WriterCheckInterval: time.Nanosecond}
	rs := newReplicaSetup(t, opts)
	if err := rs.writeAndFlush(t, "CREATE TABLE t(v); INSERT INTO t VALUES ('x')"); err != nil {
		t.Fatal(err)
	}
	client := file.New(filepath.Join(rs.repl, "app.db"))
	first, ok, err := ReadWriter(context.Background(), client)
	if err != nil || !ok || first.PID != os.Getpid() {
		t.Fatalf("writer record after a sync: %+v %v %v", first, ok, err)
	}
	if err := rs.m.Close(); err != nil {
		t.Fatal(err)
	}
	m := rs.restart(t)
	if err := rs.writeAndFlush(t, "INSERT INTO t VALUES ('y')"); err != nil {
		t.Fatal(err)
	}
	if err := m.DB("app.db").Replicas()[0].maintain(context.Background(), time.Now()); err != nil {
		t.Fatal(err)
	}
	second, _, _ := ReadWriter(context.Background(), client)
	if second.ID == first.ID || second.ID == "" {
		t.Fatalf("the restarted lfuse did not claim the replica: %+v", second)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if got := restoredValues(t, client); got != "x,y" {
		t.Fatalf("restored %q", got)
	}
}

// An lfuse that claims a replica from another that may still be running
// starts its history jumpTXIDs above the replica's; from one that stopped
// cleanly, or from its own state directory's last run, it goes on from
// the replica's TXIDs.
func TestTakeoverJumpsUnlessStoppedCleanly(t *testing.T) {
	opts := ReplicaOptions{SyncInterval: time.Hour, SnapshotInterval: time.Hour, CompactIntervals: []time.Duration{time.Hour}}
	dir := t.TempDir()
	same := func(c ReplicaClient) ReplicaClient { return c }
	client := file.New(filepath.Join(dir, "app.db"))
	pos := func() ltx.TXID { t.Helper(); return mustPlan(t, client).TXID }

	a := newReplicaSetupIn(t, dir, opts, same)
	if err := a.writeAndFlush(t, "CREATE TABLE t(v); INSERT INTO t VALUES ('a')"); err != nil {
		t.Fatal(err)
	}
	if err := a.m.Close(); err != nil {
		t.Fatal(err)
	}
	b := newReplicaSetupIn(t, dir, opts, same)
	if err := b.writeAndFlush(t, "CREATE TABLE t(v); INSERT INTO t VALUES ('b')"); err != nil {
		t.Fatal(err)
	}
	if p := pos(); p >= jumpTXIDs {
		t.Fatalf("TXID %s after a claim from an lfuse that stopped cleanly: a needless jump", p)
	}
	// b is not stopped (as if killed): c may be running beside it.
	c := newReplicaSetupIn(t, dir, opts, same)
	before := pos()
	if err := c.writeAndFlush(t, "CREATE TABLE t(v); INSERT INTO t VALUES ('c')"); err != nil {
		t.Fatal(err)
	}
	if p := pos(); p <= before+jumpTXIDs {
		t.Fatalf("TXID %s after a claim from an lfuse that may still run (it was at %s): no jump", p, before)
	}
	if !strings.Contains(c.logs.String(), "did not stop cleanly") {
		t.Fatalf("the jump was not logged:\n%s", c.logs.String())
	}
	if got := restoredValues(t, client); got != "c" {
		t.Fatalf("restored %q, want c", got)
	}
	if err := b.m.Close(); err == nil {
		t.Fatal("b stopped cleanly from a replica that c took over")
	}
	// c restarted on its own state after a crash (no record of its clean
	// stop): its predecessor is not running, so no jump.
	if err := c.m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, "app.db", stoppedMarker)); err != nil {
		t.Fatal(err)
	}
	m := c.restart(t)
	before = pos()
	if err := c.writeAndFlush(t, "INSERT INTO t VALUES ('c2')"); err != nil {
		t.Fatal(err)
	}
	if p := pos(); p != before+1 {
		t.Fatalf("TXID %s after one commit from %s on a restart on the same state", p, before)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
}

// An lfuse that wrote nothing since another took its replica over, and so
// never checked, finds the takeover when it lists the replica again (its
// newest snapshot went, to the other's retention): it used to claim the
// replica back and start above the other's history, which a latest
// restore then gave.
func TestTakeoverFoundByAListingAgain(t *testing.T) {
	opts := ReplicaOptions{SyncInterval: time.Hour, SnapshotInterval: time.Hour, CompactIntervals: []time.Duration{time.Hour}}
	a, b, client := takenOver(t, opts)
	ra := a.m.DB("app.db").Replicas()[0]
	ra.mu.Lock()
	ra.listed = false // what checkListing does when the newest snapshot is gone
	ra.mu.Unlock()
	var taken *TakenOverError
	if err := a.writeAndFlush(t, "INSERT INTO t VALUES ('a2')"); !errors.As(err, &taken) {
		t.Fatalf("a flush after listing a replica taken over: %v", err)
	}
	if w, _, _ := ReadWriter(context.Background(), client); w.ID != b.m.writer.ID {
		t.Fatalf("the writer record names %+v, not the lfuse that took the replica over", w)
	}
	if got := restoredValues(t, client); got != "b1" {
		t.Fatalf("restored %q, want b1", got)
	}
	a.m.Close()
	if err := b.m.Close(); err != nil {
		t.Fatal(err)
	}
}

// The local log of a database whose only replica was taken over folds as
// it would if that replica kept up: nothing will be shipped from it there.
func TestLogFoldsPastATakenOverReplica(t *testing.T) {
	defer func(n int64) { maxSegment = n }(maxSegment)
	maxSegment = 32 << 10
	opts := ReplicaOptions{SyncInterval: time.Hour, SnapshotInterval: time.Hour, CompactIntervals: []time.Duration{time.Hour},
		WriterCheckInterval: time.Nanosecond}
	a, b, _ := takenOver(t, opts)
	d := a.m.DB("app.db")
	ra := d.Replicas()[0]
	if err := ra.checkWriter(context.Background(), true); ra.takenOver() == nil {
		t.Fatalf("no takeover found: %v", err)
	}
	for range 200 {
		if _, err := a.db.Exec("INSERT INTO t VALUES (randomblob(3000))"); err != nil {
			t.Fatal(err)
		}
		a.m.SyncAll()
	}
	segments := func() int { return logSegments(a.state) }
	if n := segments(); n < 5 {
		t.Fatalf("only %d segments", n)
	}
	ra.tick(context.Background())
	waitUntil(t, "the local log to fold", func() bool { return segments() == 1 })
	a.m.Close()
	b.m.Close()
}

// The same at a stop: a final flush that lists the replica again reads the
// record before it writes. It used to make no claim while stopping, and
// uploaded the old database as a snapshot above the new writer's history.
func TestTakeoverFoundByAListingAgainAtStop(t *testing.T) {
	opts := ReplicaOptions{SyncInterval: time.Hour, SnapshotInterval: time.Hour, CompactIntervals: []time.Duration{time.Hour}}
	a, b, client := takenOver(t, opts)
	if _, err := a.db.Exec("INSERT INTO t VALUES ('a2')"); err != nil {
		t.Fatal(err)
	}
	a.m.SyncAll()
	ra := a.m.DB("app.db").Replicas()[0]
	ra.mu.Lock()
	ra.listed = false
	ra.mu.Unlock()
	if err := a.m.Close(); err == nil || !strings.Contains(err.Error(), "took this replica over") {
		t.Fatalf("the stop of an lfuse whose replica was taken over: %v", err)
	}
	if got := restoredValues(t, client); got != "b1" {
		t.Fatalf("restored %q, want b1", got)
	}
	if err := b.m.Close(); err != nil {
		t.Fatal(err)
	}
}

// markerFailing fails the writer records while fail is set.
type markerFailing struct {
	ReplicaClient
	fail atomic.Bool
}

func (c *markerFailing) ReadMarker(ctx context.Context, name string) ([]byte, error) {
	if c.fail.Load() {
		return nil, errors.New("injected: marker unreadable")
	}
	return c.ReplicaClient.ReadMarker(ctx, name)
}

func (c *markerFailing) WriteMarker(ctx context.Context, name string, data []byte) error {
	if c.fail.Load() {
		return errors.New("injected: marker unwritable")
	}
	return c.ReplicaClient.WriteMarker(ctx, name, data)
}

// An lfuse whose first claim failed replicates anyway; when its claim
// finally goes through and finds the record of an lfuse started after it,
// that one took the replica over: it used to take it for its predecessor
// and jump above it, and the older lfuse kept the replica.
func TestLateClaimYieldsToANewerWriter(t *testing.T) {
	opts := ReplicaOptions{SyncInterval: time.Hour, SnapshotInterval: time.Hour, CompactIntervals: []time.Duration{time.Hour},
		WriterCheckInterval: time.Nanosecond}
	dir := t.TempDir()
	mf := &markerFailing{}
	mf.fail.Store(true)
	a := newReplicaSetupIn(t, dir, opts, func(c ReplicaClient) ReplicaClient { mf.ReplicaClient = c; return mf })
	if err := a.writeAndFlush(t, "CREATE TABLE t(v); INSERT INTO t VALUES ('a1')"); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(a.logs.String(), "replicating anyway") {
		t.Fatalf("a failed claim was not logged:\n%s", a.logs.String())
	}
	b := newReplicaSetupIn(t, dir, opts, func(c ReplicaClient) ReplicaClient { return c })
	b.m.writer.Started = a.m.writer.Started.Add(2 * clockSkew) // b started later than any skew explains
	if err := b.writeAndFlush(t, "CREATE TABLE t(v); INSERT INTO t VALUES ('b1')"); err != nil {
		t.Fatal(err)
	}
	mf.fail.Store(false)
	ra := a.m.DB("app.db").Replicas()[0]
	ra.mu.Lock()
	ra.nextClaim = time.Time{}
	ra.mu.Unlock()
	var taken *TakenOverError
	if err := a.writeAndFlush(t, "INSERT INTO t VALUES ('a2')"); !errors.As(err, &taken) {
		t.Fatalf("a late claim after a newer lfuse claimed: %v", err)
	}
	client := file.New(filepath.Join(dir, "app.db"))
	if w, _, _ := ReadWriter(context.Background(), client); w.ID != b.m.writer.ID {
		t.Fatalf("the record names %+v, not the newer lfuse", w)
	}
	a.m.Close()
	if err := b.m.Close(); err != nil {
		t.Fatal(err)
	}
}

// A replica that fails until the shutdown timeout does not cost the others
// their record of a clean stop: the flush used up the timeout, and the
// records, made with it, failed. The next lfuse to claim those replicas
// from another state directory then uploaded a new snapshot to each.
func TestCleanStopRecordedBesideAFailingReplica(t *testing.T) {
	opts := ReplicaOptions{SyncInterval: time.Hour, SnapshotInterval: time.Hour, CompactIntervals: []time.Duration{time.Hour}}
	down := &failingWrites{}
	down.down.Store(true)
	rs := newReplicaSetup(t, opts)
	replicas := rs.m.Replicas
	rs.m.Replicas = func(rel string) []ReplicaSpec {
		down.ReplicaClient = file.New(filepath.Join(t.TempDir(), rel))
		return append(replicas(rel), ReplicaSpec{Client: down, Options: opts})
	}
	rs.m.ShutdownTimeout = 300 * time.Millisecond
	if _, err := rs.db.Exec("CREATE TABLE t(v); INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	rs.m.Opened("app.db-wal", true)
	rs.m.SyncAll()
	// Said as what happened and what follows, with the replica's own
	// failure, not the deadline that cut its last try short.
	if err := rs.m.Close(); err == nil || !strings.Contains(err.Error(), "not every commit shipped within the shutdown timeout") ||
		!strings.Contains(err.Error(), "injected") || !strings.Contains(err.Error(), "stays in the local log") {
		t.Fatalf("stop with a replica down: %v, want its failure", err)
	}
	if _, err := os.Stat(filepath.Join(rs.repl, "app.db", stoppedMarker)); err != nil {
		t.Fatalf("no clean stop recorded in the replica that holds every commit: %v\n%s", err, rs.logs.String())
	}
	if strings.Contains(rs.logs.String(), "deleted databases") {
		t.Fatalf("a stop with no deleted database spoke of recording some:\n%s", rs.logs.String())
	}
}
