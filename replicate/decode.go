package replicate

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"runtime"
	"slices"

	"github.com/lfuse/lfuse/internal/crc64iso"
	"github.com/pierrec/lz4/v4"
	"github.com/superfly/ltx"
)

// decodeLTX reads one LTX file for a restore, with the work spread over the
// machine's cores. ltx.Decoder does everything on one goroutine and hashes
// every page twice (its file checksum, then the caller's page checksum);
// restoring a large database was bound by that one core. Here one
// goroutine only splits the stream into page frames, workers decompress and
// hash each page once (see internal/crc64iso), and the caller's goroutine receives the
// pages in file order. Everything ltx.Decoder checks is checked: the
// header, every page header, the file checksum over the decompressed
// stream, the page index against the frames actually read (exactly, not
// just plausibly), the trailer and the end of the file, and a snapshot's
// own post-apply checksum if it records one.
//
// start is called with the header before any page; keep, on the splitting
// goroutine, with each page number in file order, and says whether the
// page's content is wanted; emit, on the caller's goroutine, with runs of
// wanted pages in file order and the XOR of their page checksums (flag bit
// not normalised); data is reused after emit returns. Memory is a few
// megabytes of frames in flight, taken from bufs (nil: buffers for this
// file alone). If decoding or emit fails, r is closed when it is an
// io.Closer. A *mappedLTX is read in place, without copying its blocks,
// and released from memory behind the decoder.
func decodeLTX(ctx context.Context, r io.Reader, bufs *decodeBuffers, start func(ltx.Header) error, keep func(pgno uint32) (bool, error),
	emit func(pgnos []uint32, data []byte, sum ltx.Checksum) error) (err error) {
	if bufs == nil {
		bufs = newDecodeBuffers()
	}
	d := &ltxSplitter{keep: keep, bufs: bufs}
	if m, ok := r.(*mappedLTX); ok {
		d.m, d.br = m, bytes.NewReader(m.data)
	} else {
		br := bufs.br
		if br == nil {
			br = bufio.NewReaderSize(r, 1<<20)
			bufs.br = br
		} else {
			br.Reset(r)
		}
		defer br.Reset(nil) // runs last, once the splitter has stopped
		d.br = br
	}
	defer onFault(d.m)(&err)
	head := make([]byte, ltx.HeaderSize)
	if _, err := io.ReadFull(d.br, head); err != nil {
		return fmt.Errorf("read header: %w", err)
	}
	if err := d.hdr.UnmarshalBinary(head); err != nil {
		return fmt.Errorf("header: %w", err)
	}
	if err := d.hdr.Validate(); err != nil {
		return fmt.Errorf("header: %w", err)
	}
	if err := start(d.hdr); err != nil {
		return err
	}
	fileCRC := crc64iso.Update(0, head)
	d.pageSize = int(d.hdr.PageSize)
	d.batchPages = max(1, batchBytes/d.pageSize)
	d.maxBlock = lz4.CompressBlockBound(d.pageSize)
	d.lock = ltx.LockPgno(d.hdr.PageSize)

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	work := make(chan *frameBatch, 4)
	ordered := make(chan *frameBatch, 6)
	go func() {
		defer close(work)
		defer close(ordered)
		defer onFault(d.m)(&d.err)
		d.err = d.split(ctx, work, ordered)
	}()
	workers := runtime.GOMAXPROCS(0)
	done := make(chan struct{})
	for range workers {
		go func() {
			defer func() { done <- struct{}{} }()
			scratch := make([]byte, d.pageSize)
			pageShift := crc64iso.Shift(int64(d.pageSize))
			for b := range work {
				func() {
					defer close(b.done)
					defer onFault(d.m)(&b.err)
					b.decompress(scratch, pageShift)
				}()
			}
		}()
	}
	defer func() {
		// Stop the splitter and the workers before returning, whatever
		// happened: they use the caller's reader and callbacks.
		cancel()
		for range ordered {
		}
		for range workers {
			<-done
		}
	}()

	var all ltx.Checksum
	var released int // the mapped bytes before this are done with
	for b := range ordered {
		<-b.done
		if err == nil {
			err = b.err
		}
		if err == nil {
			fileCRC = crc64iso.Combine(fileCRC, b.crc, crc64iso.Shift(int64(len(b.pgnos))*int64(frameHead+d.pageSize)))
			all ^= b.all
			err = emit(b.keptN, b.data, b.sum)
		}
		if d.m != nil && len(b.ends) > 0 {
			released = d.m.release(released, b.ends[len(b.ends)-1])
		}
		if err != nil && ctx.Err() == nil {
			cancel()
			// The splitter may be waiting in a read of a stalled network
			// body, and draining waits for it: closing the source (when
			// it can be closed) ends that read now rather than at the
			// client's timeout.
			if c, ok := r.(io.Closer); ok {
				c.Close()
			}
		}
		b.src = nil // nothing in the pool points into a mapping
		bufs.put(b)
	}
	if err != nil {
		return err
	}
	if d.err != nil {
		return d.err
	}
	fileCRC = crc64iso.Combine(fileCRC, d.tailCRC, crc64iso.Shift(d.tailLen))
	if ltx.ChecksumFlag|ltx.Checksum(fileCRC) != d.trailer.FileChecksum {
		return ltx.ErrChecksumMismatch
	}
	if d.hdr.IsSnapshot() && !d.hdr.NoChecksum() && ltx.ChecksumFlag|all != d.trailer.PostApplyChecksum {
		return fmt.Errorf("snapshot pages have checksum %s, its trailer says %s", ltx.ChecksumFlag|all, d.trailer.PostApplyChecksum)
	}
	return nil
}

