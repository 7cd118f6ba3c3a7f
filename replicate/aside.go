package replicate

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lfuse/lfuse/walcapture"
)

// A large transaction is expensive to capture (validating its frames and
// encoding its pages: about 18 ms for a 200,000-row insert), and SQLite
// checkpoints it right after the commit, in the application's COMMIT, through
// FUSE round trips that slow down whenever the other CPU is busy. Capturing
// it then costs the application the overlap, and capturing it in the hold at
// the end of the checkpoint makes the application wait for all of it.
//
// So for a large backlog, capture waits until the database has been quiet for
// a moment, and the hold at the end of a checkpoint copies the frames aside
// (in the kernel, about a millisecond per 5 MB) instead of capturing them:
// the frames the checkpoint may let SQLite overwrite then survive in the copy,
// and the next pass reads the log through it.
const (
	asideMin = 1 << 20   // committed, uncaptured bytes worth deferring
	asideMax = 128 << 20 // beyond this, capture in the hold rather than copy
	quietFor = 3 * time.Millisecond
	deferMax = 500 * time.Millisecond // a busy database waits no longer
)

// walAside is a copy of the log's header and of its bytes [lo, hi), at their
// own offsets in a sparse file.
type walAside struct {
	f      *os.File
	lo, hi int64
}

func (d *DB) asidePath() string { return filepath.Join(d.dir, "wal-aside") }

// touch notes that the application wrote to the database or its WAL.
func (d *DB) touch() { d.active.Store(time.Now().UnixNano()) }

// busy reports whether the application wrote to the database or its WAL
// within quietFor, or is syncing one of them.
func (d *DB) busy() bool {
	return d.syncing.Load() > 0 || time.Since(time.Unix(0, d.active.Load())) < quietFor
}

// mayDefer reports whether capture of a large committed transaction may
// wait for the application to go quiet, and starts the clock on how long.
func (d *DB) mayDefer() bool {
	if !d.busy() {
		return false
	}
	now := time.Now()
	if d.deferredAt.IsZero() {
		d.deferredAt = now
	}
	return now.Sub(d.deferredAt) < deferMax
}

// passDelay says whether an asynchronous capture pass should wait rather
// than validate a large backlog it would only put back (see capturePass):
// the application is busy and a copy aside, or a large transaction SQLite's
// WAL index counts as committed, is waiting.
func (d *DB) passDelay() time.Duration {
	if d.status != statusTracking || d.log == nil || d.failing || !d.busy() {
		return 0
	}
	if d.aside == nil && !d.largeBacklog() || !d.mayDefer() {
		return 0
	}
	return quietFor
}

// largeBacklog reports whether SQLite's WAL index counts at least asideMin
// committed bytes that capture has not taken yet.
func (d *DB) largeBacklog() bool {
	idx, ok := readIndexHeader(d.path + "-shm")
	committed, captured, ahead := d.indexAhead(idx, ok)
	return ahead && committed-captured >= asideMin
}

// armPass kicks a capture pass after wait, unless one is already due.
func (d *DB) armPass(wait time.Duration) {
	if d.passArmed {
		return
	}
	d.passArmed = true
	time.AfterFunc(wait, func() {
		d.mu.Lock()
		d.passArmed = false
		d.mu.Unlock()
		d.kick()
	})
}

