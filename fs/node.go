package fs

import (
	"context"
	"errors"
	"path"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// node is one file or directory of the mount: go-fuse's loopback node (which
// maps every operation onto the backing file and returns its errno) plus the
// few places lfuse needs to see: opens, truncations, unlinks and renames, and
// the one name in the root that belongs to lfuse itself.
type node struct {
	gofs.LoopbackNode
	m *Mount

	// passthroughSeen is set once the file was opened in passthrough mode:
	// its writes then bypassed the kernel's page cache for this inode, so
	// that cache must not be kept across a later cached open.
	passthroughSeen atomic.Bool
	// cachedOpens counts the file's open handles served through the page
	// cache: the kernel refuses a passthrough open of an inode open that
	// way (with EIO), as after a file open under one name is renamed to a
	// name ending in -wal.
	cachedOpens atomic.Int32

	// open is the node's open files: a file deleted while open has no
	// name left, and is then reached through one of them.
	openMu sync.Mutex
	open   map[*file]struct{}
}

var (
	_ gofs.NodeLookuper        = (*node)(nil)
	_ gofs.NodeOpener          = (*node)(nil)
	_ gofs.NodeCreater         = (*node)(nil)
	_ gofs.NodeSetattrer       = (*node)(nil)
	_ gofs.NodeUnlinker        = (*node)(nil)
	_ gofs.NodeRenamer         = (*node)(nil)
	_ gofs.NodeOpendirHandler  = (*node)(nil)
	_ gofs.NodeMkdirer         = (*node)(nil)
	_ gofs.NodeMknoder         = (*node)(nil)
	_ gofs.NodeSymlinker       = (*node)(nil)
	_ gofs.NodeLinker          = (*node)(nil)
	_ gofs.NodeRmdirer         = (*node)(nil)
	_ gofs.FilePassthroughFder = (*gofs.LoopbackFile)(nil)
)

func (n *node) rel(name string) string {
	return path.Join(n.Path(nil), name)
}

// hidden reports whether name in this directory is lfuse's own state.
func (n *node) hidden(name string) bool {
	return n.m.hide != "" && name == n.m.hide && n.IsRoot()
}

func (n *node) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	if n.hidden(name) {
		return nil, syscall.ENOENT
	}
	dfd, errno := n.dir()
	if errno != 0 {
		return nil, errno
	}
	defer unix.Close(dfd)
	return n.entry(ctx, dfd, name, out)
}

// entry describes name, in directory dfd of n, in out and gives its inode.
func (n *node) entry(ctx context.Context, dfd int, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	var st syscall.Stat_t
	gen, errno := statAt(dfd, name, 0, &st)
	if errno != 0 {
		return nil, errno
	}
	out.Attr.FromStat(&st)
	return n.child(ctx, name, &st, gen), 0
}

func (n *node) Getattr(ctx context.Context, f gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	if fga, ok := f.(gofs.FileGetattrer); ok && fga != nil {
		return fga.Getattr(ctx, out)
	}
	var st syscall.Stat_t
	dfd, name, errno := n.where()
	if errno == 0 {
		_, errno = statAt(dfd, name, 0, &st)
		unix.Close(dfd)
	} else if errno == syscall.ENOENT {
		if fd, ok := n.openFd(); ok {
			_, errno = statAt(fd, "", unix.AT_EMPTY_PATH, &st)
			unix.Close(fd)
		}
	}
	if errno != 0 {
		return errno
	}
	out.FromStat(&st)
	return 0
}

func (n *node) Statx(ctx context.Context, f gofs.FileHandle, flags, mask uint32, out *fuse.StatxOut) syscall.Errno {
	if fsx, ok := f.(gofs.FileStatxer); ok && fsx != nil {
		return fsx.Statx(ctx, flags, mask, out)
	}
	fd, errno := n.pin()
	if errno != 0 {
		return errno
	}
	defer unix.Close(fd)
	var x unix.Statx_t
	if err := unix.Statx(fd, "", int(flags)|unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW, int(mask), &x); err != nil {
		return gofs.ToErrno(err)
	}
	out.FromStatx(&x)
	return 0
}

func (n *node) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	dfd, name, errno := n.where()
	if errno != 0 {
		return nil, errno
	}
	defer unix.Close(dfd)
	for size := 256; ; size *= 2 {
		buf := make([]byte, size)
		k, err := unix.Readlinkat(dfd, name, buf)
		if err != nil {
			return nil, gofs.ToErrno(err)
		}
		if k < size {
			return buf[:k], 0
		}
	}
}

