package fs

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// Every operation on a name in the backing directory goes through the
// descriptor of its directory, opened beneath the backing root without
// following any symlink, and a system call relative to it that does not
// follow the name itself. go-fuse's loopback instead joins the names of its
// tree into an absolute path and lets the kernel follow it, as root. Its
// tree lags behind a rename in progress, so a user who swapped a directory
// of theirs with a symlink (renameat2 RENAME_EXCHANGE, in a loop) while
// asking for an operation under it had it done, as root, under the
// symlink's target anywhere on the machine. An adversarial run chmodded,
// truncated, deleted and took ownership of root's files that way as
// nobody.

// openDir opens the directory at rel (relative to the backing root, "" for
// the root) as an O_PATH descriptor, refusing any symlink on the way.
func (m *Mount) openDir(rel string) (int, syscall.Errno) {
	if rel == "" {
		rel = "."
	}
	how := unix.OpenHow{Flags: unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC, Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS}
	for attempt := 0; ; attempt++ {
		fd, err := unix.Openat2(m.rootFd, rel, &how)
		switch {
		case err == nil:
			return fd, 0
		case errors.Is(err, unix.ENOSYS), errors.Is(err, unix.EPERM), errors.Is(err, unix.ENAMETOOLONG):
			// Kernels before 5.6, and seccomp profiles that predate
			// openat2 (some answer EPERM); a path past PATH_MAX, which
			// a deep tree made with mkdirat reaches.
			return walkDir(m.rootFd, rel)
		case errors.Is(err, unix.EAGAIN) && attempt < 3:
			continue // a rename raced with the lookup
		}
		return -1, gofs.ToErrno(err)
	}
}

