package integration

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The mount must behave like the backing filesystem: the same sequence of
// operations, run once on a native directory and once through the mount
// (in each mode), must give the same results and the same errno.
//
// Extended attributes are off by default (they cost two round trips per
// write): then xattr calls fail with EOPNOTSUPP and everything else is the
// same; with -xattrs they behave as on disk too.
func TestFileOperationsMatchNative(t *testing.T) {
	for _, c := range []struct{ mode, xattrs string }{{"on", "-xattrs"}, {"off", "-xattrs"}, {"on", ""}, {"off", ""}} {
		t.Run("passthrough="+c.mode+c.xattrs, func(t *testing.T) {
			e := newEnv(t)
			args := []string{"-passthrough", c.mode}
			if c.xattrs != "" {
				args = append(args, c.xattrs)
			}
			e.mount(args...)
			native := filepath.Join(e.root, "native")
			if err := os.Mkdir(native, 0o755); err != nil {
				t.Fatal(err)
			}
			want := exerciseFS(t, native)
			if c.xattrs == "" {
				for i, step := range want {
					if strings.HasPrefix(step, "xattr ") {
						want[i] = step[:strings.LastIndex(step, ":")] + ": " + unix.ErrnoName(unix.EOPNOTSUPP)
					}
				}
			}
			got := exerciseFS(t, e.mnt)
			if !slices.Equal(got, want) {
				for i := 0; i < max(len(got), len(want)); i++ {
					g, w := "", ""
					if i < len(got) {
						g = got[i]
					}
					if i < len(want) {
						w = want[i]
					}
					if g != w {
						t.Errorf("step %d: mount %q, native %q", i, g, w)
					}
				}
				t.FailNow()
			}
		})
	}
}

