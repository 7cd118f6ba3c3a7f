package replicate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/lfuse/lfuse/walcapture"
	"github.com/superfly/ltx"
)

type dbStatus int

const (
	statusTracking     dbStatus = iota // every commit is being captured
	statusNeedSnapshot                 // continuity is lost; the next capture is a full snapshot
	statusRollback                     // the database uses a rollback journal: not captured
	statusGone                         // the database file was deleted or replaced
)

func (s dbStatus) String() string {
	return [...]string{"tracking", "needs snapshot", "rollback journal", "gone"}[s]
}

// DB captures one SQLite database: it turns what SQLite commits to the
// database's WAL into records in the local Log.
//
// Capture runs when the WAL changes (asynchronously, off the application's
// path) and, synchronously, before any operation that could destroy frames
// not yet captured: those operations call Hold and wait for it.
type DB struct {
	rel    string // path relative to the mount root
	path   string // the database file in the backing directory
	dir    string // this database's state directory
	logger *slog.Logger
	// closing is closed when the Manager starts to close.
	closing <-chan struct{}

	mu      sync.Mutex
	swept   bool // the leftovers of an earlier process are gone
	log     *Log
	sums    *Sums
	cap     walcapture.Capturer
	status  dbStatus
	reason  string
	noWAL   *fileID // the database file when its WAL was removed (setNoWAL)
	failing bool    // an error was logged and recovery not yet
	lastErr error   // the latest failure, while failing
	// lostAtGone is the failure under way when the database was deleted
	// or renamed away: the commits it kept from the log went with it.
	lostAtGone error
	goneAt     time.Time // when the file was seen gone, for the deletion marker
	goneSeen   bool      // lfuse saw it go (goneSince)
	serving    bool      // taken up by the running mount (not in Open's checks)
	backoff    time.Duration
	retryAt    time.Time
	retrying   bool
	// A long unfinished transaction left unverified by the capture passes
	// (see noteUnverified): since when (zero: none), how long it may stay
	// so, and whether the recheck timer is armed.
	unverifiedSince time.Time
	recheckWait     time.Duration
	rechecking      bool
	// A large backlog waits for the application to go quiet (aside.go):
	// when it last wrote (unix ns), since when a pass waits, whether a
	// pass is armed, and the copy of frames a checkpoint let go ahead of
	// capture.
	active     atomic.Int64
	syncing    atomic.Int32 // fsyncs of its files in progress
	deferredAt time.Time
	passArmed  bool
	aside      *walAside

	kickMu  sync.Mutex
	running bool
	dirty   bool
	closed  bool // no more asynchronous passes: the Manager is closing
	wg      sync.WaitGroup

	// minTXID is the lowest TXID the next snapshot may take: above what a
	// replica holds of a history this database no longer continues.
	minTXID  ltx.TXID
	replicas []*Replica
	// onGone is called (with mu held) when the database becomes gone; a
	// goroutine then waits to release it (retireArmed), and retired is set
	// once the Manager has forgotten it.
	onGone      func()
	retireArmed bool
	retired     bool
	// releasing is retired for the replicas, which read it without mu
	// while their state directory is being moved aside under them.
	releasing atomic.Bool
	compactMu sync.Mutex  // one fold of the local log at a time
	folding   atomic.Bool // a foldLog goroutine is running

	lastStats     atomic.Pointer[Stats] // the last Stats read under mu
	statsWaiting  atomic.Bool           // a Stats call is waiting for mu
	walGone       atomic.Bool           // noWAL is set
	noWALCheck    atomic.Bool           // checkNoWALSoon's timer is armed
	captured      atomic.Int64          // transactions captured since start
	capturedBytes atomic.Int64
	snapshots     atomic.Int64
	captureErrs   atomic.Int64
	// What the application waited for: operations held back until capture
	// was done, how long they waited in all, and how many of the
	// checkpoints among them copied the backlog aside instead.
	holds     atomic.Int64
	heldNanos atomic.Int64
	copies    atomic.Int64
}

// Stats is a point-in-time view of a DB for logs and metrics.
type Stats struct {
	Path      string
	Status    string
	Reason    string
	TXID      ltx.TXID
	Captured  int64
	Bytes     int64
	Snapshots int64
	Errors    int64         // failed capture attempts
	Size      int64         // bytes of the database file
	WALSize   int64         // bytes of its -wal file
	Holds     int64         // operations held back until capture was done
	Held      time.Duration // how long they waited in all
	Copies    int64         // checkpoints that copied the backlog aside
}