// walkDir is openDir one name at a time, for kernels without openat2.
func walkDir(root int, rel string) (int, syscall.Errno) {
	fd, err := unix.Openat(root, ".", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, gofs.ToErrno(err)
	}
	for _, name := range strings.Split(rel, "/") {
		if name == "" || name == "." {
			continue
		}
		next, err := unix.Openat(fd, name, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		unix.Close(fd)
		if err != nil {
			return -1, gofs.ToErrno(err)
		}
		fd = next
	}
	return fd, 0
}

// dir opens n, a directory, for operations on the names in it.
func (n *node) dir() (int, syscall.Errno) { return n.m.openDir(n.Path(nil)) }

// where opens the directory that holds n and gives n's name in it (the
// root is "." in itself). A node deleted while open has neither.
func (n *node) where() (int, string, syscall.Errno) {
	if n.IsRoot() {
		fd, errno := n.m.openDir("")
		return fd, ".", errno
	}
	name, parent := n.Parent()
	if parent == nil {
		return -1, "", syscall.ENOENT
	}
	fd, errno := n.m.openDir(parent.Path(nil))
	return fd, name, errno
}

// pin opens n itself as an O_PATH descriptor, so that every step of an
// operation acts on that one inode whatever happens to its name. A file
// deleted while open is reached through one of its open descriptors.
func (n *node) pin() (int, syscall.Errno) {
	dfd, name, errno := n.where()
	if errno == syscall.ENOENT && !n.IsRoot() {
		if fd, ok := n.openFd(); ok {
			return fd, 0
		}
	}
	if errno != 0 {
		return -1, errno
	}
	defer unix.Close(dfd)
	fd, err := unix.Openat(dfd, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	return fd, gofs.ToErrno(err)
}

// procPath names the inode behind fd for the calls that only take a path:
// the kernel resolves it to that inode, not through any name.
func procPath(fd int) string { return "/proc/self/fd/" + strconv.Itoa(fd) }

// statAt is fstatat without following name, with the birth time go-fuse
// uses to tell a reused inode number from the file it had.
func statAt(dfd int, name string, flags int, st *syscall.Stat_t) (gen uint64, errno syscall.Errno) {
	var x unix.Statx_t
	err := unix.Statx(dfd, name, flags|unix.AT_SYMLINK_NOFOLLOW, unix.STATX_BASIC_STATS|unix.STATX_BTIME, &x)
	if errors.Is(err, unix.ENOSYS) {
		// A seccomp filter without statx: struct stat is the kernel's
		// either way.
		err = unix.Fstatat(dfd, name, (*unix.Stat_t)(unsafe.Pointer(st)), flags|unix.AT_SYMLINK_NOFOLLOW)
		return 1, gofs.ToErrno(err)
	}
	if err != nil {
		return 0, gofs.ToErrno(err)
	}
	setNum(&st.Dev, uint64(unix.Mkdev(x.Dev_major, x.Dev_minor)))
	setNum(&st.Ino, x.Ino)
	setNum(&st.Nlink, uint64(x.Nlink))
	setNum(&st.Mode, uint64(x.Mode))
	setNum(&st.Uid, uint64(x.Uid))
	setNum(&st.Gid, uint64(x.Gid))
	setNum(&st.Rdev, uint64(unix.Mkdev(x.Rdev_major, x.Rdev_minor)))
	setNum(&st.Size, x.Size)
	setNum(&st.Blksize, uint64(x.Blksize))
	setNum(&st.Blocks, x.Blocks)
	st.Atim = timespec(x.Atime)
	st.Mtim = timespec(x.Mtime)
	st.Ctim = timespec(x.Ctime)
	gen = 1
	if x.Mask&unix.STATX_BTIME != 0 && (x.Btime.Sec != 0 || x.Btime.Nsec != 0) {
		gen = uint64(x.Btime.Sec)*1e9 + uint64(x.Btime.Nsec)
	}
	return gen, 0
}

// setNum stores v in a Stat_t field, whose width differs between
// architectures.
func setNum[T ~int32 | ~int64 | ~uint16 | ~uint32 | ~uint64](p *T, v uint64) { *p = T(v) }

// timespec converts a statx time, without going through nanoseconds since
// 1970, which an int64 holds only until 2262.
func timespec(t unix.StatxTimestamp) syscall.Timespec {
	var ts syscall.Timespec
	setInt(&ts.Sec, t.Sec)
	setInt(&ts.Nsec, int64(t.Nsec))
	return ts
}

func setInt[T ~int32 | ~int64](p *T, v int64) { *p = T(v) }

// child makes the inode for name, a file in directory n described by st.
func (n *node) child(ctx context.Context, name string, st *syscall.Stat_t, gen uint64) *gofs.Inode {
	r := n.RootData
	ops := &node{LoopbackNode: gofs.LoopbackNode{RootData: r}, m: n.m}
	// The inode number go-fuse gives every loopback file: the backing one,
	// with the device mixed in for files on other filesystems.
	swapped := uint64(st.Dev)<<32 | uint64(st.Dev)>>32
	rootSwapped := r.Dev<<32 | r.Dev>>32
	return n.NewInode(ctx, ops, gofs.StableAttr{Mode: uint32(st.Mode), Gen: gen, Ino: swapped ^ rootSwapped ^ uint64(st.Ino)})
}

// made finishes a name just created in directory dfd: owned by the caller
// (lfuse creates it as root) and with exactly the mode asked for, then
// described in out.
//
// The mode asked for already has the caller's umask applied by the kernel;
// lfuse's own umask then took more bits away, and the chown that gives the
// file to its caller clears setuid and setgid. In a setgid directory the
// new name keeps the group it inherited there, as on any filesystem.
func (n *node) made(ctx context.Context, dfd int, name string, fd int, mode uint32, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	if fd < 0 {
		// Everything below acts on the one inode made, not on the name.
		pfd, err := unix.Openat(dfd, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, gofs.ToErrno(err)
		}
		defer unix.Close(pfd)
		fd = pfd
	}
	if caller, ok := fuse.FromContext(ctx); ok && n.m.asRoot {
		gid := int(caller.Gid)
		var dst unix.Stat_t
		if unix.Fstat(dfd, &dst) == nil && dst.Mode&unix.S_ISGID != 0 {
			gid = -1
		}
		if err := unix.Fchownat(fd, "", int(caller.Uid), gid, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return nil, gofs.ToErrno(err)
		}
	}
	var st syscall.Stat_t
	gen, errno := statAt(fd, "", unix.AT_EMPTY_PATH, &st)
	if errno != 0 {
		return nil, errno
	}
	if missing := mode & 0o7777 &^ uint32(st.Mode); missing != 0 && st.Mode&syscall.S_IFMT != syscall.S_IFLNK {
		perm := uint32(st.Mode)&0o7777 | missing
		if err := unix.Chmod(procPath(fd), perm); err != nil {
			return nil, gofs.ToErrno(err)
		}
		st.Mode = st.Mode&^0o7777 | perm
	}
	out.Attr.FromStat(&st)
	return n.child(ctx, name, &st, gen), 0
}

// xattrPath names n for the xattr calls, which take only paths: its
// directory's descriptor through /proc, then its name, which the l-variants
// do not follow (follow is false). A file deleted while open is named by
// one of its open descriptors, which the plain calls follow to it.
func (n *node) xattrPath() (path string, follow bool, done func(), errno syscall.Errno) {
	dfd, name, errno := n.where()
	if errno == syscall.ENOENT && !n.IsRoot() {
		if fd, ok := n.openFd(); ok {
			return procPath(fd), true, func() { unix.Close(fd) }, 0
		}
	}
	if errno != 0 {
		return "", false, nil, errno
	}
	return procPath(dfd) + "/" + name, false, func() { unix.Close(dfd) }, 0
}

// xattr runs call on n's xattrPath.
func (n *node) xattr(call func(path string, follow bool) (int, error)) (uint32, syscall.Errno) {
	p, follow, done, errno := n.xattrPath()
	if errno != 0 {
		return 0, errno
	}
	defer done()
	k, err := call(p, follow)
	return uint32(max(k, 0)), gofs.ToErrno(err)
}

func (n *node) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	return n.xattr(func(p string, follow bool) (int, error) {
		if follow {
			return unix.Getxattr(p, attr, dest)
		}
		return unix.Lgetxattr(p, attr, dest)
	})
}

func (n *node) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	return n.xattr(func(p string, follow bool) (int, error) {
		if follow {
			return unix.Listxattr(p, dest)
		}
		return unix.Llistxattr(p, dest)
	})
}

