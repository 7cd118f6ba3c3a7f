// Package integration tests lfuse end to end: the real binary mounts a real
// FUSE filesystem, real SQLite clients (go-sqlite3 in separate processes and
// the sqlite3 CLI) use it, and the captured history is checked against the
// databases they leave behind.
package integration

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lfuse/lfuse/replicate"
	_ "github.com/mattn/go-sqlite3"
)

var (
	// lfuseBin is the lfuse under test: race-enabled with LFUSE_RACE=1.
	lfuseBin string
	// lfusePlainBin is always a plain build; see TestConcurrentProcesses.
	lfusePlainBin string
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(workerEnv); mode != "" {
		os.Exit(runWorker(mode))
	}
	dir, err := os.MkdirTemp("", "lfuse-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	build := func(out string, race bool) {
		args := []string{"build", "-o", out}
		if race {
			args = append(args, "-race")
		}
		cmd := exec.Command("go", append(args, "../cmd/lfuse")...)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "build lfuse:", err)
			os.Exit(1)
		}
	}
	lfuseBin, lfusePlainBin = filepath.Join(dir, "lfuse"), filepath.Join(dir, "lfuse")
	build(lfuseBin, false)
	if os.Getenv("LFUSE_RACE") == "1" {
		// The daemon under test runs with the race detector.
		lfuseBin = filepath.Join(dir, "lfuse-race")
		build(lfuseBin, true)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// requireFUSE skips a test that needs to mount unless this machine can;
// with LFUSE_REQUIRE_FUSE=1 (set by CI) it fails instead.
func requireFUSE(t testing.TB) {
	t.Helper()
	why := ""
	if os.Geteuid() != 0 {
		why = "not root"
	} else if _, err := os.Stat("/dev/fuse"); err != nil {
		why = "no /dev/fuse"
	}
	if why == "" {
		return
	}
	if os.Getenv("LFUSE_REQUIRE_FUSE") == "1" {
		t.Fatalf("integration tests need root and /dev/fuse: %s", why)
	}
	t.Skipf("integration tests need root and /dev/fuse (%s); CI runs them with LFUSE_REQUIRE_FUSE=1", why)
}

// env is a data directory and a mount point for one test.
type env struct {
	t     *testing.T
	root  string
	data  string
	mnt   string
	state string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	requireFUSE(t)
	root := t.TempDir()
	e := &env{t: t, root: root, data: filepath.Join(root, "data"), mnt: filepath.Join(root, "mnt")}
	e.state = filepath.Join(e.data, ".lfuse")
	for _, d := range []string{e.data, e.mnt} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return e
}

func (e *env) path(rel string) string { return filepath.Join(e.mnt, rel) }

// lfuse is one running "lfuse mount" process.
type lfuse struct {
	t      testing.TB
	cmd    *exec.Cmd
	log    *lineLog
	done   chan struct{}
	err    error
	mnt    string
	killed bool
}

// mount starts lfuse on e and waits for it to report the mount ready.
func (e *env) mount(args ...string) *lfuse {
	e.t.Helper()
	return e.mountWith(lfuseBin, args...)
}

// mountWith is mount with a given lfuse binary.
func (e *env) mountWith(bin string, args ...string) *lfuse {
	e.t.Helper()
	full := append([]string{"mount", "-data", e.data, "-log-level", "debug"}, args...)
	full = append(full, e.mnt)
	p := startBin(e.t, bin, full...)
	p.mnt = e.mnt
	if err := p.log.wait("mount ready", 60*time.Second, p.done); err != nil {
		e.t.Fatalf("lfuse did not mount: %v\n%s", err, p.log)
	}
	e.t.Cleanup(func() { p.cleanup() })
	return p
}

func startLfuse(t testing.TB, args ...string) *lfuse {
	t.Helper()
	return startBin(t, lfuseBin, args...)
}

func startBin(t testing.TB, bin string, args ...string) *lfuse {
	t.Helper()
	return startBinEnv(t, nil, bin, args...)
}

// startBinEnv is startBin with variables added to the environment.
func startBinEnv(t testing.TB, env []string, bin string, args ...string) *lfuse {
	t.Helper()
	p := &lfuse{t: t, log: newLineLog(), done: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	if env != nil {
		p.cmd.Env = append(os.Environ(), env...)
	}
	p.cmd.Stdout = p.log
	p.cmd.Stderr = p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	return p
}

// runLfuse runs lfuse to completion and returns its exit code and output.
func runLfuse(t testing.TB, args ...string) (int, string) {
	t.Helper()
	return runLfuseEnv(t, nil, args...)
}

// runLfuseEnv is runLfuse with variables added to the environment.
func runLfuseEnv(t testing.TB, env []string, args ...string) (int, string) {
	t.Helper()
	return runBinEnv(t, env, lfuseBin, args...)
}

// runBinEnv is runLfuseEnv with a given binary.
func runBinEnv(t testing.TB, env []string, bin string, args ...string) (int, string) {
	t.Helper()
	p := startBinEnv(t, env, bin, args...)
	select {
	case <-p.done:
	case <-time.After(60 * time.Second):
		p.cmd.Process.Signal(syscall.SIGQUIT) // its goroutines, into the log
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
			p.cmd.Process.Kill()
			<-p.done
		}
		t.Fatalf("lfuse %v did not exit\n%s", args, p.log.String())
	}
	code := 0
	var ee *exec.ExitError
	if errors.As(p.err, &ee) {
		code = ee.ExitCode()
	}
	return code, p.log.String()
}

// stop sends SIGTERM and waits for a clean exit.
func (p *lfuse) stop() {
	p.t.Helper()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(60 * time.Second):
		p.cmd.Process.Kill()
		p.t.Fatalf("lfuse did not stop on SIGTERM\n%s", p.log)
	}
	if p.err != nil {
		p.t.Fatalf("lfuse exited with %v\n%s", p.err, p.log)
	}
}

