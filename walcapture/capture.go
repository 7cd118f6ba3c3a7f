package walcapture

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"sync"

	"github.com/superfly/ltx"
)

// ErrDiverged means the log no longer holds a transaction this Capturer
// already emitted: SQLite discarded it (a writer died between writing its
// commit frame and publishing it) or the file was changed behind SQLite's
// back. Whatever was built on the emitted history must start again from a
// snapshot.
var ErrDiverged = errors.New("WAL no longer holds a transaction that was already captured")

// Page locates the final image of one page of a transaction in the log.
//
// A frame index rather than a file offset: a bulk load or a VACUUM commits
// every page of the database in one transaction, and capture holds its list
// of pages in memory (8 bytes a page instead of 16).
type Page struct {
	Pgno  uint32
	Frame uint32 // index of its frame in the log; Header.PageOffset says where its data is
}

// Txn is one transaction SQLite committed to the log.
type Txn struct {
	Header Header // the log generation it belongs to
	Offset int64  // file offset of its first frame
	Size   int64  // bytes taken by its frames
	Commit uint32 // database size in pages after the commit
	Pages  []Page // final image of every page it changed, ascending, none beyond Commit
}

// End is the file offset just past the transaction's commit frame.
func (t Txn) End() int64 { return t.Offset + t.Size }

// IndexSpillEntries is how many page index entries an LTX encoder with a
// spill directory keeps in memory before it moves the index to a file
// there: 64 Ki entries, 1.5 MB. The library's default, 1 Mi entries (24 MB),
// spills only above 4 GB of 4 KB pages, and a snapshot is encoded twice at
// once (into the local log, and merged for the upload), with compactions
// beside it: a 2 GB database's snapshot held 12.6 MB of index per encoder,
// and lfuse's anonymous memory peaked at 59-83 MB while it was taken.
const IndexSpillEntries = 1 << 16

// NewEncoder is an LTX encoder writing to w that, if spillDir is set, moves
// its page index there past IndexSpillEntries.
func NewEncoder(w io.Writer, spillDir string) (*ltx.Encoder, error) {
	enc, err := ltx.NewEncoder(w)
	if err != nil {
		return nil, err
	}
	if spillDir != "" {
		enc.SetSpillDir(spillDir)
		enc.SetSpillThreshold(IndexSpillEntries)
	}
	return enc, nil
}

// Pos is a capture position: the log generation (by its salts) and the file
// offset just past the last captured commit frame. Offset 0 means nothing of
// that generation has been captured.
type Pos struct {
	Salt1, Salt2 uint32
	Offset       int64
}

// ScanResult says what one Scan found.
type ScanResult struct {
	Txns          int  // transactions emitted
	NewGeneration bool // the log was restarted (new salts) since the previous scan
	// Unverified is the size in bytes of a long unfinished transaction at the
	// end of the log that this scan resumed rather than validated from its
	// first frame (0: none). A commit written over its frames after a
	// rollback would go unseen until Recheck; see scanFrames.
	Unverified int64
}

// partialMin is the size of an unfinished transaction worth remembering
// between scans, so a long transaction is not re-read from its start each time
// more of it arrives.
const partialMin = 1 << 20

// Capturer follows one WAL file. It is not safe for concurrent use; callers
// serialize Scan with whatever may change the file in ways SQLite does not
// (and with the operations that would destroy frames, which they hold until
// Scan has captured them).
type Capturer struct {
	// SpillDir, if set, is where large snapshots keep their LTX page index
	// while being written, so memory does not grow with database size (see
	// IndexSpillEntries).
	SpillDir string

	hdr    Header
	hasHdr bool
	next   int64  // offset of the first frame not yet captured
	s1, s2 uint32 // checksum chain at next

	// Identity of the last emitted transaction's first frame, to notice when
	// SQLite discards it (see ErrDiverged).
	lastOff   int64
	lastFirst []byte

	partial *partialTxn
	fr      frameReader
}

type partialTxn struct {
	hdr    Header
	start  int64 // offset of the transaction's first frame
	off    int64 // offset of the next frame to validate
	s1, s2 uint32
	pages  []Page // its frames so far, in log order
	first  []byte
	// unverified: the last scan resumed the transaction rather than
	// validating it from its first frame, so a commit before off, over its
	// frames, was not ruled out.
	unverified bool
	// stale is the header of the frame at off if it was there and did not
	// validate (a leftover of a longer transaction rolled back earlier).
	stale []byte
}

// Recheck makes the next Scan validate an unverified unfinished transaction
// from its first frame, which finds any commit written over its frames.
func (c *Capturer) Recheck() {
	if c.partial != nil && c.partial.unverified {
		c.partial = nil
	}
}