// takeAside copies the log's uncaptured bytes aside so that an operation
// ending a checkpoint can go ahead before they are captured. It reports
// false when capturing in the hold is cheaper or the only safe way: a small
// backlog, a copy already waiting, a log generation capture has not read
// yet, SQLite's WAL index missing (exclusive locking mode), or a failed copy.
func (d *DB) takeAside() bool {
	if d.aside != nil || d.status != statusTracking || d.log == nil || d.failing {
		return false
	}
	if !d.largeBacklog() {
		return false
	}
	lo, ok := d.cap.ReadFrom()
	if !ok {
		return false
	}
	wal, err := os.Open(d.path + "-wal")
	if err != nil {
		return false
	}
	defer wal.Close()
	st, err := wal.Stat()
	if err != nil {
		return false
	}
	// Everything up to the end of the file, not only what the index
	// counts: a commit the index does not count yet is still a commit.
	hi := st.Size()
	if hi-lo < asideMin || hi-lo > asideMax {
		return false
	}
	var hb [walcapture.HeaderSize]byte
	if _, err := wal.ReadAt(hb[:], 0); err != nil {
		return false
	}
	if h, err := walcapture.ParseHeader(hb[:]); err != nil || !d.cap.Follows(h) {
		return false
	}
	f, err := os.OpenFile(d.asidePath(), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		d.logger.Debug("cannot copy WAL frames aside; capturing in the hold", "err", err)
		return false
	}
	if _, err = f.WriteAt(hb[:], 0); err == nil {
		err = copyRange(f, wal, lo, hi-lo)
	}
	if err != nil {
		f.Close()
		os.Remove(f.Name())
		d.logger.Debug("cannot copy WAL frames aside; capturing in the hold", "err", err)
		return false
	}
	d.aside = &walAside{f: f, lo: lo, hi: hi}
	d.logger.Debug("copied uncaptured WAL frames aside for the checkpoint", "bytes", hi-lo)
	d.armPass(quietFor)
	return true
}

// copyRange copies n bytes at off from src to the same offset in dst.
func copyRange(dst, src *os.File, off, n int64) error {
	roff, woff := off, off
	for n > 0 {
		c, err := unix.CopyFileRange(int(src.Fd()), &roff, int(dst.Fd()), &woff, int(min(n, 1<<30)), 0)
		if err != nil {
			if errors.Is(err, unix.EXDEV) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL) {
				return copyRangeSlow(dst, src, roff, n)
			}
			return fmt.Errorf("copy WAL frames aside: %w", err)
		}
		if c == 0 {
			return fmt.Errorf("copy WAL frames aside: %w", io.ErrUnexpectedEOF)
		}
		n -= int64(c)
	}
	return nil
}

func copyRangeSlow(dst, src *os.File, off, n int64) error {
	buf := make([]byte, 256<<10)
	for n > 0 {
		b := buf[:min(n, int64(len(buf)))]
		if _, err := src.ReadAt(b, off); err != nil {
			return fmt.Errorf("copy WAL frames aside: %w", err)
		}
		if _, err := dst.WriteAt(b, off); err != nil {
			return fmt.Errorf("copy WAL frames aside: %w", err)
		}
		off += int64(len(b))
		n -= int64(len(b))
	}
	return nil
}

// dropAside forgets the copy. What capture remembered of an unfinished
// transaction may have come from it, so that goes too.
func (d *DB) dropAside() {
	if d.aside == nil {
		return
	}
	d.aside.f.Close()
	os.Remove(d.aside.f.Name())
	d.aside = nil
	d.cap.Rewind(d.cap.Mark())
}

// overlay reads the log as it was when the copy was taken where the copy has
// it (the header and [lo, hi)), and the live file elsewhere.
type overlay struct {
	a    *walAside
	live io.ReaderAt
}

func (o overlay) ReadAt(p []byte, off int64) (int, error) {
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		var src io.ReaderAt = o.live
		end := int64(-1) // no limit
		switch {
		case pos < walcapture.HeaderSize:
			src, end = o.a.f, walcapture.HeaderSize
		case pos < o.a.lo:
			end = o.a.lo
		case pos < o.a.hi:
			src, end = o.a.f, o.a.hi
		}
		chunk := p[n:]
		if end >= 0 && int64(len(chunk)) > end-pos {
			chunk = chunk[:end-pos]
		}
		m, err := src.ReadAt(chunk, pos)
		n += m
		if m < len(chunk) {
			if err == nil {
				err = io.ErrUnexpectedEOF
			}
			return n, err
		}
	}
	return n, nil
}

// checkLostAside runs at start: a copy left by a process that stopped
// without capturing it held commits that may be gone from the WAL.
func (d *DB) checkLostAside(live io.ReaderAt) (lost bool) {
	f, err := os.Open(d.asidePath())
	if err != nil {
		return false
	}
	defer os.Remove(d.asidePath())
	defer f.Close()
	var a, b [walcapture.HeaderSize]byte
	_, errA := f.ReadAt(a[:], 0)
	_, errB := live.ReadAt(b[:], 0)
	// The same generation still holds every frame the copy had.
	return errA != nil || errB != nil || a != b
}
