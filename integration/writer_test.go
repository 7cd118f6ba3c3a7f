package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A pod restored from the replica and mounted while the old one still runs
// (a rolling update): the new mount takes the replica over with a history
// above the old one's TXIDs, the old one's stop fails naming the takeover,
// and a restore gives the new mount's database. Before, the old mount's
// files replaced the new one's under the same names, a restore gave the old
// database, and both stops said every commit was in the replica.
func TestRestoredMountBesideTheOldOneTakesTheReplicaOver(t *testing.T) {
	old, nu := newEnv(t), newEnv(t)
	repl := filepath.Join(old.root, "replica")
	config := func(e *env) string {
		path := filepath.Join(e.root, "lfuse.toml")
		cfg := fmt.Sprintf("restore-if-missing = true\n[[replicas]]\nurl = %q\nsync-interval = \"50ms\"\n", "file://"+repl)
		if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
			t.Fatal(err)
		}
		return path
	}
	a := old.mount("-config", config(old))
	createSeq(t, old.path("app.db"))
	seqWrite(t, old.path("app.db"), 1, 10)
	if err := a.log.wait("uploaded", 10*time.Second, a.done); err != nil {
		t.Fatalf("nothing shipped: %v\n%s", err, a.log)
	}
	b := nu.mount("-config", config(nu))
	if b.log.count("did not stop cleanly") != 1 {
		t.Fatalf("the new mount did not start above the old one's history:\n%s", b.log)
	}
	// Both write on; the old one's commits outnumber the new one's, which
	// used to win it the replica.
	seqWrite(t, old.path("app.db"), 11, 60)
	seqWrite(t, nu.path("app.db"), 101, 105)
	checkpointTruncate(t, nu.path("app.db"))

	a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.done:
	case <-time.After(60 * time.Second):
		t.Fatalf("the old lfuse did not stop\n%s", a.log)
	}
	if a.err == nil || a.log.count("took this replica over") == 0 {
		t.Fatalf("the old lfuse stopped with %v, without naming the takeover:\n%s", a.err, a.log)
	}
	if a.log.count("every captured transaction is in every replica") != 0 {
		t.Fatalf("the old lfuse claimed its commits are in the replica:\n%s", a.log)
	}
	want := liveBytes(t, nu)
	b.stop()
	if b.log.count("took this replica over") != 0 {
		t.Fatalf("the new lfuse saw a takeover:\n%s", b.log)
	}
	restoreLatest(t, nu, repl, want)
	// The replica names the lfuse that writes it, for an operator who
	// wonders which of two that was.
	if code, out := runLfuse(t, "ltx", "file://"+repl+"/app.db"); code != 0 || !strings.Contains(out, fmt.Sprint("pid ", b.cmd.Process.Pid, ",")) {
		t.Fatalf("lfuse ltx exited %d without naming the writer (pid %d):\n%s", code, b.cmd.Process.Pid, out)
	}
}
