package integration

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// fullTmpfs mounts a 24 MB tmpfs as e's state directory and fills it to
// 1 MB from full with a file that can be removed to make room.
func fullTmpfs(t *testing.T, e *env) (state, filler string) {
	t.Helper()
	state = filepath.Join(e.root, "state")
	os.MkdirAll(state, 0o755)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", state).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { syscall.Unmount(state, syscall.MNT_DETACH) })
	filler = filepath.Join(state, "filler")
	if out, err := exec.Command("dd", "if=/dev/zero", "of="+filler, "bs=1M", "count=23").CombinedOutput(); err != nil {
		t.Fatalf("dd: %v %s", err, out)
	}
	e.state = state
	return state, filler
}

// A full state directory must neither fail nor block the application:
// lfuse logs it once, keeps the application running, and when space comes
// back it starts again from a snapshot so the log is whole once more.
func TestStateDirectoryFull(t *testing.T) {
	e := newEnv(t)
	state, filler := fullTmpfs(t, e)
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

// With the state directory full, what was captured before still reaches
// the replica: the upload is built elsewhere. (Found by an audit: the
// level-0 file was built in the full state directory, and 430 captured
// commits stayed on the machine until space came back; the stop gave up
// after its timeout.)
func TestStateFullStillShips(t *testing.T) {
	e := newEnv(t)
	state, filler := fullTmpfs(t, e)
	cfgPath, _ := e.replicaConfig("")
	lf := e.mount("-config", cfgPath, "-state", state)
	dbPath := e.path("full.db")
	sqliteCLI(t, dbPath, "PRAGMA journal_mode=WAL;\n"+bankSchema)
	w := startWorker(t, "bank-writer", "DB="+dbPath, "N=3000", "SEED=7", "NAME=w", "CKPT=100")
	if err := lf.log.wait("capture failed", 5*time.Minute, w.done); err != nil {
		t.Fatalf("the full state directory was not reported: %v\n%s", err, lf.log)
	}
	if err := w.wait(t, 5*time.Minute); err != nil {
		t.Fatalf("the application failed while the state directory was full: %v\n%s", err, w.out)
	}
	var rep struct {
		Databases []struct {
			TXID     string
			Replicas []struct{ TXID string }
		}
	}
	deadline := time.Now().Add(time.Minute)
	for {
		code, out := runLfuse(t, "status", "-state", state, "-json")
		if code != 0 {
			t.Fatalf("lfuse status exited %d:\n%s", code, out)
		}
		if err := json.Unmarshal([]byte(out), &rep); err != nil {
			t.Fatalf("lfuse status -json: %v\n%s", err, out)
		}
		if len(rep.Databases) == 1 && len(rep.Databases[0].Replicas) == 1 && rep.Databases[0].Replicas[0].TXID == rep.Databases[0].TXID {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("what was captured did not reach the replica while the state directory was full:\n%s\n%s", out, lf.log)
		}
		time.Sleep(100 * time.Millisecond) // polling lfuse's state: no event to wait for
	}
	os.Remove(filler)
	lf.stop()
}
