package integration

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// lastLine is the final line of a command's output: where lfuse prints its
// one-line error.
func lastLine(out string) string {
	lines := strings.Split(strings.TrimSpace(out), "\n")
	return lines[len(lines)-1]
}

// Every kind of bad input to lfuse restore is one clear line, exit code ≠ 0,
// and nothing written; the "if" flags make the container start-up step
// idempotent.
func TestRestoreRefusals(t *testing.T) {
	e := newEnv(t)
	cfgPath, repl := e.replicaConfig("")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf("[[replicas]]\nurl = %q\nsync-interval = \"50ms\"\n", "file://"+repl)), 0o644)
	e.replicateSeq(cfgPath, 200)
	url := "file://" + repl + "/app.db"
	out := filepath.Join(e.root, "out.db")

	fail := func(want string, args ...string) {
		t.Helper()
		code, log := runLfuse(t, append([]string{"restore"}, args...)...)
		if code == 0 || !strings.HasPrefix(lastLine(log), "lfuse: ") || !strings.Contains(lastLine(log), want) {
			t.Fatalf("lfuse restore %v: exit %d, want an error line with %q:\n%s", args, code, want, log)
		}
	}
	ok := func(args ...string) string {
		t.Helper()
		code, log := runLfuse(t, append([]string{"restore"}, args...)...)
		if code != 0 {
			t.Fatalf("lfuse restore %v: exit %d:\n%s", args, code, log)
		}
		return log
	}
	noOutput := func() {
		t.Helper()
		if _, err := os.Stat(out); err == nil {
			t.Fatalf("a failed restore wrote %s", out)
		}
		if m, _ := filepath.Glob(filepath.Join(e.root, ".lfuse-restore-*")); len(m) > 0 {
			t.Fatalf("a failed restore left %v", m)
		}
	}

	fail(`unknown scheme "s4"`, "-o", out, "s4://bucket/app.db")
	fail("after the newest backup", "-o", out, "-txid", "ffffff", url)
	fail("before the oldest backup", "-o", out, "-timestamp", "2001-01-01T00:00:00Z", url)
	fail("in the future", "-o", out, "-timestamp", time.Now().Add(time.Hour).UTC().Format(time.RFC3339), url)
	fail("expected a TXID in hex", "-o", out, "-txid", "xyz", url)
	fail("no backup", "-o", out, "file://"+repl+"/other.db")
	noOutput()
	if log := ok("-o", out, "-if-replica-exists", "file://"+repl+"/other.db"); !strings.Contains(log, "nothing to restore") {
		t.Fatalf("-if-replica-exists said:\n%s", log)
	}
	noOutput()

	ok("-o", out, url)
	first, _ := os.ReadFile(out)
	fail("exists: use -force", "-o", out, url)
	// What a restore killed with SIGKILL left goes at the next restore
	// beside it, even one that restores nothing.
	killed := filepath.Join(e.root, ".lfuse-restore-123")
	os.Mkdir(killed, 0o700)
	os.WriteFile(filepath.Join(killed, "db"), first, 0o600)
	long := time.Now().Add(-time.Hour)
	os.Chtimes(killed, long, long)
	if log := ok("-o", out, "-if-db-not-exists", url); !strings.Contains(log, "removed what an interrupted restore left behind") {
		t.Fatalf("-if-db-not-exists beside a killed restore's directory said:\n%s", log)
	}
	if _, err := os.Stat(killed); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a killed restore's directory is still there: %v", err)
	}
	// Not over a database an application has open: it would go on
	// writing to the replaced file. Seen by its -shm lock in WAL mode, by
	// the database file's locks in exclusive locking mode.
	held := filepath.Join(e.root, "held")
	os.Mkdir(held, 0o755)
	heldDB := filepath.Join(held, "app.db")
	os.WriteFile(heldDB, first, 0o644)
	for _, pragma := range []string{"", "PRAGMA locking_mode=EXCLUSIVE;"} {
		app := exec.Command("sqlite3", heldDB)
		in, _ := app.StdinPipe()
		stdout, _ := app.StdoutPipe()
		if err := app.Start(); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(in, "%s select count(*) > 0 from sqlite_master;\n", pragma)
		r := bufio.NewReader(stdout)
		for line := ""; strings.TrimSpace(line) != "1"; { // after the pragma's own output
			var err error
			if line, err = r.ReadString('\n'); err != nil {
				t.Fatalf("sqlite3 %q: %v", pragma, err)
			}
		}
		fail(fmt.Sprintf("is open by process %d (sqlite3): stop the application", app.Process.Pid), "-o", heldDB, "-force", url)
		fail(fmt.Sprintf("is open by process %d", app.Process.Pid), "-data", held, "-replica", "file://"+repl, "-force")
		if m, _ := filepath.Glob(filepath.Join(held, ".lfuse-restore-*")); len(m) > 0 {
			t.Fatalf("a refused restore left %v", m)
		}
		in.Close()
		app.Wait()
	}
	ok("-o", heldDB, "-force", url)
	ok("-o", out, "-force", url)
	if again, _ := os.ReadFile(out); !bytes.Equal(again, first) {
		t.Fatal("restore -force gave a different database")
	}
	// An empty file with no WAL beside it holds nothing to keep: it is
	// restored over, also with -if-db-not-exists (as restore-if-missing
	// runs). (Found by an adversarial run: it was kept, and the
	// application's first write started a near-empty history.)
	os.WriteFile(out, nil, 0o644)
	ok("-o", out, "-if-db-not-exists", url)
	if again, _ := os.ReadFile(out); !bytes.Equal(again, first) {
		t.Fatal("an empty database file was not restored over")
	}
	os.WriteFile(out, nil, 0o644)
	os.WriteFile(out+"-wal", []byte("frames"), 0o644)
	fail("exists: use -force", "-o", out, url)
	os.Remove(out + "-wal")
	os.Remove(out)

	// A gap: a level-0 file in the middle is missing and nothing else
	// covers it.
	l0 := filepath.Join(repl, "app.db", "ltx", "0")
	ents, _ := filepath.Glob(filepath.Join(l0, "*.ltx"))
	if len(ents) < 3 {
		t.Fatalf("only %d level-0 files", len(ents))
	}
	mid := ents[len(ents)/2]
	os.Rename(mid, mid+".aside")
	fail("gap in the TXID chain", "-o", out, url)
	noOutput()
	os.Rename(mid+".aside", mid)

	// A corrupt object is named.
	b, _ := os.ReadFile(mid)
	flipped := append([]byte(nil), b...)
	flipped[len(flipped)/2] ^= 0x55
	os.WriteFile(mid, flipped, 0o644)
	fail(filepath.Base(mid), "-o", out, url)
	noOutput()
	os.WriteFile(mid, b, 0o644)

	// An unreadable replica.
	os.Rename(l0, l0+".aside")
	os.WriteFile(l0, nil, 0o644)
	fail("ltx/0: not a directory", "-o", out, url)
	noOutput()
	os.Remove(l0)
	os.Rename(l0+".aside", l0)

	// A history without its snapshot: an error even with
	// -if-replica-exists, which would start the application on an empty
	// database. (Found by an adversarial run: "no backup", and
	// restore-if-missing mounted an empty directory without a word.)
	l9 := filepath.Join(repl, "app.db", "ltx", "9")
	os.Rename(l9, l9+".aside")
	fail("no snapshot to apply them to", "-o", out, url)
	fail("no snapshot to apply them to", "-o", out, "-if-replica-exists", url)
	noOutput()
	os.Rename(l9+".aside", l9)

	// An output on a full filesystem: the restore says so at once, not
	// after reading the whole replica, and leaves nothing behind.
	full := filepath.Join(e.root, "full")
	os.Mkdir(full, 0o755)
	if err := syscall.Mount("tmpfs", full, "tmpfs", 0, "size=64k"); err != nil {
		t.Fatal(err)
	}
	defer syscall.Unmount(full, syscall.MNT_DETACH)
	os.WriteFile(filepath.Join(full, "filler"), make([]byte, 64<<10), 0o644) // fills it, fully or up to ENOSPC
	fail("no room for the", "-o", filepath.Join(full, "out.db"), url)
	if m, _ := filepath.Glob(filepath.Join(full, "*.db")); len(m) > 0 {
		t.Fatalf("a restore to a full filesystem wrote %v", m)
	}
	if m, _ := filepath.Glob(filepath.Join(full, ".lfuse-restore-*")); len(m) > 0 {
		t.Fatalf("a restore to a full filesystem left %v", m)
	}

	code, log := runLfuse(t, "restore", "-o", out, "-data", e.data, url)
	if code != 2 {
		t.Fatalf("-o with -data: exit %d\n%s", code, log)
	}
	if code, log := runLfuse(t, "ltx", url); code != 0 || !strings.Contains(log, "LEVEL") || strings.Count(log, "\n") < 4 {
		t.Fatalf("lfuse ltx: %d\n%s", code, log)
	}
	if code, log := runLfuse(t, "databases", "-replica", repl); code != 0 || !strings.Contains(log, "app.db") {
		t.Fatalf("lfuse databases: %d\n%s", code, log)
	}
}

