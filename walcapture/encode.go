package walcapture

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/lfuse/lfuse/internal/crc64iso"
	"github.com/superfly/ltx"
)

// PageSums is the per-page LTX checksum of a database as of the last captured
// transaction. The pre-apply checksum of the next transaction is its Total;
// the post-apply checksum needs the old sum of every page the transaction
// replaces or truncates away.
type PageSums interface {
	Len() uint32                  // database size in pages
	Get(pgno uint32) ltx.Checksum // 0 beyond Len and for the lock page
	Total() ltx.Checksum          // ltx.ChecksumFlag | XOR of every page's sum
}

// Update is how one transaction changes a PageSums: pages beyond Commit are
// dropped, page Pgnos[i] gets the sum Sums[i], and Total is the result.
// Two lists rather than one of pairs, which padding makes 16 bytes a page:
// a transaction can hold every page of the database.
type Update struct {
	Commit uint32
	Pgnos  []uint32
	Sums   []ltx.Checksum
	Total  ltx.Checksum
}

// Add records the new sum of a page.
func (u *Update) Add(pgno uint32, sum ltx.Checksum) {
	u.Pgnos = append(u.Pgnos, pgno)
	u.Sums = append(u.Sums, sum)
}

func rawSum(c ltx.Checksum) ltx.Checksum { return c &^ ltx.ChecksumFlag }

// ChecksumPage is ltx.ChecksumPage (the CRC-64 of the page number and the
// page) at about twice its speed: capture hashes every page it records,
// a snapshot and the check at start every page of the database.
func ChecksumPage(pgno uint32, data []byte) ltx.Checksum {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], pgno)
	return ltx.ChecksumFlag | ltx.Checksum(crc64iso.Update(crc64iso.Update(0, b[:]), data))
}

// EncodeTxn writes t as one LTX file with TXIDs minID..maxID (one per
// commit t holds, see Merge), reading page images from the log wal, and
// returns how it changes sums. sums is not modified: the caller applies the
// Update once the LTX file is safely stored. spillDir, if set, is where the
// page index of a large transaction goes while it is written (see
// IndexSpillEntries).
func EncodeTxn(w io.Writer, wal io.ReaderAt, t Txn, sums PageSums, minID, maxID ltx.TXID, ts time.Time, spillDir string) (Update, error) {
	if minID <= 1 || maxID < minID {
		return Update{}, fmt.Errorf("transaction ids %d-%d: TXID 1 is reserved for snapshots", minID, maxID)
	}
	pre := sums.Total()
	enc, err := NewEncoder(w, spillDir)
	if err != nil {
		return Update{}, err
	}
	defer enc.Cleanup()
	hdr := ltx.Header{
		Version:          ltx.Version,
		PageSize:         t.Header.PageSize,
		Commit:           t.Commit,
		MinTXID:          minID,
		MaxTXID:          maxID,
		Timestamp:        ts.UnixMilli(),
		PreApplyChecksum: pre,
		WALOffset:        t.Offset,
		WALSize:          t.Size,
		WALSalt1:         t.Header.Salt1,
		WALSalt2:         t.Header.Salt2,
	}
	if err := enc.EncodeHeader(hdr); err != nil {
		return Update{}, fmt.Errorf("encode LTX header: %w", err)
	}
	u := Update{Commit: t.Commit, Pgnos: make([]uint32, 0, len(t.Pages)), Sums: make([]ltx.Checksum, 0, len(t.Pages))}
	raw := rawSum(pre)
	pr := pageReader{wal: wal, hdr: t.Header}
	for i, p := range t.Pages {
		buf, err := pr.page(t.Pages, i)
		if err != nil {
			return Update{}, fmt.Errorf("read page %d from WAL: %w", p.Pgno, err)
		}
		sum := ChecksumPage(p.Pgno, buf)
		raw ^= rawSum(sums.Get(p.Pgno) ^ sum)
		u.Add(p.Pgno, sum)
		if err := enc.EncodePage(ltx.PageHeader{Pgno: p.Pgno}, buf); err != nil {
			return Update{}, fmt.Errorf("encode page %d: %w", p.Pgno, err)
		}
	}
	for pgno := t.Commit + 1; pgno <= sums.Len(); pgno++ {
		raw ^= rawSum(sums.Get(pgno))
	}
	u.Total = ltx.ChecksumFlag | raw
	enc.SetPostApplyChecksum(u.Total)
	if err := enc.Close(); err != nil {
		return Update{}, fmt.Errorf("finish LTX file: %w", err)
	}
	return u, nil
}

