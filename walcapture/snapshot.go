package walcapture

import (
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/superfly/ltx"
)

// ErrEmptyDatabase means there is nothing to snapshot yet: the database file
// is empty and its log holds no commit.
var ErrEmptyDatabase = errors.New("database is empty")

// ErrNotDatabase means the database file does not start with a SQLite
// header (and no log holds its first page).
var ErrNotDatabase = errors.New("not a SQLite database: bad header")

// ErrLogRestarted means the log was restarted while Snapshot read it: the
// frames it read from may be gone. Take the snapshot again.
var ErrLogRestarted = errors.New("WAL restarted during the snapshot")

// SnapshotResult describes a snapshot written by Capturer.Snapshot.
type SnapshotResult struct {
	PageSize uint32
	Commit   uint32       // database size in pages
	Total    ltx.Checksum // post-apply checksum
	Merged   bool         // the snapshot is in the second file, not the first
	Pos      Pos          // capture position the snapshot reflects
	Header   ltx.Header
}

// Snapshot writes the whole database — the database file overlaid with every
// commit in its log — as one LTX snapshot file with TXIDs 1..id, and leaves
// the Capturer positioned just after the last commit it includes.
//
// The database file may be written concurrently by SQLite checkpoints (which
// copy committed log frames into it), so the read is fuzzy. Snapshot makes it
// exact: a checkpoint can only have copied frames that were committed before
// the read ended, so once the log is scanned again afterwards, overlaying
// every committed frame up to that point yields the database exactly as of
// that commit. If nothing was committed during the read the first file is the
// result; otherwise the first file is merged with the newer frames into the
// second. The caller must keep the log from being truncated or deleted, and
// the database file from being truncated, while this runs; if the log was
// restarted meanwhile, Snapshot returns ErrLogRestarted and the caller
// takes it again.
//
// setSum receives the checksum of every page of the result (and 0 for pages
// that a merge dropped), in page order for each pass.
func (c *Capturer) Snapshot(db, wal io.ReaderAt, dbSize int64, first, second io.ReadWriteSeeker, id ltx.TXID, ts time.Time, setSum func(uint32, ltx.Checksum)) (SnapshotResult, error) {
	var res SnapshotResult
	base, commit, pageSize, err := c.scanFromStart(db, wal, dbSize)
	if err != nil {
		return res, err
	}
	if commit == 0 {
		return res, ErrEmptyDatabase
	}
	res.PageSize = pageSize

	hdr := c.snapshotHeader(pageSize, commit, id, ts)
	total, err := c.encodeSnapshot(first, hdr, func(pgno uint32, buf []byte) error {
		if off, ok := base[pgno]; ok {
			return readFull(wal, buf, off)
		}
		if err := readFull(db, buf, int64(pgno-1)*int64(pageSize)); err != nil {
			return fmt.Errorf("database file is shorter than its %d pages: %w", commit, err)
		}
		return nil
	}, setSum)
	if err != nil {
		return res, err
	}

	// Commits that landed while the file was read.
	newer := make(map[uint32]int64)
	newCommit := commit
	if _, err := c.scanFrames(wal, func(t Txn) error {
		addTxnPages(newer, t)
		newCommit = t.Commit
		return nil
	}); err != nil {
		return res, err
	}
	if len(newer) == 0 && newCommit == commit {
		if err := c.sameGeneration(wal); err != nil {
			return res, err
		}
		res.Commit, res.Total, res.Pos, res.Header = commit, total, c.Pos(), hdr
		return res, nil
	}

	// Merge: pages from the first file, except those newer commits replaced.
	if _, err := first.Seek(0, io.SeekStart); err != nil {
		return res, err
	}
	dec := ltx.NewDecoder(first)
	dec.SetRetainPageIndex(false)
	if err := dec.DecodeHeader(); err != nil {
		return res, fmt.Errorf("re-read snapshot: %w", err)
	}
	var ph ltx.PageHeader
	decBuf := make([]byte, pageSize)
	decPgno := uint32(0) // last page read from the first file
	hdr = c.snapshotHeader(pageSize, newCommit, id, ts)
	total, err = c.encodeSnapshot(second, hdr, func(pgno uint32, buf []byte) error {
		for decPgno < pgno && decPgno < commit {
			if err := dec.DecodePage(&ph, decBuf); err != nil {
				return fmt.Errorf("re-read snapshot page: %w", err)
			}
			decPgno = ph.Pgno
		}
		if off, ok := newer[pgno]; ok {
			return readFull(wal, buf, off)
		}
		if decPgno != pgno {
			return fmt.Errorf("page %d is in neither the database file nor the log", pgno)
		}
		copy(buf, decBuf)
		return nil
	}, setSum)
	if err != nil {
		return res, err
	}
	for pgno := newCommit + 1; pgno <= commit; pgno++ {
		setSum(pgno, 0)
	}
	if err := c.sameGeneration(wal); err != nil {
		return res, err
	}
	res.Commit, res.Total, res.Merged, res.Pos, res.Header = newCommit, total, true, c.Pos(), hdr
	return res, nil
}

// sameGeneration checks, once a snapshot has read everything, that the log
// is still the one it started from. Holding off checkpoints' truncates keeps
// a new restart from becoming possible, but one made possible before the
// snapshot began can still happen during it: then frames read by offset may
// have been overwritten, and a checkpoint may have copied commits of the new
// generation, which the rescan (validating with the old salts) cannot see,
// into pages already read. SQLite writes the new header before any frame of
// the new generation, so an unchanged header proves neither happened.
func (c *Capturer) sameGeneration(wal io.ReaderAt) error {
	h, err := readHeader(wal)
	switch {
	case errors.Is(err, ErrNoHeader):
		if c.hasHdr {
			return ErrLogRestarted
		}
		return nil
	case err != nil:
		return err
	case !c.hasHdr || !c.hdr.SameGeneration(h):
		return ErrLogRestarted
	}
	return nil
}