// The container start-up flow: an empty data directory and an existing
// replica; lfuse mount -restore-if-missing brings the database back before
// the application starts, and keeps replicating it from there.
func TestMountRestoresMissing(t *testing.T) {
	e := newEnv(t)
	cfgPath, repl := e.replicaConfig("restore-if-missing = true")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf("restore-if-missing = true\n[[replicas]]\nurl = %q\nsync-interval = \"50ms\"\n", "file://"+repl)), 0o644)
	lf := e.mount("-config", cfgPath)
	if lf.log.count("the replicas hold no database") != 1 {
		t.Fatalf("a first start from an empty replica said nothing of it:\n%s", lf.log)
	}
	os.MkdirAll(e.path("sub"), 0o755)
	for _, db := range []string{"app.db", "sub/other.db"} {
		createSeq(t, e.path(db))
		seqWrite(t, e.path(db), 1, 50)
		checkpointTruncate(t, e.path(db))
	}
	lf.stop()
	want := liveBytes(t, e)

	snapshots := func() int {
		m, _ := filepath.Glob(filepath.Join(repl, "app.db", "ltx", "9", "*.ltx"))
		return len(m)
	}
	snapsBefore := snapshots()

	// The machine is lost: a new, empty data directory.
	os.RemoveAll(e.data)
	os.MkdirAll(e.data, 0o755)
	lf = e.mount("-config", cfgPath)
	if lf.log.count("restored databases before mounting") != 1 {
		t.Fatalf("no restore before mounting:\n%s", lf.log)
	}
	if k := seqRows(t, e.path("sub/other.db")); k != 50 {
		t.Fatalf("sub/other.db restored with %d rows", k)
	}
	got, _ := os.ReadFile(filepath.Join(e.data, "app.db"))
	if !bytes.Equal(got, want) {
		t.Fatal("app.db restored before mounting differs from the database that was lost")
	}
	seqWrite(t, e.path("app.db"), 51, 80)
	checkpointTruncate(t, e.path("app.db"))

	// A restore into the directory the running mount serves would be
	// overwritten by its next checkpoint: refused, the database untouched.
	before, _ := os.ReadFile(filepath.Join(e.data, "app.db"))
	code, log := runLfuse(t, "restore", "-force", "-data", e.data, "-replica", "file://"+repl)
	if code == 0 || !strings.Contains(lastLine(log), "served by a running lfuse mount") {
		t.Fatalf("restore -force under a running mount: exit %d\n%s", code, log)
	}
	if after, _ := os.ReadFile(filepath.Join(e.data, "app.db")); !bytes.Equal(after, before) {
		t.Fatal("a refused restore changed the database")
	}
	lf.stop()
	// The restored database continues the replica's history: once, every
	// start after a restore uploaded each database again in full.
	if n := snapshots(); n != snapsBefore || strings.Contains(lf.log.String(), "snapshot uploaded") {
		t.Fatalf("%d snapshots after the restore and mount, %d before:\n%s", n, snapsBefore, lf.log)
	}

	// Into a directory that already holds one of the databases: refused
	// before any is written. (Found by an adversarial run: the databases
	// listed before it were restored, then the restore stopped.)
	partial := filepath.Join(e.root, "partial")
	os.MkdirAll(filepath.Join(partial, "sub"), 0o755)
	os.WriteFile(filepath.Join(partial, "sub", "other.db"), []byte("kept"), 0o644)
	code, log = runLfuse(t, "restore", "-data", partial, "-replica", "file://"+repl)
	if code == 0 || !strings.Contains(lastLine(log), "sub/other.db already in") {
		t.Fatalf("restore -data over an existing database: exit %d\n%s", code, log)
	}
	if _, err := os.Stat(filepath.Join(partial, "app.db")); err == nil {
		t.Fatal("a refused restore -data wrote app.db")
	}

	restoreLatest(t, e, repl, liveBytes(t, e))
	if k := seqRows(t, filepath.Join(e.data, "app.db")); k != 80 {
		t.Fatalf("%d rows after restore, mount and more writes", k)
	}
}

