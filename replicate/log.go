package replicate

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/superfly/ltx"
)

// Log is the durable local record of one database's captured history: a
// snapshot LTX file followed by segments of transaction LTX files, with
// consecutive TXIDs. It is what replicas are fed from, and what proves on the
// next start where capture stood.
//
// Layout, in the log directory:
//
//	<txid %016x>.snapshot.ltx   TXIDs 1..txid, every page of the database
//	<txid %016x>.seg            records with TXIDs txid, txid+1, ...
//
// A segment is a sequence of records, each an 8-byte big-endian length and
// then one complete LTX file. A record is appended with a zero length, which
// is filled in only once the whole file is written, so a torn tail is
// recognised on open and cut off.
//
// Older snapshots and segments from before the newest snapshot stay only
// while a replica lacks what they hold (prune); reading the log starts at
// the newest snapshot.
type Log struct {
	dir string

	snapshot ltx.TXID // TXID of the newest snapshot, 0 if none
	last     Record   // the newest record (snapshot or transaction)

	kept    bool     // snapshots or segments from before the snapshot are kept for a replica (prune)
	seg     *os.File // segment being appended to, nil until the first append after a snapshot
	segFrom ltx.TXID
	segSize int64
}

// Record describes one LTX file in the log.
type Record struct {
	Header  ltx.Header
	Trailer ltx.Trailer
}

// TXID is the record's last transaction.
func (r Record) TXID() ltx.TXID { return r.Header.MaxTXID }

// maxSegment is the size at which appends move to a new segment file.
var maxSegment int64 = 64 << 20

const snapshotSuffix = ".snapshot.ltx"

var errNoSnapshot = errors.New("the local log holds no snapshot")

// OpenLog opens (creating it if needed) the log in dir, cuts any torn record
// off the end, and finds the newest record.
func OpenLog(dir string) (*Log, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	return openLog(dir, true)
}

// ReadLog opens the log in dir for reading only, as it is now (lfuse may be
// appending to it): an unfinished record at the end is left alone.
func ReadLog(dir string) (*Log, error) {
	return openLog(dir, false)
}

func openLog(dir string, repair bool) (*Log, error) {
	l := &Log{dir: dir}
	snaps, segs, err := l.files()
	if err != nil {
		return nil, err
	}
	if len(snaps) == 0 {
		return l, nil
	}
	l.snapshot = snaps[len(snaps)-1]
	rec, err := readRecordFile(l.snapshotPath(l.snapshot))
	if err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", l.snapshot, err)
	}
	l.last = rec
	l.kept = len(snaps) > 1
	for _, from := range segs {
		if from <= l.snapshot {
			l.kept = true
			continue
		}
		if from != l.last.TXID()+1 {
			return nil, fmt.Errorf("segment %s does not follow TXID %s", from, l.last.TXID())
		}
		last, size, err := scanSegment(l.segmentPath(from), repair)
		if err != nil {
			return nil, err
		}
		if size == 0 {
			if repair {
				_ = os.Remove(l.segmentPath(from))
			}
			break
		}
		l.last = last
		l.segFrom, l.segSize = from, size
	}
	return l, nil
}

// files lists the snapshot TXIDs and segment first-TXIDs, ascending.
func (l *Log) files() (snaps, segs []ltx.TXID, err error) {
	ents, err := os.ReadDir(l.dir)
	if err != nil {
		return nil, nil, err
	}
	for _, e := range ents {
		name := e.Name()
		switch {
		case strings.HasSuffix(name, snapshotSuffix):
			if id, err := ltx.ParseTXID(strings.TrimSuffix(name, snapshotSuffix)); err == nil {
				snaps = append(snaps, id)
			}
		case strings.HasSuffix(name, ".seg"):
			if id, err := ltx.ParseTXID(strings.TrimSuffix(name, ".seg")); err == nil {
				segs = append(segs, id)
			}
		}
	}
	slices.Sort(snaps)
	slices.Sort(segs)
	return snaps, segs, nil
}

func (l *Log) snapshotPath(id ltx.TXID) string {
	return filepath.Join(l.dir, id.String()+snapshotSuffix)
}

func (l *Log) segmentPath(from ltx.TXID) string {
	return filepath.Join(l.dir, from.String()+".seg")
}

// Last returns the newest record and whether there is one.
func (l *Log) Last() (Record, bool) { return l.last, l.snapshot != 0 }

// SnapshotTXID is the TXID of the newest snapshot, 0 if none.
func (l *Log) SnapshotTXID() ltx.TXID { return l.snapshot }

// writers are the buffers records are written through, shared by every
// database's log rather than one kept by each (see walcapture's chunks).
var writers sync.Pool

