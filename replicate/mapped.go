package replicate

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"unsafe"

	"golang.org/x/sys/unix"
)

// mappedLTX is an LTX file mapped into memory, which decodeLTX reads in
// place. Reading a file through read(2) copies every byte from the page
// cache into the process, and restoring the benchmark database spent more
// CPU on that copy than on decompressing (docs/BENCHMARKS.md); mapped, the
// decompressor reads the page cache itself. Tests build one over any slice.
type mappedLTX struct {
	*bytes.Reader
	data   []byte
	mapped bool // data is a mapping: release and unmap apply
}

func newMappedLTX(data []byte) *mappedLTX {
	return &mappedLTX{Reader: bytes.NewReader(data), data: data}
}

// mapLTX maps the whole of f, a regular file read from its start.
func mapLTX(f *os.File) (*mappedLTX, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	// Where the size does not fit an int (a 32-bit build), or the address
	// space has no room, the caller reads the file instead.
	if !fi.Mode().IsRegular() || fi.Size() == 0 || fi.Size() > 1<<40 || int64(int(fi.Size())) != fi.Size() {
		return nil, errors.New("not a mappable file")
	}
	if pos, err := f.Seek(0, io.SeekCurrent); err != nil || pos != 0 {
		return nil, errors.New("not read from its start")
	}
	data, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, err
	}
	// The decoder reads it once, front to back: read ahead generously and
	// drop what is behind.
	_ = unix.Madvise(data, unix.MADV_SEQUENTIAL)
	m := newMappedLTX(data)
	m.mapped = true
	return m, nil
}

func (m *mappedLTX) unmap() {
	if m.mapped {
		_ = unix.Munmap(m.data)
		m.mapped = false
	}
	m.data = nil
}

// release unmaps the pages of the file before offset end, which the
// restore is done with, from the process (not from the page cache), so
// that its resident memory stays a few batches rather than the file.
// released is where the previous release stopped; the new one is returned.
func (m *mappedLTX) release(released, end int) int {
	end &^= os.Getpagesize() - 1
	if !m.mapped || end <= released {
		return released
	}
	_ = unix.Madvise(m.data[released:end], unix.MADV_DONTNEED)
	return end
}

// onFault turns a memory fault inside m's mapping on the calling goroutine
// into an error: the kernel reports a read error of a mapped file, or the
// file being cut short while mapped, as a fault, which would otherwise
// crash the process. Any other panic goes on. Use: defer onFault(m)(&err).
func onFault(m *mappedLTX) func(*error) {
	if m == nil || !m.mapped {
		return func(*error) {}
	}
	old := debug.SetPanicOnFault(true)
	base := uintptr(unsafe.Pointer(unsafe.SliceData(m.data)))
	size := uintptr(len(m.data))
	return func(err *error) {
		debug.SetPanicOnFault(old)
		r := recover()
		if r == nil {
			return
		}
		if f, ok := r.(interface{ Addr() uintptr }); ok && f.Addr()-base < size {
			*err = mapFault{offset: int64(f.Addr() - base)}
			return
		}
		panic(r)
	}
}

// mapFault is a fault reading a mapped file: the file could not be read,
// which says nothing of whether its content is sound.
type mapFault struct{ offset int64 }

func (e mapFault) Error() string {
	return fmt.Sprintf("byte %d could not be read: an I/O error, or the file was cut short while being read", e.offset)
}