// A replica that fell behind (down while the mount ran) and then the
// machine is lost: restore-if-missing brings back the newest state any
// replica holds, whichever replica the config names first, and the mount
// then brings the one behind up to date. Taking the first replica with a
// backup, it restored 10 of 40 rows without an error.
func TestMountRestoresFromTheNewestReplica(t *testing.T) {
	e := newEnv(t)
	behind, ahead := filepath.Join(e.root, "behind"), filepath.Join(e.root, "ahead")
	cfgPath := filepath.Join(e.root, "lfuse.toml")
	config := func(urls ...string) {
		cfg := "restore-if-missing = true\n"
		for _, u := range urls {
			cfg += fmt.Sprintf("[[replicas]]\nurl = %q\nsync-interval = \"50ms\"\n", "file://"+u)
		}
		if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	config(ahead)
	lf := e.mount("-config", cfgPath)
	createSeq(t, e.path("app.db"))
	seqWrite(t, e.path("app.db"), 1, 10)
	lf.stop()
	if out, err := exec.Command("cp", "-a", ahead, behind).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v\n%s", err, out)
	}
	lf = e.mount("-config", cfgPath)
	seqWrite(t, e.path("app.db"), 11, 40)
	checkpointTruncate(t, e.path("app.db"))
	lf.stop()
	want := liveBytes(t, e)

	// The machine is lost; the replica behind comes first in the config.
	os.RemoveAll(e.data)
	os.MkdirAll(e.data, 0o755)
	config(behind, ahead)
	lf = e.mount("-config", cfgPath)
	if k := seqRows(t, e.path("app.db")); k != 40 {
		t.Fatalf("restored with %d rows, want 40:\n%s", k, lf.log)
	}
	if lf.log.count("replica is behind another") != 1 {
		t.Fatalf("no word of the replica behind:\n%s", lf.log)
	}
	if got, _ := os.ReadFile(filepath.Join(e.data, "app.db")); !bytes.Equal(got, want) {
		t.Fatal("the restored database differs from the one lost")
	}
	lf.stop()
	restoreLatest(t, e, behind, want)
}