// Mark returns the Capturer's state, to Rewind to if what Scan emitted
// since could not be stored.
func (c *Capturer) Mark() Capturer {
	m := *c
	m.partial = nil
	m.fr = frameReader{} // the buffer stays the Capturer's own
	return m
}

// Rewind returns to a state from Mark.
func (c *Capturer) Rewind(m Capturer) {
	fr := c.fr
	*c = m
	c.fr = fr
}

// Pos returns the current capture position.
func (c *Capturer) Pos() Pos {
	if !c.hasHdr {
		return Pos{}
	}
	off := c.next
	if off == HeaderSize {
		off = 0
	}
	return Pos{Salt1: c.hdr.Salt1, Salt2: c.hdr.Salt2, Offset: off}
}

// ReadFrom returns the lowest offset a later Scan of the generation being
// followed reads (the first frame of the last emitted transaction, which
// Scan checks is still there), and false before a generation was read.
// Together with the header, the bytes from there on are all a Scan of this
// generation needs.
func (c *Capturer) ReadFrom() (int64, bool) {
	if !c.hasHdr {
		return 0, false
	}
	if c.lastFirst != nil && c.lastOff < c.next {
		return c.lastOff, true
	}
	return c.next, true
}

// Follows reports whether h is the header of the generation being followed.
func (c *Capturer) Follows(h Header) bool { return c.hasHdr && c.hdr.SameGeneration(h) }

// FrameSize is the size of a frame of the log being followed (0 before
// its header was read).
func (c *Capturer) FrameSize() int64 {
	if !c.hasHdr {
		return 0
	}
	return c.hdr.FrameSize()
}

func (c *Capturer) startGeneration(h Header) {
	c.hdr, c.hasHdr = h, true
	c.next = HeaderSize
	c.s1, c.s2 = h.Cksum1, h.Cksum2
	c.lastOff, c.lastFirst = 0, nil
	c.partial = nil
}

// Resume positions the Capturer at pos in the log r, proving that r still
// holds the captured history up to pos. If r holds a later generation, capture
// starts at that generation's first frame (SQLite only restarts a log once
// every frame of the previous one was checkpointed, and callers capture before
// letting that happen). If r holds the same generation but its frames do not
// validate up to a commit ending exactly at pos, Resume returns ErrDiverged.
func (c *Capturer) Resume(r io.ReaderAt, pos Pos) error {
	*c = Capturer{SpillDir: c.SpillDir, fr: c.fr}
	defer c.fr.release()
	h, err := readHeader(r)
	if errors.Is(err, ErrNoHeader) {
		return nil
	} else if err != nil {
		return err
	}
	c.startGeneration(h)
	if h.Salt1 != pos.Salt1 || h.Salt2 != pos.Salt2 || pos.Offset <= HeaderSize {
		return nil
	}
	c.fr.reset(r, h)
	off, s1, s2 := int64(HeaderSize), h.Cksum1, h.Cksum2
	txnStart := off
	var first []byte
	for off < pos.Offset {
		frame, err := c.fr.frame(off)
		if err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) {
				break
			}
			return err
		}
		fh, n1, n2, ok := validFrame(h, frame, s1, s2)
		if !ok {
			break
		}
		if off == txnStart {
			first = append(first[:0], frame[:FrameHeaderSize]...)
		}
		off, s1, s2 = off+h.FrameSize(), n1, n2
		if fh.Commit != 0 && off <= pos.Offset {
			c.next, c.s1, c.s2 = off, s1, s2
			c.lastOff, c.lastFirst = txnStart, slices.Clone(first)
			txnStart = off
		}
	}
	if c.next != pos.Offset {
		return fmt.Errorf("%w: log holds valid commits up to offset %d, capture was at %d", ErrDiverged, c.next, pos.Offset)
	}
	return nil
}

func readHeader(r io.ReaderAt) (Header, error) {
	var b [HeaderSize]byte
	n, err := r.ReadAt(b[:], 0)
	if n < HeaderSize {
		if err == nil || errors.Is(err, io.EOF) {
			return Header{}, fmt.Errorf("%w: file is %d bytes", ErrNoHeader, n)
		}
		return Header{}, fmt.Errorf("read WAL header: %w", err)
	}
	return ParseHeader(b[:])
}

