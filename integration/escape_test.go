package integration

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// A user who owns a directory in the mount cannot make lfuse, which runs
// as root, act on a file outside it. The user swaps a directory of theirs
// with a symlink to a root-only directory (renameat2 RENAME_EXCHANGE, in a
// loop) while chmodding, truncating, creating and deleting a file under
// it. (Found by an adversarial run: go-fuse's loopback followed the
// symlink, and nobody chmodded, truncated, deleted and took ownership of
// root's file within a few dozen tries; natively nothing happened in a
// million.)
func TestSymlinkRaceStaysInside(t *testing.T) {
	e := newEnv(t)
	e.mount()
	victimDir := filepath.Join(e.root, "victim")
	victim := filepath.Join(victimDir, "f")
	secret := []byte("root's secret\n")
	if err := os.Mkdir(victimDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(victim, secret, 0o600); err != nil {
		t.Fatal(err)
	}
	// nobody must reach the mount, and run a copy of this test binary.
	for d := e.root; d != filepath.Dir(d) && d != os.TempDir(); d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
	bin := filepath.Join(e.root, "racer")
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	race := e.path("race")
	if err := os.Mkdir(race, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(race, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), workerEnv+"=symlink-racer", "DIR="+race, "TARGET="+victimDir, "N=20000")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("racer: %v\n%s", err, out)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(victim, &st); err != nil {
		t.Fatalf("the file outside the mount: %v", err)
	}
	got, _ := os.ReadFile(victim)
	if st.Mode&0o7777 != 0o600 || st.Uid != 0 || !bytes.Equal(got, secret) {
		t.Fatalf("the file outside the mount was changed: mode %o, owner %d, content %q", st.Mode&0o7777, st.Uid, got)
	}
	if m, _ := filepath.Glob(filepath.Join(victimDir, "*")); len(m) != 1 {
		t.Fatalf("files appeared outside the mount: %v", m)
	}
}

// runSymlinkRacer is the unprivileged user of TestSymlinkRaceStaysInside:
// one thread exchanges DIR/d (a directory) with DIR/l (a symlink to
// TARGET) while the other works on DIR/d/f and DIR/l/f, N rounds.
func runSymlinkRacer() int {
	dir, target := os.Getenv("DIR"), os.Getenv("TARGET")
	n, _ := strconv.Atoi(os.Getenv("N"))
	d, l := filepath.Join(dir, "d"), filepath.Join(dir, "l")
	if err := os.Mkdir(d, 0o755); err != nil {
		return fail(err)
	}
	if err := os.WriteFile(filepath.Join(d, "f"), nil, 0o600); err != nil {
		return fail(err)
	}
	if err := os.Symlink(target, l); err != nil {
		return fail(err)
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
				unix.Renameat2(unix.AT_FDCWD, d, unix.AT_FDCWD, l, unix.RENAME_EXCHANGE)
			}
		}
	}()
	for i := range n {
		for _, p := range []string{filepath.Join(d, "f"), filepath.Join(l, "f")} {
			switch i % 4 {
			case 0:
				syscall.Chmod(p, 0o606)
			case 1:
				syscall.Truncate(p, 0)
			case 2:
				if fd, err := syscall.Open(p, syscall.O_CREAT|syscall.O_WRONLY, 0o600); err == nil {
					syscall.Close(fd)
				}
			case 3:
				syscall.Unlink(p)
			}
		}
	}
	close(stop)
	<-done
	return 0
}