// restore -data brings back many databases at once (several at a time);
// each is the database that was lost, and one that cannot be restored
// fails the command, naming it.
func TestRestoreManyDatabases(t *testing.T) {
	e := newEnv(t)
	cfgPath, repl := e.replicaConfig("")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf("[[replicas]]\nurl = %q\nsync-interval = \"50ms\"\n", "file://"+repl)), 0o644)
	lf := e.mount("-config", cfgPath)
	var rels []string
	for i := range 12 {
		rel := fmt.Sprintf("tenant-%d/db-%d.db", i%3, i)
		os.MkdirAll(e.path(filepath.Dir(rel)), 0o755)
		createSeq(t, e.path(rel))
		seqWrite(t, e.path(rel), 1, 5+i)
		checkpointTruncate(t, e.path(rel))
		rels = append(rels, rel)
	}
	lf.stop()

	out := filepath.Join(e.root, "restored")
	code, log := runLfuse(t, "restore", "-data", out, "-replica", "file://"+repl)
	if code != 0 {
		t.Fatalf("restore -data: exit %d\n%s", code, log)
	}
	if n := strings.Count(log, `msg=restored `); n != len(rels) {
		t.Fatalf("%d databases restored, want %d:\n%s", n, len(rels), log)
	}
	for _, rel := range rels {
		want, _ := os.ReadFile(filepath.Join(e.data, filepath.FromSlash(rel)))
		got, err := os.ReadFile(filepath.Join(out, filepath.FromSlash(rel)))
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s restored differs from the live database (%v)", rel, err)
		}
	}

	snaps, _ := filepath.Glob(filepath.Join(repl, "tenant-1", "db-7.db", "ltx", "9", "*.ltx"))
	if len(snaps) == 0 {
		t.Fatal("no snapshot of tenant-1/db-7.db")
	}
	b, _ := os.ReadFile(snaps[0])
	b[len(b)/2] ^= 0x55
	os.WriteFile(snaps[0], b, 0o644)
	code, log = runLfuse(t, "restore", "-data", filepath.Join(e.root, "again"), "-replica", "file://"+repl)
	if code == 0 || !strings.Contains(lastLine(log), "tenant-1/db-7.db: ") || !strings.Contains(lastLine(log), filepath.Base(snaps[0])) {
		t.Fatalf("restore -data with a corrupt snapshot: exit %d\n%s", code, log)
	}
	if _, err := os.Stat(filepath.Join(e.root, "again", "tenant-1", "db-7.db")); err == nil {
		t.Fatal("the database with a corrupt snapshot was written")
	}
}
