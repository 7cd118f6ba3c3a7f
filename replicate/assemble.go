package replicate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"

	"github.com/lfuse/lfuse/walcapture"
	"github.com/superfly/ltx"
)

// assembler builds a restored database from LTX files given newest first.
// Each page is written once, by the newest file that holds it, so the
// history costs no rewrites and no reads of replaced pages, and the
// database checksum is the XOR of the written pages' checksums.
//
// Applying files oldest first would cut a database that shrinks (a smaller
// commit size) and zero-fill it where it grows again. Newest first, that is
// limit: the smallest commit size among the files seen so far. An older
// file's page above it was cut off later; a page at or below the newest
// file's size that no file gives (nor the snapshot, within limit) reads as
// zeros, which the sparse output already does.
type assembler struct {
	out      *os.File
	pageSize int
	lock     uint32
	commit   uint32 // pages in the result: the newest file's commit size
	limit    uint32
	written  []uint64 // bit per page: holds its final content
	sum      ltx.Checksum
	started  bool
	// The snapshot's pages below this offset are already on their way to
	// the disk (see writeBack).
	flushed int64
	bufs    *decodeBuffers // reused by every file of the restore
}

func (a *assembler) isWritten(pgno uint32) bool {
	return a.written[(pgno-1)/64]&(1<<((pgno-1)%64)) != 0
}

func (a *assembler) markWritten(pgno uint32) {
	a.written[(pgno-1)/64] |= 1 << ((pgno - 1) % 64)
}

// apply reads one LTX file and writes the pages of it that are still the
// final content of the database, coalescing runs of adjacent pages into one
// write. decodeLTX spreads the decoding and hashing over the cores.
func (a *assembler) apply(ctx context.Context, r io.Reader, f ltx.FileInfo, snapshot bool) error {
	var hdr ltx.Header
	start := func(h ltx.Header) error {
		hdr = h
		switch {
		case hdr.MinTXID != f.MinTXID || hdr.MaxTXID != f.MaxTXID:
			// Another file's content under this name (a copy, a bad
			// sync) would restore another TXID's state as this one's.
			return fmt.Errorf("it holds TXIDs %s-%s, not the %s-%s of its name", hdr.MinTXID, hdr.MaxTXID, f.MinTXID, f.MaxTXID)
		case snapshot && !hdr.IsSnapshot():
			return errors.New("the first file of a restore must be a snapshot")
		case !snapshot && hdr.IsSnapshot():
			return errors.New("unexpected snapshot in the middle of a restore")
		}
		if !a.started {
			a.started = true
			a.pageSize = int(hdr.PageSize)
			a.lock = ltx.LockPgno(hdr.PageSize)
			a.commit, a.limit = hdr.Commit, hdr.Commit
			a.written = make([]uint64, (int(hdr.Commit)+63)/64)
			if err := a.preallocate(int64(hdr.Commit) * int64(hdr.PageSize)); err != nil {
				return outputError{err}
			}
		} else if int(hdr.PageSize) != a.pageSize {
			return fmt.Errorf("page size %d, the newer files' %d", hdr.PageSize, a.pageSize)
		}
		a.limit = min(a.limit, hdr.Commit)
		return nil
	}
	var prev uint32
	keep := func(pgno uint32) (bool, error) {
		// decodeLTX has checked the order and the bounds.
		if snapshot && pgno != prev+1 && !(pgno == a.lock+1 && prev == a.lock-1) {
			return false, fmt.Errorf("snapshot page %d follows page %d", pgno, prev)
		}
		prev = pgno
		if pgno > a.limit || a.isWritten(pgno) {
			return false, nil // a newer file has its final content, or cut it off
		}
		a.markWritten(pgno)
		return true, nil
	}
	emit := func(pgnos []uint32, data []byte, sum ltx.Checksum) error {
		a.sum ^= sum
		pageSize := a.pageSize
		for i := 0; i < len(pgnos); {
			j := i + 1
			for j < len(pgnos) && pgnos[j] == pgnos[j-1]+1 {
				j++
			}
			if _, err := a.out.WriteAt(data[i*pageSize:j*pageSize], int64(pgnos[i]-1)*int64(pageSize)); err != nil {
				return outputError{err}
			}
			if snapshot {
				a.writeBack(int64(pgnos[j-1]) * int64(pageSize))
			}
			i = j
		}
		return nil
	}
	if a.bufs == nil {
		a.bufs = newDecodeBuffers()
	}
	if err := decodeLTX(ctx, r, a.bufs, start, keep, emit); err != nil {
		return err
	}
	if snapshot && prev != hdr.Commit && !(prev == a.lock-1 && hdr.Commit == a.lock) {
		return fmt.Errorf("snapshot ends at page %d of %d", prev, hdr.Commit)
	}
	return nil
}

// outputError is a failure to write the restored database, as opposed to a
// replica file that does not decode or fit: the restore reports it as such.
type outputError struct{ err error }

func (e outputError) Error() string { return e.err.Error() }
func (e outputError) Unwrap() error { return e.err }

// preallocate gives the output its final size. Allocating the blocks now,
// rather than leaving a sparse file for the write-back to allocate, is what
// made the write-back below pay (docs/BENCHMARKS.md). Unwritten blocks read
// as zeros, as holes do. Where the filesystem cannot preallocate, the file
// is left sparse; where it has no room, the restore stops here instead of
// after the whole apply.
func (a *assembler) preallocate(size int64) error {
	err := unix.Fallocate(int(a.out.Fd()), 0, 0, size)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.ENOSPC):
		return fmt.Errorf("no room for the %d bytes of the restored database (free some space or restore elsewhere): %w", size, err)
	default:
		return a.out.Truncate(size)
	}
}

// writeBackEvery is how much of the snapshot is written before the kernel is
// asked to start writing it to the disk (4 MB did better than 16 MB).
const writeBackEvery = 4 << 20

// writeBack starts writing the output up to end, which the snapshot has
// just reached, to the disk. Otherwise the whole database is written by the
// final fsync, after the apply, while the CPUs wait; this way the disk
// writes while the decoder works and the fsync finds little left to do.
// Below the snapshot's position every page is final: newer files were
// applied first. Errors are left to that fsync, which reports them.
func (a *assembler) writeBack(end int64) {
	if end-a.flushed < writeBackEvery {
		return
	}
	_ = unix.SyncFileRange(int(a.out.Fd()), a.flushed, end-a.flushed, unix.SYNC_FILE_RANGE_WRITE)
	a.flushed = end
}

// finish accounts for the pages no file gave, which read as zeros, and
// returns the database checksum.
func (a *assembler) finish() ltx.Checksum {
	var zero []byte
	for pgno := uint32(1); pgno <= a.commit; pgno++ {
		if pgno == a.lock || a.isWritten(pgno) {
			continue
		}
		if zero == nil {
			zero = make([]byte, a.pageSize)
		}
		a.sum ^= walcapture.ChecksumPage(pgno, zero)
	}
	// Page checksums carry the flag bit, which XOR toggles; the database
	// checksum always has it set.
	return ltx.ChecksumFlag | a.sum
}