// frameHead is the part of a page frame before its LZ4 block: the page
// header and the block's size.
const frameHead = ltx.PageHeaderSize + 4

// ltxSplitter cuts an LTX stream into batches of page frames and reads what
// follows the pages.
type ltxSplitter struct {
	br interface {
		io.Reader
		io.ByteReader
	}
	// The whole file, when it is mapped: br then reads it, and the batches
	// point into it instead of holding copies of their blocks.
	m          *mappedLTX
	hdr        ltx.Header
	pageSize   int
	batchPages int
	maxBlock   int
	lock       uint32 // SQLite's lock page, never in a file
	keep       func(pgno uint32) (bool, error)
	bufs       *decodeBuffers

	// What split found, read by decodeLTX once split has returned: its
	// error, or the CRC and length of the hashed stream after the pages
	// and the trailer.
	err     error
	tailCRC uint64
	tailLen int64
	trailer ltx.Trailer

	// The page index must list exactly the frames read: same pages,
	// offsets and sizes, in order. Both sides are hashed and counted.
	frames, listed   uint64
	nFrames, nListed int
}

func (d *ltxSplitter) batch() *frameBatch {
	if b := d.bufs.get(); b != nil && b.pageSize == d.pageSize {
		b.pgnos, b.heads, b.starts, b.ends, b.blocks = b.pgnos[:0], b.heads[:0], b.starts[:0], b.ends[:0], b.blocks[:0]
		b.src = nil
		b.kept, b.keptN, b.data = b.kept[:0], b.keptN[:0], b.data[:0]
		b.crc, b.sum, b.all, b.err = 0, 0, 0, nil
		return b
	}
	return &frameBatch{pageSize: d.pageSize}
}

// indexEntry adds one (page, offset, size) to the hash h.
func indexEntry(h uint64, pgno uint32, offset, size int64) uint64 {
	var e [20]byte
	binary.BigEndian.PutUint32(e[:], pgno)
	binary.BigEndian.PutUint64(e[4:], uint64(offset))
	binary.BigEndian.PutUint64(e[12:], uint64(size))
	return crc64iso.Update(h, e[:])
}