// kill ends lfuse with SIGKILL, leaving a dead mount behind.
func (p *lfuse) kill() {
	p.killed = true
	p.cmd.Process.Kill()
	<-p.done
}

func (p *lfuse) cleanup() {
	select {
	case <-p.done:
	default:
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(30 * time.Second):
			p.cmd.Process.Kill()
			<-p.done
		}
	}
	// A killed lfuse leaves a dead mount; detach it so the directory can
	// be removed.
	if p.mnt != "" {
		syscall.Unmount(p.mnt, syscall.MNT_DETACH)
	}
	if p.t.Failed() {
		p.t.Logf("lfuse output:\n%s", p.log)
	}
}

// lineLog collects a process's output and lets a test wait for a line.
type lineLog struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	lines []string
	part  string
	cond  *sync.Cond
}

func newLineLog() *lineLog {
	l := &lineLog{}
	l.cond = sync.NewCond(&l.mu)
	return l
}

func (l *lineLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	s := l.part + string(p)
	parts := strings.Split(s, "\n")
	l.lines = append(l.lines, parts[:len(parts)-1]...)
	l.part = parts[len(parts)-1]
	l.cond.Broadcast()
	return len(p), nil
}

func (l *lineLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// count returns how many lines contain substr.
func (l *lineLog) count(substr string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, line := range l.lines {
		if strings.Contains(line, substr) {
			n++
		}
	}
	return n
}

// wait blocks until a line containing substr is written, the process ends
// (done closes), or the timeout passes.
func (l *lineLog) wait(substr string, timeout time.Duration, done <-chan struct{}) error {
	return l.waitCount(substr, 1, timeout, done)
}

// waitCount blocks until n lines contain substr, the process ends, or the
// timeout passes.
func (l *lineLog) waitCount(substr string, n int, timeout time.Duration, done <-chan struct{}) error {
	deadline := time.Now().Add(timeout)
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-done:
		case <-time.After(timeout):
		case <-stop:
			return
		}
		l.mu.Lock()
		l.cond.Broadcast()
		l.mu.Unlock()
	}()
	l.mu.Lock()
	defer l.mu.Unlock()
	for {
		seen := 0
		for _, line := range l.lines {
			if strings.Contains(line, substr) {
				seen++
			}
		}
		if seen >= n {
			return nil
		}
		select {
		case <-done:
			return fmt.Errorf("process exited after %d of %d lines with %q", seen, n, substr)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of %d lines with %q within %v", seen, n, substr, timeout)
		}
		l.cond.Wait()
	}
}