func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	fd, errno := n.pin()
	if errno != 0 {
		return errno
	}
	defer unix.Close(fd)
	var st syscall.Statfs_t
	if err := syscall.Fstatfs(fd, &st); err != nil {
		return gofs.ToErrno(err)
	}
	out.FromStatfsT(&st)
	return 0
}

func (n *node) OpendirHandle(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	ds, errno := n.Readdir(ctx)
	if errno != 0 {
		return nil, 0, errno
	}
	fh := gofs.FileHandle(ds)
	if n.IsRoot() && n.m.hide != "" {
		fh = &hidingDir{FileHandle: fh, hide: n.m.hide}
	}
	return fh, 0, 0
}

func (n *node) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	dfd, name, errno := n.where()
	if errno != 0 {
		return nil, errno
	}
	defer unix.Close(dfd)
	fd, err := unix.Openat(dfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, gofs.ToErrno(err)
	}
	return gofs.NewLoopbackDirStreamFd(fd)
}

func (n *node) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	rel := n.Path(nil)
	var after func(bool)
	if flags&syscall.O_TRUNC != 0 && n.m.obs != nil {
		after = n.m.obs.BeforeTruncate(rel)
	}
	fh, fl, errno := n.openat(flags)
	if after != nil {
		after(errno == 0)
	}
	if errno != 0 {
		return nil, 0, errno
	}
	fh, fl = n.m.fileHandle(n, rel, fh, fl)
	n.m.opened(rel, false)
	return fh, fl, 0
}

func (n *node) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*gofs.Inode, gofs.FileHandle, uint32, syscall.Errno) {
	if n.hidden(name) {
		return nil, nil, 0, syscall.EPERM
	}
	rel := n.rel(name)
	var after func(bool)
	if flags&syscall.O_TRUNC != 0 && n.m.obs != nil {
		after = n.m.obs.BeforeTruncate(rel)
	}
	in, fh, fl, errno := n.create(ctx, name, flags, mode, out)
	if after != nil {
		after(errno == 0)
	}
	if errno != 0 {
		return nil, nil, 0, errno
	}
	fh, fl = n.m.fileHandle(in.Operations().(*node), rel, fh, fl)
	n.m.opened(rel, true)
	return in, fh, fl, 0
}

// openat opens n's backing file, never through a symlink. A file deleted
// while open (reopened through /proc/PID/fd) is reopened from one of its
// open descriptors.
func (n *node) openat(flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	// Writes come with their offsets: O_APPEND would move them.
	flags &^= syscall.O_APPEND | fuse.FMODE_EXEC
	var fd int
	var err error
	dfd, name, errno := n.where()
	switch {
	case errno == 0:
		fd, err = unix.Openat(dfd, name, int(flags)|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		unix.Close(dfd)
	case errno == syscall.ENOENT:
		ofd, ok := n.openFd()
		if !ok {
			return nil, 0, errno
		}
		fd, err = unix.Open(procPath(ofd), int(flags)|unix.O_CLOEXEC, 0)
		unix.Close(ofd)
	default:
		return nil, 0, errno
	}
	if err != nil {
		return nil, 0, gofs.ToErrno(err)
	}
	return gofs.NewLoopbackFile(fd), 0, 0
}

func (n *node) create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*gofs.Inode, gofs.FileHandle, uint32, syscall.Errno) {
	dfd, errno := n.dir()
	if errno != 0 {
		return nil, nil, 0, errno
	}
	defer unix.Close(dfd)
	// Writes come with their offsets: O_APPEND would move them.
	flags &^= syscall.O_APPEND
	// Only a file this call made is given to the caller: the kernel asks
	// for a name it saw missing, and one there now (a tree lagging behind a
	// rename, a change outside the mount) is opened as it is.
	fd, err := unix.Openat(dfd, name, int(flags)|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, mode)
	if errors.Is(err, unix.EEXIST) && flags&syscall.O_EXCL == 0 {
		if fd, err = unix.Openat(dfd, name, int(flags&^syscall.O_CREAT)|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0); err != nil {
			return nil, nil, 0, gofs.ToErrno(err)
		}
		in, errno := n.entry(ctx, dfd, name, out)
		if errno != 0 {
			unix.Close(fd)
			return nil, nil, 0, errno
		}
		return in, gofs.NewLoopbackFile(fd), 0, 0
	}
	if err != nil {
		return nil, nil, 0, gofs.ToErrno(err)
	}
	in, errno := n.made(ctx, dfd, name, fd, mode, out)
	if errno != 0 {
		unix.Close(fd)
		return nil, nil, 0, errno
	}
	return in, gofs.NewLoopbackFile(fd), 0, 0
}