func (d *DB) Stats() Stats {
	// d.mu can be held for seconds (a snapshot, a capture or a fold under
	// load): lfuse status and /metrics waited up to a minute behind one
	// database. Past statsWait, the status and TXID are the last ones read.
	// One waiter at a time: a scrape every second during a minute-long
	// hold left sixty goroutines per busy database queued on d.mu.
	st := Stats{Path: d.rel}
	fresh := d.statsWaiting.CompareAndSwap(false, true)
	if fresh {
		locked := make(chan struct{})
		go func() { d.mu.Lock(); close(locked) }()
		t := time.NewTimer(statsWait)
		select {
		case <-locked:
		case <-t.C:
			go func() { <-locked; d.mu.Unlock(); d.statsWaiting.Store(false) }()
			fresh = false
		}
		t.Stop()
	}
	if fresh {
		st.Status, st.Reason = d.status.String(), d.reason
		if d.log != nil {
			if last, ok := d.log.Last(); ok {
				st.TXID = last.TXID()
			}
		}
		d.mu.Unlock()
		d.statsWaiting.Store(false)
		d.lastStats.Store(&st)
	} else if last := d.lastStats.Load(); last != nil {
		st.Status, st.Reason, st.TXID = last.Status, last.Reason, last.TXID
	} else {
		st.Status = "busy"
	}
	st.Captured, st.Bytes, st.Snapshots, st.Errors = d.captured.Load(), d.capturedBytes.Load(), d.snapshots.Load(), d.captureErrs.Load()
	st.Holds, st.Held, st.Copies = d.holds.Load(), time.Duration(d.heldNanos.Load()), d.copies.Load()
	if fi, err := os.Stat(d.path); err == nil {
		st.Size = fi.Size()
	}
	if fi, err := os.Stat(d.path + "-wal"); err == nil {
		st.WALSize = fi.Size()
	}
	return st
}

// statsWait is how long Stats waits for a busy database before it reports
// what it read last.
const statsWait = 200 * time.Millisecond

// kick schedules an asynchronous capture pass, coalescing bursts.
func (d *DB) kick() {
	d.kickMu.Lock()
	defer d.kickMu.Unlock()
	if d.closed {
		return
	}
	if d.running {
		d.dirty = true
		return
	}
	d.running = true
	d.wg.Add(1)
	go d.loop()
}

func (d *DB) loop() {
	defer d.wg.Done()
	for {
		d.mu.Lock()
		if wait := d.passDelay(); wait > 0 {
			d.armPass(wait)
		} else {
			d.syncLocked(false)
		}
		d.mu.Unlock()

		d.kickMu.Lock()
		if !d.dirty {
			d.running = false
			d.kickMu.Unlock()
			if len(d.replicas) == 0 {
				// Without replicas nothing needs old records.
				d.foldLog()
			}
			return
		}
		d.dirty = false
		d.kickMu.Unlock()
	}
}

// Sync captures everything committed so far, leaving nothing unverified:
// at a stop, what it captures is what the replicas are flushed with.
func (d *DB) Sync() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.syncLocked(true)
}

// Hold captures everything committed so far and keeps capture stopped until
// release is called: the caller runs an operation that could destroy WAL
// frames in between. A capture that fails does not block the operation: the
// database is marked as needing a snapshot instead.
func (d *DB) Hold() (release func()) { return d.hold(false) }

// HoldCheckpoint is Hold for the truncation of the database file that ends
// a checkpoint: a large backlog is copied aside rather than captured, and
// captured once the application is quiet.
func (d *DB) HoldCheckpoint() (release func()) { return d.hold(true) }

func (d *DB) hold(checkpoint bool) (release func()) {
	start := time.Now()
	d.mu.Lock()
	d.holds.Add(1)
	defer func() { d.heldNanos.Add(int64(time.Since(start))) }()
	if checkpoint && d.takeAside() {
		d.copies.Add(1)
		return d.mu.Unlock
	}
	if d.status == statusTracking && d.log != nil {
		if err := d.captureLocked(); err != nil {
			d.needSnapshot(fmt.Sprintf("capture failed before frames could be overwritten: %v", err))
			if !errors.Is(err, walcapture.ErrDiverged) {
				// A failure, not a new history: if the file goes before
				// a snapshot succeeds, the stop must say these commits
				// reached no replica (gone sets lostAtGone).
				d.fail(err)
			}
		}
	}
	if waited := time.Since(start); waited > 100*time.Millisecond {
		d.logger.Warn("held an operation on the database while capturing", "seconds", waited.Seconds())
	}
	return d.mu.Unlock
}

// syncLocked runs a capture pass (see capturePass for strict).
func (d *DB) syncLocked(strict bool) {
	if d.failing && time.Now().Before(d.retryAt) {
		d.armRetry() // WAL frames wait in the WAL until then
		return
	}
	if d.log == nil {
		if d.status == statusGone {
			return
		}
		if err := d.openState(); err != nil {
			d.fail(fmt.Errorf("state directory: %w", err))
			return
		}
	}
	d.checkNoWAL(strict)
	switch d.status {
	case statusGone:
		if err := d.snapshotGoneLocked(); err != nil {
			d.fail(err)
		} else {
			d.recovered()
		}
		return
	case statusRollback:
		return
	case statusNeedSnapshot:
		if err := d.snapshotLocked(); err != nil {
			d.fail(err)
		}
		return
	}
	if err := d.capturePass(strict); err != nil {
		if errors.Is(err, walcapture.ErrDiverged) {
			d.needSnapshot(err.Error())
			if err := d.snapshotLocked(); err != nil {
				d.fail(err)
			}
			return
		}
		d.fail(err)
		return
	}
	if d.status == statusNeedSnapshot {
		if err := d.snapshotLocked(); err != nil {
			d.fail(err)
			return
		}
	}
	d.recovered()
}

// noWALQuiet is how long a database file written while it has no WAL must
// stay unwritten before it is taken as a new snapshot.
const noWALQuiet = time.Second

// setNoWAL records the database file as it was when its WAL went away
// (nil: the WAL is back). Call with mu held.
func (d *DB) setNoWAL(id *fileID) {
	d.noWAL = id
	d.walGone.Store(id != nil)
}

