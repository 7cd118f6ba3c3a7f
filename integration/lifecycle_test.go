package integration

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// kill -9 of lfuse while applications write: they see I/O errors, never a
// corrupt database; a new lfuse refuses to mount while they still hold files
// in the dead mount, then mounts, proves continuity (or re-snapshots) and
// carries on so that the log still rebuilds the database exactly.
func TestKillLfuseWhileWriting(t *testing.T) {
	for _, mode := range []string{"on", "off"} {
		t.Run("passthrough="+mode, func(t *testing.T) {
			e := newEnv(t)
			lf := e.mount("-passthrough", mode)
			dbPath := e.path("bank.db")
			sqliteCLI(t, dbPath, "PRAGMA journal_mode=WAL;\n"+bankSchema)

			var writers []*workerProc
			for i := 0; i < 2; i++ {
				writers = append(writers, startWorker(t, "bank-writer", "DB="+dbPath, "N=1000000",
					fmt.Sprintf("SEED=%d", i+1), fmt.Sprintf("NAME=go%d", i), "CKPT=200"))
			}
			if err := writers[0].out.wait("committed 1000", 5*time.Minute, writers[0].done); err != nil {
				t.Fatalf("writer made no progress: %v\n%s", err, writers[0].out)
			}
			// A process that keeps a file open in the mount, to check the
			// refusal below.
			holder := exec.Command("sleep", "3600")
			f, err := os.Open(dbPath)
			if err != nil {
				t.Fatal(err)
			}
			holder.ExtraFiles = []*os.File{f}
			if err := holder.Start(); err != nil {
				t.Fatal(err)
			}
			f.Close()
			t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })

			lf.kill()
			for i, w := range writers {
				w.wait(t, time.Minute)
				switch w.exitCode() {
				case 2: // an I/O error: what an application must see
				case 3:
					t.Fatalf("writer %d saw a corrupt database after lfuse was killed:\n%s", i, w.out)
				default:
					t.Fatalf("writer %d exited with %d after lfuse was killed:\n%s", i, w.exitCode(), w.out)
				}
			}

			code, out := runLfuse(t, "mount", "-data", e.data, e.mnt)
			if code == 0 || !strings.Contains(out, "still have files open") || !strings.Contains(out, fmt.Sprint(holder.Process.Pid)) {
				t.Fatalf("mount over a dead mount still in use: exit %d, %q", code, out)
			}
			holder.Process.Kill()
			holder.Wait()

			lf2 := e.mount("-passthrough", mode)
			if lf2.log.count("detached the dead mount") != 1 {
				t.Fatalf("expected the dead mount to be detached:\n%s", lf2.log)
			}
			verified := lf2.log.count("verified database against the local log")
			resnap := lf2.log.count("snapshot taken")
			if verified+resnap != 1 {
				t.Fatalf("expected continuity to be verified or a new snapshot, got %d and %d:\n%s", verified, resnap, lf2.log)
			}
			t.Logf("after the crash: continuity verified %d, new snapshots %d", verified, resnap)
			integrityCheck(t, dbPath)
			if got := sqliteCLI(t, dbPath, "SELECT SUM(balance) FROM accounts;"); got != fmt.Sprint(bankTotal) {
				t.Fatalf("total balance %s after the crash, want %d", got, bankTotal)
			}
			sqliteCLI(t, dbPath, cliTransfers("after", 200, 99))
			checkpointTruncate(t, dbPath)
			lf2.stop()
			assertLogMatches(t, e, "bank.db")
		})
	}
}

// A clean stop records where capture stands, so the next start trusts the
// files without reading them; anything else (here: the database changed
// while lfuse was not running) is verified and answered with a snapshot.
func TestRestartContinuity(t *testing.T) {
	e := newEnv(t)
	lf := e.mount()
	dbPath := e.path("app.db")
	sqliteCLI(t, dbPath, "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES(1);")
	lf.stop()

	lf = e.mount()
	if n := lf.log.count("snapshot taken") + lf.log.count("verified database"); n != 0 {
		t.Fatalf("a clean restart re-read or re-snapshotted the database:\n%s", lf.log)
	}
	sqliteCLI(t, dbPath, "INSERT INTO t VALUES(2);")
	lf.stop()

	// Changed behind lfuse's back (directly in the backing directory).
	sqliteCLI(t, filepath.Join(e.data, "app.db"), "INSERT INTO t VALUES(3);")
	lf = e.mount()
	if lf.log.count("needs a new snapshot") != 1 || lf.log.count("changed without lfuse seeing it") != 2 || lf.log.count("snapshot taken") != 1 {
		t.Fatalf("a database changed while lfuse was stopped was not detected and re-snapshotted:\n%s", lf.log)
	}
	checkpointTruncate(t, dbPath)
	lf.stop()
	assertLogMatches(t, e, "app.db")
}