func (n *node) Setxattr(ctx context.Context, attr string, data []byte, flags uint32) syscall.Errno {
	_, errno := n.xattr(func(p string, follow bool) (int, error) {
		if follow {
			return 0, unix.Setxattr(p, attr, data, int(flags))
		}
		return 0, unix.Lsetxattr(p, attr, data, int(flags))
	})
	return errno
}

func (n *node) Removexattr(ctx context.Context, attr string) syscall.Errno {
	_, errno := n.xattr(func(p string, follow bool) (int, error) {
		if follow {
			return 0, unix.Removexattr(p, attr)
		}
		return 0, unix.Lremovexattr(p, attr)
	})
	return errno
}

// Ioctl passes on only the ioctls that read a file's attribute flags. lfuse
// would run any other as root on the backing file, whoever asked: an
// unprivileged user's FITRIM got past ext4's CAP_SYS_ADMIN check (an
// adversarial run), and EXT4_IOC_SHUTDOWN would have done the same. A
// caller that is root gets them all, as it would natively.
func (n *node) Ioctl(ctx context.Context, f gofs.FileHandle, cmd uint32, arg uint64, input, output []byte) (int32, syscall.Errno) {
	io, ok := f.(gofs.FileIoctler)
	if !ok {
		return 0, syscall.ENOTTY
	}
	caller, ok := fuse.FromContext(ctx)
	reads := cmd == unix.FS_IOC_GETFLAGS || cmd == fsIOC32GetFlags || cmd == fsIOCFSGetXattr // one value on 32-bit targets
	if (!ok || caller.Uid != 0) && !reads {
		return 0, syscall.ENOTTY
	}
	return io.Ioctl(ctx, cmd, arg, input, output)
}

// The read-only attribute ioctls x/sys/unix does not name (linux/fs.h).
const (
	fsIOC32GetFlags = 0x80046601 // FS_IOC32_GETFLAGS
	fsIOCFSGetXattr = 0x801c581f // FS_IOC_FSGETXATTR
)
