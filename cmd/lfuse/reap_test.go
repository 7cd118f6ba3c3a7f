package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// As a container's PID 1, lfuse inherits the processes the application
// leaves behind and must wait for them, or they stay zombies; it must not
// take the application's own exit status. A subreaper inherits orphans as
// PID 1 does, so this test process stands in for it.
func TestReapOrphans(t *testing.T) {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Skipf("cannot become a subreaper: %v", err)
	}
	defer unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)

	// The application starts three processes in the background that note
	// their PIDs and exit, then waits for its stdin to close and exits
	// with 7.
	pids := filepath.Join(t.TempDir(), "pids")
	app := exec.Command("/bin/sh", "-c", `for i in 1 2 3; do (sh -c 'echo $$ >> "$0"' "$1" &); done; read x; exit 7`, "sh", pids)
	stdin, err := app.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := app.Start(); err != nil {
		t.Fatal(err)
	}
	stop := reapOrphans(app.Process.Pid)
	// A process waited for leaves /proc; a zombie stays there. No event
	// says either, so this polls.
	deadline := time.Now().Add(20 * time.Second)
	for {
		b, _ := os.ReadFile(pids)
		left := 0
		for _, pid := range strings.Fields(string(b)) {
			if _, err := os.Stat("/proc/" + pid); err == nil {
				left++
			}
		}
		if len(strings.Fields(string(b))) == 3 && left == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("of the orphans %q, %d not waited for", strings.Fields(string(b)), left)
		}
		time.Sleep(20 * time.Millisecond)
	}
	stdin.Close()
	err = app.Wait()
	stop()
	if code := app.ProcessState.ExitCode(); code != 7 {
		t.Fatalf("application exit status %d (%v), want 7: its status was taken", code, err)
	}
}
