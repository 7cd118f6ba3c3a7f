package replicate

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/lfuse/lfuse/walcapture"
	"github.com/superfly/ltx"
)

// Sums is the LTX checksum of every page of a database as of one TXID,
// kept in a memory-mapped file so that memory does not grow with the
// database: the kernel pages the table in and out like any file.
//
// The file is a 64-byte header (magic, TXID, page count, total) followed by
// one 8-byte checksum per page. The header's TXID is written after the
// entries it describes, so after a crash the table is at that TXID or
// partly ahead of it; replaying records from that TXID on makes it exact.
type Sums struct {
	f     *os.File
	m     []byte
	n     uint32 // pages
	total ltx.Checksum
	txid  ltx.TXID
}

var errNotSums = errors.New("not a page checksum table")

const (
	sumsHeader  = 64
	sumsMagic   = "LFUSESUMS1\x00\x00"
	sumsMinGrow = 64 << 10 // the table grows at least this much, at most doubling
)

// OpenSums opens or creates the table at path.
func OpenSums(path string) (*Sums, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	s := &Sums{f: f}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if st.Size() < sumsHeader {
		if err := s.remap(sumsHeader + sumsMinGrow); err != nil {
			f.Close()
			return nil, err
		}
		copy(s.m, sumsMagic)
		return s, nil
	}
	if err := s.remap(st.Size()); err != nil {
		f.Close()
		return nil, err
	}
	if string(s.m[:len(sumsMagic)]) != sumsMagic {
		s.Close()
		return nil, fmt.Errorf("%s: %w", path, errNotSums)
	}
	s.txid = ltx.TXID(binary.BigEndian.Uint64(s.m[16:]))
	s.n = binary.BigEndian.Uint32(s.m[24:])
	s.total = ltx.Checksum(binary.BigEndian.Uint64(s.m[32:]))
	if int64(s.n)*8+sumsHeader > int64(len(s.m)) {
		s.n = 0
		s.txid = 0
	}
	return s, nil
}

func (s *Sums) remap(size int64) error {
	if s.m != nil {
		if err := unix.Munmap(s.m); err != nil {
			return err
		}
		s.m = nil
	}
	// Allocate the blocks now: a store into a mapped page that the
	// filesystem cannot back (a full disk) would kill the process with
	// SIGBUS instead of returning an error.
	if err := unix.Fallocate(int(s.f.Fd()), 0, 0, size); err != nil {
		return fmt.Errorf("grow page checksum table: %w", err)
	}
	m, err := unix.Mmap(int(s.f.Fd()), 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("map page checksum table: %w", err)
	}
	s.m = m
	return nil
}

// TXID is the transaction the table describes.
func (s *Sums) TXID() ltx.TXID { return s.txid }

func (s *Sums) Len() uint32 { return s.n }

func (s *Sums) Get(pgno uint32) ltx.Checksum {
	if pgno == 0 || pgno > s.n {
		return 0
	}
	return ltx.Checksum(binary.BigEndian.Uint64(s.m[sumsHeader+int64(pgno-1)*8:]))
}

func (s *Sums) Total() ltx.Checksum { return ltx.ChecksumFlag | s.total }

func (s *Sums) put(pgno uint32, sum ltx.Checksum) {
	binary.BigEndian.PutUint64(s.m[sumsHeader+int64(pgno-1)*8:], uint64(sum))
}

// Reserve makes room for n pages, so that recording a transaction of that
// size cannot fail for lack of space.
func (s *Sums) Reserve(n uint32) error {
	if need := sumsHeader + int64(n)*8; need > int64(len(s.m)) {
		size := max(need, 2*int64(len(s.m)))
		size = min(size, need+64<<20)
		size = (size + sumsMinGrow - 1) / sumsMinGrow * sumsMinGrow
		if err := s.remap(size); err != nil {
			return err
		}
	}
	return nil
}

