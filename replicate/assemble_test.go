package replicate

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lfuse/lfuse/backends"
	"github.com/lfuse/lfuse/backends/file"
	"github.com/superfly/ltx"
)

// Restore writes each page once, newest file first; whatever the history
// (pages rewritten, the database shrinking and growing again), the result
// must be byte for byte what applying the files oldest first gives, and
// its checksum the one recorded.
func TestRestoreMatchesSequentialApply(t *testing.T) {
	rng := rand.New(rand.NewSource(2))
	ctx := context.Background()
	for trial := 0; trial < 150; trial++ {
		dir := t.TempDir()
		client := file.New(filepath.Join(dir, "replica"))
		commit := uint32(1 + rng.Intn(40))
		snap := map[uint32]byte{}
		for p := uint32(1); p <= commit; p++ {
			snap[p] = byte(rng.Intn(250) + 1)
		}
		files := [][]byte{encodeTest(t, 1, 1, commit, snap)}
		txid := ltx.TXID(2)
		for i := 0; i < rng.Intn(7); i++ {
			commit = uint32(1 + rng.Intn(40))
			pages := map[uint32]byte{}
			for p := uint32(1); p <= commit; p++ {
				if rng.Intn(3) == 0 {
					pages[p] = byte(rng.Intn(250) + 1)
				}
			}
			files = append(files, encodeTest(t, txid, txid, commit, pages))
			txid++
		}
		for i, b := range files {
			want := applyAll(t, files[:i+1])
			sum, err := ltx.ChecksumReader(bytes.NewReader(want), 512)
			if err != nil {
				t.Fatal(err)
			}
			level := 0
			if i == 0 {
				level = SnapshotLevel
			}
			id := ltx.TXID(i + 1)
			if err := client.WriteLTXFile(ctx, level, id, id, bytes.NewReader(b), int64(len(b)),
				backends.FileMeta{PostApplyChecksum: ltx.ChecksumFlag | sum}); err != nil {
				t.Fatal(err)
			}
		}
		want := applyAll(t, files)
		plan, err := PlanRestore(ctx, client, Target{})
		if err != nil {
			t.Fatal(err)
		}
		if len(plan.Files) != len(files) {
			t.Fatalf("trial %d: plan of %d files for %d", trial, len(plan.Files), len(files))
		}
		out := filepath.Join(dir, "restored.db")
		if _, err := Restore(ctx, client, plan, out, RestoreOptions{}); err != nil {
			t.Fatalf("trial %d: %v", trial, err)
		}
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("trial %d (%d files): restored database differs from sequential apply", trial, len(files))
		}
	}
}

// A restore interrupted (Ctrl-C) says it was stopped: it used to blame
// whichever replica file it was reading as corrupt. Nothing is left behind.
func TestRestoreInterruptedIsNotCorruption(t *testing.T) {
	dir := t.TempDir()
	client, _ := fourFileReplica(t, dir)
	bg := context.Background()
	if _, err := Restore(bg, client, mustPlan(t, client), filepath.Join(dir, "whole.db"), RestoreOptions{}); err != nil {
		t.Fatalf("uninterrupted: %v", err)
	}
	os.Remove(filepath.Join(dir, "whole.db"))
	ctx, cancel := context.WithCancelCause(bg)
	stop := errors.New("interrupt signal received")
	out := filepath.Join(dir, "restored.db")
	_, err := Restore(ctx, client, mustPlan(t, client), out, RestoreOptions{Progress: func(done, total int64) { cancel(stop) }})
	if !errors.Is(err, stop) || strings.Contains(err.Error(), "corrupt") {
		t.Fatalf("interrupted restore: %v", err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "*")); len(left) != 1 {
		t.Fatalf("left behind: %v", left)
	}
}