// Tmpfile is open(O_TMPFILE): a file with no name, which linkat can give one.
func (n *node) Tmpfile(ctx context.Context, flags, mode uint32, out *fuse.EntryOut) (*gofs.Inode, gofs.FileHandle, uint32, syscall.Errno) {
	dfd, errno := n.dir()
	if errno != 0 {
		return nil, nil, 0, errno
	}
	defer unix.Close(dfd)
	fd, err := unix.Openat(dfd, ".", int(flags&^syscall.O_APPEND)|unix.O_TMPFILE|unix.O_CLOEXEC, mode)
	if err != nil {
		return nil, nil, 0, gofs.ToErrno(err)
	}
	in, errno := n.made(ctx, dfd, "", fd, mode, out)
	if errno != 0 {
		unix.Close(fd)
		return nil, nil, 0, errno
	}
	fh, fl := n.m.fileHandle(in.Operations().(*node), "", gofs.NewLoopbackFile(fd), 0)
	return in, fh, fl, 0
}

func (n *node) Setattr(ctx context.Context, f gofs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if _, ok := in.GetSize(); ok && n.m.obs != nil {
		if after := n.m.obs.BeforeTruncate(n.Path(nil)); after != nil {
			errno := n.setattr(ctx, f, in, out)
			after(errno == 0)
			return errno
		}
	}
	return n.setattr(ctx, f, in, out)
}

// setattr is chmod, chown, truncate and utimens, all on the one inode
// pin gives, or on the open file the kernel names.
func (n *node) setattr(ctx context.Context, f gofs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if fsa, ok := f.(gofs.FileSetattrer); ok && fsa != nil {
		return fsa.Setattr(ctx, in, out)
	}
	fd, errno := n.pin()
	if errno != 0 {
		return errno
	}
	defer unix.Close(fd)
	var st syscall.Stat_t
	if _, errno := statAt(fd, "", unix.AT_EMPTY_PATH, &st); errno != 0 {
		return errno
	}
	link := st.Mode&syscall.S_IFMT == syscall.S_IFLNK
	if mode, ok := in.GetMode(); ok {
		if link {
			return syscall.EOPNOTSUPP // as chmod of a symlink itself
		}
		if err := unix.Chmod(procPath(fd), mode); err != nil {
			return gofs.ToErrno(err)
		}
	}
	uid, uok := in.GetUID()
	gid, gok := in.GetGID()
	if uok || gok {
		u, g := -1, -1
		if uok {
			u = int(uid)
		}
		if gok {
			g = int(gid)
		}
		if err := unix.Fchownat(fd, "", u, g, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return gofs.ToErrno(err)
		}
	}
	// Truncate before the times, so that an explicit mtime stays.
	if size, ok := in.GetSize(); ok {
		if link {
			return syscall.EINVAL
		}
		if err := unix.Truncate(procPath(fd), int64(size)); err != nil {
			return gofs.ToErrno(err)
		}
	}
	mtime, mok := in.GetMTime()
	atime, aok := in.GetATime()
	if mok || aok {
		ts := []unix.Timespec{{Nsec: unix.UTIME_OMIT}, {Nsec: unix.UTIME_OMIT}}
		var err error
		// Not through UnixNano, which overflows after 2262.
		if aok {
			if ts[0], err = unix.TimeToTimespec(atime); err != nil {
				return gofs.ToErrno(err)
			}
		}
		if mok {
			if ts[1], err = unix.TimeToTimespec(mtime); err != nil {
				return gofs.ToErrno(err)
			}
		}
		if link {
			// A symlink's own times: through its directory, by name,
			// without following it.
			dfd, name, errno := n.where()
			if errno != 0 {
				return errno
			}
			err = unix.UtimesNanoAt(dfd, name, ts, unix.AT_SYMLINK_NOFOLLOW)
			unix.Close(dfd)
		} else {
			err = unix.UtimesNanoAt(unix.AT_FDCWD, procPath(fd), ts, 0)
		}
		if err != nil {
			return gofs.ToErrno(err)
		}
	}
	if _, errno := statAt(fd, "", unix.AT_EMPTY_PATH, &st); errno != 0 {
		return errno
	}
	out.FromStat(&st)
	return 0
}

