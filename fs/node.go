package fs

import (
	"context"
	"path"
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
	return n.LoopbackNode.Lookup(ctx, name, out)
}

func (n *node) OpendirHandle(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	fh, fl, errno := n.LoopbackNode.OpendirHandle(ctx, flags)
	if errno == 0 && n.IsRoot() && n.m.hide != "" {
		fh = &hidingDir{FileHandle: fh, hide: n.m.hide}
	}
	return fh, fl, errno
}

func (n *node) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	rel := n.Path(nil)
	var after func(bool)
	if flags&syscall.O_TRUNC != 0 && n.m.obs != nil {
		after = n.m.obs.BeforeTruncate(rel)
	}
	fh, fl, errno := n.LoopbackNode.Open(ctx, flags)
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
	in, fh, fl, errno := n.LoopbackNode.Create(ctx, name, flags, mode, out)
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

func (n *node) Setattr(ctx context.Context, f gofs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if _, ok := in.GetSize(); ok && n.m.obs != nil {
		if after := n.m.obs.BeforeTruncate(n.Path(nil)); after != nil {
			errno := n.LoopbackNode.Setattr(ctx, f, in, out)
			after(errno == 0)
			return errno
		}
	}
	return n.LoopbackNode.Setattr(ctx, f, in, out)
}

func (n *node) Unlink(ctx context.Context, name string) syscall.Errno {
	if n.hidden(name) {
		return syscall.ENOENT
	}
	if n.m.obs == nil {
		return n.LoopbackNode.Unlink(ctx, name)
	}
	after := n.m.obs.BeforeUnlink(n.rel(name))
	errno := n.LoopbackNode.Unlink(ctx, name)
	if after != nil {
		after(errno == 0)
	}
	return errno
}

func (n *node) Rmdir(ctx context.Context, name string) syscall.Errno {
	if n.hidden(name) {
		return syscall.ENOENT
	}
	return n.LoopbackNode.Rmdir(ctx, name)
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
		return n.LoopbackNode.Rename(ctx, name, newParent, newName, flags)
	}
	oldRel, newRel := n.rel(name), np.rel(newName)
	exchange := flags&gofs.RENAME_EXCHANGE != 0
	var after func(ok bool)
	if exchange {
		after = n.m.obs.BeforeExchange(oldRel, newRel)
	} else {
		after = n.m.obs.BeforeRename(oldRel, newRel)
	}
	errno := n.LoopbackNode.Rename(ctx, name, newParent, newName, flags)
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

func (n *node) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	if n.hidden(name) {
		return nil, syscall.EPERM
	}
	return n.LoopbackNode.Mkdir(ctx, name, mode, out)
}

func (n *node) Mknod(ctx context.Context, name string, mode, rdev uint32, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	if n.hidden(name) {
		return nil, syscall.EPERM
	}
	return n.LoopbackNode.Mknod(ctx, name, mode, rdev, out)
}

func (n *node) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	if n.hidden(name) {
		return nil, syscall.EPERM
	}
	return n.LoopbackNode.Symlink(ctx, target, name, out)
}

func (n *node) Link(ctx context.Context, target gofs.InodeEmbedder, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	if n.hidden(name) {
		return nil, syscall.EPERM
	}
	return n.LoopbackNode.Link(ctx, target, name, out)
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