// checkNoWALSoon has a pass check the database file once it has been left
// alone for noWALQuiet.
func (d *DB) checkNoWALSoon() {
	if d.noWALCheck.CompareAndSwap(false, true) {
		time.AfterFunc(noWALQuiet, func() {
			d.noWALCheck.Store(false)
			d.kick()
		})
	}
}

// checkNoWAL takes a database file written while it had no WAL as a new
// snapshot. SQLite in WAL mode writes the file only in a checkpoint, which
// needs the WAL: the writer was something else (a backup copied over it,
// dd), and the log no longer describes the file. Unnoticed, the stop
// recorded the file as matching the log, and the next commits were
// captured onto the old content: a restore then gave a malformed database.
// A file still being written waits for noWALQuiet, except in a strict pass
// (a stop): then it is taken as it is. Call with mu held.
func (d *DB) checkNoWAL(strict bool) {
	if d.noWAL == nil || d.status != statusTracking {
		return
	}
	now, err := statID(d.path)
	if err != nil || *now == *d.noWAL {
		return
	}
	if !strict && time.Since(time.Unix(0, d.active.Load())) < noWALQuiet {
		d.checkNoWALSoon()
		return
	}
	if !isWALMode(d.path) {
		// A rollback journal that leaves no file (journal_mode=MEMORY or
		// OFF) or one not noted yet: SQLite writes the file in place.
		d.markRollback()
		return
	}
	// A write during sameContent's read must move the file's times, which
	// a coarse clock stamps: a file changed within a tick of now could
	// keep them (a review). Such a file is looked at again later, or at a
	// stop once the tick is over.
	// (The change time: anyone can set the modification time, to the
	// future too, but a write stamps both with the clock.)
	if age := time.Since(time.Unix(0, now.Ctime)); age < sameTick {
		if !strict {
			d.checkNoWALSoon()
			return
		}
		time.Sleep(sameTick - max(age, 0))
	}
	if d.sameContent(now) {
		// chmod, chown or touch: attributes only. A snapshot would upload
		// the whole database again for nothing (an entrypoint's `chown -R`
		// under `mount -exec` did so for every database at every start).
		d.logger.Debug("only the database file's attributes changed; no snapshot needed")
		d.setNoWAL(now)
		return
	}
	d.setNoWAL(now)
	d.needSnapshot("database file changed while it had no WAL (written by a program other than SQLite in WAL mode)")
}

// sameTick is more than the coarse clock that stamps file times can lag.
const sameTick = 100 * time.Millisecond

// sameContent reports whether the database file, last seen as d.noWAL and
// now as now, still holds exactly the pages the log ends with. Only a file
// of the same inode and size can; anything else is left to a snapshot. It
// reads the whole file, as the snapshot it saves would. Call with mu held.
func (d *DB) sameContent(now *fileID) bool {
	if now.Ino != d.noWAL.Ino || now.Size != d.noWAL.Size || d.sums == nil {
		return false
	}

	f, err := os.Open(d.path)
	if err != nil {
		return false
	}
	defer f.Close()
	_, commit, total, err := walcapture.DatabaseChecksum(f, emptyReader{}, now.Size)
	if err != nil || commit != d.sums.Len() || total != d.sums.Total() {
		return false
	}
	// Written while it was read: its times moved (they are a tick older
	// than the read's start, see checkNoWAL).
	after, err := statID(d.path)
	return err == nil && *after == *now
}

// captureLocked appends every newly committed transaction to the log.
func (d *DB) captureLocked() error { return d.capturePass(true) }