func (n *node) Unlink(ctx context.Context, name string) syscall.Errno {
	if n.hidden(name) {
		return syscall.ENOENT
	}
	if n.m.obs == nil {
		return n.unlinkat(name, 0)
	}
	after := n.m.obs.BeforeUnlink(n.rel(name))
	errno := n.unlinkat(name, 0)
	if after != nil {
		after(errno == 0)
	}
	return errno
}

func (n *node) Rmdir(ctx context.Context, name string) syscall.Errno {
	if n.hidden(name) {
		return syscall.ENOENT
	}
	return n.unlinkat(name, unix.AT_REMOVEDIR)
}

func (n *node) unlinkat(name string, flags int) syscall.Errno {
	dfd, errno := n.dir()
	if errno != 0 {
		return errno
	}
	defer unix.Close(dfd)
	return gofs.ToErrno(unix.Unlinkat(dfd, name, flags))
}

func (n *node) Rename(ctx context.Context, name string, newParent gofs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	np, ok := newParent.(*node)
	if !ok {
		return syscall.EXDEV
	}
	if n.hidden(name) || np.hidden(newName) {
		return syscall.EPERM
	}
	if n.m.obs == nil {
		return n.renameat(name, np, newName, flags)
	}
	oldRel, newRel := n.rel(name), np.rel(newName)
	exchange := flags&gofs.RENAME_EXCHANGE != 0
	var after func(ok bool)
	if exchange {
		after = n.m.obs.BeforeExchange(oldRel, newRel)
	} else {
		after = n.m.obs.BeforeRename(oldRel, newRel)
	}
	errno := n.renameat(name, np, newName, flags)
	if errno == 0 && n.m.watch != nil {
		n.m.watch.renamed(oldRel, newRel, exchange)
		n.m.arrived(newRel)
		if exchange {
			n.m.arrived(oldRel)
		}
	}
	if after != nil {
		after(errno == 0)
	}
	return errno
}

func (n *node) renameat(name string, np *node, newName string, flags uint32) syscall.Errno {
	dfd, errno := n.dir()
	if errno != 0 {
		return errno
	}
	defer unix.Close(dfd)
	ndfd, errno := np.dir()
	if errno != 0 {
		return errno
	}
	defer unix.Close(ndfd)
	return gofs.ToErrno(unix.Renameat2(dfd, name, ndfd, newName, uint(flags)))
}

func (n *node) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	if n.hidden(name) {
		return nil, syscall.EPERM
	}
	return n.makeAt(ctx, name, mode, out, unix.AT_REMOVEDIR, func(dfd int) error { return unix.Mkdirat(dfd, name, mode) })
}

func (n *node) Mknod(ctx context.Context, name string, mode, rdev uint32, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	if n.hidden(name) {
		return nil, syscall.EPERM
	}
	return n.makeAt(ctx, name, mode, out, 0, func(dfd int) error { return unix.Mknodat(dfd, name, mode, int(rdev)) })
}

func (n *node) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	if n.hidden(name) {
		return nil, syscall.EPERM
	}
	return n.makeAt(ctx, name, 0, out, 0, func(dfd int) error { return unix.Symlinkat(target, dfd, name) })
}

// makeAt runs mk to make name in n, then gives it to its caller (made);
// if that fails, the name goes again (unlinkat with undo's flags).
func (n *node) makeAt(ctx context.Context, name string, mode uint32, out *fuse.EntryOut, undo int, mk func(dfd int) error) (*gofs.Inode, syscall.Errno) {
	dfd, errno := n.dir()
	if errno != 0 {
		return nil, errno
	}
	defer unix.Close(dfd)
	if err := mk(dfd); err != nil {
		return nil, gofs.ToErrno(err)
	}
	in, errno := n.made(ctx, dfd, name, -1, mode, out)
	if errno != 0 {
		unix.Unlinkat(dfd, name, undo)
	}
	return in, errno
}