// split reads the page frames into batches, each sent to the workers and,
// in order, to the caller; then the index and the trailer.
func (d *ltxSplitter) split(ctx context.Context, work, ordered chan<- *frameBatch) error {
	b := d.batch()
	send := func() bool {
		b.done = make(chan struct{})
		b.src = b.blocks
		if d.m != nil {
			b.src = d.m.data
		}
		select {
		case work <- b:
		case <-ctx.Done():
			return false
		}
		select {
		case ordered <- b:
		case <-ctx.Done():
			return false
		}
		return true
	}
	offset := int64(ltx.HeaderSize)
	var fh [frameHead]byte
	var prev uint32
	for {
		if _, err := io.ReadFull(d.br, fh[:ltx.PageHeaderSize]); err != nil {
			return fmt.Errorf("read page header: %w", unexpected(err))
		}
		var ph ltx.PageHeader
		if err := ph.UnmarshalBinary(fh[:ltx.PageHeaderSize]); err != nil {
			return fmt.Errorf("page header: %w", err)
		}
		if ph.IsZero() {
			break
		}
		if err := ph.Validate(); err != nil {
			return fmt.Errorf("page header: %w", err)
		}
		if ph.Pgno > d.hdr.Commit || ph.Pgno == d.lock || ph.Pgno <= prev {
			return fmt.Errorf("page %d out of order or outside the database of %d pages", ph.Pgno, d.hdr.Commit)
		}
		prev = ph.Pgno
		if ph.Flags&ltx.PageHeaderFlagSize == 0 {
			return fmt.Errorf("page %d is in the older LZ4-frame encoding, which restore does not read", ph.Pgno)
		}
		if _, err := io.ReadFull(d.br, fh[ltx.PageHeaderSize:]); err != nil {
			return fmt.Errorf("page %d: read block size: %w", ph.Pgno, unexpected(err))
		}
		size32 := binary.BigEndian.Uint32(fh[ltx.PageHeaderSize:])
		if size32 == 0 || size32 > uint32(d.maxBlock) {
			return fmt.Errorf("page %d: compressed block of %d bytes for a %d-byte page", ph.Pgno, size32, d.pageSize)
		}
		n := int(size32)
		want, err := d.keep(ph.Pgno)
		if err != nil {
			return err
		}
		if len(b.pgnos) == d.batchPages {
			if !send() {
				return ctx.Err()
			}
			b = d.batch()
		}
		var at int
		if d.m != nil {
			// The block stays where it is, in the mapping.
			at = int(offset) + frameHead
			if at+n > len(d.m.data) {
				return fmt.Errorf("page %d: read block: %w", ph.Pgno, io.ErrUnexpectedEOF)
			}
			if _, err := d.br.(*bytes.Reader).Seek(int64(n), io.SeekCurrent); err != nil {
				return err
			}
		} else {
			at = len(b.blocks)
			if cap(b.blocks)-at < n {
				// At once to what a full batch can need, not in append's
				// steps of a quarter, each a new allocation: a batch then
				// allocates once for the whole restore.
				b.blocks = slices.Grow(b.blocks, d.batchPages*d.maxBlock-at)
			}
			b.blocks = b.blocks[:at+n]
			if _, err := io.ReadFull(d.br, b.blocks[at:]); err != nil {
				return fmt.Errorf("page %d: read block: %w", ph.Pgno, unexpected(err))
			}
		}
		b.pgnos = append(b.pgnos, ph.Pgno)
		b.heads = append(b.heads, fh)
		b.starts = append(b.starts, at)
		b.ends = append(b.ends, at+n)
		b.kept = append(b.kept, want)
		size := int64(frameHead + n)
		d.frames = indexEntry(d.frames, ph.Pgno, offset, size)
		d.nFrames++
		offset += size
	}
	if len(b.pgnos) == 0 {
		d.bufs.put(b)
	} else if !send() {
		return ctx.Err()
	}
	return d.readTail(fh[:ltx.PageHeaderSize])
}

// readTail reads what follows the pages, whose end marker was end: the page
// index, its size and the trailer, and nothing after.
func (d *ltxSplitter) readTail(end []byte) error {
	tail := crc64iso.Update(0, end)
	hr := &hashingByteReader{r: d.br}
	for {
		pgno, err := binary.ReadUvarint(hr)
		if err != nil {
			return fmt.Errorf("read page index: %w", unexpected(err))
		}
		if pgno == 0 {
			break
		}
		off, err := binary.ReadUvarint(hr)
		if err != nil {
			return fmt.Errorf("read page index: %w", unexpected(err))
		}
		size, err := binary.ReadUvarint(hr)
		if err != nil {
			return fmt.Errorf("read page index: %w", unexpected(err))
		}
		if pgno > uint64(^uint32(0)) || off > 1<<62 || size > 1<<62 {
			return fmt.Errorf("page index entry %d out of range", d.nListed)
		}
		d.listed = indexEntry(d.listed, uint32(pgno), int64(off), int64(size))
		d.nListed++
		tail = crc64iso.Update(tail, hr.seen)
		hr.seen = hr.seen[:0]
	}
	tail = crc64iso.Update(tail, hr.seen)
	var rest [8 + ltx.TrailerSize]byte
	if _, err := io.ReadFull(d.br, rest[:]); err != nil {
		return fmt.Errorf("read page index size and trailer: %w", unexpected(err))
	}
	if got := binary.BigEndian.Uint64(rest[:8]); got != uint64(hr.total) {
		return fmt.Errorf("page index is %d bytes, its size field says %d", hr.total, got)
	}
	if d.nListed != d.nFrames || d.listed != d.frames {
		return fmt.Errorf("page index (%d entries) does not match the %d page frames", d.nListed, d.nFrames)
	}
	if err := d.trailer.UnmarshalBinary(rest[8:]); err != nil {
		return fmt.Errorf("trailer: %w", err)
	}
	tail = crc64iso.Update(tail, rest[:8+ltx.TrailerChecksumOffset])
	if _, err := d.br.ReadByte(); err == nil {
		return errors.New("unexpected data after the trailer")
	} else if !errors.Is(err, io.EOF) {
		return fmt.Errorf("read after the trailer: %w", err)
	}
	d.tailCRC, d.tailLen = tail, int64(len(end))+hr.total+8+ltx.TrailerChecksumOffset
	return nil
}