// SIGINT, SIGTERM, fusermount3 -u and umount all end lfuse cleanly (exit 0,
// mount gone); a mount still in use is detached and lfuse waits for the
// last file to close.
func TestStopping(t *testing.T) {
	stoppers := map[string]func(e *env, lf *lfuse){
		"SIGINT":  func(e *env, lf *lfuse) { lf.cmd.Process.Signal(syscall.SIGINT) },
		"SIGTERM": func(e *env, lf *lfuse) { lf.cmd.Process.Signal(syscall.SIGTERM) },
		// A closed terminal or a supervisor's HUP once ended lfuse
		// without unmounting or shipping.
		"SIGHUP": func(e *env, lf *lfuse) { lf.cmd.Process.Signal(syscall.SIGHUP) },
		"fusermount3": func(e *env, lf *lfuse) {
			if out, err := exec.Command("fusermount3", "-u", e.mnt).CombinedOutput(); err != nil {
				e.t.Fatalf("fusermount3 -u: %v %s", err, out)
			}
		},
		"umount": func(e *env, lf *lfuse) {
			if out, err := exec.Command("umount", e.mnt).CombinedOutput(); err != nil {
				e.t.Fatalf("umount: %v %s", err, out)
			}
		},
	}
	for name, stop := range stoppers {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t)
			lf := e.mount()
			sqliteCLI(t, e.path("a.db"), "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES(1);")
			stop(e, lf)
			select {
			case <-lf.done:
			case <-time.After(time.Minute):
				t.Fatalf("lfuse did not exit after %s\n%s", name, lf.log)
			}
			if lf.err != nil {
				t.Fatalf("lfuse exited with %v after %s\n%s", lf.err, name, lf.log)
			}
			if _, mounted := mountType(e.mnt); mounted {
				t.Fatalf("still mounted after %s", name)
			}
		})
	}

	t.Run("busy", func(t *testing.T) {
		e := newEnv(t)
		lf := e.mount()
		if err := os.WriteFile(e.path("f"), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(e.path("f"))
		if err != nil {
			t.Fatal(err)
		}
		lf.cmd.Process.Signal(syscall.SIGTERM)
		if err := lf.log.wait("mount is busy", time.Minute, lf.done); err != nil {
			t.Fatalf("%v\n%s", err, lf.log)
		}
		// A second signal does not end it there (it once did, leaving
		// the processes in the mount a dead one, and nothing shipped).
		lf.cmd.Process.Signal(syscall.SIGTERM)
		if err := lf.log.wait("still waiting for the processes that hold files open", time.Minute, lf.done); err != nil {
			t.Fatalf("%v\n%s", err, lf.log)
		}
		select {
		case <-lf.done:
			t.Fatal("lfuse exited while a file was still open through it")
		default:
		}
		b := make([]byte, 1)
		if _, err := f.Read(b); err != nil || b[0] != 'x' {
			t.Fatalf("open file stopped working after the detach: %v", err)
		}
		f.Close()
		select {
		case <-lf.done:
		case <-time.After(time.Minute):
			t.Fatalf("lfuse did not exit after the last file closed\n%s", lf.log)
		}
		if lf.err != nil {
			t.Fatalf("lfuse exited with %v\n%s", lf.err, lf.log)
		}
	})
}

func mountType(dir string) (string, bool) {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[4] == dir {
			for i, x := range f {
				if x == "-" && i+1 < len(f) {
					return f[i+1], true
				}
			}
		}
	}
	return "", false
}

