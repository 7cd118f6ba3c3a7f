package replicate

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"github.com/superfly/ltx"
)

// Ref locates one record of a local log: an LTX file at Off..Off+Size of the
// file at Path. Readers read it with a section reader, without copying.
//
// A ref found by a LogReader holds its file open until released: a fold of
// the log may replace the file with a new snapshot at any moment, and what
// was found must stay readable until it has been shipped.
type Ref struct {
	Record
	Path      string
	Off, Size int64
	file      *os.File
}

// releaseRefs closes the files refs hold open. Refs of one segment share
// its file.
func releaseRefs(refs ...Ref) {
	seen := map[*os.File]bool{}
	for _, r := range refs {
		if r.file != nil && !seen[r.file] {
			seen[r.file] = true
			r.file.Close()
		}
	}
}

// LogReader finds records in a local log that another goroutine may be
// appending to. It reads only records up to a TXID the writer reported as
// stored, so it never sees a partial one, and it remembers where it stopped
// so that following the log costs nothing per record already read.
type LogReader struct {
	dir string
	// Where the last call stopped: the next record in segment seg starts
	// at off and has TXID next.
	seg  string
	off  int64
	next ltx.TXID
}

// NewLogReader reads the log in dir.
func NewLogReader(dir string) *LogReader { return &LogReader{dir: dir} }

// errLogMoved means the records asked for are no longer in the log (a newer
// snapshot replaced them): start again from the snapshot.
var errLogMoved = errors.New("the local log no longer holds those records")

// errNotBoundary: a TXID asked for falls inside one of the local log's
// records. Every TXID a replica got from this log ends a record, so the
// replica holds another history (the state directory was lost, or another
// lfuse wrote it).
var errNotBoundary = errors.New("the local log has no record boundary there")

// Snapshot returns the log's newest snapshot, held open until released.
func (lr *LogReader) Snapshot() (Ref, error) {
	ref, _, err := lr.SnapshotAbove(0)
	return ref, err
}

// SnapshotAbove returns the oldest snapshot the log holds with a TXID
// above after (the log keeps older ones for a replica that lacks them:
// Log.prune), or the newest if after is 0 or none is above it, held open
// until released; newest says which.
func (lr *LogReader) SnapshotAbove(after ltx.TXID) (_ Ref, newest bool, _ error) {
	l := &Log{dir: lr.dir}
	for attempt := 0; ; attempt++ {
		snaps, _, err := l.files()
		if err != nil {
			return Ref{}, false, fmt.Errorf("local log snapshot: %w", err)
		}
		if len(snaps) == 0 {
			return Ref{}, false, errNoSnapshot
		}
		i := len(snaps) - 1
		if after > 0 {
			for i > 0 && snaps[i-1] > after {
				i--
			}
		}
		path := l.snapshotPath(snaps[i])
		f, err := os.Open(path)
		if errors.Is(err, os.ErrNotExist) && attempt < 3 {
			continue // a newer snapshot replaced it since the listing
		} else if err != nil {
			return Ref{}, false, err
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return Ref{}, false, err
		}
		rec, err := peekRecord(f, 0, st.Size())
		if err != nil {
			f.Close()
			return Ref{}, false, fmt.Errorf("%s: %w", path, err)
		}
		return Ref{Record: rec, Path: path, Size: st.Size(), file: f}, i == len(snaps)-1, nil
	}
}

// Refs returns the transaction records with TXIDs after..upTo, which must
// all have been stored, held open until released. If the newest snapshot is
// past after, it returns errLogMoved: the caller starts from Snapshot
// instead.
func (lr *LogReader) Refs(after, upTo ltx.TXID) (_ []Ref, err error) {
	if upTo <= after {
		return nil, nil
	}
	l := &Log{dir: lr.dir}
	snaps, segs, err := l.files()
	if err != nil {
		return nil, fmt.Errorf("local log records: %w", err)
	}
	if len(snaps) == 0 || snaps[len(snaps)-1] > after {
		return nil, errLogMoved
	}
	// The segment holding TXID after+1 is the last one starting at or
	// before it.
	i := len(segs) - 1
	for i >= 0 && segs[i] > after+1 {
		i--
	}
	if i < 0 || segs[i] <= snaps[len(snaps)-1] {
		return nil, errLogMoved
	}
	var refs []Ref
	defer func() {
		if err != nil {
			releaseRefs(refs...)
		}
	}()
	for ; i < len(segs) && segs[i] <= upTo; i++ {
		path := l.segmentPath(segs[i])
		off, next := int64(0), segs[i]
		if lr.seg == path && lr.next <= after+1 && lr.next >= next {
			off, next = lr.off, lr.next
		}
		more, end, endTXID, err := readRefs(path, off, next, after, upTo)
		if errors.Is(err, os.ErrNotExist) {
			return nil, errLogMoved
		} else if err != nil {
			return nil, err
		}
		refs = append(refs, more...)
		lr.seg, lr.off, lr.next = path, end, endTXID
		if len(refs) > 0 && refs[len(refs)-1].TXID() >= upTo {
			break
		}
	}
	if len(refs) > 0 && refs[0].Header.MinTXID <= after {
		return nil, fmt.Errorf("%w: local record %s..%s spans TXID %s", errNotBoundary, refs[0].Header.MinTXID, refs[0].TXID(), after)
	}
	if len(refs) == 0 || refs[0].Header.MinTXID != after+1 || refs[len(refs)-1].TXID() != upTo {
		return nil, fmt.Errorf("local log: records %s..%s not found where expected", after+1, upTo)
	}
	return refs, nil
}