// scanFromStart positions the Capturer at the start of the log's current
// generation and scans every commit in it, returning where each page's newest
// committed image is, the database size after the last commit, and the page
// size.
func (c *Capturer) scanFromStart(db, wal io.ReaderAt, dbSize int64) (map[uint32]int64, uint32, uint32, error) {
	*c = Capturer{SpillDir: c.SpillDir, fr: c.fr}
	defer c.fr.release()
	pages := make(map[uint32]int64)
	var commit, pageSize uint32

	var dbHdr [100]byte
	if dbSize >= int64(len(dbHdr)) {
		if err := readFull(db, dbHdr[:], 0); err != nil {
			return nil, 0, 0, fmt.Errorf("read database header: %w", err)
		}
		if pageSize = DBHeaderPageSize(dbHdr[:]); pageSize == 0 {
			return nil, 0, 0, ErrNotDatabase
		}
		commit = uint32(dbSize / int64(pageSize))
	}

	h, err := readHeader(wal)
	if err != nil && !errors.Is(err, ErrNoHeader) {
		return nil, 0, 0, err
	}
	if err == nil {
		c.startGeneration(h)
		if _, err := c.scanFrames(wal, func(t Txn) error {
			addTxnPages(pages, t)
			commit = t.Commit
			pageSize = t.Header.PageSize
			return nil
		}); err != nil {
			return nil, 0, 0, err
		}
	}
	return pages, commit, pageSize, nil
}

// addTxnPages records t's pages in m and forgets pages t truncated away.
func addTxnPages(m map[uint32]int64, t Txn) {
	for pgno := range m {
		if pgno > t.Commit {
			delete(m, pgno)
		}
	}
	for _, p := range t.Pages {
		m[p.Pgno] = t.Header.PageOffset(p.Frame)
	}
}

func (c *Capturer) snapshotHeader(pageSize, commit uint32, id ltx.TXID, ts time.Time) ltx.Header {
	hdr := ltx.Header{
		Version:   ltx.Version,
		PageSize:  pageSize,
		Commit:    commit,
		MinTXID:   1,
		MaxTXID:   id,
		Timestamp: ts.UnixMilli(),
	}
	if pos := c.Pos(); pos.Offset > 0 {
		hdr.WALOffset, hdr.WALSize = HeaderSize, pos.Offset-HeaderSize
		hdr.WALSalt1, hdr.WALSalt2 = pos.Salt1, pos.Salt2
	}
	return hdr
}

// encodeSnapshot writes pages 1..hdr.Commit, each filled in by page, and
// returns the database checksum.
func (c *Capturer) encodeSnapshot(w io.Writer, hdr ltx.Header, page func(pgno uint32, buf []byte) error, setSum func(uint32, ltx.Checksum)) (ltx.Checksum, error) {
	enc, err := NewEncoder(w, c.SpillDir)
	if err != nil {
		return 0, err
	}
	defer enc.Cleanup()
	if err := enc.EncodeHeader(hdr); err != nil {
		return 0, fmt.Errorf("encode snapshot header: %w", err)
	}
	lock := LockPgno(hdr.PageSize)
	buf := make([]byte, hdr.PageSize)
	var raw ltx.Checksum
	for pgno := uint32(1); pgno <= hdr.Commit; pgno++ {
		if pgno == lock {
			continue
		}
		if err := page(pgno, buf); err != nil {
			return 0, err
		}
		sum := ChecksumPage(pgno, buf)
		raw ^= rawSum(sum)
		setSum(pgno, sum)
		if err := enc.EncodePage(ltx.PageHeader{Pgno: pgno}, buf); err != nil {
			return 0, fmt.Errorf("encode page %d: %w", pgno, err)
		}
	}
	total := ltx.ChecksumFlag | raw
	enc.SetPostApplyChecksum(total)
	if err := enc.Close(); err != nil {
		return 0, fmt.Errorf("finish snapshot: %w", err)
	}
	return total, nil
}

// DatabaseChecksum computes the LTX checksum of the database as SQLite would
// read it now — the database file overlaid with every commit in its log —
// along with its size in pages and the log position that state corresponds
// to. It reads the whole database; the caller keeps the files still.
func DatabaseChecksum(db, wal io.ReaderAt, dbSize int64) (Pos, uint32, ltx.Checksum, error) {
	var c Capturer
	pages, commit, pageSize, err := c.scanFromStart(db, wal, dbSize)
	if err != nil {
		return Pos{}, 0, 0, err
	}
	if commit == 0 {
		// Shorter than a header with no log: no page size to read by.
		return Pos{}, 0, 0, ErrEmptyDatabase
	}
	lock := LockPgno(pageSize)
	buf := make([]byte, pageSize)
	var raw ltx.Checksum
	for pgno := uint32(1); pgno <= commit; pgno++ {
		if pgno == lock {
			continue
		}
		var err error
		if off, ok := pages[pgno]; ok {
			err = readFull(wal, buf, off)
		} else {
			err = readFull(db, buf, int64(pgno-1)*int64(pageSize))
		}
		if err != nil {
			return Pos{}, 0, 0, fmt.Errorf("read page %d: %w", pgno, err)
		}
		raw ^= rawSum(ChecksumPage(pgno, buf))
	}
	return c.Pos(), commit, ltx.ChecksumFlag | raw, nil
}