// Each refusal is one clear line on stderr and a non-zero exit.
func TestRefusals(t *testing.T) {
	requireFUSE(t)
	base := t.TempDir()
	mk := func(p string) string {
		if err := os.MkdirAll(p, 0o777); err != nil {
			t.Fatal(err)
		}
		return p
	}
	data := mk(filepath.Join(base, "data"))
	mnt := mk(filepath.Join(base, "mnt"))
	tmpfs := mk(filepath.Join(base, "tmpfs"))
	if out, err := exec.Command("mount", "-t", "tmpfs", "tmpfs", tmpfs).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { syscall.Unmount(tmpfs, syscall.MNT_DETACH) })
	badKey := filepath.Join(base, "bad.toml")
	os.WriteFile(badKey, []byte("mount-dir = \""+mnt+"\"\ndata-dir = \""+data+"\"\n\n[log]\nlevel = \"info\"\ncolour = \"yes\"\n"), 0o644)
	file := filepath.Join(base, "file")
	os.WriteFile(file, nil, 0o644)
	appDir := mk(filepath.Join(data, "appdir")) // the application's own directory, in the data directory
	os.WriteFile(filepath.Join(appDir, "notes.txt"), []byte("the application's"), 0o644)
	hasDB := mk(filepath.Join(base, "hasdb"))
	os.WriteFile(filepath.Join(hasDB, "app.db"), []byte("SQLite format 3\x00 and the rest"), 0o644)

	// For the permission case everything must be reachable by nobody.
	pub, err := os.MkdirTemp("", "lfuse-perm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(pub) })
	os.Chmod(pub, 0o755)
	pubData, pubMnt := mk(filepath.Join(pub, "data")), mk(filepath.Join(pub, "mnt"))
	bin := filepath.Join(pub, "lfuse")
	if b, err := os.ReadFile(lfuseBin); err != nil || os.WriteFile(bin, b, 0o755) != nil {
		t.Fatal("copy lfuse binary")
	}

	cases := []struct {
		name string
		cmd  []string
		want string
	}{
		{"mountpoint missing", []string{lfuseBin, "mount", "-data", data, filepath.Join(base, "nope")}, "does not exist: create it"},
		{"mountpoint is a file", []string{lfuseBin, "mount", "-data", data, file}, "is not a directory"},
		// Mounting over an application's directory would hide its
		// database, and the application would start an empty one.
		{"mountpoint holds a database", []string{lfuseBin, "mount", "-data", data, hasDB}, "holds the database app.db, which the mount would hide"},
		{"state dir holds other files", []string{lfuseBin, "mount", "-data", data, "-state", appDir, mnt}, "holds files that are not lfuse's (notes.txt)"},
		{"already a mount", []string{lfuseBin, "mount", "-data", data, tmpfs}, "already a mount (tmpfs)"},
		{"data dir missing", []string{lfuseBin, "mount", "-data", filepath.Join(base, "nodata"), mnt}, "data directory"},
		{"data dir is the mountpoint", []string{lfuseBin, "mount", "-data", mnt, mnt}, "is the mount point or inside it"},
		{"data dir inside the mountpoint", []string{lfuseBin, "mount", "-data", mk(filepath.Join(mnt, "inner")), mnt}, "is the mount point or inside it"},
		{"mountpoint inside the data dir", []string{lfuseBin, "mount", "-data", data, mk(filepath.Join(data, "m"))}, "inside the data directory"},
		{"state inside the mountpoint", []string{lfuseBin, "mount", "-data", data, "-state", filepath.Join(mnt, "s"), mnt}, "inside the mount point"},
		{"unknown config key", []string{lfuseBin, "mount", "-config", badKey}, `line 6: unknown key "log.colour"`},
		{"missing config", []string{lfuseBin, "mount", "-config", filepath.Join(base, "none.toml")}, "does not exist"},
		{"bad passthrough value", []string{lfuseBin, "mount", "-data", data, "-passthrough", "maybe", mnt}, `passthrough = "maybe"`},
		{"no /dev/fuse", []string{"unshare", "--mount", "--propagation", "private", "sh", "-c",
			`mount -t tmpfs none /dev && exec "$0" "$@"`, lfuseBin, "mount", "-data", data, mnt}, "/dev/fuse does not exist"},
		{"no permission", []string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", bin, "mount", "-data", pubData, "-state", mk(filepath.Join(pub, "state")), pubMnt}, "/dev/fuse: permission denied"},
	}
	os.Chmod(filepath.Join(pub, "state"), 0o777)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cmd := exec.Command(c.cmd[0], c.cmd[1:]...)
			out, err := cmd.CombinedOutput()
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			msg := strings.TrimSpace(string(out))
			if code == 0 {
				t.Fatalf("exit code 0, want a refusal; output %q", msg)
			}
			if !strings.Contains(msg, c.want) {
				t.Fatalf("output %q does not say %q", msg, c.want)
			}
			if strings.Count(msg, "\n") != 0 {
				t.Fatalf("refusal is not one line:\n%s", msg)
			}
			if _, mounted := mountType(mnt); mounted {
				syscall.Unmount(mnt, syscall.MNT_DETACH)
				t.Fatal("a refused mount left a mount behind")
			}
		})
	}

	t.Run("second lfuse on the same state", func(t *testing.T) {
		e := newEnv(t)
		lf := e.mount()
		other := mk(filepath.Join(e.root, "mnt2"))
		code, out := runLfuse(t, "mount", "-data", e.data, other)
		if code == 0 || !strings.Contains(out, fmt.Sprintf("another lfuse (pid %d)", lf.cmd.Process.Pid)) {
			t.Fatalf("exit %d, %q", code, out)
		}
	})

	// With a state directory of its own it would still serve the same
	// files to a second application, with locks neither mount sees (found
	// by an audit: two writers corrupted the database).
	t.Run("second lfuse on the same data", func(t *testing.T) {
		e := newEnv(t)
		e.mount()
		other := mk(filepath.Join(e.root, "mnt2"))
		code, out := runLfuse(t, "mount", "-data", e.data, "-state", filepath.Join(e.root, "state2"), other)
		if code == 0 || !strings.Contains(lastLine(out), "another lfuse is serving the data directory") {
			t.Fatalf("exit %d, %q", code, out)
		}
		if _, mounted := mountType(other); mounted {
			syscall.Unmount(other, syscall.MNT_DETACH)
			t.Fatal("a refused mount left a mount behind")
		}
	})
}