func (n *node) Link(ctx context.Context, target gofs.InodeEmbedder, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	if n.hidden(name) {
		return nil, syscall.EPERM
	}
	t, ok := target.(*node)
	if !ok {
		return nil, syscall.EXDEV
	}
	dfd, errno := n.dir()
	if errno != 0 {
		return nil, errno
	}
	defer unix.Close(dfd)
	var err error
	if tdfd, tname, errno := t.where(); errno == 0 {
		err = unix.Linkat(tdfd, tname, dfd, name, 0)
		unix.Close(tdfd)
	} else if fd, ok := t.openFd(); ok {
		// No name: a file made with O_TMPFILE, named now.
		err = unix.Linkat(fd, "", dfd, name, unix.AT_EMPTY_PATH)
		unix.Close(fd)
	} else {
		return nil, errno
	}
	if err != nil {
		return nil, gofs.ToErrno(err)
	}
	return n.entry(ctx, dfd, name, out)
}

// openFd is a duplicate of the descriptor of one of the node's open files,
// which the caller closes. Duplicated under openMu, which Release takes
// before it closes the file: the bare number, used after a concurrent
// release, could name whatever lfuse opened next (an adversarial run
// chmodded and chowned the backing root through a deleted file that way).
func (n *node) openFd() (int, bool) {
	n.openMu.Lock()
	defer n.openMu.Unlock()
	for f := range n.open {
		if fd, ok := f.LoopbackFile.PassthroughFd(); ok {
			if dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0); err == nil {
				return dup, true
			}
		}
	}
	return -1, false
}

// file is an open file. In passthrough mode the kernel reads and writes the
// backing file directly; otherwise data goes through lfuse and the kernel's
// page cache.
type file struct {
	*gofs.LoopbackFile
	passthrough bool
	rel         string // as opened
	obs         Observer
	node        *node
}

// Release closes the file.
func (f *file) Release(ctx context.Context) syscall.Errno {
	if !f.passthrough {
		f.node.cachedOpens.Add(-1)
	}
	f.node.openMu.Lock()
	delete(f.node.open, f)
	f.node.openMu.Unlock()
	return f.LoopbackFile.Release(ctx)
}

// PassthroughFd hands the backing file to the kernel, or declines to.
func (f *file) PassthroughFd() (int, bool) {
	if !f.passthrough {
		return 0, false
	}
	return f.LoopbackFile.PassthroughFd()
}

// Fsync honours fdatasync, which SQLite uses on Linux; a full fsync also
// commits the metadata every write changed, which costs a journal commit.
func (f *file) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	fd, ok := f.LoopbackFile.PassthroughFd()
	if !ok {
		return syscall.EBADF
	}
	if f.obs != nil {
		if done := f.obs.Syncing(f.rel); done != nil {
			defer done()
		}
	}
	var err error
	if flags&fsyncDataOnly != 0 {
		err = unix.Fdatasync(fd)
	} else {
		err = unix.Fsync(fd)
	}
	return gofs.ToErrno(err)
}

// fsyncDataOnly is FUSE_FSYNC_FDATASYNC.
const fsyncDataOnly = 1

// hidingDir is the root directory's listing without lfuse's state directory.
type hidingDir struct {
	gofs.FileHandle
	hide string
}

func (h *hidingDir) Readdirent(ctx context.Context) (*fuse.DirEntry, syscall.Errno) {
	r, ok := h.FileHandle.(gofs.FileReaddirenter)
	if !ok {
		return nil, syscall.ENOTSUP
	}
	for {
		e, errno := r.Readdirent(ctx)
		if e != nil && e.Name == h.hide {
			continue
		}
		return e, errno
	}
}

func (h *hidingDir) Seekdir(ctx context.Context, off uint64) syscall.Errno {
	if s, ok := h.FileHandle.(gofs.FileSeekdirer); ok {
		return s.Seekdir(ctx, off)
	}
	return syscall.ENOTSUP
}

func (h *hidingDir) Releasedir(ctx context.Context, flags uint32) {
	if r, ok := h.FileHandle.(gofs.FileReleasedirer); ok {
		r.Releasedir(ctx, flags)
	}
}

func (h *hidingDir) Fsyncdir(ctx context.Context, flags uint32) syscall.Errno {
	if s, ok := h.FileHandle.(gofs.FileFsyncdirer); ok {
		return s.Fsyncdir(ctx, flags)
	}
	return syscall.ENOTSUP
}