// Scan reads the log from the capture position and calls emit for each
// transaction committed since, in commit order, then advances past it. It
// stops at the first frame that does not validate: the end of the log, a torn
// or still-being-written frame, or a leftover of an older generation. If emit
// returns an error, Scan stops without advancing past that transaction.
func (c *Capturer) Scan(r io.ReaderAt, emit func(Txn) error) (ScanResult, error) {
	defer c.fr.release()
	var res ScanResult
	h, err := readHeader(r)
	if errors.Is(err, ErrNoHeader) {
		return res, nil // an empty or not-yet-written log holds no commits
	} else if err != nil {
		return res, err
	}
	if !c.hasHdr || !c.hdr.SameGeneration(h) {
		if c.hasHdr {
			// Frames of the old generation that the new one has not yet
			// overwritten can still be captured with the old header. It is
			// the last look at them, so nothing is left unverified.
			for range 2 {
				n, err := c.scanFrames(r, emit)
				res.Txns += n
				if err != nil {
					return res, err
				}
				if c.partial == nil || !c.partial.unverified {
					break
				}
				c.Recheck()
			}
			res.NewGeneration = true
		}
		c.startGeneration(h)
	} else if c.lastFirst != nil {
		var b [FrameHeaderSize]byte
		if n, err := r.ReadAt(b[:], c.lastOff); n < len(b) || string(b[:]) != string(c.lastFirst) {
			if n < len(b) && err != nil && !errors.Is(err, io.EOF) {
				return res, fmt.Errorf("read WAL: %w", err)
			}
			return res, fmt.Errorf("%w: frame at offset %d changed", ErrDiverged, c.lastOff)
		}
	}
	n, err := c.scanFrames(r, emit)
	res.Txns += n
	if p := c.partial; p != nil && p.unverified {
		res.Unverified = p.off - p.start
	}
	return res, err
}

// scanFrames validates frames from the capture position and emits each
// committed transaction.
//
// A transaction longer than partialMin is remembered between scans (the
// partial), so the next scan resumes from where this one stopped instead of
// re-validating megabytes on every write of a long transaction. A chain that
// validates from a remembered midpoint proves less than one validated from
// the last commit:
//   - SQLite may have rewritten earlier frames of the transaction since
//     (spilled pages rewritten in place, then their checksums recomputed at
//     commit), so a commit reached from a midpoint is never emitted as such:
//     the whole transaction is validated again from its first frame, and only
//     a chain from the last commit is what SQLite's recovery accepts.
//   - The transaction may have been rolled back (a full disk, a savepoint)
//     and a later, shorter one committed over its first frames. Frames it
//     appended before the rollback still validate from the midpoint, so
//     nothing a resumed scan sees rules that out. A resumed partial is
//     therefore unverified (ScanResult.Unverified) until a scan validates it
//     from its first frame: Recheck asks for one, and the scan that leaves
//     a generation does one at once. Re-validating on every scan instead
//     made capture quadratic: a 200,000-row insert re-checksummed its
//     spilled frames about 120 times.
//   - A frame at the midpoint that does not validate and was written since
//     the last scan means another writer's chain: the scan starts again from
//     the first frame at once. The same invalid leftover as last time (a
//     longer transaction rolled back earlier, not yet overwritten) is
//     nothing new.
func (c *Capturer) scanFrames(r io.ReaderAt, emit func(Txn) error) (int, error) {
	h := c.hdr
	c.fr.reset(r, h)
	off, s1, s2 := c.next, c.s1, c.s2
	txnStart := off
	// The frames of the transaction being validated, in log order. A list
	// rather than a map by page: a large transaction (a VACUUM, a bulk
	// load) has hundreds of thousands, and a map of them cost twice the
	// memory, then the sorted list on top.
	var pages []Page
	var first []byte
	resumed := false
	var stale []byte
	if p := c.partial; p != nil && p.start == c.next && p.hdr == h {
		off, s1, s2, pages, first, resumed, stale = p.off, p.s1, p.s2, p.pages, p.first, true, p.stale
	}
	c.partial = nil
	progressed := false // a frame past the remembered midpoint validated in this scan

	restart := func() {
		resumed, progressed = false, false
		c.fr.n = 0 // re-read: the buffered bytes may be the ones since rewritten
		off, s1, s2 = c.next, c.s1, c.s2
		txnStart = off
		pages = pages[:0]
		first = first[:0]
	}

	emitted := 0
	for {
		frame, err := c.fr.frame(off)
		if errors.Is(err, io.ErrUnexpectedEOF) {
			stale = nil
			break
		} else if err != nil {
			return emitted, err
		}
		fh, n1, n2, ok := validFrame(h, frame, s1, s2)
		if !ok {
			if resumed && !progressed && string(frame[:FrameHeaderSize]) != string(stale) {
				// Written since the last scan, and not by a writer
				// continuing the remembered chain.
				restart()
				continue
			}
			stale = slices.Clone(frame[:FrameHeaderSize])
			break
		}
		if off == txnStart {
			first = append(first[:0], frame[:FrameHeaderSize]...)
		}
		idx := (off - HeaderSize) / h.FrameSize()
		if idx > math.MaxUint32 {
			return emitted, fmt.Errorf("the log is longer than %d frames, which capture cannot index", uint64(math.MaxUint32)+1)
		}
		pages = append(pages, Page{Pgno: fh.Pgno, Frame: uint32(idx)})
		off, s1, s2 = off+h.FrameSize(), n1, n2
		progressed = resumed
		if fh.Commit == 0 {
			continue
		}
		if resumed {
			restart()
			continue
		}
		final := finalPages(pages, fh.Commit, h.PageSize)
		if cap(pages) >= handOver {
			pages = nil // the transaction keeps the list
		} else {
			final, pages = slices.Clone(final), pages[:0]
		}
		t := Txn{Header: h, Offset: txnStart, Size: off - txnStart, Commit: fh.Commit, Pages: final}
		if err := emit(t); err != nil {
			return emitted, err
		}
		emitted++
		c.next, c.s1, c.s2 = off, s1, s2
		c.lastOff, c.lastFirst = txnStart, slices.Clone(first)
		txnStart = off
	}
	if off-txnStart >= partialMin {
		c.partial = &partialTxn{hdr: h, start: txnStart, off: off, s1: s1, s2: s2, pages: pages, first: first, unverified: resumed, stale: stale}
	}
	return emitted, nil
}