// pageReader reads the pages of a transaction from the log. Where pages
// in page order sit in consecutive frames (a transaction that appends or
// rewrites a table in order), it reads the run with one call rather than
// one per page: a 6 MB insert took 1,400 reads.
type pageReader struct {
	wal    io.ReaderAt
	hdr    Header
	buf    []byte
	bufOff int64 // log offset of buf[0]
}

const maxPageRun = 256 << 10

func (r *pageReader) page(pages []Page, i int) ([]byte, error) {
	pageSize := int64(r.hdr.PageSize)
	off := r.hdr.PageOffset(pages[i].Frame)
	if rel := off - r.bufOff; r.buf != nil && rel >= 0 && rel+pageSize <= int64(len(r.buf)) {
		return r.buf[rel : rel+pageSize], nil
	}
	end := off + pageSize
	for j := i + 1; j < len(pages) && pages[j].Frame == pages[j-1].Frame+1 && r.hdr.PageOffset(pages[j].Frame)+pageSize-off <= maxPageRun; j++ {
		end = r.hdr.PageOffset(pages[j].Frame) + pageSize
	}
	if int64(cap(r.buf)) < end-off {
		r.buf = make([]byte, end-off)
	}
	r.buf, r.bufOff = r.buf[:end-off], off
	if err := readFull(r.wal, r.buf, off); err != nil {
		r.buf = nil
		return nil, err
	}
	return r.buf[:pageSize], nil
}

// Merge combines consecutive transactions of one log generation into one:
// the final image of every page any of them changed, and the last one's
// commit size. Committing them one after the other and committing the merge
// leave the database the same.
func Merge(txns []Txn) Txn {
	if len(txns) == 1 {
		return txns[0]
	}
	first, last := txns[0], txns[len(txns)-1]
	n := 0
	for _, t := range txns {
		n += len(t.Pages)
	}
	all := make([]Page, 0, n)
	for _, t := range txns {
		all = append(all, t.Pages...)
	}
	// Later transactions sit later in the log, so a page's entry with the
	// highest offset is its final image. It survives only if
	// no transaction after the one that wrote it cut the database below it.
	laterMin := make([]uint32, len(txns)) // smallest commit size after txns[i]
	m := last.Commit
	for i := len(txns) - 1; i >= 0; i-- {
		laterMin[i] = m
		m = min(m, txns[i].Commit)
	}
	out := lastOfEach(all, func(p Page) bool {
		k, _ := slices.BinarySearchFunc(txns, first.Header.PageOffset(p.Frame), func(t Txn, off int64) int { return cmp.Compare(t.End(), off+1) })
		return k < len(txns) && p.Pgno <= laterMin[k]
	})
	return Txn{
		Header: first.Header,
		Offset: first.Offset,
		Size:   last.End() - first.Offset,
		Commit: last.Commit,
		Pages:  out,
	}
}

func readFull(r io.ReaderAt, b []byte, off int64) error {
	n, err := r.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// MemSums is a PageSums held in memory, for tests and small tools.
type MemSums struct {
	sums  []ltx.Checksum
	total ltx.Checksum
}

func (m *MemSums) Len() uint32 { return uint32(len(m.sums)) }

func (m *MemSums) Get(pgno uint32) ltx.Checksum {
	if pgno == 0 || pgno > uint32(len(m.sums)) {
		return 0
	}
	return m.sums[pgno-1]
}

func (m *MemSums) Total() ltx.Checksum { return ltx.ChecksumFlag | m.total }

// Set replaces the sum of one page, growing the database if needed.
func (m *MemSums) Set(pgno uint32, sum ltx.Checksum) {
	for uint32(len(m.sums)) < pgno {
		m.sums = append(m.sums, 0)
	}
	m.total ^= rawSum(m.sums[pgno-1] ^ sum)
	m.sums[pgno-1] = sum
}

// Truncate drops the pages beyond n.
func (m *MemSums) Truncate(n uint32) {
	for uint32(len(m.sums)) > n {
		m.total ^= rawSum(m.sums[len(m.sums)-1])
		m.sums = m.sums[:len(m.sums)-1]
	}
	for uint32(len(m.sums)) < n {
		m.sums = append(m.sums, 0)
	}
}

// Apply applies a transaction's Update.
func (m *MemSums) Apply(u Update) {
	m.Truncate(u.Commit)
	for i, pgno := range u.Pgnos {
		m.Set(pgno, u.Sums[i])
	}
}
