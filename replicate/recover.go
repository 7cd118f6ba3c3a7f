package replicate

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/lfuse/lfuse/walcapture"
	"github.com/superfly/ltx"
)

// openState opens the log and checksum table of a DB. A log that cannot be
// read is moved aside (kept for inspection) and capture restarts from a
// snapshot.
func (d *DB) openState() error {
	if err := os.MkdirAll(d.dir, 0o700); err != nil {
		return err
	}
	if !d.swept {
		d.sweep()
		d.swept = true
	}
	if _, err := os.Stat(d.statePath()); errors.Is(err, os.ErrNotExist) {
		if err := d.writeState(stateFile{Path: d.rel}); err != nil {
			return err
		}
	}
	logDir := filepath.Join(d.dir, "log")
	l, err := OpenLog(logDir)
	if err != nil {
		aside := fmt.Sprintf("%s.broken-%d", logDir, time.Now().Unix())
		d.logger.Error("local log is unreadable; moving it aside and starting from a snapshot", "err", err, "moved_to", aside)
		if rerr := os.Rename(logDir, aside); rerr != nil {
			return fmt.Errorf("local log %s is unreadable (%v) and cannot be moved aside: %w", logDir, err, rerr)
		}
		if l, err = OpenLog(logDir); err != nil {
			return err
		}
	}
	d.log = l
	d.takeRestoredHint()
	s, err := OpenSums(filepath.Join(d.dir, "sums"))
	if errors.Is(err, errNotSums) {
		d.logger.Warn("page checksum table is unreadable; rebuilding it", "err", err)
		os.Remove(filepath.Join(d.dir, "sums"))
		s, err = OpenSums(filepath.Join(d.dir, "sums"))
	}
	if err != nil {
		l.Close()
		d.log = nil
		return err
	}
	d.sums = s
	return nil
}

// tempPatterns are the temporary files lfuse makes in a database's state
// directory, which a killed lfuse leaves behind.
var tempPatterns = []string{"*.tmp", ".*.tmp", "upload-*.ltx", "download-*.ltx", "merge-*.ltx"}

// sweep removes what a killed lfuse left of its temporary files: each can
// be as large as the database, and nothing else would ever remove them.
func (d *DB) sweep() {
	n := 0
	for _, pattern := range tempPatterns {
		names, _ := filepath.Glob(filepath.Join(d.dir, pattern))
		for _, name := range names {
			if os.Remove(name) == nil {
				n++
			}
		}
	}
	if n > 0 {
		d.logger.Info("removed temporary files left by an earlier lfuse", "files", n)
	}
}

// recoverLocked proves, at start, that the database on disk continues the
// history in the local log, capturing whatever the WAL still holds beyond it.
// If it cannot, the database is marked as needing a snapshot, with the reason.
func (d *DB) recoverLocked() error {
	last, ok := d.log.Last()
	if !ok {
		// A first snapshot is the normal start of a database's log (one
		// restored before the mount starts here), not a warning.
		d.status, d.reason = statusNeedSnapshot, "no snapshot in the local log yet"
		return nil
	}
	if _, err := os.Stat(d.path); errors.Is(err, os.ErrNotExist) {
		if at, ok := seenGone(d.dir); ok {
			d.goneSince("database file was deleted through the mount before the last stop", at, true)
		} else {
			d.goneSince("database file was deleted while lfuse was not running", time.Now(), false)
		}
		return nil
	}
	d.back()
	if err := d.catchUpSums(last); err != nil {
		d.needSnapshot(fmt.Sprintf("page checksum table does not match the local log: %v", err))
		return nil
	}

	st, _ := d.readState()
	clean := st.Clean
	st.Clean = nil
	// From here on a crash must not be mistaken for a clean stop.
	if err := d.writeState(st); err != nil {
		return err
	}

	pos := walcapture.Pos{Salt1: last.Header.WALSalt1, Salt2: last.Header.WALSalt2}
	if last.Header.WALOffset > 0 {
		pos.Offset = last.Header.WALOffset + last.Header.WALSize
	}
	wal, err := os.Open(d.path + "-wal")
	var walR io.ReaderAt = emptyReader{}
	if err == nil {
		defer wal.Close()
		walR = wal
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if d.checkLostAside(walR) {
		d.needSnapshot("WAL frames copied aside before a checkpoint were not captured before the last stop")
		return nil
	}
	if err := d.cap.Resume(walR, pos); err != nil {
		d.needSnapshot(fmt.Sprintf("WAL does not continue the local log at TXID %s: %v", last.TXID(), err))
		return nil
	}

	if clean != nil && clean.TXID == last.TXID() && d.unchangedSince(clean) {
		d.logger.Debug("resumed after a clean stop", "txid", last.TXID().String())
		return nil
	}

	// Not a clean stop: capture what the WAL holds beyond the log, then
	// prove the files match the result page for page.
	start := time.Now()
	if err := d.captureLocked(); err != nil {
		if errors.Is(err, walcapture.ErrDiverged) {
			d.needSnapshot(err.Error())
			return nil
		}
		return err
	}
	db, err := os.Open(d.path)
	if err != nil {
		return err
	}
	defer db.Close()
	dbSt, err := db.Stat()
	if err != nil {
		return err
	}
	gotPos, commit, total, err := walcapture.DatabaseChecksum(db, walR, dbSt.Size())
	if err != nil {
		d.needSnapshot(fmt.Sprintf("cannot read the database to verify it: %v", err))
		return nil
	}
	last, _ = d.log.Last()
	if total != d.sums.Total() || commit != d.sums.Len() || gotPos != d.cap.Pos() {
		d.needSnapshot(fmt.Sprintf("database file does not match the local log at TXID %s (checksum %s, log has %s): it was changed without lfuse seeing it (while lfuse was not running, outside the mount, or through a WAL moved away)", last.TXID(), total, d.sums.Total()))
		return nil
	}
	d.logger.Info("verified database against the local log", "txid", last.TXID().String(), "pages", commit,
		"seconds", time.Since(start).Seconds())
	return nil
}

// catchUpSums brings the checksum table to the log's last record by
// replaying the records it has not seen, then checks it adds up.
func (d *DB) catchUpSums(last Record) error {
	if d.sums.TXID() > last.TXID() {
		return fmt.Errorf("table is at TXID %s, beyond the log's %s", d.sums.TXID(), last.TXID())
	}
	if d.sums.TXID() < last.TXID() {
		if err := d.log.Each(d.sums.TXID(), func(rec Record, r io.Reader) error {
			return applyRecordSums(d.sums, rec, r)
		}); err != nil {
			return err
		}
	}
	return d.sums.Verify(last.Trailer.PostApplyChecksum)
}

// applyRecordSums applies one LTX file's pages to a checksum table.
func applyRecordSums(s *Sums, rec Record, r io.Reader) error {
	dec := ltx.NewDecoder(bufio.NewReaderSize(r, 64<<10))
	dec.SetRetainPageIndex(false)
	if err := dec.DecodeHeader(); err != nil {
		return err
	}
	hdr := dec.Header()
	if hdr.IsSnapshot() {
		if err := s.Reset(); err != nil {
			return err
		}
	}
	u := walcapture.Update{Commit: hdr.Commit, Total: rec.Trailer.PostApplyChecksum}
	buf := make([]byte, hdr.PageSize)
	for {
		var ph ltx.PageHeader
		if err := dec.DecodePage(&ph, buf); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return err
		}
		sum := walcapture.ChecksumPage(ph.Pgno, buf)
		if hdr.IsSnapshot() {
			s.Set(ph.Pgno, sum)
		} else {
			u.Add(ph.Pgno, sum)
		}
	}
	if err := dec.Close(); err != nil {
		return err
	}
	if hdr.IsSnapshot() {
		return s.Finish(hdr.Commit, rec.Trailer.PostApplyChecksum, hdr.MaxTXID)
	}
	return s.Apply(u, hdr.MaxTXID)
}