// capturePass appends newly committed transactions to the log. A pass that
// is not strict may leave a long unfinished transaction unverified (see
// walcapture.ScanResult): it runs on every write of the WAL, and proving on
// each that no commit hides behind such a transaction made capture quadratic
// in its size. SQLite's WAL index counting a commit not yet captured proves
// it in the same pass, else a recheck timer a moment later. Holds, stops and
// Sync are strict: what follows them could destroy the frames, or ship what
// was captured as all there is.
//
// Commits found in one pass go into one record (TXIDs min..max, one per
// commit): an LTX encoder costs a 136 KB allocation, too much to pay per
// commit for an application doing tens of thousands of them a second. At
// ordinary rates a pass finds one commit, so a record is one commit.
func (d *DB) capturePass(strict bool) error {
	if captureFault != nil {
		if err := captureFault(); err != nil {
			return err
		}
	}
	var wal io.ReaderAt = emptyReader{}
	f, err := os.Open(d.path + "-wal")
	if errors.Is(err, os.ErrNotExist) {
		if d.aside == nil {
			return nil
		}
	} else if err != nil {
		return err
	} else {
		defer f.Close()
		wal = f
	}
	viaAside := d.aside != nil
	if viaAside {
		wal = overlay{a: d.aside, live: wal}
	}
	// SQLite's own count of committed frames, read before the scan: every
	// frame it counts was in the log before it was counted.
	idx, idxOK := readIndexHeader(d.path + "-shm")

	mark := d.cap.Mark()
	var group []walcapture.Txn
	var groupBytes int64
	flush := func() error {
		if len(group) == 0 {
			return nil
		}
		err := d.appendTxn(wal, walcapture.Merge(group), len(group))
		group, groupBytes = group[:0], 0
		return err
	}
	scan := func() (walcapture.ScanResult, error) {
		res, err := d.cap.Scan(wal, func(t walcapture.Txn) error {
			if !strict && t.Size >= asideMin && d.mayDefer() {
				return errDeferred
			}
			if len(group) > 0 && (t.Header != group[0].Header || groupBytes >= maxGroupBytes) {
				if err := flush(); err != nil {
					return err
				}
				mark = d.cap.Mark()
			}
			group = append(group, t)
			groupBytes += t.Size
			return nil
		})
		if err == nil {
			err = flush()
		}
		return res, err
	}
	res, err := scan()
	if _, _, ahead := d.indexAhead(idx, idxOK); err == nil && res.Unverified > 0 && (strict || ahead) {
		d.cap.Recheck()
		mark = d.cap.Mark()
		var again walcapture.ScanResult
		again, err = scan()
		again.NewGeneration = again.NewGeneration || res.NewGeneration
		res = again
	}
	if err == nil {
		d.noteUnverified(res.Unverified)
		d.deferredAt = time.Time{}
	}
	if errors.Is(err, errStored) {
		d.needSnapshot(err.Error())
		return nil
	} else if errors.Is(err, errDeferred) {
		// Found, validated and put back: captured once the application
		// is quiet, or copied aside at the end of its checkpoint.
		d.cap.Rewind(mark)
		d.armPass(quietFor)
		return nil
	} else if err != nil && !errors.Is(err, walcapture.ErrDiverged) {
		// What was scanned but not stored is still in the WAL (or the
		// copy aside).
		d.cap.Rewind(mark)
	}
	if res.NewGeneration {
		d.logger.Debug("WAL restarted with new salts")
	}
	if viaAside {
		if err != nil {
			return err
		}
		// Every commit the copy held is captured. What follows it is in
		// the live WAL, or was never committed if SQLite restarted it.
		d.dropAside()
		return d.capturePass(strict)
	}
	if committed, captured, ahead := d.indexAhead(idx, idxOK); err == nil && res.Unverified == 0 && ahead {
		// A safety net: if SQLite counts commits in this generation that
		// capture could not validate, capture is stuck and would stay
		// silent while they never reach a replica. Start again from a
		// snapshot of what the database holds.
		d.needSnapshot(fmt.Sprintf("the WAL index counts commits up to offset %d, capture validated up to %d", committed, captured))
	}
	return err
}

// indexAhead says whether SQLite's WAL index, read before a scan, counts
// commits in the current generation beyond what capture has validated, and
// the two log offsets.
func (d *DB) indexAhead(idx walcapture.IndexHeader, ok bool) (committed, captured int64, ahead bool) {
	pos := d.cap.Pos()
	captured = max(pos.Offset, walcapture.HeaderSize)
	committed = walcapture.HeaderSize + int64(idx.MaxFrame)*d.cap.FrameSize()
	return committed, captured, ok && pos.Salt1 == idx.Salt1 && pos.Salt2 == idx.Salt2 && d.cap.FrameSize() > 0 && captured < committed
}

// recheckAfter is how long a long unfinished transaction may stay
// unverified before a pass re-validates it from its first frame. It bounds
// the delay in capturing a commit written over the frames of a rolled-back
// transaction while SQLite's WAL index did not yet count it (or, in
// exclusive locking mode, has no index in a file). While a transaction
// grows, every pass leaves it unverified, so it is re-validated about once
// per wait; that costs about a millisecond per MB, and for a large
// transaction the wait grows with its size (recheckRate), which keeps the
// cost near a fifth of a core whatever the size.
var recheckAfter = 20 * time.Millisecond // a variable for tests

const recheckRate = 200 << 20 // bytes per second of waiting

// noteUnverified records what a capture pass left unverified and makes
// sure a recheck comes back for it.
func (d *DB) noteUnverified(size int64) {
	if size == 0 {
		d.unverifiedSince = time.Time{}
		return
	}
	if d.unverifiedSince.IsZero() {
		d.unverifiedSince = time.Now()
	}
	d.recheckWait = max(recheckAfter, time.Duration(size)*time.Second/recheckRate)
	d.armRecheck()
}

// armRecheck arms the recheck timer unless it is armed. When it fires, a
// transaction unverified for recheckWait is re-validated; one unverified
// for less (a validating pass came in between) re-arms the timer.
func (d *DB) armRecheck() {
	if d.rechecking {
		return
	}
	d.rechecking = true
	time.AfterFunc(time.Until(d.unverifiedSince.Add(d.recheckWait)), func() {
		d.mu.Lock()
		d.rechecking = false
		due := false
		switch {
		case d.unverifiedSince.IsZero():
		case time.Since(d.unverifiedSince) < d.recheckWait:
			d.armRecheck()
		default:
			d.cap.Recheck()
			due = true
		}
		d.mu.Unlock()
		if due {
			d.kick()
		}
	})
}

// readIndexHeader reads the WAL index header from a -shm file.
func readIndexHeader(path string) (walcapture.IndexHeader, bool) {
	f, err := os.Open(path)
	if err != nil {
		return walcapture.IndexHeader{}, false
	}
	defer f.Close()
	var b [96]byte
	if _, err := io.ReadFull(f, b[:]); err != nil {
		return walcapture.IndexHeader{}, false
	}
	return walcapture.ParseIndexHeader(b[:])
}

