// Package fs is lfuse's FUSE filesystem: a passthrough over a backing
// directory that behaves like that directory (same bytes, same errno) and
// reports to an Observer the events that matter for capturing SQLite
// databases: files opened, written and fsynced, and — before they happen —
// the truncations, unlinks and renames that could destroy WAL frames.
//
// Where the kernel supports it (Linux 6.9+, CAP_SYS_ADMIN), SQLite's WAL and
// shared-memory files are opened in kernel passthrough mode: reads, writes
// and mmap go straight to the backing file without a round trip to this
// process, and WAL writes are noticed through inotify on the backing
// directory instead. Other files, database files among them, are served
// through this process and the kernel page cache (the "cached" mode, which is
// also the fallback for everything). POSIX and BSD locks stay in the kernel
// in both modes, which gives every process using the mount the same lock
// table.
package fs

import (
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// Observer receives the events of the files under the mount. Paths are
// relative to the mount root. The Before methods are called before the
// operation runs and block it until they return; the function they return
// (if not nil) is called once the operation is done, with whether it
// succeeded.
type Observer interface {
	Opened(rel string, created bool)
	Modified(rel string) // "" means: anything may have changed
	// Syncing is called when an fsync of the file starts; the function it
	// returns (if not nil) when it ends. The application is busy with the
	// file meanwhile, though it writes nothing.
	Syncing(rel string) func()
	BeforeTruncate(rel string) func(ok bool)
	BeforeUnlink(rel string) func(ok bool)
	BeforeRename(oldRel, newRel string) func(ok bool)
	// BeforeExchange is called before two paths swap what they hold
	// (renameat2 with RENAME_EXCHANGE).
	BeforeExchange(aRel, bRel string) func(ok bool)
}

// Passthrough modes.
const (
	PassthroughAuto = "auto" // use kernel passthrough if the kernel offers it
	PassthroughOn   = "on"   // require it
	PassthroughOff  = "off"  // serve file data through lfuse and the page cache
)

// Options configure a Mount.
type Options struct {
	DataDir  string // the backing directory
	MountDir string // where the mount appears
	// Hide is a name in the root of DataDir that the mount does not show
	// (lfuse's state directory when it lives there).
	Hide        string
	Passthrough string // PassthroughAuto (default), PassthroughOn or PassthroughOff
	Observer    Observer
	Logger      *slog.Logger
	// AttrTimeout is how long the kernel may cache names and attributes.
	// Only changes made outside the mount can make them stale.
	AttrTimeout time.Duration
	// XAttrs serves extended attributes. Off, the kernel stops asking for
	// them — including the security.capability lookup it makes before
	// every write, two round trips per SQLite transaction — and xattr
	// calls fail with EOPNOTSUPP.
	XAttrs bool
	Debug  bool
}

// Mount is a mounted lfuse filesystem.
type Mount struct {
	opts        Options
	server      *fuse.Server
	obs         Observer
	hide        string
	passthrough bool
	watch       *watcher
	counts      *counters
	logger      *slog.Logger
	unmountOnce sync.Once
	mountID     string // this mount's ID in mountinfo, once Unmount had to detach it
	// rootFd is the backing directory, which every operation starts from
	// (at.go); asRoot: lfuse runs as root, and gives what it creates to
	// the caller.
	rootFd int
	asRoot bool
}

// New checks the directories, mounts the filesystem and starts serving it.
func New(opts Options) (*Mount, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Passthrough == "" {
		opts.Passthrough = PassthroughAuto
	}
	if opts.AttrTimeout == 0 {
		opts.AttrTimeout = time.Second
	}
	switch opts.Passthrough {
	case PassthroughAuto, PassthroughOn, PassthroughOff:
	default:
		return nil, fmt.Errorf("passthrough must be %q, %q or %q, not %q", PassthroughAuto, PassthroughOn, PassthroughOff, opts.Passthrough)
	}
	var err error
	if opts.DataDir, err = filepath.Abs(opts.DataDir); err != nil {
		return nil, err
	}
	if opts.MountDir, err = filepath.Abs(opts.MountDir); err != nil {
		return nil, err
	}
	if err := CheckDirs(opts.DataDir, opts.MountDir); err != nil {
		return nil, err
	}
	if err := checkFuseDevice(); err != nil {
		return nil, err
	}

	m := &Mount{opts: opts, obs: opts.Observer, hide: opts.Hide, logger: opts.Logger, counts: &counters{}, asRoot: os.Geteuid() == 0}
	if m.rootFd, err = unix.Open(opts.DataDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err != nil {
		return nil, fmt.Errorf("backing directory: %w", err)
	}
	if m.obs != nil {
		w, err := newWatcher(opts.DataDir, m.obs, opts.Logger)
		if err != nil {
			unix.Close(m.rootFd)
			return nil, err
		}
		m.watch = w
	}

	var st syscall.Stat_t
	if err := syscall.Fstat(m.rootFd, &st); err != nil {
		m.closeWatch()
		return nil, err
	}
	// Every node is made by node.child (at.go), which go-fuse's loopback
	// never calls: its own operations that make nodes are all replaced.
	root := &gofs.LoopbackRoot{Path: opts.DataDir, Dev: uint64(st.Dev)}
	rootNode := &node{LoopbackNode: gofs.LoopbackNode{RootData: root}, m: m}
	root.RootNode = rootNode

	timeout := opts.AttrTimeout
	mo := fuse.MountOptions{
		FsName:       opts.DataDir,
		Name:         "lfuse",
		AllowOther:   os.Geteuid() == 0,
		Options:      []string{"default_permissions"},
		DirectMount:  true,
		MaxReadAhead: 512 << 10,
		MaxWrite:     maxRequest,
		// Nothing but this mount changes the backing files (the README
		// says so), so the page cache is never stale: no invalidation on
		// a changed mtime or size. Automatic invalidation drops pages of
		// the shared-memory and WAL files under processes using them; with
		// it, the cached mode corrupted a database about once in ten runs
		// of the concurrency test under load (never without it, in 25).
		ExplicitDataCacheControl: true,
		DisableXAttrs:            !opts.XAttrs,
		Debug:                    opts.Debug,
		Logger:                   log.New(slogWriter{opts.Logger}, "", 0),
	}
	raw := gofs.NewNodeFS(rootNode, &gofs.Options{
		EntryTimeout:    &timeout,
		AttrTimeout:     &timeout,
		NegativeTimeout: &timeout,
		// A mode without permission bits is a mode like any other: go-fuse
		// would show 000 as 0644 (0755 for a directory), and with
		// default_permissions the kernel would then let anyone read it.
		NullPermissions: true,
		MountOptions:    mo,
		Logger:          mo.Logger,
	})
	server, err := fuse.NewServer(&counting{RawFileSystem: raw, c: m.counts}, opts.MountDir, &mo)
	if err != nil {
		if m.watch != nil {
			m.watch.close()
		}
		return nil, mountError(opts.MountDir, err)
	}
	m.server = server
	closeFUSEOnExec()
	go server.Serve()
	if err := server.WaitMount(); err != nil {
		m.closeWatch()
		return nil, mountError(opts.MountDir, err)
	}

	m.setReadahead()
	reason := m.probePassthrough()
	switch {
	case m.passthrough:
		opts.Logger.Info("kernel passthrough on for WAL, shared-memory and journal files; other files through the page cache")
	case opts.Passthrough == PassthroughOn:
		_ = m.Unmount()
		return nil, fmt.Errorf("kernel passthrough was required but is unavailable: %s", reason)
	default:
		opts.Logger.Info("kernel passthrough off: file data goes through lfuse and the page cache", "reason", reason)
	}
	return m, nil
}

// maxRequest bounds reads and writes. Reads are spliced from the backing
// file into a pipe with the reply header and one spare page; a pipe holds at
// most 1 MiB (fs.pipe-max-size), so 1 MiB reads would each fail to splice,
// log a warning and fall back to a copy. 254 pages fit.
const maxRequest = 254 << 12

// readahead is how far the kernel reads ahead in files served through the
// page cache. The kernel's default for FUSE is 128 KiB, which costs a round
// trip per 128 KiB of a sequential scan; requests of about 1 MiB cut the round
// trips eightfold (measured: a cold 200 MB scan went from ≈0.87 to ≈0.95 of
// native).
const readahead = maxRequest

// setReadahead raises the readahead of the mount's backing device info,
// which the kernel otherwise caps at 128 KiB whatever FUSE negotiated. It
// needs root; without it the default stays.
func (m *Mount) setReadahead() {
	var st syscall.Stat_t
	if err := syscall.Stat(m.opts.MountDir, &st); err != nil {
		return
	}
	bdi := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	if err := os.WriteFile(bdi, []byte(strconv.Itoa(readahead>>10)), 0); err != nil {
		m.logger.Debug("cannot raise readahead; keeping the kernel default", "err", err)
	}
}

// probePassthrough asks the kernel to register a backing file, the step
// every passthrough open needs, so the mode is known (and logged) before the
// first open instead of failing silently on it.
func (m *Mount) probePassthrough() string {
	if m.opts.Passthrough == PassthroughOff {
		return "turned off"
	}
	if m.server.KernelSettings().Flags64()&fuse.CAP_PASSTHROUGH == 0 {
		return "the kernel does not offer FUSE passthrough (needs Linux 6.9 or later)"
	}
	f, err := os.Open(m.opts.DataDir)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	probe, err := os.CreateTemp(m.opts.DataDir, ".lfuse-probe-*")
	if err != nil {
		return fmt.Sprintf("cannot create a probe file: %v", err)
	}
	defer func() { probe.Close(); os.Remove(probe.Name()) }()
	id, errno := m.server.RegisterBackingFd(&fuse.BackingMap{Fd: int32(probe.Fd())})
	if errno != 0 {
		if errno == syscall.EPERM {
			return "registering a backing file needs CAP_SYS_ADMIN"
		}
		return fmt.Sprintf("the kernel refused a backing file from %s: %v (is it on overlayfs or FUSE?)", m.opts.DataDir, errno)
	}
	m.server.UnregisterBackingFd(id)
	m.passthrough = true
	return ""
}

// Passthrough reports whether files are opened in kernel passthrough mode.
func (m *Mount) Passthrough() bool { return m.passthrough }

// Wait blocks until the filesystem is unmounted, by Unmount or from outside
// (fusermount3 -u, umount).
func (m *Mount) Wait() {
	m.server.Wait()
	m.closeWatch()
}

// closeWatch releases what New opened besides the mount itself.
func (m *Mount) closeWatch() {
	if m.watch != nil {
		m.watch.close()
	}
	unix.Close(m.rootFd)
}

// Unmount unmounts the filesystem. If files are still open it detaches the
// mount instead, which completes when the last one is closed; Wait returns
// then.
func (m *Mount) Unmount() error {
	var err error
	m.unmountOnce.Do(func() {
		if err = m.server.Unmount(); err == nil {
			return
		}
		m.logger.Warn("mount is busy: detaching it; lfuse exits when the last open file is closed", "err", err)
		// Found now: once detached, the mount is in no mountinfo.
		if real, rerr := filepath.EvalSymlinks(m.opts.MountDir); rerr == nil {
			m.mountID = lfuseMountID(real)
		}
		err = syscall.Unmount(m.opts.MountDir, syscall.MNT_DETACH)
	})
	return err
}

// BusyWith returns the processes that still have files open in the mount
// after Unmount had to detach it. They are found by the mount's ID, which
// their open files carry (fdinfo's mnt_id), not by path: a path under the
// mount point names a file of this mount only in lfuse's own mount
// namespace, and a container's process with its own /data was taken for a
// holder (a review). Found afresh each call, so a PID that has since gone
// and been reused is not named.
func (m *Mount) BusyWith() []int {
	if m.mountID == "" {
		return nil
	}
	return processesWith("fdinfo", func(path string) bool {
		b, err := os.ReadFile(path)
		return err == nil && fdinfoMountID(b) == m.mountID
	})
}

// fdinfoMountID reads the mnt_id line of a /proc/PID/fdinfo/FD file.
func fdinfoMountID(b []byte) string {
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "mnt_id:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// lfuseMountID returns the ID of the lfuse mount on top at dir, or "".
func lfuseMountID(dir string) string {
	id := ""
	for _, e := range mountsAt(dir) {
		if e.fstype == "fuse.lfuse" {
			id = e.id // the last one listed is on top
		}
	}
	return id
}

// Requests returns how many requests of each kind lfuse has served.
func (m *Mount) Requests() map[string]uint64 { return m.counts.snapshot() }

// fileHandle picks, for a newly opened file, kernel passthrough or the
// cached path through this process.
//
// Only SQLite's WAL, shared-memory and journal files use passthrough. The
// database file itself goes through the page cache: with passthrough, every
// read marks the inode's atime stale and SQLite's fstat at the start of each
// read transaction then costs a round trip (point reads measured 0.3x
// native), while cached reads never reach lfuse. The choice depends on the
// name only, so every open of an inode agrees (the kernel refuses a cached
// open of an inode open in passthrough mode).
func (m *Mount) fileHandle(n *node, rel string, fh gofs.FileHandle, flags uint32) (gofs.FileHandle, uint32) {
	lf, ok := fh.(*gofs.LoopbackFile)
	if !ok {
		return fh, flags
	}
	f := &file{LoopbackFile: lf, rel: rel, obs: m.obs, node: n}
	n.openMu.Lock()
	if n.open == nil {
		n.open = map[*file]struct{}{}
	}
	n.open[f] = struct{}{}
	n.openMu.Unlock()
	if m.passthrough && sidecar(rel) && n.cachedOpens.Load() == 0 {
		n.passthroughSeen.Store(true)
		f.passthrough = true
		return f, flags
	}
	n.cachedOpens.Add(1)
	if !n.passthroughSeen.Load() {
		// Nothing changes the backing file but this mount, so the page
		// cache stays valid across opens.
		flags |= fuse.FOPEN_KEEP_CACHE
	}
	return f, flags
}

// sidecar reports whether a file is one of SQLite's WAL, shared-memory or
// rollback journal files.
func sidecar(rel string) bool {
	return strings.HasSuffix(rel, "-wal") || strings.HasSuffix(rel, "-shm") || strings.HasSuffix(rel, "-journal")
}

// opened reports an open to the Observer, first watching the directory of a
// WAL so that no write to it can go unnoticed.
func (m *Mount) opened(rel string, created bool) {
	if m.obs == nil {
		return
	}
	m.arrived(rel)
	m.obs.Opened(rel, created)
}

// arrived watches the directory of a WAL that was opened, or that a rename
// put at rel: an application may have it open and go on writing it there.
// (A WAL moved into a directory where none had been opened went unwatched,
// and its commits reached the replica only at the next checkpoint or stop.)
func (m *Mount) arrived(rel string) {
	if m.watch != nil && strings.HasSuffix(rel, "-wal") {
		m.watch.watchDir(path.Dir(rel))
	}
}

// CheckDirs refuses directory layouts that cannot work: a missing or
// non-directory backing directory or mount point, a mount point that is
// already a mount, and a backing directory inside the mount point or the
// other way round (the mount would then contain itself and hang).
func CheckDirs(dataDir, mountDir string) error {
	st, err := os.Stat(dataDir)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("data directory %s does not exist: create it or point -data at the directory holding your databases", dataDir)
	} else if err != nil {
		return fmt.Errorf("data directory %s: %w", dataDir, err)
	} else if !st.IsDir() {
		return fmt.Errorf("data directory %s is not a directory", dataDir)
	}
	mst, err := os.Stat(mountDir)
	if errors.Is(err, syscall.ENOTCONN) {
		return fmt.Errorf("mount point %s is a dead FUSE mount (its process was killed): run 'fusermount3 -uz %s' and start again", mountDir, mountDir)
	} else if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("mount point %s does not exist: create it with 'mkdir -p %s'", mountDir, mountDir)
	} else if err != nil {
		return fmt.Errorf("mount point %s: %w", mountDir, err)
	} else if !mst.IsDir() {
		return fmt.Errorf("mount point %s is not a directory", mountDir)
	}
	realData, err := filepath.EvalSymlinks(dataDir)
	if err != nil {
		return err
	}
	realMount, err := filepath.EvalSymlinks(mountDir)
	if err != nil {
		return err
	}
	if within(realData, realMount) {
		return fmt.Errorf("data directory %s is the mount point or inside it: the backing files must live outside %s", dataDir, mountDir)
	}
	if within(realMount, realData) {
		return fmt.Errorf("mount point %s is inside the data directory %s: the mount would contain itself; mount somewhere else", mountDir, dataDir)
	}
	if fstype, ok := mountedAt(realMount); ok {
		return fmt.Errorf("mount point %s is already a mount (%s): unmount it first", mountDir, fstype)
	}
	return nil
}

// ClearDeadMount detaches a mount left at dir by an lfuse process that died
// (its FUSE connection answers ENOTCONN), so a new lfuse can take its place.
// It reports whether it did; a live mount, or one of another kind, is left
// alone.
func ClearDeadMount(dir string) (bool, error) {
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		real = dir
	}
	if fstype, ok := mountedAt(real); !ok || fstype != "fuse.lfuse" {
		return false, nil
	}
	if _, err := os.ReadDir(real); !errors.Is(err, syscall.ENOTCONN) {
		return false, nil
	}
	// A process that still has a file open there holds its locks on the
	// dead mount's files; a new mount's files would not share them, and two
	// writers could then corrupt a database.
	if pids := holders(real); len(pids) > 0 {
		return false, fmt.Errorf("mount point %s is the dead mount of a killed lfuse and processes %v still have files open in it: stop them first (their locks would not be shared with a new mount)", dir, pids)
	}
	if err := syscall.Unmount(real, syscall.MNT_DETACH); err != nil {
		return false, fmt.Errorf("mount point %s is a dead lfuse mount and cannot be detached: %w", dir, err)
	}
	return true, nil
}