// fourFileReplica writes a replica of a snapshot (TXID 1) and three
// transactions, each rewriting every page with its TXID, and returns it
// with each file's bytes and recorded checksum.
func fourFileReplica(t *testing.T, dir string) (ReplicaClient, []replicaFile) {
	t.Helper()
	client := file.New(filepath.Join(dir, "replica"))
	var files [][]byte
	var out []replicaFile
	for id := ltx.TXID(1); id <= 4; id++ {
		level := 0
		if id == 1 {
			level = SnapshotLevel
		}
		pages := map[uint32]byte{}
		for p := uint32(1); p <= 40; p++ {
			pages[p] = byte(id)
		}
		b := encodeTest(t, id, id, 40, pages)
		files = append(files, b)
		sum, err := ltx.ChecksumReader(bytes.NewReader(applyAll(t, files)), 512)
		if err != nil {
			t.Fatal(err)
		}
		meta := backends.FileMeta{PostApplyChecksum: ltx.ChecksumFlag | sum}
		if err := client.WriteLTXFile(context.Background(), level, id, id, bytes.NewReader(b), int64(len(b)), meta); err != nil {
			t.Fatal(err)
		}
		out = append(out, replicaFile{b, meta})
	}
	return client, out
}

type replicaFile struct {
	data []byte
	meta backends.FileMeta
}

