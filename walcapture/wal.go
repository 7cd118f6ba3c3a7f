// Package walcapture turns the bytes of a SQLite write-ahead log into the
// transactions SQLite committed, in order, each exactly once.
//
// It applies the same rule SQLite's own WAL recovery applies: a frame belongs
// to the log only if its salts match the log header and the cumulative
// checksum, seeded by the header, validates through it; a transaction is
// committed once its commit frame (non-zero "database size" field) validates.
// Everything the package reads comes through io.ReaderAt, so it knows nothing
// of FUSE, files being written concurrently, or where the bytes came from.
package walcapture

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Sizes fixed by the SQLite WAL format.
const (
	HeaderSize      = 32
	FrameHeaderSize = 24

	walMagic   = 0x377f0682 // low bit set: checksums are computed on big-endian words
	walVersion = 3007000
)

// ErrNoHeader means the bytes hold no valid WAL header. SQLite treats such a
// log as empty, and so does this package.
var ErrNoHeader = errors.New("no valid WAL header")

// Header is the 32-byte header at the start of a WAL file. SQLite writes a
// new one, with new salts, each time it restarts the log from the beginning.
type Header struct {
	BigEndian bool // checksum words are big-endian (magic 0x377f0683)
	PageSize  uint32
	CkptSeq   uint32
	Salt1     uint32
	Salt2     uint32
	Cksum1    uint32
	Cksum2    uint32
}

// ParseHeader decodes and validates a WAL header.
func ParseHeader(b []byte) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, fmt.Errorf("%w: %d bytes, need %d", ErrNoHeader, len(b), HeaderSize)
	}
	magic := binary.BigEndian.Uint32(b[0:])
	if magic&^1 != walMagic {
		return Header{}, fmt.Errorf("%w: bad magic %08x", ErrNoHeader, magic)
	}
	if v := binary.BigEndian.Uint32(b[4:]); v != walVersion {
		return Header{}, fmt.Errorf("%w: unsupported version %d", ErrNoHeader, v)
	}
	h := Header{
		BigEndian: magic&1 == 1,
		PageSize:  binary.BigEndian.Uint32(b[8:]),
		CkptSeq:   binary.BigEndian.Uint32(b[12:]),
		Salt1:     binary.BigEndian.Uint32(b[16:]),
		Salt2:     binary.BigEndian.Uint32(b[20:]),
		Cksum1:    binary.BigEndian.Uint32(b[24:]),
		Cksum2:    binary.BigEndian.Uint32(b[28:]),
	}
	if !ValidPageSize(h.PageSize) {
		return Header{}, fmt.Errorf("%w: invalid page size %d", ErrNoHeader, h.PageSize)
	}
	s1, s2 := Checksum(h.BigEndian, b[:24], 0, 0)
	if s1 != h.Cksum1 || s2 != h.Cksum2 {
		return Header{}, fmt.Errorf("%w: header checksum mismatch", ErrNoHeader)
	}
	return h, nil
}

// ValidPageSize reports whether n is a SQLite page size: a power of two from
// 512 to 65536.
func ValidPageSize(n uint32) bool {
	return n >= 512 && n <= 65536 && n&(n-1) == 0
}

// FrameSize is the size of one frame (header and page) in a log of this header.
func (h Header) FrameSize() int64 { return FrameHeaderSize + int64(h.PageSize) }

// FrameOffset is the file offset of the frame with 0-based index i.
func (h Header) FrameOffset(i int64) int64 { return HeaderSize + i*h.FrameSize() }

// PageOffset is the file offset of the page data of the frame with index i.
func (h Header) PageOffset(i uint32) int64 { return h.FrameOffset(int64(i)) + FrameHeaderSize }

// SameGeneration reports whether g is the same log generation as h: the
// same header, byte for byte. Equal salts are not enough: a writer that
// restarts the log and dies before committing leaves its salts in the WAL
// index, and the next writer rewrites the header with them but with its
// own checkpoint counter, hence another header checksum, which seeds the
// checksum chain of every frame after it.
func (h Header) SameGeneration(g Header) bool { return h == g }

// FrameHeader is the 24-byte header in front of every page in the log.
type FrameHeader struct {
	Pgno   uint32
	Commit uint32 // database size in pages after this commit; 0 if not a commit frame
	Salt1  uint32
	Salt2  uint32
	Cksum1 uint32
	Cksum2 uint32
}