// A mount over the data directory of a running lfuse would hide its files,
// state and all, from it: refused.
func TestMountOverServedDataRefused(t *testing.T) {
	e := newEnv(t)
	e.mount()
	other := filepath.Join(e.root, "other")
	os.MkdirAll(other, 0o755)
	code, log := runLfuse(t, "mount", "-data", other, e.data)
	if code == 0 || !strings.Contains(lastLine(log), "is the data directory of a running lfuse") {
		t.Fatalf("mount over a served data directory: exit %d\n%s", code, log)
	}
}

// A reader of lfuse's output that goes away (lfuse mount ... | grep -m1
// ready) once killed lfuse with SIGPIPE at its next log line: a dead
// mount, nothing shipped. lfuse now goes on, and stops cleanly.
func TestOutputReaderGone(t *testing.T) {
	e := newEnv(t)
	cmd := exec.Command(lfuseBin, "mount", "-data", e.data, e.mnt)
	out, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		syscall.Unmount(e.mnt, syscall.MNT_DETACH)
	}()
	r := bufio.NewReader(out)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("lfuse said no \"mount ready\": %v", err)
		}
		if strings.Contains(line, "mount ready") {
			break
		}
	}
	out.Close() // the reader goes away
	// Log lines follow: a database is discovered and captured.
	sqliteCLI(t, e.path("a.db"), "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES(1);")
	sqliteCLI(t, e.path("a.db"), "INSERT INTO t VALUES(2);")
	select {
	case err := <-done:
		t.Fatalf("lfuse ended when its output's reader went: %v", err)
	default:
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("lfuse stopped with %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("lfuse did not stop")
	}
	if _, mounted := mountType(e.mnt); mounted {
		t.Fatal("still mounted")
	}
}

// A backup copied over a closed database through the mount (cp, in place)
// reaches the replica, and across a restart the next commits continue it:
// lfuse once recorded the copied file as matching its log at the stop, the
// next commit was captured onto the old content, and the restore exited 0
// with a malformed database.
func TestBackupCopiedOverClosedDatabase(t *testing.T) {
	for _, mode := range []string{"on", "off"} {
		t.Run("passthrough="+mode, func(t *testing.T) {
			e := newEnv(t)
			cfgPath, repl := e.replicaConfig("")
			lf := e.mount("-config", cfgPath, "-passthrough", mode)
			dbPath := e.path("app.db")
			sqliteCLI(t, dbPath, "PRAGMA journal_mode=WAL; CREATE TABLE t(x); WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i<2000) INSERT INTO t SELECT 'orig'||i FROM c;")
			// The original is in the log before the backup goes over it.
			if err := lf.log.wait(`msg="snapshot taken" db=app.db `, time.Minute, lf.done); err != nil {
				t.Fatalf("%v\n%s", err, lf.log)
			}
			backup := filepath.Join(e.root, "backup.db")
			sqliteCLI(t, backup, "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES('from backup');")
			if out, err := exec.Command("cp", backup, dbPath).CombinedOutput(); err != nil {
				t.Fatalf("cp: %v\n%s", err, out)
			}
			lf.stop()

			lf = e.mount("-config", cfgPath, "-passthrough", mode)
			sqliteCLI(t, dbPath, "INSERT INTO t VALUES('after restart');")
			checkpointTruncate(t, dbPath)
			lf.stop()

			out := filepath.Join(e.root, "restored.db")
			if code, log := runLfuse(t, "restore", "-o", out, "file://"+repl+"/app.db"); code != 0 {
				t.Fatalf("restore exited %d:\n%s", code, log)
			}
			integrityCheck(t, out)
			if got, want := sqliteCLI(t, out, "SELECT group_concat(x) FROM t;"), "from backup,after restart"; strings.TrimSpace(got) != want {
				t.Fatalf("restored %q, want %q", got, want)
			}
			assertLogMatches(t, e, "app.db")
		})
	}
}