// Append writes one transaction record with the next TXID. write encodes the
// LTX file; if it fails, nothing is kept.
func (l *Log) Append(write func(w io.Writer) error) (Record, error) {
	if l.snapshot == 0 {
		return Record{}, errNoSnapshot
	}
	if l.seg == nil || l.segSize >= maxSegment {
		if err := l.openSegment(); err != nil {
			return Record{}, err
		}
	}
	start := l.segSize
	var lenBuf [8]byte
	if _, err := l.seg.WriteAt(lenBuf[:], start); err != nil {
		return Record{}, l.cut(start, fmt.Errorf("write to local log: %w", err))
	}
	cw := &countingWriter{w: io.NewOffsetWriter(l.seg, start+8)}
	bw, _ := writers.Get().(*bufio.Writer)
	if bw == nil {
		bw = bufio.NewWriterSize(cw, 64<<10)
	}
	bw.Reset(cw)
	defer func() { bw.Reset(nil); writers.Put(bw) }()
	hw := &headTrailWriter{w: bw}
	if err := write(hw); err != nil {
		return Record{}, l.cut(start, err)
	}
	if err := bw.Flush(); err != nil {
		return Record{}, l.cut(start, fmt.Errorf("write to local log: %w", err))
	}
	binary.BigEndian.PutUint64(lenBuf[:], uint64(cw.n))
	if _, err := l.seg.WriteAt(lenBuf[:], start); err != nil {
		return Record{}, l.cut(start, fmt.Errorf("write to local log: %w", err))
	}
	rec, err := hw.record()
	if err != nil {
		return Record{}, l.cut(start, err)
	}
	if rec.Header.MinTXID != l.last.TXID()+1 {
		return Record{}, l.cut(start, fmt.Errorf("record TXID %s does not follow %s", rec.Header.MinTXID, l.last.TXID()))
	}
	l.segSize = start + 8 + cw.n
	l.last = rec
	return rec, nil
}

// cut removes a partly written record.
func (l *Log) cut(at int64, err error) error {
	if terr := l.seg.Truncate(at); terr != nil {
		// The zero length already marks the record as torn; a later open
		// cuts it.
		return errors.Join(err, terr)
	}
	return err
}

