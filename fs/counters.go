package fs

import (
	"sync/atomic"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// Request kinds counted, by the name of the FUSE operation.
const (
	opLookup = iota
	opGetattr
	opSetattr
	opOpen
	opCreate
	opRead
	opWrite
	opFlush
	opFsync
	opRelease
	opGetxattr
	opListxattr
	opSetxattr
	opUnlink
	opRename
	opMkdir
	opRmdir
	opReaddir
	opStatfs
	opAccess
	opLock
	opFallocate
	opLseek
	opStatx
	opCount
)

var opNames = [opCount]string{
	"lookup", "getattr", "setattr", "open", "create", "read", "write", "flush", "fsync", "release",
	"getxattr", "listxattr", "setxattr", "unlink", "rename", "mkdir", "rmdir", "readdir", "statfs",
	"access", "lock", "fallocate", "lseek", "statx",
}

// counters count the requests lfuse serves: a transaction that costs a
// round trip here is one the application can measure.
type counters struct{ n [opCount]atomic.Uint64 }

func (c *counters) snapshot() map[string]uint64 {
	out := make(map[string]uint64, opCount)
	for i := range c.n {
		if v := c.n[i].Load(); v > 0 {
			out[opNames[i]] = v
		}
	}
	return out
}

// counting counts requests on their way to the filesystem.
type counting struct {
	fuse.RawFileSystem
	c *counters
}

func (f *counting) inc(op int) { f.c.n[op].Add(1) }

func (f *counting) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	f.inc(opLookup)
	return f.RawFileSystem.Lookup(cancel, h, name, out)
}

func (f *counting) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	f.inc(opGetattr)
	return f.RawFileSystem.GetAttr(cancel, in, out)
}

func (f *counting) SetAttr(cancel <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	f.inc(opSetattr)
	return f.RawFileSystem.SetAttr(cancel, in, out)
}

func (f *counting) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	f.inc(opOpen)
	return f.RawFileSystem.Open(cancel, in, out)
}

func (f *counting) Create(cancel <-chan struct{}, in *fuse.CreateIn, name string, out *fuse.CreateOut) fuse.Status {
	f.inc(opCreate)
	return f.RawFileSystem.Create(cancel, in, name, out)
}

func (f *counting) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	f.inc(opRead)
	return f.RawFileSystem.Read(cancel, in, buf)
}

func (f *counting) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	f.inc(opWrite)
	return f.RawFileSystem.Write(cancel, in, data)
}

func (f *counting) Writev(cancel <-chan struct{}, in *fuse.WriteIn, data [][]byte) (uint32, fuse.Status) {
	f.inc(opWrite)
	return f.RawFileSystem.Writev(cancel, in, data)
}

func (f *counting) Flush(cancel <-chan struct{}, in *fuse.FlushIn) fuse.Status {
	f.inc(opFlush)
	return f.RawFileSystem.Flush(cancel, in)
}

func (f *counting) Fsync(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	f.inc(opFsync)
	return f.RawFileSystem.Fsync(cancel, in)
}

func (f *counting) Release(cancel <-chan struct{}, in *fuse.ReleaseIn) {
	f.inc(opRelease)
	f.RawFileSystem.Release(cancel, in)
}

func (f *counting) GetXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string, dest []byte) (uint32, fuse.Status) {
	f.inc(opGetxattr)
	return f.RawFileSystem.GetXAttr(cancel, h, attr, dest)
}

func (f *counting) ListXAttr(cancel <-chan struct{}, h *fuse.InHeader, dest []byte) (uint32, fuse.Status) {
	f.inc(opListxattr)
	return f.RawFileSystem.ListXAttr(cancel, h, dest)
}

func (f *counting) SetXAttr(cancel <-chan struct{}, in *fuse.SetXAttrIn, attr string, data []byte) fuse.Status {
	f.inc(opSetxattr)
	return f.RawFileSystem.SetXAttr(cancel, in, attr, data)
}

func (f *counting) Unlink(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	f.inc(opUnlink)
	return f.RawFileSystem.Unlink(cancel, h, name)
}

func (f *counting) Rename(cancel <-chan struct{}, in *fuse.RenameIn, oldName, newName string) fuse.Status {
	f.inc(opRename)
	return f.RawFileSystem.Rename(cancel, in, oldName, newName)
}

func (f *counting) Mkdir(cancel <-chan struct{}, in *fuse.MkdirIn, name string, out *fuse.EntryOut) fuse.Status {
	f.inc(opMkdir)
	return f.RawFileSystem.Mkdir(cancel, in, name, out)
}

func (f *counting) Rmdir(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	f.inc(opRmdir)
	return f.RawFileSystem.Rmdir(cancel, h, name)
}

func (f *counting) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	f.inc(opReaddir)
	return f.RawFileSystem.ReadDir(cancel, in, out)
}

func (f *counting) ReadDirPlus(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	f.inc(opReaddir)
	return f.RawFileSystem.ReadDirPlus(cancel, in, out)
}

func (f *counting) StatFs(cancel <-chan struct{}, h *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	f.inc(opStatfs)
	return f.RawFileSystem.StatFs(cancel, h, out)
}

func (f *counting) Access(cancel <-chan struct{}, in *fuse.AccessIn) fuse.Status {
	f.inc(opAccess)
	return f.RawFileSystem.Access(cancel, in)
}

func (f *counting) GetLk(cancel <-chan struct{}, in *fuse.LkIn, out *fuse.LkOut) fuse.Status {
	f.inc(opLock)
	return f.RawFileSystem.GetLk(cancel, in, out)
}

func (f *counting) SetLk(cancel <-chan struct{}, in *fuse.LkIn) fuse.Status {
	f.inc(opLock)
	return f.RawFileSystem.SetLk(cancel, in)
}

func (f *counting) SetLkw(cancel <-chan struct{}, in *fuse.LkIn) fuse.Status {
	f.inc(opLock)
	return f.RawFileSystem.SetLkw(cancel, in)
}

func (f *counting) Fallocate(cancel <-chan struct{}, in *fuse.FallocateIn) fuse.Status {
	f.inc(opFallocate)
	return f.RawFileSystem.Fallocate(cancel, in)
}

func (f *counting) Lseek(cancel <-chan struct{}, in *fuse.LseekIn, out *fuse.LseekOut) fuse.Status {
	f.inc(opLseek)
	return f.RawFileSystem.Lseek(cancel, in, out)
}

func (f *counting) Statx(cancel <-chan struct{}, in *fuse.StatxIn, out *fuse.StatxOut) fuse.Status {
	f.inc(opStatx)
	return f.RawFileSystem.Statx(cancel, in, out)
}