// maxGroupBytes bounds the WAL bytes merged into one record.
const maxGroupBytes = 16 << 20

// errDeferred stops a pass at a large transaction whose capture waits for
// the application to go quiet (aside.go).
var errDeferred = errors.New("capture deferred")

// errStored marks a failure after a record reached the log, which capture
// cannot simply retry.
var errStored = errors.New("local state inconsistent after storing a record")

func (d *DB) appendTxn(wal io.ReaderAt, t walcapture.Txn, commits int) error {
	if err := d.sums.Reserve(t.Commit); err != nil {
		return err
	}
	var u walcapture.Update
	last, _ := d.log.Last()
	first := last.TXID() + 1
	rec, err := d.log.Append(func(w io.Writer) error {
		var err error
		u, err = walcapture.EncodeTxn(w, wal, t, d.sums, first, first+ltx.TXID(commits-1), time.Now(), d.cap.SpillDir)
		return err
	})
	if err != nil {
		return err
	}
	if err := d.sums.Apply(u, rec.TXID()); err != nil {
		return fmt.Errorf("%w: %v", errStored, err)
	}
	d.captured.Add(int64(commits))
	d.capturedBytes.Add(t.Size)
	return nil
}

// needSnapshot records that continuity is lost and why.
func (d *DB) needSnapshot(reason string) {
	if d.status == statusGone {
		return
	}
	if d.status != statusNeedSnapshot {
		d.logger.Warn("database needs a new snapshot", "reason", reason)
	}
	d.status, d.reason = statusNeedSnapshot, reason
}

// fail logs the first error of an outage and schedules a retry.
func (d *DB) fail(err error) {
	d.captureErrs.Add(1)
	d.lastErr = err
	if !d.failing {
		d.logger.Error("capture failed; will retry", "err", err)
		d.failing = true
	} else {
		d.logger.Debug("capture still failing", "err", err)
	}
	d.backoff = min(max(2*d.backoff, time.Second), 30*time.Second)
	d.retryAt = time.Now().Add(d.backoff)
	d.armRetry()
}

// armRetry makes sure a timer comes back at retryAt. A timer armed for an
// earlier retryAt (a capture failed again, on an event, before it fired)
// re-arms itself instead of kicking too early, where the sync would return
// with nothing left to wake it: capture then stalled until the next write,
// which after an application's last commit never comes.
func (d *DB) armRetry() {
	if d.retrying {
		return
	}
	d.retrying = true
	time.AfterFunc(time.Until(d.retryAt), func() {
		d.mu.Lock()
		d.retrying = false
		early := d.failing && time.Now().Before(d.retryAt)
		if early {
			d.armRetry()
		}
		d.mu.Unlock()
		if !early {
			d.kick()
		}
	})
}

func (d *DB) recovered() {
	if d.failing {
		d.logger.Info("capture recovered")
		d.failing = false
	}
	d.backoff, d.lastErr = 0, nil
}

// finalSync is the capture pass at a stop. It does not wait out a retry's
// backoff, which nothing would come back for, and it reports a database
// whose commits it still could not capture: they reached no replica, and
// lfuse stopped as if all were well (exit 0, "every captured transaction
// is in every replica").
func (d *DB) finalSync() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.retryAt = time.Time{}
	d.syncLocked(true)
	if d.retired {
		return nil
	}
	var txid ltx.TXID
	if d.log != nil {
		last, _ := d.log.Last()
		txid = last.TXID()
	}
	var errs []error
	if d.lostAtGone != nil {
		errs = append(errs, fmt.Errorf("%s: commits after TXID %s could not be captured before the file was deleted or renamed (%v): they are in no replica", d.rel, txid, d.lostAtGone))
	}
	if d.failing && d.status != statusGone {
		errs = append(errs, fmt.Errorf("%s: commits after TXID %s could not be captured (%v): they are in the database file but in no replica until lfuse captures them at its next start", d.rel, txid, d.lastErr))
	} else if d.failing {
		errs = append(errs, fmt.Errorf("%s: %v", d.rel, d.lastErr))
	}
	return errors.Join(errs...)
}

// snapshotLocked writes the whole database to the log as a new snapshot.
// If the disk is full and the log keeps older snapshots for a replica that
// is behind, those go first: each is the database's size, and a capture
// that cannot take its snapshot leaves every commit unreplicated, not only
// the points in time between them.
func (d *DB) snapshotLocked() error {
	// The snapshot holds the file as it is now: with no WAL, a later
	// change to it is someone else's (checkNoWAL).
	pre, _ := statID(d.path)
	noWAL := !walExists(d.path)
	err := d.snapshotRetryLocked()
	if err == nil && d.status == statusTracking && noWAL && pre != nil {
		d.setNoWAL(pre)
	}
	return err
}

// snapshotRetryLocked is snapshotLocked without the WAL's bookkeeping.
func (d *DB) snapshotRetryLocked() error {
	err := d.takeSnapshotLocked()
	if !errors.Is(err, syscall.ENOSPC) && !errors.Is(err, syscall.EDQUOT) || d.log == nil {
		return err
	}
	if d.log.dropKeptSnapshots() == 0 {
		return err
	}
	d.logger.Warn("disk full: dropping the local snapshots kept for a replica that is behind; its points in time before the newest are lost", "err", err)
	if err := d.takeSnapshotLocked(); err != nil {
		return err
	}
	// Nor does the one this replaced stay: the disk was full.
	d.log.dropKeptSnapshots()
	return nil
}