// exerciseFS runs file operations in dir and returns what each one did.
func exerciseFS(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	note := func(step string, err error) {
		out = append(out, step+": "+errName(err))
	}
	p := func(name string) string { return filepath.Join(dir, name) }

	// Create, exclusive create, write, pwrite past the end, read back.
	f, err := os.OpenFile(p("a"), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o640)
	note("create", err)
	_, err = os.OpenFile(p("a"), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o640)
	note("create excl again", err)
	_, err = f.Write([]byte("hello"))
	note("write", err)
	_, err = f.WriteAt([]byte("world"), 100)
	note("pwrite beyond end", err)
	st, err := f.Stat()
	note(fmt.Sprintf("fstat size=%d mode=%v", st.Size(), st.Mode()), err)
	b := make([]byte, 200)
	n, err := f.ReadAt(b, 0)
	note(fmt.Sprintf("pread n=%d head=%q tail=%q", n, b[:5], b[100:n]), ignoreEOF(err))
	note("fsync", f.Sync())
	note("fdatasync", unix.Fdatasync(int(f.Fd())))
	note("ftruncate 50", f.Truncate(50))
	note("truncate path 10", os.Truncate(p("a"), 10))
	st, _ = os.Stat(p("a"))
	note(fmt.Sprintf("stat size=%d", st.Size()), nil)
	note("fallocate", unix.Fallocate(int(f.Fd()), 0, 0, 8192))
	st, _ = f.Stat()
	note(fmt.Sprintf("size after fallocate=%d", st.Size()), nil)
	f.Close()

	// O_APPEND.
	f, err = os.OpenFile(p("log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	note("open append", err)
	f.Write([]byte("one\n"))
	f.Write([]byte("two\n"))
	f.Close()
	data, err := os.ReadFile(p("log"))
	note(fmt.Sprintf("read appended %q", data), err)

	// Errors on missing things and on the wrong kind of thing.
	_, err = os.Open(p("missing"))
	note("open missing", err)
	note("unlink missing", os.Remove(p("missing")))
	note("mkdir", os.Mkdir(p("d"), 0o750))
	note("mkdir again", os.Mkdir(p("d"), 0o750))
	note("unlink dir", syscall.Unlink(p("d")))
	note("rmdir file", syscall.Rmdir(p("a")))
	os.WriteFile(p("d/inner"), []byte("x"), 0o644)
	note("rmdir non-empty", syscall.Rmdir(p("d")))
	note("rename dir into itself", os.Rename(p("d"), p("d/sub")))
	note("rename missing", os.Rename(p("missing"), p("x")))
	note("open dir for write", openErr(p("d"), os.O_WRONLY))
	note("open file as dir", openErr(p("a/x"), os.O_RDONLY))

	// Renames, over an existing file too; hard and symbolic links.
	note("rename", os.Rename(p("log"), p("log2")))
	os.WriteFile(p("victim"), []byte("old"), 0o644)
	note("rename over file", os.Rename(p("log2"), p("victim")))
	data, _ = os.ReadFile(p("victim"))
	note(fmt.Sprintf("renamed content %q", data), nil)
	renameat2 := func(a, b string, flags uint) error {
		return unix.Renameat2(unix.AT_FDCWD, p(a), unix.AT_FDCWD, p(b), flags)
	}
	note("rename noreplace", renameat2("a", "victim", unix.RENAME_NOREPLACE))
	note("exchange", renameat2("a", "victim", unix.RENAME_EXCHANGE))
	data, _ = os.ReadFile(p("a"))
	note(fmt.Sprintf("exchanged content %q", data), nil)
	note("exchange with missing", renameat2("a", "missing", unix.RENAME_EXCHANGE))
	note("exchange dir and file", renameat2("d", "a", unix.RENAME_EXCHANGE))
	note("exchange back", renameat2("a", "d", unix.RENAME_EXCHANGE))
	note("symlink", os.Symlink("victim", p("sl")))
	target, err := os.Readlink(p("sl"))
	note("readlink "+target, err)
	note("link", os.Link(p("victim"), p("hard")))
	st, _ = os.Stat(p("hard"))
	note(fmt.Sprintf("nlink=%d", st.Sys().(*syscall.Stat_t).Nlink), nil)
	note("nested mkdir", os.MkdirAll(p("x/y/z"), 0o755))
	note("nested write", os.WriteFile(p("x/y/z/deep"), []byte("deep"), 0o600))
	data, err = os.ReadFile(p("x/y/z/deep"))
	note(fmt.Sprintf("nested read %q", data), err)

	// Metadata: chmod, utimens, readdir, statfs.
	note("chmod", os.Chmod(p("victim"), 0o600))
	mt := time.Date(2020, 1, 2, 3, 4, 5, 600, time.UTC)
	note("utimens", os.Chtimes(p("victim"), mt, mt))
	st, _ = os.Stat(p("victim"))
	note(fmt.Sprintf("mode=%v mtime=%v", st.Mode(), st.ModTime().UTC()), nil)
	ents, err := os.ReadDir(dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name()+":"+e.Type().String())
	}
	note("readdir "+strings.Join(names, ","), err)
	var sfs unix.Statfs_t
	err = unix.Statfs(dir, &sfs)
	note(fmt.Sprintf("statfs bsize=%d namelen=%d", sfs.Bsize, sfs.Namelen), err)
	note("xattr set", unix.Setxattr(p("victim"), "user.lfuse", []byte("v"), 0))
	xb := make([]byte, 16)
	xn, err := unix.Getxattr(p("victim"), "user.lfuse", xb)
	if err == nil && string(xb[:xn]) != "v" {
		err = fmt.Errorf("got %q", xb[:xn])
	}
	note("xattr get", err)
	_, err = unix.Getxattr(p("victim"), "user.none", xb)
	note("xattr get missing", err)

	// Another user: the kernel's permission checks apply as on disk.
	os.WriteFile(p("secret"), []byte("s"), 0o600)
	os.Chmod(dir, 0o755)
	cmd := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", p("secret"))
	cerr := cmd.Run()
	note("cat 0600 file as nobody", exitErr(cerr))
	cmd = exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "touch", p("nobody-file"))
	note("create in root-owned dir as nobody", exitErr(cmd.Run()))
	// A file still open under one name, reopened under a name SQLite
	// gives its side files (found by an adversarial run: EIO).
	for _, suffix := range []string{"-journal", "-wal", "-shm"} {
		os.WriteFile(p("notes"), []byte("hello"), 0o644)
		held, err := os.Open(p("notes"))
		if err != nil {
			t.Fatal(err)
		}
		note("rename open file to *"+suffix, os.Rename(p("notes"), p("notes"+suffix)))
		data, err := os.ReadFile(p("notes" + suffix))
		note(fmt.Sprintf("reopen as *%s %q", suffix, data), err)
		held.Close()
		os.Remove(p("notes" + suffix))
	}
	// Mode 000 is a mode like any other (go-fuse shows it as 0644 unless
	// told not to; found by an adversarial run).
	os.WriteFile(p("nobits"), []byte("n"), 0o644)
	os.Chmod(p("nobits"), 0)
	os.MkdirAll(p("nobitsdir"), 0o755)
	os.WriteFile(p("nobitsdir/in"), []byte("i"), 0o644)
	os.Chmod(p("nobitsdir"), 0)
	for _, name := range []string{"nobits", "nobitsdir"} {
		st, err := os.Stat(p(name))
		if err == nil {
			note(fmt.Sprintf("stat %s mode=%v", name, st.Mode()), nil)
		} else {
			note("stat "+name, err)
		}
	}
	cmd = exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", p("nobits"))
	note("cat mode 000 file as nobody", exitErr(cmd.Run()))
	cmd = exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", p("nobitsdir/in"))
	note("cat in a mode 000 directory as nobody", exitErr(cmd.Run()))
	os.Chmod(p("nobitsdir"), 0o755)

	// Locks held by another process: POSIX record locks (as SQLite uses
	// them), open file description locks, and flock.
	os.WriteFile(p("lockfile"), make([]byte, 100), 0o644)
	holder := startLockHolder(t, p("lockfile"))
	lf, _ := os.OpenFile(p("lockfile"), os.O_RDWR, 0)
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 0, Len: 10}
	err = unix.FcntlFlock(lf.Fd(), unix.F_GETLK, &lk)
	note(fmt.Sprintf("F_GETLK type=%d start=%d len=%d holder-pid-matches=%v", lk.Type, lk.Start, lk.Len, lk.Pid == int32(holder.Process.Pid)), err)
	lk = unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 5, Len: 1}
	note("F_SETLK conflicting", unix.FcntlFlock(lf.Fd(), unix.F_SETLK, &lk))
	lk = unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 50, Len: 1}
	note("F_SETLK free range", unix.FcntlFlock(lf.Fd(), unix.F_SETLK, &lk))
	lk = unix.Flock_t{Type: unix.F_RDLCK, Whence: 0, Start: 20, Len: 1}
	note("F_OFD_SETLK conflicting", unix.FcntlFlock(lf.Fd(), unix.F_OFD_SETLK, &lk))
	note("flock conflicting", unix.Flock(int(lf.Fd()), unix.LOCK_EX|unix.LOCK_NB))

	// Shared memory maps are coherent between processes (SQLite's -shm).
	m, err := unix.Mmap(int(lf.Fd()), 0, 100, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	note("mmap shared", err)
	holder.tell("poke")
	holder.read()
	note(fmt.Sprintf("sees the other process's mmap write=%v", m != nil && m[42] == 42), nil)
	if m != nil {
		m[43] = 43
		holder.tell("peek")
		note("other process sees our mmap write="+holder.read(), nil)
		unix.Munmap(m)
	}
	holder.stop()
	note("flock after holder exit", unix.Flock(int(lf.Fd()), unix.LOCK_EX|unix.LOCK_NB))
	lf.Close()

	exerciseModes(p, note)
	return out
}

