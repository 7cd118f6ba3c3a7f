package integration

import (
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// A full state directory must neither fail nor block the application:
// lfuse logs it once, keeps the application running, and when space comes
// back it starts again from a snapshot so the log is whole once more.
func TestStateDirectoryFull(t *testing.T) {
	e := newEnv(t)
	state := filepath.Join(e.root, "state")
	os.MkdirAll(state, 0o755)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", state).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { syscall.Unmount(state, syscall.MNT_DETACH) })
	filler := filepath.Join(state, "filler")
	if out, err := exec.Command("dd", "if=/dev/zero", "of="+filler, "bs=1M", "count=23").CombinedOutput(); err != nil {
		t.Fatalf("dd: %v %s", err, out)
	}
	e.state = state
	lf := e.mount("-state", state)
	dbPath := e.path("full.db")
	sqliteCLI(t, dbPath, "PRAGMA journal_mode=WAL;\n"+bankSchema)

	w := startWorker(t, "bank-writer", "DB="+dbPath, "N=3000", "SEED=7", "NAME=w", "CKPT=100")
	if err := lf.log.wait("capture failed", 5*time.Minute, w.done); err != nil {
		t.Fatalf("the full state directory was not reported: %v\n%s", err, lf.log)
	}
	if err := w.wait(t, 5*time.Minute); err != nil {
		t.Fatalf("the application failed while the state directory was full: %v\n%s", err, w.out)
	}
	if n := lf.log.count("capture failed; will retry"); n != 1 {
		t.Fatalf("the outage was reported %d times, want once:\n%s", n, lf.log)
	}

	os.Remove(filler)
	sqliteCLI(t, dbPath, cliTransfers("after", 50, 3))
	if err := lf.log.wait("capture recovered", 5*time.Minute, lf.done); err != nil {
		t.Fatalf("capture did not recover once space came back: %v\n%s", err, lf.log)
	}
	integrityCheck(t, dbPath)
	checkpointTruncate(t, dbPath)
	lf.stop()
	assertLogMatches(t, e, "full.db")
}