// snapshotFault and captureFault, if set (by tests), fail a snapshot or a
// capture pass before it starts.
var snapshotFault, captureFault func() error

// takeSnapshotLocked is snapshotLocked, once.
func (d *DB) takeSnapshotLocked() error {
	if snapshotFault != nil {
		if err := snapshotFault(); err != nil {
			return err
		}
	}
	start := time.Now()
	// The snapshot holds what the copy's commits changed.
	d.dropAside()
	db, err := os.Open(d.path)
	if errors.Is(err, os.ErrNotExist) {
		d.gone("database file no longer exists")
		return nil
	} else if err != nil {
		return err
	}
	defer db.Close()
	tmp1, err := os.CreateTemp(d.dir, "snapshot-*.tmp")
	if err != nil {
		return fmt.Errorf("create snapshot file: %w", err)
	}
	defer func() { tmp1.Close(); os.Remove(tmp1.Name()) }()
	tmp2, err := os.CreateTemp(d.dir, "snapshot-*.tmp")
	if err != nil {
		return fmt.Errorf("create snapshot file: %w", err)
	}
	defer func() { tmp2.Close(); os.Remove(tmp2.Name()) }()

	last, _ := d.log.Last()
	txid := max(last.TXID()+1, d.minTXID)
	d.cap.SpillDir = d.dir
	var res walcapture.SnapshotResult
	var st os.FileInfo
	for attempt := 1; ; attempt++ {
		if err := d.sums.Reset(); err != nil {
			return err
		}
		for _, f := range []*os.File{tmp1, tmp2} {
			if err := f.Truncate(0); err != nil {
				return err
			}
			if _, err := f.Seek(0, io.SeekStart); err != nil {
				return err
			}
		}
		if st, err = db.Stat(); err != nil {
			return err
		}
		var wal io.ReaderAt = emptyReader{}
		f, openErr := os.Open(d.path + "-wal")
		if openErr == nil {
			wal = f
		} else if !errors.Is(openErr, os.ErrNotExist) {
			return openErr
		}
		res, err = d.cap.Snapshot(db, wal, st.Size(), tmp1, tmp2, txid, time.Now(), d.sums.Set)
		if f != nil {
			f.Close()
		}
		if err == nil && f == nil {
			// No log when the read began: one created since may have been
			// checkpointed into pages already read.
			if fi, serr := os.Stat(d.path + "-wal"); serr == nil && fi.Size() > 0 {
				err = walcapture.ErrLogRestarted
			}
		}
		// A restart made possible before this began (its checkpoint's
		// truncate was not held off) can still happen during the read.
		if !errors.Is(err, walcapture.ErrLogRestarted) || attempt == 10 {
			break
		}
		d.logger.Debug("WAL restarted during the snapshot; taking it again", "attempt", attempt)
	}
	if errors.Is(err, walcapture.ErrEmptyDatabase) {
		return nil // nothing to capture until something is committed
	} else if errors.Is(err, walcapture.ErrNotDatabase) {
		// Replaced by another kind of file: its history here ends, as if
		// deleted. Not a failure to capture: there is nothing to capture.
		d.gone("the file is no longer a SQLite database")
		return nil
	} else if err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	if err := d.sums.Finish(res.Commit, res.Total, txid); err != nil {
		return err
	}
	out := tmp1
	if res.Merged {
		out = tmp2
	}
	if err := out.Sync(); err != nil {
		return err
	}
	size, _ := out.Seek(0, io.SeekEnd)
	if err := d.storeSnapshot(out.Name()); err != nil {
		return err
	}
	d.logger.Info("snapshot taken", "txid", txid.String(), "pages", res.Commit, "page_size", res.PageSize,
		"bytes", size, "seconds", time.Since(start).Seconds(), "reason", d.reason)
	d.status, d.reason = statusTracking, ""
	d.recovered()
	return nil
}

// snapshotGoneLocked gives a gone database's history a snapshot at
// minTXID when a replica asked for one above the log (resnapshotAbove),
// made from the local log since the database file is gone. This happens
// to a database made again at a released path and deleted before its
// replica had listed: the replica held the old history under the TXIDs
// the new one started with. Without it, those commits reached no replica,
// the database was never released, and every stop failed waiting for a
// snapshot that could not be taken.
func (d *DB) snapshotGoneLocked() error {
	if d.log == nil {
		return nil
	}
	last, ok := d.log.Last()
	if !ok || d.minTXID <= last.TXID() {
		return nil
	}
	var files [3]*os.File
	for i := range files {
		f, err := os.CreateTemp(d.dir, "snapshot-*.tmp")
		if err != nil {
			return fmt.Errorf("create snapshot file: %w", err)
		}
		defer func() { f.Close(); os.Remove(f.Name()) }()
		files[i] = f
	}
	img, tmp1, tmp2 := files[0], files[1], files[2]
	if _, err := d.log.Restore(img); err != nil {
		return fmt.Errorf("rebuild the deleted database from the local log: %w", err)
	}
	st, err := img.Stat()
	if err != nil {
		return err
	}
	c := walcapture.Capturer{SpillDir: d.dir}
	ts := time.UnixMilli(last.Header.Timestamp)
	res, err := c.Snapshot(img, emptyReader{}, st.Size(), tmp1, tmp2, d.minTXID, ts, func(uint32, ltx.Checksum) {})
	if err != nil {
		return fmt.Errorf("snapshot of the deleted database: %w", err)
	}
	out := tmp1
	if res.Merged {
		out = tmp2
	}
	if err := out.Sync(); err != nil {
		return err
	}
	if err := d.storeSnapshot(out.Name()); err != nil {
		return err
	}
	d.logger.Info("snapshot taken of a deleted database from its local log", "txid", d.minTXID.String(), "pages", res.Commit)
	return nil
}