// exerciseModes covers what a new file's mode and owner become, and the
// calls on a file deleted while open. (Found by an adversarial run: lfuse's
// own umask was applied on top of the caller's, setuid, setgid and sticky
// bits were dropped, a setgid directory did not pass its group on,
// O_TMPFILE then linkat failed with EXDEV, and fchmod, fchown, futimens and
// fstatfs of a deleted open file failed with ENOENT.)
func exerciseModes(p func(string) string, note func(string, error)) {
	mode := func(name string) string {
		var st unix.Stat_t
		if err := unix.Lstat(p(name), &st); err != nil {
			return errName(err)
		}
		return fmt.Sprintf("%o gid %d", st.Mode&0o7777, st.Gid)
	}
	old := unix.Umask(0)
	defer unix.Umask(old)
	fd, err := unix.Open(p("m666"), unix.O_CREAT|unix.O_WRONLY, 0o666)
	unix.Close(fd)
	note("create 0666 with umask 0: "+mode("m666"), err)
	fd, err = unix.Open(p("m4755"), unix.O_CREAT|unix.O_WRONLY, 0o4755)
	unix.Close(fd)
	note("create 04755: "+mode("m4755"), err)
	note("mknod 02755: "+mode("n2755"), unix.Mknod(p("n2755"), unix.S_IFREG|0o2755, 0))
	note("mkdir 01777: "+mode("d1777"), unix.Mkdir(p("d1777"), 0o1777))
	note("mkfifo 0666: "+mode("fifo"), unix.Mkfifo(p("fifo"), 0o666))
	unix.Umask(0o22)
	note("mkdir 0775", unix.Mkdir(p("sgid"), 0o775))
	note("chown dir group", os.Chown(p("sgid"), 0, 1234))
	note("chmod g+s", os.Chmod(p("sgid"), 0o2775|os.ModeSetgid))
	note("setgid dir: "+mode("sgid"), nil)
	fd, err = unix.Open(p("sgid/f"), unix.O_CREAT|unix.O_WRONLY, 0o644)
	unix.Close(fd)
	note("create in setgid dir: "+mode("sgid/f"), err)
	note("mkdir in setgid dir: "+mode("sgid/sub"), unix.Mkdir(p("sgid/sub"), 0o755))
	note("symlink in setgid dir", unix.Symlink("f", p("sgid/link")))
	note("symlink: "+mode("sgid/link"), nil)

	fd, err = unix.Open(p(""), unix.O_TMPFILE|unix.O_RDWR, 0o640)
	note("open O_TMPFILE", err)
	if err == nil {
		unix.Write(fd, []byte("anonymous"))
		note("linkat AT_EMPTY_PATH", unix.Linkat(fd, "", unix.AT_FDCWD, p("named"), unix.AT_EMPTY_PATH))
		unix.Close(fd)
		b, err := os.ReadFile(p("named"))
		note(fmt.Sprintf("read linked tmpfile %q, mode %s", b, mode("named")), err)
	}

	// Times past 2262, which nanoseconds since 1970 in an int64 cannot hold.
	// (os.Chtimes goes through UnixNano itself.)
	far, _ := unix.TimeToTimespec(time.Date(2300, 1, 1, 0, 0, 0, 0, time.UTC))
	err = unix.UtimesNanoAt(unix.AT_FDCWD, p("m666"), []unix.Timespec{far, far}, 0)
	var fst unix.Stat_t
	unix.Stat(p("m666"), &fst)
	note(fmt.Sprintf("utimensat 2300: mtime %d", fst.Mtim.Sec), err)

	// A tree deeper than PATH_MAX, made and used relative to descriptors
	// (the mount failed past 4,096 bytes of path).
	dfd, err := unix.Open(p(""), unix.O_RDONLY|unix.O_DIRECTORY, 0)
	depth := 0
	for ; err == nil && depth < 30; depth++ {
		name := strings.Repeat("d", 200)
		if err = unix.Mkdirat(dfd, name, 0o755); err == nil {
			var next int
			next, err = unix.Openat(dfd, name, unix.O_RDONLY|unix.O_DIRECTORY, 0)
			unix.Close(dfd)
			dfd = next
		}
	}
	if err == nil {
		var leaf int
		if leaf, err = unix.Openat(dfd, "leaf", unix.O_CREAT|unix.O_RDWR, 0o644); err == nil {
			unix.Close(leaf)
			err = unix.Fchmodat(dfd, "leaf", 0o600, 0)
		}
		unix.Close(dfd)
	}
	note(fmt.Sprintf("deep tree: depth %d", depth), err)

	f, err := os.Create(p("orphan"))
	note("create orphan", err)
	if err == nil {
		note("unlink while open", os.Remove(p("orphan")))
		note("fchmod deleted", f.Chmod(0o604))
		note("fchown deleted", f.Chown(0, 1234))
		note("futimens deleted", unix.UtimesNanoAt(int(f.Fd()), "", []unix.Timespec{{Sec: 1}, {Sec: 2}}, unix.AT_EMPTY_PATH))
		var sfs unix.Statfs_t
		note("fstatfs deleted", unix.Fstatfs(int(f.Fd()), &sfs))
		note("xattr fsetxattr deleted", unix.Fsetxattr(int(f.Fd()), "user.k", []byte("v"), 0))
		st, err := f.Stat()
		note(fmt.Sprintf("fstat deleted mode %v mtime %d", st.Mode(), st.ModTime().Unix()), err)
		f.Close()
	}
}