func (d *DB) unchangedSince(c *cleanState) bool {
	db, err := statID(d.path)
	if err != nil || *db != c.DB {
		return false
	}
	wal, err := statID(d.path + "-wal")
	if errors.Is(err, os.ErrNotExist) {
		return c.WAL == nil
	}
	return err == nil && c.WAL != nil && *wal == *c.WAL
}

// closeLocked finishes capture at a clean stop and records the files' state,
// so the next start can trust them without reading the database.
func (d *DB) closeLocked() error {
	if d.log == nil {
		return nil
	}
	var errs []error
	if d.status == statusTracking {
		if err := d.captureLocked(); err != nil {
			errs = append(errs, err)
		}
	}
	errs = append(errs, d.log.Sync(), d.sums.Sync())
	if last, ok := d.log.Last(); ok && d.status == statusTracking && errors.Join(errs...) == nil {
		st := stateFile{Path: d.rel}
		if db, err := statID(d.path); err == nil {
			st.Clean = &cleanState{TXID: last.TXID(), DB: *db}
			if wal, err := statID(d.path + "-wal"); err == nil {
				st.Clean.WAL = wal
			}
		}
		// Without it the next start reads the database to verify it
		// instead: slower, but nothing is lost, and a full state disk at
		// a stop must not make a clean stop look failed.
		if err := d.writeState(st); err != nil {
			d.logger.Warn("cannot record the clean stop; the next start verifies the database instead", "err", err)
		}
	}
	errs = append(errs, d.log.Close(), d.sums.Close())
	d.log, d.sums = nil, nil
	return errors.Join(errs...)
}

func (d *DB) readState() (stateFile, error) {
	st := stateFile{Path: d.rel}
	b, err := os.ReadFile(d.statePath())
	if err != nil {
		return st, err
	}
	err = json.Unmarshal(b, &st)
	st.Path = d.rel
	return st, err
}

func (d *DB) writeState(st stateFile) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(d.statePath(), b)
}

// writeFileAtomic replaces path with data durably: temp file, fsync, rename,
// directory fsync.
func writeFileAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	return syncDir(filepath.Dir(path))
}

// takeRestoredHint reads, and removes, the TXID a restore put the database
// at (NoteRestored): the next snapshot takes it, unless the log is past it.
func (d *DB) takeRestoredHint() {
	_, txid, ok := readRestoredHint(d.dir)
	if !ok {
		return
	}
	os.Remove(filepath.Join(d.dir, restoredName))
	last, _ := d.log.Last()
	if txid > last.TXID() && txid > d.minTXID {
		d.minTXID = txid
		d.logger.Info("restored at TXID " + txid.String() + "; its snapshot takes that TXID, so a replica that holds the same needs no upload")
	}
}