// holders returns the processes with a file open under dir.
func holders(dir string) []int {
	return processesWith("fd", func(path string) bool {
		target, err := os.Readlink(path)
		return err == nil && within(strings.TrimSuffix(target, " (deleted)"), dir)
	})
}

// processesWith returns the other processes with an open file whose entry
// in /proc/PID/<sub> (fd or fdinfo) satisfies has.
func processesWith(sub string, has func(path string) bool) []int {
	procs, _ := os.ReadDir("/proc")
	var pids []int
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		dir := filepath.Join("/proc", p.Name(), sub)
		fds, _ := os.ReadDir(dir)
		for _, fd := range fds {
			if has(filepath.Join(dir, fd.Name())) {
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids
}

// within reports whether p is dir or below it.
func within(p, dir string) bool {
	rel, err := filepath.Rel(dir, p)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

// mountedAt reports whether dir is a mount point, and its filesystem type.
func mountedAt(dir string) (string, bool) {
	if ms := mountsAt(dir); len(ms) > 0 {
		return ms[0].fstype, true
	}
	return "", false
}

// mountEntry is one line of mountinfo: the mount's ID and filesystem type.
type mountEntry struct{ id, fstype string }

// mountsAt lists the mounts at dir in mountinfo's order (the last on top).
func mountsAt(dir string) []mountEntry {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []mountEntry
	for _, line := range strings.Split(string(b), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 10 || unescapeMount(fields[4]) != dir {
			continue
		}
		e := mountEntry{id: fields[0], fstype: "unknown"}
		for i, f := range fields {
			if f == "-" && i+1 < len(fields) {
				e.fstype = fields[i+1]
				break
			}
		}
		out = append(out, e)
	}
	return out
}

func unescapeMount(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}

func checkFuseDevice() error {
	f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return errors.New("/dev/fuse does not exist: this machine or container has no FUSE device (in Docker: --device /dev/fuse --cap-add SYS_ADMIN)")
	} else if errors.Is(err, os.ErrPermission) {
		return errors.New("cannot open /dev/fuse: permission denied (run lfuse as root, or give it access to /dev/fuse)")
	} else if err != nil {
		return fmt.Errorf("cannot open /dev/fuse: %w", err)
	}
	return f.Close()
}

func mountError(dir string, err error) error {
	if errors.Is(err, syscall.EPERM) || strings.Contains(err.Error(), "permission denied") || strings.Contains(err.Error(), "Operation not permitted") {
		return fmt.Errorf("cannot mount %s: permission denied (lfuse needs root or CAP_SYS_ADMIN, or fusermount3 from the fuse3 package): %v", dir, err)
	}
	if strings.Contains(err.Error(), "fusermount") && strings.Contains(err.Error(), "not found") {
		return fmt.Errorf("cannot mount %s: the mount syscall failed and fusermount3 is not installed (install the fuse3 package): %v", dir, err)
	}
	return fmt.Errorf("cannot mount %s: %w", dir, err)
}

// slogWriter sends go-fuse's log lines to slog.
type slogWriter struct{ l *slog.Logger }

func (w slogWriter) Write(p []byte) (int, error) {
	msg := strings.TrimRight(string(p), "\n")
	level := slog.LevelWarn
	if strings.Contains(msg, "connection abort") {
		// How go-fuse's readers learn that the mount went: every stop
		// logged it as a warning.
		level = slog.LevelDebug
	}
	w.l.Log(context.Background(), level, msg, "component", "fuse")
	return len(p), nil
}

// closeFUSEOnExec marks lfuse's descriptors of /dev/fuse close-on-exec:
// go-fuse opens them without the flag, so the application lfuse starts
// (exec) held the mount's connection. A killed lfuse then left the mount
// hanging every access instead of failing with ENOTCONN, and a new lfuse
// could not clear it.
func closeFUSEOnExec() {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && target == "/dev/fuse" {
			unix.CloseOnExec(fd)
		}
	}
}