// decompress decompresses every page of the batch, the wanted ones into
// data and the others into scratch, and hashes each once: into the batch's
// part of the file checksum, and into its page checksum.
func (b *frameBatch) decompress(scratch []byte, pageShift uint64) {
	var crc uint64
	var pgnoBuf [4]byte
	b.data = slices.Grow(b.data, len(b.pgnos)*b.pageSize) // once, not page by page
	for i, pgno := range b.pgnos {
		page := scratch
		if b.kept[i] {
			at := len(b.data)
			b.data = slices.Grow(b.data, b.pageSize)[:at+b.pageSize]
			page = b.data[at:]
			b.keptN = append(b.keptN, pgno)
		}
		if n, err := lz4.UncompressBlock(b.src[b.starts[i]:b.ends[i]], page); err != nil || n != b.pageSize {
			if err == nil {
				err = fmt.Errorf("%d bytes, expected %d", n, b.pageSize)
			}
			b.err = fmt.Errorf("page %d: decompress: %w", pgno, err)
			return
		}
		crcPage := crc64iso.Update(0, page)
		crc = crc64iso.Combine(crc64iso.Update(crc, b.heads[i][:]), crcPage, pageShift)
		binary.BigEndian.PutUint32(pgnoBuf[:], pgno)
		sum := ltx.Checksum(crc64iso.Combine(crc64iso.Update(0, pgnoBuf[:]), crcPage, pageShift))
		b.all ^= sum
		if b.kept[i] {
			b.sum ^= sum
		}
	}
	b.crc = crc
}

// frameBatch is a run of consecutive page frames of one LTX file. Its
// buffers grow as needed (most LTX files are small) and are reused through
// decodeBuffers by the next batch and file of the restore.
type frameBatch struct {
	pageSize int
	pgnos    []uint32          // every page in the run
	heads    [][frameHead]byte // each frame's page header and size, hashed as stored
	starts   []int             // where each frame's block is in src
	ends     []int
	src      []byte // blocks, or the mapped file
	blocks   []byte
	kept     []bool
	keptN    []uint32 // the wanted pages, for emit
	data     []byte   // the wanted pages, decompressed
	crc      uint64   // CRC of the run's part of the file's hashed stream
	sum      ltx.Checksum
	all      ltx.Checksum // every page's checksum, for a snapshot's own check
	err      error
	done     chan struct{}
}

// decodeBuffers are what decodeLTX reuses from one file of a restore to the
// next: the 1 MB read buffer and the frame batches. They lived in
// sync.Pools, which the garbage collector empties at every cycle, and the
// memory limit lfuse sets makes cycles frequent: restoring 1.44 GB of LTX
// allocated 455 MB of buffers and ran 92 collections (18 MB and 3 now).
// They belong to one restore and go with it.
type decodeBuffers struct {
	br      *bufio.Reader // decodeLTX reads one file at a time
	batches chan *frameBatch
}

func newDecodeBuffers() *decodeBuffers {
	// Room for every batch one file can have in flight: queued for the
	// workers and for the caller, being decompressed, filled and emitted.
	return &decodeBuffers{batches: make(chan *frameBatch, 16+runtime.GOMAXPROCS(0))}
}

func (p *decodeBuffers) get() *frameBatch {
	select {
	case b := <-p.batches:
		return b
	default:
		return nil
	}
}

func (p *decodeBuffers) put(b *frameBatch) {
	select {
	case p.batches <- b:
	default:
	}
}

// batchBytes is the most page data a batch holds (tests make it smaller,
// to cross batch boundaries with small files).
var batchBytes = 1 << 20

// unexpected turns a clean EOF in the middle of a file into a short file.
func unexpected(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// hashingByteReader keeps the bytes read through it, so that the page
// index can be parsed with encoding/binary and still be hashed as stored.
type hashingByteReader struct {
	r     io.ByteReader
	seen  []byte
	total int64
}

func (h *hashingByteReader) ReadByte() (byte, error) {
	c, err := h.r.ReadByte()
	if err == nil {
		h.seen = append(h.seen, c)
		h.total++
	}
	return c, err
}