// resize sets the page count, zeroing pages dropped or added.
func (s *Sums) resize(n uint32) error {
	if err := s.Reserve(n); err != nil {
		return err
	}
	for p := n + 1; p <= s.n; p++ {
		s.total ^= s.Get(p) &^ ltx.ChecksumFlag
		s.put(p, 0)
	}
	for p := s.n + 1; p <= n; p++ {
		s.put(p, 0)
	}
	s.n = n
	return nil
}

// Apply records a transaction's changes and marks the table as of txid.
func (s *Sums) Apply(u walcapture.Update, txid ltx.TXID) error {
	if err := s.resize(u.Commit); err != nil {
		return err
	}
	if len(u.Sums) != len(u.Pgnos) {
		return fmt.Errorf("TXID %s: an update of %d pages with %d sums", txid, len(u.Pgnos), len(u.Sums))
	}
	for i, pgno := range u.Pgnos {
		s.total ^= (s.Get(pgno) ^ u.Sums[i]) &^ ltx.ChecksumFlag
		s.put(pgno, u.Sums[i])
	}
	if got := s.Total(); got != u.Total {
		return fmt.Errorf("page checksum table disagrees with TXID %s: %s, want %s", txid, got, u.Total)
	}
	s.setTXID(txid)
	return nil
}

func (s *Sums) setTXID(txid ltx.TXID) {
	s.txid = txid
	binary.BigEndian.PutUint32(s.m[24:], s.n)
	binary.BigEndian.PutUint64(s.m[32:], uint64(s.total))
	binary.BigEndian.PutUint64(s.m[16:], uint64(txid))
}

// Reset empties the table before a snapshot refills it with Set. It starts
// from nothing rather than removing the entries one by one from the total:
// a stop or crash between a Reset and its Finish leaves entries on disk
// that are partly the new snapshot's, and removing those from the old
// total left a residue that failed every later snapshot, across restarts,
// so that the database was never replicated again.
func (s *Sums) Reset() error {
	s.n, s.total = 0, 0
	s.setTXID(0)
	return nil
}

// Set replaces one page's checksum during a snapshot (0 drops the page).
func (s *Sums) Set(pgno uint32, sum ltx.Checksum) {
	if pgno > s.n {
		if err := s.resize(pgno); err != nil {
			// Surface at Finish: the total will not match.
			s.total = ^ltx.Checksum(0)
			return
		}
	}
	s.total ^= (s.Get(pgno) ^ sum) &^ ltx.ChecksumFlag
	s.put(pgno, sum)
}

// Finish completes a snapshot of commit pages with checksum total at txid.
func (s *Sums) Finish(commit uint32, total ltx.Checksum, txid ltx.TXID) error {
	if err := s.resize(commit); err != nil {
		return err
	}
	if s.Total() != total {
		return fmt.Errorf("page checksum table disagrees with snapshot %s: %s, want %s", txid, s.Total(), total)
	}
	s.setTXID(txid)
	return nil
}

// Verify recomputes the total from the entries and checks it against the
// header and against want.
func (s *Sums) Verify(want ltx.Checksum) error {
	var raw ltx.Checksum
	for p := uint32(1); p <= s.n; p++ {
		raw ^= s.Get(p) &^ ltx.ChecksumFlag
	}
	if raw != s.total&^ltx.ChecksumFlag {
		return errors.New("page checksum table entries do not add up to its total")
	}
	if s.Total() != want {
		return fmt.Errorf("page checksum table is at %s, the log at %s", s.Total(), want)
	}
	return nil
}

// Sync writes the table to disk.
func (s *Sums) Sync() error {
	return msync(s.m)
}

func (s *Sums) Close() error {
	var err error
	if s.m != nil {
		err = unix.Munmap(s.m)
		s.m = nil
	}
	return errors.Join(err, s.f.Close())
}

func msync(b []byte) error {
	if len(b) == 0 {
		return nil
	}
	return unix.Msync(b, unix.MS_SYNC)
}