// ParseFrameHeader decodes a frame header without validating it.
func ParseFrameHeader(b []byte) FrameHeader {
	_ = b[FrameHeaderSize-1]
	return FrameHeader{
		Pgno:   binary.BigEndian.Uint32(b[0:]),
		Commit: binary.BigEndian.Uint32(b[4:]),
		Salt1:  binary.BigEndian.Uint32(b[8:]),
		Salt2:  binary.BigEndian.Uint32(b[12:]),
		Cksum1: binary.BigEndian.Uint32(b[16:]),
		Cksum2: binary.BigEndian.Uint32(b[20:]),
	}
}

// Checksum extends SQLite's WAL checksum (s1, s2) over b, whose length must
// be a multiple of 8 (a trailing partial word is ignored). Words are read
// big-endian when bigEndian is set, else little-endian, as the WAL magic
// number says.
func Checksum(bigEndian bool, b []byte, s1, s2 uint32) (uint32, uint32) {
	if bigEndian {
		for i := 0; i+8 <= len(b); i += 8 {
			s1 += binary.BigEndian.Uint32(b[i:]) + s2
			s2 += binary.BigEndian.Uint32(b[i+4:]) + s1
		}
		return s1, s2
	}
	for i := 0; i+8 <= len(b); i += 8 {
		s1 += binary.LittleEndian.Uint32(b[i:]) + s2
		s2 += binary.LittleEndian.Uint32(b[i+4:]) + s1
	}
	return s1, s2
}

// validFrame checks one frame (hdr+page) against the log header h and the
// running checksum (s1, s2) and returns the checksum after it.
func validFrame(h Header, frame []byte, s1, s2 uint32) (FrameHeader, uint32, uint32, bool) {
	fh := ParseFrameHeader(frame)
	if fh.Pgno == 0 || fh.Salt1 != h.Salt1 || fh.Salt2 != h.Salt2 {
		return fh, s1, s2, false
	}
	s1, s2 = Checksum(h.BigEndian, frame[:8], s1, s2)
	s1, s2 = Checksum(h.BigEndian, frame[FrameHeaderSize:], s1, s2)
	if s1 != fh.Cksum1 || s2 != fh.Cksum2 {
		return fh, s1, s2, false
	}
	return fh, s1, s2, true
}

// DBHeaderPageSize returns the page size recorded in a database file header
// (the first 100 bytes of page 1), or 0 if b is not a SQLite database header.
func DBHeaderPageSize(b []byte) uint32 {
	if !IsDBHeader(b) {
		return 0
	}
	n := uint32(binary.BigEndian.Uint16(b[16:]))
	if n == 1 {
		n = 65536
	}
	if !ValidPageSize(n) {
		return 0
	}
	return n
}

// IsDBHeader reports whether b starts with the SQLite database magic string.
func IsDBHeader(b []byte) bool {
	return len(b) >= 100 && string(b[:16]) == "SQLite format 3\x00"
}

// DBHeaderWAL reports whether a database header marks the file as being in
// WAL mode (read and write format versions 2).
func DBHeaderWAL(b []byte) bool {
	return IsDBHeader(b) && b[18] == 2 && b[19] == 2
}

// IndexHeader is what SQLite's WAL index (the -shm file) says about the
// log: how many frames are committed, in which generation.
type IndexHeader struct {
	MaxFrame     uint32
	Salt1, Salt2 uint32
}

// ParseIndexHeader reads the header at the start of a -shm file. SQLite
// keeps two copies, written in the machine's byte order, and updates them
// only after a commit's frames are in the log; they differ while a writer
// updates them, and ok is false then (and for anything unrecognizable).
func ParseIndexHeader(b []byte) (IndexHeader, bool) {
	const size = 48
	if len(b) < 2*size || string(b[:size]) != string(b[size:2*size]) {
		return IndexHeader{}, false
	}
	ne := binary.NativeEndian
	if ne.Uint32(b[0:]) != 3007000 || b[12] != 1 {
		return IndexHeader{}, false // not a version SQLite uses, or not initialized
	}
	// The salts are copied from the log's header bytes as they are.
	return IndexHeader{MaxFrame: ne.Uint32(b[16:]), Salt1: binary.BigEndian.Uint32(b[32:]), Salt2: binary.BigEndian.Uint32(b[36:])}, true
}