// handOver is the size from which a transaction's frame list becomes its
// page list instead of being copied: a copy of a large list is memory the
// size of the list again, and a small one saves growing a new list for the
// next transaction.
const handOver = 4096

// finalPages sorts frames (in log order) by page and keeps, in place, the
// last frame of each page: its final image in the transaction. Pages beyond
// commit, and the lock page, are dropped.
func finalPages(frames []Page, commit, pageSize uint32) []Page {
	lock := LockPgno(pageSize)
	return lastOfEach(frames, func(p Page) bool { return p.Pgno <= commit && p.Pgno != lock })
}

// lastOfEach sorts pages by page number and then offset, and keeps, in
// place, the entry of each page with the highest offset (the last written)
// if keep says so.
func lastOfEach(pages []Page, keep func(Page) bool) []Page {
	slices.SortFunc(pages, func(a, b Page) int {
		if c := cmp.Compare(a.Pgno, b.Pgno); c != 0 {
			return c
		}
		return cmp.Compare(a.Frame, b.Frame)
	})
	out := pages[:0]
	for i, p := range pages {
		if i+1 < len(pages) && pages[i+1].Pgno == p.Pgno {
			continue
		}
		if keep(p) {
			out = append(out, p)
		}
	}
	return out
}

// LockPgno is the page that holds SQLite's lock bytes (at offset 1 GiB); it is
// never written and LTX files leave it out.
func LockPgno(pageSize uint32) uint32 { return uint32(0x40000000/int64(pageSize)) + 1 }

// frameReader reads consecutive frames in large chunks, so scanning a log
// costs a few reads rather than two per frame.
type frameReader struct {
	r      io.ReaderAt
	h      Header
	buf    []byte
	bufOff int64
	n      int
}

const frameChunk = 256 << 10

// chunks holds the read buffers between scans: a mount can follow hundreds
// of databases, most of them idle, and a buffer kept by each one was 256 KiB
// of heap per database ever seen, with the garbage collector running nearly
// nonstop once that passed lfuse's soft memory limit.
var chunks sync.Pool

func (fr *frameReader) reset(r io.ReaderAt, h Header) {
	fr.r, fr.h, fr.n = r, h, 0
}

// release gives the buffer back for other scans; nothing read is kept
// between scans.
func (fr *frameReader) release() {
	if fr.buf != nil {
		b := fr.buf[:0]
		chunks.Put(&b)
	}
	fr.r, fr.buf, fr.bufOff, fr.n = nil, nil, 0, 0
}

// frame returns the frame at off, or io.ErrUnexpectedEOF if the file ends
// before the whole frame.
func (fr *frameReader) frame(off int64) ([]byte, error) {
	fs := fr.h.FrameSize()
	if off >= fr.bufOff && off+fs <= fr.bufOff+int64(fr.n) {
		return fr.buf[off-fr.bufOff : off-fr.bufOff+fs], nil
	}
	size := max(fs, frameChunk/fs*fs)
	if fr.buf == nil {
		if b, ok := chunks.Get().(*[]byte); ok {
			fr.buf = *b
		}
	}
	if int64(cap(fr.buf)) < size {
		fr.buf = make([]byte, size)
	}
	fr.buf = fr.buf[:size]
	n, err := fr.r.ReadAt(fr.buf, off)
	fr.bufOff, fr.n = off, n
	if int64(n) < fs {
		if err == nil || errors.Is(err, io.EOF) {
			return nil, io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("read WAL at %d: %w", off, err)
	}
	return fr.buf[:fs], nil
}