func (l *Log) openSegment() error {
	if l.seg != nil {
		// Replicas fsync only the newest segment before shipping from it.
		if err := l.seg.Sync(); err != nil {
			return err
		}
		if err := l.seg.Close(); err != nil {
			return err
		}
		l.seg = nil
	}
	from := l.last.TXID() + 1
	f, err := os.OpenFile(l.segmentPath(from), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("create local log segment: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return err
	}
	l.seg, l.segFrom, l.segSize = f, from, st.Size()
	return syncDir(l.dir)
}

// AddSnapshot moves a finished snapshot LTX file at tmpPath into the log. It
// becomes the start of the log: older snapshots and segments are removed,
// except those holding records after keepAfter, which a replica has not
// received yet (LogReader.SnapshotAbove, LogReader.Tail).
func (l *Log) AddSnapshot(tmpPath string, keepAfter ltx.TXID) (Record, error) {
	rec, err := readRecordFile(tmpPath)
	if err != nil {
		return Record{}, err
	}
	if !rec.Header.IsSnapshot() || rec.TXID() <= l.last.TXID() {
		return Record{}, fmt.Errorf("snapshot TXID %s does not follow %s", rec.TXID(), l.last.TXID())
	}
	if err := fsyncPath(tmpPath); err != nil {
		return Record{}, err
	}
	// The segment may be kept for a replica, and a log is repaired on
	// open only after its newest snapshot: its records must be whole.
	if err := l.Sync(); err != nil {
		return Record{}, err
	}
	if err := os.Rename(tmpPath, l.snapshotPath(rec.TXID())); err != nil {
		return Record{}, err
	}
	if err := syncDir(l.dir); err != nil {
		return Record{}, err
	}
	if l.seg != nil {
		l.seg.Close()
		l.seg = nil
	}
	oldLast := l.last.TXID()
	l.snapshot, l.last, l.segFrom, l.segSize = rec.TXID(), rec, 0, 0
	l.prune(keepAfter, oldLast)
	return rec, nil
}

// maxKeptSnapshots is how many snapshots older than the newest the log
// keeps for a replica that lacks them. Each is the size of the database,
// and a lfuse restarted again and again while a replica is down may take
// one at every start: past this, the oldest go, and with them the
// points in time between them in that replica.
const maxKeptSnapshots = 2

// prune removes the snapshots older than the newest, and the segments
// before it, except those holding records after keepAfter (at most
// maxKeptSnapshots snapshots). oldLast is the newest record before the
// snapshot: where the last of those segments ends.
func (l *Log) prune(keepAfter, oldLast ltx.TXID) {
	snaps, segs, err := l.files()
	if err != nil {
		return
	}
	l.kept = false
	older := snaps[:max(0, len(snaps)-1)]
	for i, id := range older {
		if id > keepAfter && len(older)-i <= maxKeptSnapshots || os.Remove(l.snapshotPath(id)) != nil {
			l.kept = true
		}
	}
	for i, from := range segs {
		if from > l.snapshot {
			break
		}
		end := oldLast
		if i+1 < len(segs) && segs[i+1] <= l.snapshot {
			end = segs[i+1] - 1
		}
		if end > keepAfter || os.Remove(l.segmentPath(from)) != nil {
			l.kept = true
		}
	}
}

// dropKeptSnapshots removes the snapshots older than the newest, even
// those a replica lacks, and says how many it removed.
func (l *Log) dropKeptSnapshots() int {
	snaps, _, err := l.files()
	if err != nil {
		return 0
	}
	n := 0
	for _, id := range snaps {
		if id < l.snapshot && os.Remove(l.snapshotPath(id)) == nil {
			n++
		}
	}
	return n
}

// DropKept removes the snapshots and segments kept from before the newest
// snapshot (prune) that every replica now holds: all records up to
// keepAfter.
func (l *Log) DropKept(keepAfter ltx.TXID) {
	if l.kept {
		l.prune(keepAfter, l.snapshot)
	}
}

// Sync makes every appended record durable.
func (l *Log) Sync() error {
	if l.seg == nil {
		return nil
	}
	return l.seg.Sync()
}

// Close closes the segment being appended to.
func (l *Log) Close() error {
	if l.seg == nil {
		return nil
	}
	err := l.seg.Close()
	l.seg = nil
	return err
}

// Each calls fn with every record after TXID after, in order: the newest
// snapshot first if after is before it. r reads that record's LTX file.
func (l *Log) Each(after ltx.TXID, fn func(rec Record, r io.Reader) error) error {
	if l.snapshot == 0 {
		return errNoSnapshot
	}
	if after < l.snapshot {
		f, err := os.Open(l.snapshotPath(l.snapshot))
		if err != nil {
			return err
		}
		rec, err := readRecord(f)
		if err == nil {
			_, err = f.Seek(0, io.SeekStart)
		}
		if err == nil {
			err = fn(rec, f)
		}
		f.Close()
		if err != nil {
			return err
		}
	}
	_, segs, err := l.files()
	if err != nil {
		return err
	}
	for _, from := range segs {
		if from <= l.snapshot {
			continue
		}
		if err := eachRecord(l.segmentPath(from), func(rec Record, r io.Reader) error {
			if rec.TXID() <= after {
				return nil
			}
			return fn(rec, r)
		}); err != nil {
			return err
		}
	}
	return nil
}

// scanSegment walks a segment's records, optionally cutting a torn tail, and
// returns the last complete record and the segment's valid size. Records are
// framed by their lengths; the last one is also decoded whole, since a crash
// can leave it with a length but without all of its bytes on disk.
func scanSegment(path string, repair bool) (Record, int64, error) {
	flag := os.O_RDONLY
	if repair {
		flag = os.O_RDWR
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return Record{}, 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return Record{}, 0, err
	}
	type span struct{ off, n int64 }
	var spans []span
	br := bufio.NewReaderSize(io.NewSectionReader(f, 0, st.Size()), 64<<10)
	for off := int64(0); off+8 <= st.Size(); {
		var lb [8]byte
		if _, err := io.ReadFull(br, lb[:]); err != nil {
			return Record{}, 0, err
		}
		n := int64(binary.BigEndian.Uint64(lb[:]))
		if n == 0 || off+8+n > st.Size() {
			break
		}
		spans = append(spans, span{off, n})
		if _, err := br.Discard(int(n)); err != nil {
			return Record{}, 0, err
		}
		off += 8 + n
	}
	var last Record
	valid := int64(0)
	for i := len(spans) - 1; i >= 0; i-- {
		rec, err := readRecord(io.NewSectionReader(f, spans[i].off+8, spans[i].n))
		if err == nil {
			last, valid = rec, spans[i].off+8+spans[i].n
			break
		}
	}
	if valid < st.Size() && repair {
		if err := f.Truncate(valid); err != nil {
			return Record{}, 0, err
		}
	}
	return last, valid, nil
}

func eachRecord(path string, fn func(rec Record, r io.Reader) error) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	br := bufio.NewReaderSize(f, 256<<10)
	for {
		var lb [8]byte
		if _, err := io.ReadFull(br, lb[:]); errors.Is(err, io.EOF) {
			return nil
		} else if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		n := int64(binary.BigEndian.Uint64(lb[:]))
		if n == 0 {
			return nil
		}
		body := make([]byte, 0, min(n, 1<<20))
		buf := bytes.NewBuffer(body)
		if _, err := io.CopyN(buf, br, n); err != nil {
			return fmt.Errorf("%s: truncated record: %w", path, err)
		}
		rec, err := readRecord(bytes.NewReader(buf.Bytes()))
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		if err := fn(rec, bytes.NewReader(buf.Bytes())); err != nil {
			return err
		}
	}
}