// openDB opens a database through go-sqlite3 in this process.
func openDB(t testing.TB, path string, params ...string) *sql.DB {
	t.Helper()
	dsn := path + "?_busy_timeout=10000&_journal_mode=WAL&_txlock=immediate"
	for _, p := range params {
		dsn += "&" + p
	}
	db, err := sql.Open("sqlite3", dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func mustExec(t testing.TB, db *sql.DB, q string, args ...any) {
	t.Helper()
	if _, err := db.Exec(q, args...); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
}

// sqliteCLI runs the sqlite3 command-line shell on a database with script on
// its standard input.
func sqliteCLI(t testing.TB, path, script string) string {
	t.Helper()
	cmd := exec.Command("sqlite3", "-bail", path)
	cmd.Stdin = strings.NewReader(".timeout 10000\n" + script)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("sqlite3 %s: %v\n%s", path, err, out)
	}
	return strings.TrimSpace(string(out))
}

func integrityCheck(t testing.TB, path string) {
	t.Helper()
	if got := sqliteCLI(t, path, "PRAGMA integrity_check;"); got != "ok" {
		t.Fatalf("integrity_check of %s: %s", path, got)
	}
}

// replayLog rebuilds a database from lfuse's local log alone.
func replayLog(t testing.TB, state, rel string) ([]byte, replicate.Record) {
	t.Helper()
	l, err := replicate.OpenLog(replicate.LogDir(state, rel))
	if err != nil {
		t.Fatalf("open log of %s: %v", rel, err)
	}
	defer l.Close()
	f, err := os.CreateTemp(t.TempDir(), "replay-*.db")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rec, err := l.Restore(f)
	if err != nil {
		t.Fatalf("replay log of %s: %v", rel, err)
	}
	b, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	return b, rec
}

// assertLogMatches stops nothing; it expects lfuse to have stopped cleanly
// after a TRUNCATE checkpoint, so the backing database file holds every
// commit, and compares it page for page with the replayed log.
func assertLogMatches(t testing.TB, e *env, rel string) replicate.Record {
	t.Helper()
	want, err := os.ReadFile(filepath.Join(e.data, rel))
	if err != nil {
		t.Fatal(err)
	}
	got, rec := replayLog(t, e.state, rel)
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: database rebuilt from the local log (%d bytes, TXID %s) differs from the live database (%d bytes)%s",
			rel, len(got), rec.TXID(), len(want), firstDiff(got, want))
	}
	return rec
}

func firstDiff(a, b []byte) string {
	for i := 0; i < min(len(a), len(b)); i++ {
		if a[i] != b[i] {
			return fmt.Sprintf("; first difference at byte %d (page %d of 4096)", i, i/4096+1)
		}
	}
	return ""
}

// checkpointTruncate copies every commit into the database file through the
// mount, so the backing file alone holds the database.
func checkpointTruncate(t testing.TB, path string) {
	t.Helper()
	out := sqliteCLI(t, path, "PRAGMA wal_checkpoint(TRUNCATE);")
	if !strings.HasPrefix(out, "0|") {
		t.Fatalf("checkpoint of %s: %s", path, out)
	}
}

// exitCode returns a finished worker's exit code.
func (w *workerProc) exitCode() int {
	var ee *exec.ExitError
	if errors.As(w.err, &ee) {
		return ee.ExitCode()
	}
	if w.err != nil {
		return -1
	}
	return 0
}

// worker processes: the test binary re-executed, so several real processes
// use one database through the mount.

const workerEnv = "LFUSE_TEST_WORKER"

type workerProc struct {
	cmd  *exec.Cmd
	out  *lineLog
	done chan struct{}
	err  error
}

func startWorker(t testing.TB, mode string, env ...string) *workerProc {
	t.Helper()
	w := &workerProc{done: make(chan struct{}), out: newLineLog()}
	w.cmd = exec.Command(os.Args[0], "-test.run=^$")
	w.cmd.Env = append(os.Environ(), append([]string{workerEnv + "=" + mode}, env...)...)
	w.cmd.Stdout = w.out
	w.cmd.Stderr = w.out
	if err := w.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { w.err = w.cmd.Wait(); close(w.done) }()
	t.Cleanup(func() {
		select {
		case <-w.done:
		default:
			w.cmd.Process.Kill()
			<-w.done
		}
	})
	return w
}

func (w *workerProc) wait(t testing.TB, timeout time.Duration) error {
	t.Helper()
	select {
	case <-w.done:
		return w.err
	case <-time.After(timeout):
		w.cmd.Process.Kill()
		<-w.done
		return fmt.Errorf("worker did not finish within %v:\n%s", timeout, w.out.String())
	}
}

// cliWorker runs the sqlite3 shell with a generated script as another
// process using the database.
func startCLI(t testing.TB, path, script string) *workerProc {
	t.Helper()
	w := &workerProc{done: make(chan struct{}), out: newLineLog()}
	w.cmd = exec.CommandContext(context.Background(), "sqlite3", "-bail", path)
	w.cmd.Stdin = strings.NewReader(".timeout 60000\n" + script)
	w.cmd.Stdout = w.out
	w.cmd.Stderr = w.out
	if err := w.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { w.err = w.cmd.Wait(); close(w.done) }()
	return w
}