// A file whose content is another file's (a copy under the wrong name, with
// its checksum) is refused, not restored as the TXID its name says; and the
// old database's WAL goes before the restored file takes its place, or
// nothing is written. (Found by an adversarial run: a copy of TXID 3 named
// 4 restored TXID 3's state as 4's; an old WAL that could not be removed
// was left beside the restored database, which SQLite replayed onto it.)
func TestRestoreRefusesMisnamedFileAndStaleWAL(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	client, files := fourFileReplica(t, dir)
	out := filepath.Join(dir, "restored.db")
	if err := os.WriteFile(out, []byte("the old database"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(out+"-wal", "cannot be removed"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := Restore(ctx, client, mustPlan(t, client), out, RestoreOptions{}); err == nil || !strings.Contains(err.Error(), "is not a regular file") {
		t.Fatalf("restore beside a WAL that is a directory: %v", err)
	}
	if got, _ := os.ReadFile(out); string(got) != "the old database" {
		t.Fatal("the restored database was put in place beside the old WAL")
	}
	if _, err := os.Stat(filepath.Join(out+"-wal", "cannot be removed")); err != nil {
		t.Fatalf("a directory named like the WAL was removed: %v", err)
	}
	os.RemoveAll(out + "-wal")

	third := files[2]
	if err := client.WriteLTXFile(ctx, 0, 4, 4, bytes.NewReader(third.data), int64(len(third.data)), third.meta); err != nil {
		t.Fatal(err)
	}
	if _, err := Restore(ctx, client, mustPlan(t, client), out, RestoreOptions{}); err == nil || !strings.Contains(err.Error(), "holds TXIDs 0000000000000003-0000000000000003") {
		t.Fatalf("restore of a file holding another's content: %v", err)
	}
}

// The old database's WAL and hot journal are replaced with it, and kept if
// the restored file cannot be put in place; the restored file takes the old
// one's mode and owner; and without -force, a database that appears while
// the restore runs is kept.
func TestRestoreReplacesSideFilesTogether(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	client, _ := fourFileReplica(t, dir)
	out := filepath.Join(dir, "restored.db")
	side := func(content string) {
		t.Helper()
		for _, suffix := range []string{"-wal", "-journal"} {
			if err := os.WriteFile(out+suffix, []byte(content+suffix), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	// The rename fails (a directory is in the way, as a bind mount or an
	// immutable file would make it fail): the old side files stay.
	if err := os.MkdirAll(filepath.Join(out, "in the way"), 0o755); err != nil {
		t.Fatal(err)
	}
	side("old")
	if _, err := Restore(ctx, client, mustPlan(t, client), out, RestoreOptions{}); err == nil {
		t.Fatal("restore over a directory succeeded")
	}
	for _, suffix := range []string{"-wal", "-journal"} {
		if got, err := os.ReadFile(out + suffix); err != nil || string(got) != "old"+suffix {
			t.Fatalf("after a failed rename, %s holds %q, %v", suffix, got, err)
		}
	}
	os.RemoveAll(out)

	// Without -force, a database made while the restore ran is kept.
	if err := os.WriteFile(out, []byte("made meanwhile"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Restore(ctx, client, mustPlan(t, client), out, RestoreOptions{NoReplace: true}); err == nil || !strings.Contains(err.Error(), "appeared while the restore ran") {
		t.Fatalf("restore with NoReplace over a file: %v", err)
	}
	if got, _ := os.ReadFile(out); string(got) != "made meanwhile" {
		t.Fatal("NoReplace replaced the file")
	}
	if got, _ := os.ReadFile(out + "-wal"); string(got) != "old-wal" {
		t.Fatal("NoReplace did not put the WAL back")
	}

	// Replaced: the side files go, mode and owner stay.
	if os.Geteuid() == 0 {
		os.Chown(out, 1234, 5678)
	}
	if _, err := Restore(ctx, client, mustPlan(t, client), out, RestoreOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, suffix := range []string{"-wal", "-journal"} {
		if _, err := os.Stat(out + suffix); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("the old %s is still beside the restored database: %v", suffix, err)
		}
	}
	var st unix.Stat_t
	if err := unix.Stat(out, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode&0o777 != 0o600 || os.Geteuid() == 0 && (st.Uid != 1234 || st.Gid != 5678) {
		t.Fatalf("restored file has mode %o, owner %d:%d; want the old one's 600, 1234:5678", st.Mode&0o777, st.Uid, st.Gid)
	}
	if m, _ := filepath.Glob(filepath.Join(dir, ".lfuse-restore-*")); len(m) > 0 {
		t.Fatalf("left %v", m)
	}
}

func mustPlan(t *testing.T, client ReplicaClient) Plan {
	t.Helper()
	plan, err := PlanRestore(context.Background(), client, Target{})
	if err != nil {
		t.Fatal(err)
	}
	return plan
}

// A restore killed with SIGKILL leaves its directory, up to a whole
// database; the next restore beside it removes it, but not the directory
// of a restore still running (it holds the lock) nor one just created.
func TestRestoreSweepsLeftovers(t *testing.T) {
	dir := t.TempDir()
	client, _ := fourFileReplica(t, dir)
	old := time.Now().Add(-2 * leftoverMinAge)
	mk := func(name string, mtime time.Time) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(p, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(p, "db"), make([]byte, 4096), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, mtime, mtime); err != nil {
			t.Fatal(err)
		}
		return p
	}
	killed := mk(".lfuse-restore-111", old)
	running := mk(".lfuse-restore-222", old)
	killedYoung := mk(".lfuse-restore-333", time.Now()) // killed a moment ago: its room is needed now
	other := mk(".lfuse-restored-by-hand", old)
	starting := filepath.Join(dir, ".lfuse-restoring-444") // made, not locked yet
	staleStart := filepath.Join(dir, ".lfuse-restoring-555")
	os.Mkdir(starting, 0o700)
	os.Mkdir(staleStart, 0o700)
	os.Chtimes(staleStart, old, old)
	lock := lockRestoreDir(running)
	if lock == nil {
		t.Skip("no flock on this filesystem")
	}
	defer lock.Close()

	var logs bytes.Buffer
	logger := slog.New(slog.NewTextHandler(&logs, nil))
	if _, err := Restore(context.Background(), client, mustPlan(t, client), filepath.Join(dir, "restored.db"), RestoreOptions{Logger: logger}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{killed, killedYoung, staleStart} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s is still there: %v", filepath.Base(p), err)
		}
	}
	for _, p := range []string{running, other} {
		if _, err := os.Stat(filepath.Join(p, "db")); err != nil {
			t.Errorf("%s was removed: %v", filepath.Base(p), err)
		}
	}
	if _, err := os.Stat(starting); err != nil {
		t.Errorf("a restore's directory not locked yet was removed: %v", err)
	}
	if !strings.Contains(logs.String(), "removed what an interrupted restore left behind") || !strings.Contains(logs.String(), "bytes=4096") {
		t.Errorf("the removal was not logged:\n%s", logs.String())
	}
}