func openErr(path string, flag int) error {
	f, err := os.OpenFile(path, flag, 0)
	if err == nil {
		f.Close()
	}
	return err
}

func ignoreEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

func exitErr(err error) error {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return fmt.Errorf("exit %d", ee.ExitCode())
	}
	return err
}

func errName(err error) string {
	if err == nil {
		return "ok"
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return unix.ErrnoName(errno)
	}
	return err.Error()
}

// lockHolder is another process holding locks on a file and answering
// requests about a shared mapping of it.
type lockHolder struct {
	*exec.Cmd
	in  io.WriteCloser
	out *bufio.Reader
}

func startLockHolder(t *testing.T, path string) *lockHolder {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), workerEnv+"=lock-holder", "FILE="+path)
	in, _ := cmd.StdinPipe()
	outPipe, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h := &lockHolder{Cmd: cmd, in: in, out: bufio.NewReader(outPipe)}
	if got := h.read(); got != "locked" {
		t.Fatalf("lock holder: %q", got)
	}
	return h
}

func (h *lockHolder) tell(s string) { fmt.Fprintln(h.in, s) }

func (h *lockHolder) read() string {
	line, _ := h.out.ReadString('\n')
	return strings.TrimSpace(line)
}

func (h *lockHolder) stop() {
	h.in.Close()
	h.Wait()
}

// runLockHolder is the lock holder process: it write-locks bytes 0-9 with a
// POSIX lock and byte 20 with an open file description lock, takes flock,
// maps the file, then answers "poke" (write byte 42) and "peek" (report
// byte 43) until its input closes.
func runLockHolder() int {
	f, err := os.OpenFile(os.Getenv("FILE"), os.O_RDWR, 0)
	if err != nil {
		return fail(err)
	}
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 0, Len: 10}
	if err := unix.FcntlFlock(f.Fd(), unix.F_SETLK, &lk); err != nil {
		return fail(err)
	}
	ofd, err := os.OpenFile(os.Getenv("FILE"), os.O_RDWR, 0)
	if err != nil {
		return fail(err)
	}
	lk = unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 20, Len: 1}
	if err := unix.FcntlFlock(ofd.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
		return fail(err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		return fail(err)
	}
	m, err := unix.Mmap(int(f.Fd()), 0, 100, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fail(err)
	}
	fmt.Println("locked")
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		switch in.Text() {
		case "poke":
			m[42] = 42
			fmt.Println("poked")
		case "peek":
			fmt.Println(m[43] == 43)
		}
	}
	return 0
}