// storeSnapshot moves a finished snapshot file into the local log. Records
// and snapshots some replica has not received stay (LogReader.Tail,
// LogReader.SnapshotAbove), up to maxKeptSnapshots snapshots.
func (d *DB) storeSnapshot(path string) error {
	keepAfter := d.shippedEverywhere()
	before, _, _ := d.log.files()
	if _, err := d.log.AddSnapshot(path, keepAfter); err != nil {
		return fmt.Errorf("store snapshot: %w", err)
	}
	d.snapshots.Add(1)
	after, _, _ := d.log.files()
	for _, id := range before {
		if id > keepAfter && !slices.Contains(after, id) {
			d.logger.Info("dropped a local snapshot a replica has not received: too many snapshots while it is behind; points in time before the next one are lost there",
				"snapshot_txid", id.String(), "replica_txid", keepAfter.String())
		}
	}
	return nil
}

// shippedEverywhere is the newest TXID every replica holds (all of them,
// without replicas).
func (d *DB) shippedEverywhere() ltx.TXID {
	txid := ltx.TXID(1<<63 - 1)
	for _, r := range d.replicas {
		if r.takenOver() != nil {
			continue // it takes nothing more from this log
		}
		txid = min(txid, r.Pos())
	}
	return txid
}

// gone is called when the file is found gone: deleted, renamed away or
// replaced, through the mount once it serves.
func (d *DB) gone(why string) { d.goneSince(why, time.Now(), d.serving) }

// goneSince marks the database gone since at. seen says lfuse saw it go,
// which a state-directory note keeps across a restart: only such a
// deletion is recorded in the replicas (markDeleted). One found at start
// with no note happened while lfuse was not running, and may as well be a
// data volume that is not mounted yet: recorded, its replicas would be
// purged after the retention.
func (d *DB) goneSince(why string, at time.Time, seen bool) {
	if d.failing && d.status != statusGone {
		// What was failing was capture of a file no longer here.
		d.lostAtGone = d.lastErr
		d.failing, d.backoff, d.lastErr = false, 0, nil
	}
	if d.status != statusGone {
		d.goneAt, d.goneSeen = at, seen
		if seen && d.log != nil { // with no log, nothing is to be recorded
			b, _ := at.UTC().MarshalText()
			if err := writeFileAtomic(filepath.Join(d.dir, goneName), b); err != nil {
				// Without it, a restart before the deletion is recorded
				// takes it as one lfuse did not see.
				d.logger.Warn("cannot note the deletion in the state directory", "err", err)
			}
		}
		d.logger.Info("stopped capturing database", "reason", why)
		if d.onGone != nil {
			d.onGone()
		}
	}
	d.status, d.reason = statusGone, why
	d.dropAside()
}

// goneName, in a database's state directory, says when lfuse saw the
// database go (goneSince). It goes when the database is back.
const goneName = "gone"

// seenGone reads the note goneSince wrote in dir.
func seenGone(dir string) (time.Time, bool) {
	b, err := os.ReadFile(filepath.Join(dir, goneName))
	if err != nil {
		return time.Time{}, false
	}
	var at time.Time
	if at.UnmarshalText(b) != nil {
		return time.Time{}, false
	}
	return at, true
}

// back forgets that the database went: a file is at its path again.
func (d *DB) back() {
	os.Remove(filepath.Join(d.dir, goneName))
}

// DeletedThroughMount says whether the state directory notes that lfuse
// saw the database at rel deleted: a restore before the mount must not
// bring it back (its deletion may not be recorded in a replica yet).
func DeletedThroughMount(stateDir, rel string) bool {
	_, ok := seenGone(filepath.Join(stateDir, "dbs", stateName(rel)))
	return ok
}

type emptyReader struct{}

func (emptyReader) ReadAt([]byte, int64) (int, error) { return 0, io.EOF }

// fileID identifies a version of a file: any write changes its ctime, and
// replacing it changes its inode.
type fileID struct {
	Ino   uint64 `json:"ino"`
	Size  int64  `json:"size"`
	Mtime int64  `json:"mtime_ns"`
	Ctime int64  `json:"ctime_ns"`
}

func statID(path string) (*fileID, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return nil, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	return &fileID{Ino: st.Ino, Size: st.Size, Mtime: st.Mtim.Nano(), Ctime: st.Ctim.Nano()}, nil
}

// stateFile is what a DB keeps in its state directory besides the log.
type stateFile struct {
	Path  string      `json:"path"`
	Clean *cleanState `json:"clean,omitempty"`
}

// cleanState is written at a clean shutdown, after the last capture: if the
// files are exactly as they were, the next start needs no verification.
type cleanState struct {
	TXID ltx.TXID `json:"txid"`
	DB   fileID   `json:"db"`
	WAL  *fileID  `json:"wal,omitempty"`
}