// Tail returns the records after+1 onwards that the log kept from before
// its snapshot snap, the newest or an older one it kept (Log.AddSnapshot
// keeps what a replica has not received), as far as they run on without a
// gap, held open until released.
// It returns nothing if the log does not hold TXID after+1 that way.
func (lr *LogReader) Tail(after, snap ltx.TXID) ([]Ref, error) {
	l := &Log{dir: lr.dir}
	_, segs, err := l.files()
	if err != nil {
		return nil, fmt.Errorf("local log records: %w", err)
	}
	i := len(segs) - 1
	for i >= 0 && (segs[i] >= snap || segs[i] > after+1) {
		i--
	}
	if i < 0 {
		return nil, nil
	}
	var refs []Ref
	next := segs[i]
	for ; i < len(segs) && segs[i] == next && next < snap; i++ {
		more, _, end, err := readRefs(l.segmentPath(segs[i]), 0, segs[i], after, snap-1)
		if err != nil {
			break // removed since the listing, or unreadable: ship what runs on
		}
		refs = append(refs, more...)
		next = end
	}
	if len(refs) == 0 || refs[0].Header.MinTXID != after+1 {
		releaseRefs(refs...)
		return nil, nil
	}
	return refs, nil
}

// readRefs walks a segment from off (where the record with TXID next
// starts), returning the records within after+1..upTo, which hold the
// segment open, and where it stopped.
func readRefs(path string, off int64, next, after, upTo ltx.TXID) (refs []Ref, end int64, endTXID ltx.TXID, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, 0, err
	}
	defer func() {
		if len(refs) == 0 || err != nil {
			f.Close()
		}
	}()
	st, err := f.Stat()
	if err != nil {
		return nil, 0, 0, err
	}
	// Records go on in the next segment after this one's end.
	for next <= upTo && off+8 <= st.Size() {
		var lb [8]byte
		if _, err := f.ReadAt(lb[:], off); err != nil {
			return nil, 0, 0, fmt.Errorf("%s at %d: %w", path, off, err)
		}
		n := int64(binary.BigEndian.Uint64(lb[:]))
		if n == 0 {
			return nil, 0, 0, fmt.Errorf("%s at %d: record TXID %s not stored yet", path, off, next)
		}
		rec, err := peekRecord(f, off+8, n)
		if err != nil {
			return nil, 0, 0, fmt.Errorf("%s at %d: %w", path, off, err)
		}
		if rec.Header.MinTXID != next {
			return nil, 0, 0, fmt.Errorf("%s at %d: record TXID %s, expected %s", path, off, rec.Header.MinTXID, next)
		}
		if rec.TXID() > after {
			refs = append(refs, Ref{Record: rec, Path: path, Off: off + 8, Size: n, file: f})
		}
		off += 8 + n
		next = rec.TXID() + 1
	}
	return refs, off, next, nil
}

// peekRecord reads an LTX file's header and trailer without decoding its
// pages; the CRC is checked by whoever decodes it.
func peekRecord(f *os.File, off, n int64) (Record, error) {
	var rec Record
	if n < ltx.HeaderSize+ltx.TrailerSize {
		return rec, fmt.Errorf("LTX file of %d bytes is too short", n)
	}
	b := make([]byte, ltx.HeaderSize)
	if _, err := f.ReadAt(b, off); err != nil {
		return rec, err
	}
	if err := rec.Header.UnmarshalBinary(b); err != nil {
		return rec, err
	}
	t := make([]byte, ltx.TrailerSize)
	if _, err := f.ReadAt(t, off+n-ltx.TrailerSize); err != nil {
		return rec, err
	}
	if err := rec.Trailer.UnmarshalBinary(t); err != nil {
		return rec, err
	}
	return rec, nil
}
