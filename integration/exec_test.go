package integration

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func exitStatus(t *testing.T, p *lfuse) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(2 * time.Minute):
		p.cmd.Process.Kill()
		t.Fatalf("lfuse did not exit\n%s", p.log)
	}
	var ee *exec.ExitError
	if errors.As(p.err, &ee) {
		return ee.ExitCode()
	}
	return 0
}

// lfuse -exec runs the application on the mount: its commits reach the
// replica before lfuse exits, the mount is gone, and lfuse exits with the
// application's status.
func TestExecRunsTheApp(t *testing.T) {
	e := newEnv(t)
	cfgPath, repl := e.replicaConfig("")
	db := e.path("app.db")
	script := filepath.Join(e.root, "app.sh")
	os.WriteFile(script, []byte(fmt.Sprintf(`#!/bin/sh
for fd in /proc/$$/fd/*; do [ "$(readlink "$fd")" = /dev/fuse ] && echo "app holds /dev/fuse as $fd"; done
ign=$(awk '/^SigIgn/ {print $2}' /proc/$$/status); [ $(( 0x$ign & 0x1000 )) -ne 0 ] && echo "app ignores SIGPIPE"
sqlite3 "$1" "PRAGMA journal_mode=WAL; CREATE TABLE seq(k INTEGER PRIMARY KEY, v BLOB); INSERT INTO seq(v) VALUES (X'%x'), (X'%x');" >/dev/null && echo app-done && exit 7
`, seqRow(1), seqRow(2))), 0o755)
	p := startLfuse(t, "mount", "-config", cfgPath, "-data", e.data, "-exec", script+" "+db, e.mnt)
	defer p.cleanup()
	if code := exitStatus(t, p); code != 7 {
		t.Fatalf("lfuse exited %d, want the application's 7:\n%s", code, p.log)
	}
	log := p.log.String()
	for _, want := range []string{"application started", "app-done", "every captured transaction is in every replica", "stopped"} {
		if !strings.Contains(log, want) {
			t.Fatalf("no %q in:\n%s", want, log)
		}
	}
	// The mount's connection is lfuse's alone: held by the application,
	// a killed lfuse left the mount hanging instead of failing.
	if strings.Contains(log, "app holds /dev/fuse") {
		t.Fatalf("the application inherited the FUSE connection:\n%s", log)
	}
	// lfuse survives a closed output; the application keeps SIGPIPE's
	// default (an ignored signal would stay ignored across exec).
	if strings.Contains(log, "app ignores SIGPIPE") {
		t.Fatalf("the application inherited an ignored SIGPIPE:\n%s", log)
	}
	if _, mounted := mountType(e.mnt); mounted {
		t.Fatalf("%s is still mounted", e.mnt)
	}
	out := filepath.Join(e.root, "restored.db")
	if code, log := runLfuse(t, "restore", "-o", out, "file://"+repl+"/app.db"); code != 0 {
		t.Fatalf("restore exited %d:\n%s", code, log)
	}
	if n := seqRows(t, out); n != 2 {
		t.Fatalf("the replica holds %d rows of the application's 2", n)
	}
}