func (d *DB) statePath() string { return filepath.Join(d.dir, "state.json") }

func (d *DB) logDir() string { return filepath.Join(d.dir, "log") }

// Replicas are the replicas this database is shipped to.
func (d *DB) Replicas() []*Replica { return d.replicas }

// prepareUpload returns the newest record in the local log after making it,
// and the WAL that also holds it, durable: a replica must never hold a
// commit that this machine could lose in a power cut. ok is false while the
// log holds nothing.
func (d *DB) prepareUpload() (last Record, ok bool, err error) {
	d.mu.Lock()
	if d.log == nil {
		d.mu.Unlock()
		return Record{}, false, nil
	}
	last, ok = d.log.Last()
	d.mu.Unlock()
	if !ok {
		return Record{}, false, nil
	}
	// Fsync through fresh descriptors, outside the lock: capture and the
	// application's checkpoints are not held up by a slow disk.
	_, segs, err := (&Log{dir: d.logDir()}).files()
	if err != nil {
		return Record{}, false, fmt.Errorf("local log: %w", err)
	}
	if len(segs) > 0 {
		if err := fsyncPath((&Log{dir: d.logDir()}).segmentPath(segs[len(segs)-1])); err != nil && !errors.Is(err, os.ErrNotExist) {
			return Record{}, false, fmt.Errorf("sync local log: %w", err)
		}
	}
	if err := fsyncPath(d.path + "-wal"); err != nil && !errors.Is(err, os.ErrNotExist) {
		return Record{}, false, fmt.Errorf("sync WAL: %w", err)
	}
	return last, true, nil
}

// resnapshotAbove starts a new history for this database, from a snapshot
// whose TXID is above txid, because a replica holds txid from a history the
// database does not continue.
func (d *DB) resnapshotAbove(txid ltx.TXID, reason string) {
	d.mu.Lock()
	if d.minTXID <= txid {
		d.minTXID = txid + 1
		if d.status == statusTracking {
			d.needSnapshot(reason)
		}
	}
	d.mu.Unlock()
	d.kick()
}

// foldHook, if set (by tests), runs as a fold starts merging.
var foldHook func()

// foldLog runs compactLog in the background, once at a time. Folding a
// large log takes seconds: neither capture nor a replica's next sync may
// wait for it (a replica that did lagged by the fold's length).
func (d *DB) foldLog() {
	if !d.folding.CompareAndSwap(false, true) {
		return
	}
	d.kickMu.Lock()
	if d.closed {
		d.kickMu.Unlock()
		d.folding.Store(false)
		return
	}
	d.wg.Add(1)
	d.kickMu.Unlock()
	go func() {
		defer d.wg.Done()
		defer d.folding.Store(false)
		if err := d.compactLog(); err != nil {
			d.logger.Warn("cannot fold the local log; it keeps growing until this works", "err", err)
		}
	}()
}

// compactLog folds the local log's snapshot and the closed segments that
// every replica has shipped into a new snapshot, so the log stays about the
// size of the database instead of growing with its history. It runs only
// when those segments are at least as large as the snapshot, which bounds
// the rewriting to about twice what the application writes.
func (d *DB) compactLog() error {
	if !d.compactMu.TryLock() {
		return nil
	}
	defer d.compactMu.Unlock()
	limit := d.shippedEverywhere()
	d.mu.Lock()
	if d.log == nil {
		d.mu.Unlock()
		return nil
	}
	d.log.DropKept(limit)
	snapTXID := d.log.SnapshotTXID()
	upTo, segBytes, err := d.log.closedSegments()
	d.mu.Unlock()
	if err != nil || upTo == 0 || upTo > limit {
		return err
	}
	reader := NewLogReader(d.logDir())
	snap, err := reader.Snapshot()
	if err != nil {
		return err
	}
	defer releaseRefs(snap)
	if snap.TXID() != snapTXID || segBytes < snap.Size {
		return nil
	}
	refs, err := reader.Refs(snapTXID, upTo)
	if errors.Is(err, errLogMoved) {
		return nil
	} else if err != nil {
		return err
	}
	defer releaseRefs(refs...)
	srcs := []source{refSource(snap)}
	for _, ref := range refs {
		srcs = append(srcs, refSource(ref))
	}
	tmp, err := os.CreateTemp(d.dir, "fold-*.tmp")
	if err != nil {
		return err
	}
	defer func() { tmp.Close(); os.Remove(tmp.Name()) }()
	start := time.Now()
	if foldHook != nil {
		foldHook()
	}
	// A stop does not wait for a fold: the log is whole without it.
	ctx, cancel := untilClosed(d.closing)
	defer cancel()
	if _, err := mergeSources(ctx, tmp, srcs, d.dir, true); errors.Is(err, context.Canceled) {
		return nil
	} else if err != nil {
		return fmt.Errorf("fold local log: %w", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.log == nil || d.log.SnapshotTXID() != snapTXID {
		return nil // a new snapshot replaced the log meanwhile
	}
	if err := d.log.replaceStart(tmp.Name()); err != nil {
		return fmt.Errorf("fold local log: %w", err)
	}
	d.logger.Info("folded the local log into a snapshot", "txid", upTo.String(), "segment_bytes", segBytes, "seconds", time.Since(start).Seconds())
	return nil
}