func readRecordFile(path string) (Record, error) {
	f, err := os.Open(path)
	if err != nil {
		return Record{}, err
	}
	defer f.Close()
	return readRecord(f)
}

// readRecord decodes a whole LTX file, verifying its checksums. The page
// index is checked as it streams past but not kept: for a snapshot it would
// be a map of every page of the database (tens of MB at 2 GB), built only
// to be dropped.
func readRecord(r io.Reader) (Record, error) {
	dec := ltx.NewDecoder(bufio.NewReaderSize(r, 64<<10))
	dec.SetRetainPageIndex(false)
	if err := dec.Verify(); err != nil {
		return Record{}, fmt.Errorf("invalid LTX file: %w", err)
	}
	return Record{Header: dec.Header(), Trailer: dec.Trailer()}, nil
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// headTrailWriter keeps the first and last bytes written through it, which
// are an LTX file's header and trailer, so an appended record can be
// described without reading it back.
type headTrailWriter struct {
	w     io.Writer
	head  []byte
	trail [ltx.TrailerSize]byte
	n     int64
}

func (h *headTrailWriter) Write(p []byte) (int, error) {
	if len(h.head) < ltx.HeaderSize {
		h.head = append(h.head, p[:min(len(p), ltx.HeaderSize-len(h.head))]...)
	}
	if len(p) >= ltx.TrailerSize {
		copy(h.trail[:], p[len(p)-ltx.TrailerSize:])
	} else {
		copy(h.trail[:], h.trail[len(p):])
		copy(h.trail[ltx.TrailerSize-len(p):], p)
	}
	h.n += int64(len(p))
	return h.w.Write(p)
}

func (h *headTrailWriter) record() (Record, error) {
	var rec Record
	if err := rec.Header.UnmarshalBinary(h.head); err != nil {
		return rec, fmt.Errorf("encoded LTX header: %w", err)
	}
	if err := rec.Trailer.UnmarshalBinary(h.trail[:]); err != nil {
		return rec, fmt.Errorf("encoded LTX trailer: %w", err)
	}
	return rec, nil
}

func fsyncPath(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

func syncDir(dir string) error {
	return fsyncPath(dir)
}

// closedSegments returns the newest TXID held by segments that are no longer
// appended to, with their total size, or 0 if there are none.
func (l *Log) closedSegments() (upTo ltx.TXID, size int64, err error) {
	_, segs, err := l.files()
	if err != nil {
		return 0, 0, err
	}
	for i := 0; i+1 < len(segs); i++ {
		// Appends go to the newest segment only: one with a successor
		// is closed.
		if segs[i] <= l.snapshot {
			continue
		}
		fi, err := os.Stat(l.segmentPath(segs[i]))
		if err != nil {
			return 0, 0, err
		}
		upTo, size = segs[i+1]-1, size+fi.Size()
	}
	return upTo, size, nil
}

// replaceStart installs a snapshot that folds the current snapshot and the
// closed segments up to its TXID into one file, and removes what it
// replaces. Records after it, and the segment being appended to, stay.
func (l *Log) replaceStart(tmpPath string) error {
	rec, err := readRecordFile(tmpPath)
	if err != nil {
		return err
	}
	if !rec.Header.IsSnapshot() || rec.TXID() <= l.snapshot || rec.TXID() > l.last.TXID() {
		return fmt.Errorf("folded snapshot at TXID %s does not fit the log (snapshot %s, last %s)", rec.TXID(), l.snapshot, l.last.TXID())
	}
	if err := fsyncPath(tmpPath); err != nil {
		return err
	}
	if err := os.Rename(tmpPath, l.snapshotPath(rec.TXID())); err != nil {
		return err
	}
	if err := syncDir(l.dir); err != nil {
		return err
	}
	l.snapshot = rec.TXID()
	if l.last.TXID() == rec.TXID() {
		l.last = rec
	}
	// Every replica holds the folded records, and so everything before.
	l.prune(rec.TXID(), rec.TXID())
	return nil
}
