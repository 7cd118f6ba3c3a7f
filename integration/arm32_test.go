package integration

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The 32-bit ARM release builds (made by scripts/build-arm32.sh, which works
// around a go-fuse build failure on those targets) mount, capture, ship and
// restore. They run under qemu-user, which passes the FUSE device and the
// mount to this kernel; the kernel refuses passthrough to an emulated
// daemon, so they run in cached mode.
func TestARM32UnderEmulation(t *testing.T) {
	requireFUSE(t)
	qemu, err := exec.LookPath("qemu-arm")
	if err != nil {
		if os.Getenv("LFUSE_REQUIRE_FUSE") == "1" {
			t.Fatal("qemu-arm is missing: scripts/deps.sh installs qemu-user")
		}
		t.Skip("qemu-arm is missing (apt-get install qemu-user)")
	}
	for _, arm := range []struct{ goarm, cpu string }{{"7", "cortex-a7"}, {"6", "arm1176"}} {
		t.Run("armv"+arm.goarm, func(t *testing.T) {
			bin := filepath.Join(t.TempDir(), "lfuse")
			if out, err := exec.Command("../scripts/build-arm32.sh", arm.goarm, bin).CombinedOutput(); err != nil {
				t.Fatalf("build-arm32.sh %s: %v\n%s", arm.goarm, err, out)
			}
			env := []string{"QEMU_CPU=" + arm.cpu}
			run := func(args ...string) string {
				t.Helper()
				code, out := runBinEnv(t, env, qemu, append([]string{bin}, args...)...)
				if code != 0 {
					t.Fatalf("lfuse %v: exit %d\n%s", args, code, out)
				}
				return out
			}
			if out := run("version"); !strings.HasPrefix(out, "lfuse ") {
				t.Fatalf("lfuse version: %q", out)
			}

			root := t.TempDir()
			data, mnt, repl := filepath.Join(root, "data"), filepath.Join(root, "mnt"), filepath.Join(root, "replica")
			for _, d := range []string{data, mnt} {
				if err := os.MkdirAll(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			p := startBinEnv(t, env, qemu, bin, "mount", "-data", data, "-replica", "file://"+repl, mnt)
			p.mnt = mnt
			t.Cleanup(p.cleanup)
			if err := p.log.wait("mount ready", time.Minute, p.done); err != nil {
				t.Fatalf("lfuse did not mount: %v\n%s", err, p.log)
			}
			db := filepath.Join(mnt, "app.db")
			sqliteCLI(t, db, "PRAGMA journal_mode=WAL;\nCREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);\n"+
				"WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < 500) INSERT INTO t(v) SELECT randomblob(1000) FROM s;\n")
			for i := 0; i < 20; i++ { // one process and one transaction each
				sqliteCLI(t, db, fmt.Sprintf("UPDATE t SET v = randomblob(%d) WHERE id %% 20 = %d;\nPRAGMA wal_checkpoint(PASSIVE);\n", 500+i, i))
			}
			integrityCheck(t, db)
			p.stop()
			if !strings.Contains(p.log.String(), "every captured transaction is in every replica") {
				t.Fatalf("lfuse did not report its final flush:\n%s", p.log)
			}

			out := filepath.Join(root, "restored.db")
			run("restore", "-o", out, "file://"+filepath.Join(repl, "app.db"))
			integrityCheck(t, out)
			live := filepath.Join(data, "app.db")
			sqliteCLI(t, live, "PRAGMA wal_checkpoint(TRUNCATE);")
			want, err := os.ReadFile(live)
			if err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(out)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("restored %d bytes, differing from the live database's %d", len(got), len(want))
			}
		})
	}
}