// SIGTERM to lfuse goes to the application, which decides when to stop.
func TestExecForwardsSignals(t *testing.T) {
	e := newEnv(t)
	marker := filepath.Join(e.root, "ready")
	app := fmt.Sprintf(`sh -c 'trap "echo got-term; exit 3" TERM; trap "echo got-hup" HUP; touch %s; while :; do sleep 0.05; done'`, marker)
	p := startLfuse(t, "mount", "-data", e.data, "-exec", app, e.mnt)
	defer p.cleanup()
	for i := 0; ; i++ {
		if _, err := os.Stat(marker); err == nil {
			break
		}
		if i == 1000 {
			t.Fatalf("the application did not start:\n%s", p.log)
		}
		time.Sleep(10 * time.Millisecond) // polling a file the app creates: no event to wait for
	}
	// HUP is the application's (a reload, often), not a reason to stop.
	p.cmd.Process.Signal(syscall.SIGHUP)
	if err := p.log.wait("got-hup", time.Minute, p.done); err != nil {
		t.Fatalf("the application did not get SIGHUP: %v\n%s", err, p.log)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	if code := exitStatus(t, p); code != 3 {
		t.Fatalf("lfuse exited %d, want the application's 3:\n%s", code, p.log)
	}
	if !strings.Contains(p.log.String(), "got-term") {
		t.Fatalf("the application did not get SIGTERM:\n%s", p.log)
	}
}

// A signal while lfuse is starting stops it there. It was once seen only
// by the replica check, which took it for an unreachable replica: lfuse
// mounted and started the application anyway.
func TestExecNotStartedAfterSignalWhileStarting(t *testing.T) {
	e := newEnv(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0") // takes the replica check's connection, never answers
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		if c, err := ln.Accept(); err == nil {
			accepted <- c
		}
	}()
	marker := filepath.Join(e.root, "started")
	p := startBinEnv(t, []string{"AWS_ACCESS_KEY_ID=test", "AWS_SECRET_ACCESS_KEY=test", "AWS_REGION=us-east-1"}, lfuseBin,
		"mount", "-data", e.data, "-replica", "s3://bucket/x?endpoint=http://"+ln.Addr().String(), "-exec", "touch "+marker, e.mnt)
	defer p.cleanup()
	select {
	case c := <-accepted:
		defer c.Close()
	case <-p.done:
		t.Fatalf("lfuse exited before checking the replica:\n%s", p.log)
	case <-time.After(time.Minute):
		t.Fatalf("the replica check never connected:\n%s", p.log)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	if code := exitStatus(t, p); code == 0 || !strings.Contains(p.log.String(), "stopped by a signal before the mount was ready") {
		t.Fatalf("lfuse exited %d:\n%s", code, p.log)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("the application was started after the signal")
	}
	if _, mounted := mountType(e.mnt); mounted {
		t.Fatalf("%s is still mounted", e.mnt)
	}
}

// If the mount fails, the application never starts.
func TestExecNotStartedWhenMountFails(t *testing.T) {
	e := newEnv(t)
	marker := filepath.Join(e.root, "started")
	code, log := runLfuse(t, "mount", "-data", filepath.Join(e.root, "no-such-dir"), "-exec", "touch "+marker, e.mnt)
	if code == 0 {
		t.Fatalf("mount of a missing data directory exited 0:\n%s", log)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Fatalf("the application ran although the mount failed:\n%s", log)
	}
}

// The container entrypoint of examples/: lfuse mount -config with
// restore-if-missing and exec, settings from the environment. A first start
// on an empty volume runs the app, which writes; a start on a new, empty
// volume (the machine was lost) restores before the app starts, and the app
// finds its data.
func TestContainerEntrypoint(t *testing.T) {
	e := newEnv(t)
	repl := filepath.Join(e.root, "replica")
	cfg := filepath.Join(e.root, "lfuse.toml")
	os.WriteFile(cfg, []byte(`mount-dir = "${APP_MNT}"
data-dir = "${APP_VOLUME}"
restore-if-missing = true
exec = "${APP}"
[[replicas]]
url = "file://${APP_REPLICA}"
`), 0o600)
	write := filepath.Join(e.root, "write.sh")
	os.WriteFile(write, []byte(fmt.Sprintf(`#!/bin/sh
sqlite3 "$APP_MNT/app.db" "PRAGMA journal_mode=WAL; CREATE TABLE seq(k INTEGER PRIMARY KEY, v BLOB); INSERT INTO seq(v) VALUES (X'%x'), (X'%x'), (X'%x');" >/dev/null
`, seqRow(1), seqRow(2), seqRow(3))), 0o755)
	count := filepath.Join(e.root, "count")
	read := filepath.Join(e.root, "read.sh")
	os.WriteFile(read, []byte(`#!/bin/sh
sqlite3 "$APP_MNT/app.db" "SELECT count(*) FROM seq" > "$APP_COUNT"
`), 0o755)
	run := func(volume, app string) string {
		t.Helper()
		os.MkdirAll(volume, 0o755)
		p := startBinEnv(t, []string{"APP_MNT=" + e.mnt, "APP_VOLUME=" + volume, "APP=" + app, "APP_REPLICA=" + repl, "APP_COUNT=" + count},
			lfuseBin, "mount", "-config", cfg)
		defer p.cleanup()
		if code := exitStatus(t, p); code != 0 {
			t.Fatalf("the entrypoint exited %d:\n%s", code, p.log)
		}
		return p.log.String()
	}
	run(filepath.Join(e.root, "volume1"), write)
	log := run(filepath.Join(e.root, "volume2"), read)
	if !strings.Contains(log, "restored databases before mounting") {
		t.Fatalf("the new volume was not restored:\n%s", log)
	}
	b, _ := os.ReadFile(count)
	if strings.TrimSpace(string(b)) != "3" {
		t.Fatalf("the app found %q rows on the new volume, want 3:\n%s", b, log)
	}
	seqRows(t, filepath.Join(e.root, "volume2", "app.db"))
}

// As a container's PID 1 (here: of a new PID namespace), lfuse would
// inherit the processes the application leaves behind; they are waited
// for, as an init would, and signals and the application's status still
// pass through. The application checks from the host's /proc: each orphan
// notes its PID and exits, and once all of them are gone from /proc
// (waited for) the application sends SIGTERM to PID 1, lfuse, which
// passes it back to the application: exit 6. It exits 9 if the orphans
// stay as zombies, 8 if the signal never comes.
func TestExecAsPID1WaitsForOrphans(t *testing.T) {
	if out, err := exec.Command("unshare", "-p", "-f", "true").CombinedOutput(); err != nil {
		t.Skipf("cannot make a PID namespace here: %v %s", err, out)
	}
	e := newEnv(t)
	pids := filepath.Join(e.root, "pids")
	script := filepath.Join(e.root, "app.sh")
	// read from /proc/self in a redirection: the shell opens it itself,
	// so it names the shell, by its PID in the host's /proc.
	os.WriteFile(script, []byte(`#!/bin/sh
for i in 1 2 3; do (sh -c 'read -r pid rest < /proc/self/stat; echo $pid >> "$0"' "$1" &); done
for try in $(seq 300); do
	set -- $(cat "$1" 2>/dev/null)
	if [ $# -eq 3 ] && [ ! -e /proc/$1 ] && [ ! -e /proc/$2 ] && [ ! -e /proc/$3 ]; then
		trap 'exit 6' TERM
		kill -TERM 1
		sleep 30 & wait $!
		exit 8
	fi
	set -- "`+pids+`"
	sleep 0.1
done
exit 9
`), 0o755)
	code, log := runBinEnv(t, nil, "unshare", "-p", "-f", lfuseBin, "mount", "-data", e.data, "-exec", script+" "+pids, e.mnt)
	if code != 6 {
		b, _ := os.ReadFile(pids)
		t.Fatalf("exit %d, want the application's 6 (9: orphans %q left as zombies; 8: SIGTERM not passed on)\n%s", code, strings.Fields(string(b)), log)
	}
}

// A process the application leaves behind with a file open in the mount
// gets SIGTERM once the application has exited, as a container's init
// would pass it on; lfuse then ships and exits with the application's
// status. Before, it was never told, and lfuse waited for it until the
// container runtime killed everything (found by a review).
func TestExecSignalsWhatTheAppLeftBehind(t *testing.T) {
	e := newEnv(t)
	ready, out := filepath.Join(e.root, "ready"), filepath.Join(e.root, "leftover.out")
	script := filepath.Join(e.root, "app.sh")
	os.WriteFile(script, []byte(`#!/bin/sh
held="$1"; ready="$2"; out="$3"
sh -c 'exec 3>>"$0"; trap "echo got-term >> \"$2\"; exit 0" TERM; echo $$ > "$1"; while :; do sleep 0.05; done' "$held" "$ready" "$out" >/dev/null 2>&1 &
while [ ! -s "$ready" ]; do sleep 0.05; done
exit 5
`), 0o755)
	t.Cleanup(func() { // if it was never told
		if b, err := os.ReadFile(ready); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	// A process of another mount namespace (a container's) with a file
	// open at the same path on a filesystem of its own is not the
	// application's: it was signalled too when holders were found by path.
	other, otherReady := filepath.Join(e.root, "other.out"), filepath.Join(e.root, "other.ready")
	stranger := exec.Command("unshare", "-m", "sh", "-c", `mount -t tmpfs none "$0" && exec 3>"$0/mine" && trap "echo got-term >> \"$1\"; exit 0" TERM && echo $$ > "$2" && while :; do sleep 0.05; done`, e.mnt, other, otherReady)
	if err := stranger.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stranger.Process.Kill(); stranger.Wait() }()
	for i := 0; ; i++ {
		if b, _ := os.ReadFile(otherReady); len(b) > 0 {
			break
		}
		if i == 500 {
			t.Skip("cannot hold a file in another mount namespace here")
		}
		time.Sleep(10 * time.Millisecond) // polling a file it creates: no event to wait for
	}

	p := startLfuse(t, "mount", "-data", e.data, "-exec", script+" "+e.path("held")+" "+ready+" "+out, e.mnt)
	defer p.cleanup()
	if code := exitStatus(t, p); code != 5 {
		t.Fatalf("lfuse exited %d, want the application's 5:\n%s", code, p.log)
	}
	got, _ := os.ReadFile(out)
	if !strings.Contains(p.log.String(), "passing the signal to the processes the application left behind") || string(got) != "got-term\n" {
		t.Fatalf("the leftover process wrote %q:\n%s", got, p.log)
	}
	if b, _ := os.ReadFile(other); len(b) > 0 {
		t.Fatalf("a process of another mount namespace was signalled:\n%s", p.log)
	}
}
