package replicate

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/lfuse/lfuse/backends"
	"github.com/superfly/ltx"
)

// ReplicaOptions is the policy of one replica. Zero fields take defaults.
type ReplicaOptions struct {
	// SyncInterval is how often new commits are shipped, as one L0 file.
	SyncInterval time.Duration
	// SnapshotInterval is how often a full snapshot (L9) is written.
	SnapshotInterval time.Duration
	// Retention is how far back any point stays restorable.
	Retention time.Duration
	// CompactIntervals are the intervals of levels 1, 2, ...: each merges
	// the files of the level below written since its last file.
	CompactIntervals []time.Duration
	// CheckInterval is how often the replica's snapshots are listed, to
	// notice a replica deleted or replaced while lfuse runs (one LIST).
	CheckInterval time.Duration
	// WriterCheckInterval is how often a replica that lfuse writes to is
	// checked for another lfuse that claimed it since (one GET).
	WriterCheckInterval time.Duration
}

// Defaults of ReplicaOptions.
const (
	DefaultSyncInterval     = time.Second
	DefaultSnapshotInterval = 24 * time.Hour
	DefaultRetention        = 24 * time.Hour
	DefaultCheckInterval    = time.Hour
)

// DefaultCompactIntervals are the intervals of levels 1 to 3.
var DefaultCompactIntervals = []time.Duration{30 * time.Second, 5 * time.Minute, time.Hour}

// WithDefaults fills zero fields with the defaults.
func (o ReplicaOptions) WithDefaults() ReplicaOptions {
	if o.SyncInterval <= 0 {
		o.SyncInterval = DefaultSyncInterval
	}
	if o.SnapshotInterval <= 0 {
		o.SnapshotInterval = DefaultSnapshotInterval
	}
	if o.Retention <= 0 {
		o.Retention = DefaultRetention
	}
	if o.CompactIntervals == nil {
		o.CompactIntervals = DefaultCompactIntervals
	}
	if o.CheckInterval <= 0 {
		o.CheckInterval = DefaultCheckInterval
	}
	if o.WriterCheckInterval <= 0 {
		o.WriterCheckInterval = DefaultWriterCheckInterval
	}
	return o
}

// Replica ships one database's captured transactions to one ReplicaClient:
// an L0 file per sync, compactions into higher levels, periodic snapshots,
// and deletion of what the retention window no longer needs.
//
// Its position is the newest TXID the replica holds, learnt by listing the
// replica once at start; from then on it keeps the listing up to date itself,
// so the steady state issues no LIST.
type Replica struct {
	db     *DB
	client ReplicaClient
	opts   ReplicaOptions
	logger *slog.Logger
	reader *LogReader // the sync's
	tmpDir string

	// mu is held by a sync or flush for its whole length, and briefly by
	// maintenance (compaction, snapshots, retention) to plan its work and
	// to record what it did. Maintenance runs on its own goroutine and
	// makes its requests without mu: a daily snapshot of a large database
	// can take minutes to upload, and new commits must keep reaching the
	// replica meanwhile.
	mu          sync.Mutex
	listed      bool
	files       [SnapshotLevel + 1][]ltx.FileInfo
	pos         ltx.Pos
	lastCompact [SnapshotLevel + 1]time.Time
	lastCheck   time.Time
	syncOutage  outage
	unsent      *builtFile // a level-0 file built by a sync that failed to store it

	// maintMu makes compactions, snapshots and retention passes take
	// turns; the fields after it are the maintenance loop's own.
	maintMu     sync.Mutex
	maintReader *LogReader
	maintKick   chan struct{}
	maintDone   chan struct{}
	maintOutage outage

	synced    atomic.Uint64 // TXID the replica holds, for metrics and status
	syncedAt  atomic.Int64  // unix nanoseconds of the last successful sync
	startedAt int64         // unix nanoseconds of newReplica
	syncs     atomic.Int64
	errs      atomic.Int64
	uploaded  atomic.Int64 // bytes
	ops       *opCounter   // also client: what the replica asks of storage
	stop      chan struct{}
	done      chan struct{}
	startOnce sync.Once
	stopOnce  sync.Once // closes stop
	// staleChecked: dropStaleDeletion ran (under mu), once per lifetime.
	staleChecked bool

	// Who writes the replica (writer.go). ownMu serialises the checks;
	// wrote says something was written since the last one; takenBy is
	// set for good once another lfuse has claimed the replica.
	writer       Writer
	ownMu        sync.Mutex
	lastOwnCheck time.Time
	wrote        atomic.Bool
	takenBy      atomic.Pointer[TakenOverError]
	// jumpFrom is the writer a claim took the replica from while it may
	// still run: the next sync starts a history above jumpTo, and ships
	// nothing below it until that snapshot is there (no older local
	// snapshot, no commits from before it: the other may yet write those
	// names). needClaim: a listing was taken and not claimed yet;
	// claimErr why the last try failed, nextClaim when to try again.
	// Under mu. claimed: a claim was made (checks then mean something);
	// wroteAny: this replica has written something.
	jumpFrom  *Writer
	jumpTo    ltx.TXID
	needClaim bool
	claimErr  error
	claimWait time.Duration
	nextClaim time.Time
	claimed   atomic.Bool
	wroteAny  atomic.Bool
}

func newReplica(d *DB, client ReplicaClient, opts ReplicaOptions, writer Writer, logger *slog.Logger) *Replica {
	ops := &opCounter{ReplicaClient: withTimeouts(client)}
	return &Replica{
		db:        d,
		writer:    writer,
		client:    ops,
		ops:       ops,
		opts:      opts.WithDefaults(),
		logger:    logger.With("replica", client.String()),
		reader:    NewLogReader(d.logDir()),
		tmpDir:    d.dir,
		startedAt: time.Now().UnixNano(),
		stop:      make(chan struct{}),
		done:      make(chan struct{}),

		maintReader: NewLogReader(d.logDir()),
		maintKick:   make(chan struct{}, 1),
		maintDone:   make(chan struct{}),
	}
}

// Client is where the replica stores.
func (r *Replica) Client() ReplicaClient { return r.client }

// Pos is the newest TXID known to be in the replica.
func (r *Replica) Pos() ltx.TXID { return ltx.TXID(r.synced.Load()) }

// start runs the sync loop and the maintenance loop until Stop.
func (r *Replica) start() {
	r.startOnce.Do(func() {
		go r.run()
		go r.maintainLoop()
	})
}

// stopContext is a context cancelled by Stop.
func (r *Replica) stopContext() (context.Context, context.CancelFunc) { return untilClosed(r.stop) }

// untilClosed is a context cancelled when stop is closed.
func untilClosed(stop <-chan struct{}) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(context.Background())
	select {
	case <-stop:
		// Already closed: done at once. Left to the goroutine, work
		// started under ctx could run to its end before it cancelled (a
		// fold of the local log begun after the stop, in CI).
		cancel()
		return ctx, cancel
	default:
	}
	go func() {
		select {
		case <-stop:
		case <-ctx.Done():
		}
		cancel()
	}()
	return ctx, cancel
}

func (r *Replica) run() {
	defer close(r.done)
	t := time.NewTicker(r.opts.SyncInterval)
	defer t.Stop()
	for {
		ctx, cancel := r.stopContext()
		r.tick(ctx)
		cancel()
		select {
		case <-r.stop:
			return
		case <-t.C:
		}
	}
}

// tick syncs, then lets the maintenance loop do whatever compaction,
// snapshot or retention work is due. Errors are logged once per outage;
// the next tick retries.
func (r *Replica) tick(ctx context.Context) {
	if r.takenOver() != nil {
		// Said once, when it was found. The local log still folds: this
		// replica holds nothing of it back any more.
		r.db.foldLog()
		return
	}
	r.mu.Lock()
	if !r.syncOutage.due(r.opts.SyncInterval) {
		r.mu.Unlock()
		return
	}
	err := r.syncLocked(ctx)
	resnapshot := errors.Is(err, errResnapshot)
	if resnapshot {
		err = nil // the database's loop takes the snapshot; a later tick ships it
	}
	r.syncResult(err)
	r.mu.Unlock()
	if err == nil {
		r.db.foldLog()
	}
	if err == nil && !resnapshot {
		// Not while the local log and the replica disagree: maintenance
		// would build files for the replica from the local log.
		select {
		case r.maintKick <- struct{}{}:
		default: // maintenance is busy; it looks again after this pass
		}
	}
}

// maintainLoop does the maintenance a sync asks for, one pass at a time.
func (r *Replica) maintainLoop() {
	defer close(r.maintDone)
	for {
		select {
		case <-r.stop:
			return
		case <-r.maintKick:
		}
		select {
		case <-r.stop:
			return // both were ready: stopping wins
		default:
		}
		if !r.maintOutage.due(r.opts.SyncInterval) {
			continue
		}
		ctx, cancel := r.stopContext()
		err := r.maintain(ctx, time.Now())
		cancel()
		// Apart from the syncs' outage: a compaction that fails while
		// syncs succeed must not make the replica look healthy and
		// broken in turn every second.
		r.maintOutage.result(r, err, "replica compaction, snapshot or retention failed; will retry",
			"replica maintenance still failing", "replica maintenance recovered")
	}
}

// backoff is the wait between attempts during an outage that began at
// since: every at first, growing with the outage to 30 s, with jitter so
// that many databases do not retry in step.
func backoff(every time.Duration, since time.Time) time.Duration {
	d := min(max(every, time.Since(since)/4), 30*time.Second)
	return d/2 + rand.N(d/2+1)
}

// syncResult notes how a sync ended. Call with mu held.
func (r *Replica) syncResult(err error) {
	r.syncOutage.result(r, err, "replica sync failed; will retry", "replica sync still failing",
		"replica recovered", "txid", r.pos.TXID.String())
}

// outage follows one kind of a replica's work (syncs, or maintenance)
// while it fails: it logs once when failures begin and once when they end,
// spaces out the attempts in between, and mirrors its state in an atomic
// for Stats, which must not wait for a sync in progress (that can take the
// S3 client's retries, or a large upload, and status is wanted most during
// an outage).
type outage struct {
	failing bool
	since   time.Time // when the outage began
	lastTry time.Time
	now     atomic.Bool
}

// due says whether to try now, and if so notes the attempt.
func (o *outage) due(every time.Duration) bool {
	if o.failing && time.Since(o.lastTry) < backoff(every, o.since) {
		return false
	}
	o.lastTry = time.Now()
	return true
}

// result notes how an attempt ended; recoveredAttrs go with the log line of
// the recovery.
func (o *outage) result(r *Replica, err error, failed, still, recovered string, recoveredAttrs ...any) {
	switch {
	case err == nil:
		if o.failing {
			// The state changes before the log line: whoever reads the
			// line (an operator, a test) may look at the metrics next.
			o.failing = false
			o.now.Store(false)
			r.logger.Info(recovered, append([]any{"outage_seconds", time.Since(o.since).Seconds()}, recoveredAttrs...)...)
		}
	case errors.Is(err, context.Canceled):
	case r.takenOver() != nil:
		// Logged once, when it was found; no retry will mend it.
	case r.db.releasing.Load():
		// Its state directory was moved aside under a pass in progress
		// (a release stops its replicas right after): not an outage.
	default:
		r.errs.Add(1)
		if !o.failing {
			// From the start of the attempt that failed: against a hung
			// server that attempt took its whole timeout, which the
			// outage reported at recovery left out (29 s for 90).
			o.failing, o.since = true, o.lastTry
			if o.since.IsZero() {
				o.since = time.Now()
			}
			o.now.Store(true)
			r.logger.Error(failed, "err", err)
		} else {
			r.logger.Debug(still, "err", err)
		}
	}
}

// Stop ends the sync loop after the pass in progress, and cancels the
// maintenance in progress (see waitMaintenance).
func (r *Replica) Stop() {
	// Once: a stop that timed out waiting for a release can flush a
	// database that the release stops at the same moment.
	r.stopOnce.Do(func() { close(r.stop) })
	r.startOnce.Do(func() { close(r.done); close(r.maintDone) })
	<-r.done
}

// waitMaintenance waits for the maintenance loop to end after Stop. It is
// separate so that the final flush need not wait for it: a snapshot being
// merged when lfuse is told to stop finishes its local work before it sees
// the cancellation.
func (r *Replica) waitMaintenance() { <-r.maintDone }

// Flush ships everything captured so far, retrying until ctx ends.
func (r *Replica) Flush(ctx context.Context) error {
	resnapshots := 0
	var cause error // the last failure that was not the stop cutting a try short
	for tries := 0; ; tries++ {
		r.mu.Lock()
		err := r.syncLocked(ctx)
		r.mu.Unlock()
		if err == nil {
			return nil
		}
		if cause == nil || !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
			cause = err
		}
		var taken *TakenOverError
		if errors.As(err, &taken) {
			return fmt.Errorf("replica %s: %w", r.client, err)
		}
		if errors.Is(err, errResnapshot) && resnapshots < 3 {
			// The database's loop is stopped: take the new snapshot
			// here, then ship it, rather than call the replica flushed
			// while it holds only the history the database left.
			resnapshots++
			r.db.Sync()
			continue
		}
		r.errs.Add(1)
		if tries == 0 {
			r.logger.Warn("flush to replica failed; retrying until the shutdown timeout", "err", err)
		}
		select {
		case <-ctx.Done():
			// Said as what happened and what follows: "context deadline
			// exceeded (last error: ...: context deadline exceeded)"
			// told an operator neither.
			why := "not every commit shipped within the shutdown timeout"
			if errors.Is(ctx.Err(), context.Canceled) {
				why = "stopped waiting at a second signal"
			}
			return fmt.Errorf("replica %s: %s (%w; last error: %v); what it lacks stays in the local log, and lfuse ships it when it next starts on this state directory", r.client, why, ctx.Err(), cause)
		case <-time.After(time.Second):
		}
	}
}

// dropStaleDeletion removes the deletion record from the replica of a
// database that is here. A database restored after its deletion
// (-include-deleted, restore -o) or copied in again can continue the
// deleted history exactly, with nothing to upload: the record then hid a
// live database from every restore of all databases.
//
// Only a record of this database's own last state: another (a database
// deleted at the path before this one, which may yet go before it ships
// anything and record nothing) stops hiding anything once this one ships
// past it, and removed it would let the deleted database come back.
func (r *Replica) dropStaleDeletion(ctx context.Context, last Record) error {
	r.db.mu.Lock()
	gone := r.db.status == statusGone
	r.db.mu.Unlock()
	if gone {
		return nil
	}
	rec, ok, err := ReadDeletion(ctx, r.client)
	if err != nil {
		return fmt.Errorf("read the deletion record: %w", err)
	}
	if !ok || rec.TXID != last.TXID() || rec.PostApplyChecksum != last.Trailer.PostApplyChecksum {
		return nil
	}
	if err := r.client.DeleteMarker(ctx, deletedMarker); err != nil {
		return fmt.Errorf("remove a deletion record of the database, which is here again: %w", err)
	}
	r.logger.Info("removed the replica's record of an earlier deletion: the database is here again")
	return nil
}

// list learns what the replica holds: every level once.
func (r *Replica) listLocked(ctx context.Context) error {
	var files [SnapshotLevel + 1][]ltx.FileInfo
	for _, level := range r.levels() {
		infos, err := r.client.LTXFiles(ctx, level)
		if err != nil {
			return err // the backends' errors say what they were listing
		}
		// Snapshots all start at TXID 1: by their first TXID alone their
		// order is the listing's, and the last must be the newest.
		slices.SortStableFunc(infos, func(a, b ltx.FileInfo) int {
			return cmp.Or(cmp.Compare(a.MinTXID, b.MinTXID), cmp.Compare(a.MaxTXID, b.MaxTXID))
		})
		files[level] = infos
	}
	r.files = files
	r.pos = ltx.Pos{}
	var newest *ltx.FileInfo
	for level := range files {
		for i := range files[level] {
			if f := &files[level][i]; newest == nil || f.MaxTXID > newest.MaxTXID {
				newest = f
			}
		}
	}
	if newest != nil {
		meta, err := r.client.FileMeta(ctx, newest.Level, newest.MinTXID, newest.MaxTXID)
		if err != nil && !errors.Is(err, backends.ErrNotFound) {
			return fmt.Errorf("read newest file: %w", err)
		}
		if meta.PostApplyChecksum == 0 {
			// Not written by lfuse (Litestream records no checksum: no
			// metadata file, or object metadata without it): nothing
			// proves the local log continues it, so every check against
			// it fails and a new history starts above it.
			r.logger.Warn("the replica's newest file has no recorded checksum; a new snapshot will start a history above it",
				"file", fmt.Sprintf("%d/%s-%s", newest.Level, newest.MinTXID, newest.MaxTXID))
			meta.PostApplyChecksum = unknownChecksum
		} else {
			newest.PostApplyChecksum = meta.PostApplyChecksum
		}
		r.pos = ltx.Pos{TXID: newest.MaxTXID, PostApplyChecksum: meta.PostApplyChecksum}
	}
	r.needClaim = true
	r.listed = true
	r.synced.Store(uint64(r.pos.TXID))
	// Compaction intervals run on across restarts, from the newest file of
	// each level: restarted more often than a level's interval, lfuse
	// never wrote that level, and a latest restore read every level-0
	// file since the snapshot (180 files after 20 restarts).
	now := time.Now()
	for level := range r.lastCompact {
		r.lastCompact[level] = time.Time{}
		if fs := files[level]; len(fs) > 0 {
			r.lastCompact[level] = fs[len(fs)-1].CreatedAt
			if r.lastCompact[level].After(now) {
				r.lastCompact[level] = now
			}
		}
	}
	r.lastCheck = now
	return nil
}

// unknownChecksum stands for a replica checksum that cannot be known. Real
// LTX checksums have ltx.ChecksumFlag set, so it equals none of them.
const unknownChecksum ltx.Checksum = 1

// levels are the levels in use: 0, the compaction levels, snapshots.
func (r *Replica) levels() []int {
	levels := []int{0}
	for i := range r.opts.CompactIntervals {
		levels = append(levels, i+1)
	}
	return append(levels, SnapshotLevel)
}

// errResnapshot: the replica holds a history the database does not continue;
// the database was told to start a new one above it, which must be shipped
// before the replica is up to date.
var errResnapshot = errors.New("a new snapshot is needed before this replica can be synced")

// syncLocked ships every transaction captured so far.
func (r *Replica) syncLocked(ctx context.Context) error {
	for attempt := 1; ; attempt++ {
		err := r.syncPass(ctx)
		// A newer local snapshot replaced the log while this pass shipped
		// the one before (a database renamed or exchanged again at once):
		// ship that too. Not an outage of the replica, and a flush must
		// not stop short of it.
		if !errors.Is(err, errLogMoved) || attempt == 3 {
			return err
		}
	}
}

func (r *Replica) syncPass(ctx context.Context) error {
	if err := r.takenOver(); err != nil {
		return err
	}
	if !r.listed {
		if err := r.listLocked(ctx); err != nil {
			return err
		}
	}
	if err := r.claimLocked(ctx); err != nil {
		return err
	}
	if w := r.jumpFrom; w != nil {
		r.jumpFrom = nil
		r.logger.Warn("this replica was written last by another lfuse that did not stop cleanly and may still be running; "+
			"a new snapshot starts this history far above its TXIDs, so that nothing it writes until it notices can replace a file of this one",
			"other_host", w.Host, "other_pid", w.PID, "other_started", w.Started.Format(time.RFC3339))
		r.jumpTo = r.pos.TXID + jumpTXIDs
		r.db.resnapshotAbove(r.jumpTo, fmt.Sprintf("replica %s was taken over from another lfuse", r.client))
		return errResnapshot
	}
	last, ok, err := r.db.prepareUpload()
	if err != nil || !ok {
		return err
	}
	upTo := last.TXID()
	if r.jumpTo != 0 && upTo <= r.jumpTo {
		return errResnapshot // the snapshot above the other's TXIDs is not taken yet
	}
	if upTo < r.pos.TXID {
		// The database went back in time (restored from an older copy,
		// a power cut): a second history must not reuse these TXIDs.
		r.db.resnapshotAbove(r.pos.TXID, fmt.Sprintf("replica %s holds TXID %s, beyond the local TXID %s", r.client, r.pos.TXID, upTo))
		return errResnapshot
	}
	if upTo == r.pos.TXID {
		if post := last.Trailer.PostApplyChecksum; r.pos.PostApplyChecksum != 0 && post != r.pos.PostApplyChecksum {
			r.db.resnapshotAbove(upTo, fmt.Sprintf("replica %s at TXID %s has checksum %s, the local log %s",
				r.client, r.pos.TXID, r.pos.PostApplyChecksum, post))
			return errResnapshot
		}
		if !r.staleChecked {
			// The replica holds exactly the local state: the one case a
			// deletion record can hide while the database is here.
			if err := r.dropStaleDeletion(ctx, last); err != nil && ctx.Err() == nil {
				// Replication goes on: only restores of every database
				// leave it out, and only while it stays at this state.
				r.logger.Warn("cannot remove a stale deletion record; restore -data leaves the database out until it changes (or use -include-deleted)", "err", err)
			}
			r.staleChecked = ctx.Err() == nil
		}
		r.syncedAt.Store(time.Now().UnixNano())
		return nil
	}
	refs, err := r.reader.Refs(r.pos.TXID, upTo)
	defer func() { releaseRefs(refs...) }()
	if errors.Is(err, errNotBoundary) {
		r.db.resnapshotAbove(upTo, fmt.Sprintf("replica %s holds TXID %s from another history: %v", r.client, r.pos.TXID, err))
		return errResnapshot
	}
	if errors.Is(err, errLogMoved) || r.pos.TXID == 0 {
		snap, err := r.shipSnapshots(ctx, upTo)
		if err != nil || snap == 0 {
			return err
		}
		releaseRefs(refs...)
		if refs, err = r.reader.Refs(snap, upTo); err != nil {
			return err
		}
	} else if err != nil {
		return err
	} else if pre := refs[0].Header.PreApplyChecksum; r.pos.PostApplyChecksum != 0 && pre != r.pos.PostApplyChecksum {
		r.db.resnapshotAbove(max(r.pos.TXID, upTo), fmt.Sprintf("replica %s at TXID %s has checksum %s, the local log continues from %s",
			r.client, r.pos.TXID, r.pos.PostApplyChecksum, pre))
		return errResnapshot
	}
	if len(refs) == 0 {
		return nil
	}
	if _, err := r.shipRefs(ctx, refs); err != nil {
		return err
	}
	// From the first commit of the batch being captured to the batch
	// being durable in the replica: the longest any of its commits waited.
	r.logger.Debug("synced", "txid", upTo.String(), "commits", uint64(upTo-refs[0].Header.MinTXID+1),
		"lag_seconds", time.Since(time.UnixMilli(refs[0].Header.Timestamp)).Seconds())
	r.syncs.Add(1)
	r.syncedAt.Store(time.Now().UnixNano())
	return nil
}

// shipSnapshots ships the local snapshots the replica lacks, oldest first,
// each after the commits before it that the log kept, and returns the
// newest one's TXID (0 if it is not ready to ship yet). A snapshot taken
// while the replica was behind (a capture that failed, a log that
// diverged, a restart that could not prove continuity) must not erase the
// history before it from the replica, where a restore to a time among
// those commits would otherwise give the state before them. A replica that
// holds nothing gets the newest alone.
func (r *Replica) shipSnapshots(ctx context.Context, upTo ltx.TXID) (ltx.TXID, error) {
	for {
		// After a jump, only the snapshot above it: an older one would
		// go in under TXIDs the other lfuse may yet write.
		snap, newest, err := r.reader.SnapshotAbove(max(r.pos.TXID, r.jumpTo))
		if err != nil {
			return 0, err
		}
		txid := snap.TXID()
		err = r.shipSnapshot(ctx, snap, upTo)
		releaseRefs(snap)
		if err != nil || txid > upTo {
			return 0, err // past upTo: newer than what the DB reported; next pass
		}
		if newest {
			return txid, nil
		}
	}
}

func (r *Replica) shipSnapshot(ctx context.Context, snap Ref, upTo ltx.TXID) error {
	if snap.TXID() > upTo {
		return nil
	}
	if snap.TXID() <= r.pos.TXID {
		r.db.resnapshotAbove(r.pos.TXID, fmt.Sprintf("the local log cannot continue replica %s at TXID %s", r.client, r.pos.TXID))
		return errResnapshot
	}
	if err := r.shipTail(ctx, snap.TXID()); err != nil {
		return err
	}
	info, err := r.upload(ctx, SnapshotLevel, []source{refSource(snap)}, snap.Trailer.PostApplyChecksum)
	if err != nil {
		return err
	}
	r.record(info)
	if info.MaxTXID > r.jumpTo {
		r.jumpTo = 0 // the new history stands above the other's
	}
	return nil
}

// shipTail ships the commits the replica lacks from before the local
// snapshot snap (see shipSnapshots).
func (r *Replica) shipTail(ctx context.Context, snap ltx.TXID) error {
	if r.pos.TXID == 0 || r.jumpTo != 0 {
		return nil
	}
	refs, err := r.reader.Tail(r.pos.TXID, snap)
	if err != nil || len(refs) == 0 {
		return err
	}
	defer releaseRefs(refs...)
	if pre := refs[0].Header.PreApplyChecksum; r.pos.PostApplyChecksum != 0 && pre != r.pos.PostApplyChecksum {
		return nil // another history: the snapshot alone follows
	}
	info, err := r.shipRefs(ctx, refs)
	if err != nil {
		return err
	}
	r.logger.Info("shipped the commits from before a new local snapshot", "txids", fmt.Sprintf("%s-%s", refs[0].Header.MinTXID, info.MaxTXID))
	return nil
}

// shipRefs uploads local records as one level-0 file and records it. A
// file built but not stored (the replica is down) is kept for the next
// try: rebuilding the whole backlog at every retry of an outage cost more
// each time, 42,562 transactions merged again at once after eight minutes.
// The commits made since follow it in a file of their own.
func (r *Replica) shipRefs(ctx context.Context, refs []Ref) (ltx.FileInfo, error) {
	first := refs[0].Header.MinTXID
	var info ltx.FileInfo
	if b := r.unsent; b != nil {
		r.unsent = nil
		i := slices.IndexFunc(refs, func(ref Ref) bool { return ref.Header.MaxTXID == b.hdr.MaxTXID })
		if b.hdr.MinTXID != first || i < 0 || refs[i].Trailer.PostApplyChecksum != b.post {
			b.remove() // the log moved on to another history
		} else {
			var err error
			if info, err = r.send(ctx, 0, b); err != nil {
				r.unsent = b
				return info, err
			}
			b.remove()
			r.record(info)
			if refs = refs[i+1:]; len(refs) == 0 {
				return info, nil
			}
		}
	}
	srcs := make([]source, len(refs))
	for i, ref := range refs {
		srcs[i] = refSource(ref)
	}
	post := refs[len(refs)-1].Trailer.PostApplyChecksum
	b, err := r.build(ctx, r.tmpDir, 0, srcs, post)
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		// The state directory's disk is full (often the database's own):
		// commits already captured must still leave the machine. Only
		// level 0, whose files hold recent commits: a snapshot could be
		// as large as the database, and the temporary directory may be
		// memory. Such a file is not kept for a retry.
		r.logger.Debug("state directory full; building the upload in the temporary directory", "dir", os.TempDir())
		b, err = r.build(ctx, os.TempDir(), 0, srcs, post)
	}
	if err != nil {
		return info, err
	}
	if info, err = r.send(ctx, 0, b); err != nil {
		if filepath.Dir(b.f.Name()) == r.tmpDir {
			r.unsent = b
		} else {
			b.remove()
		}
		return info, err
	}
	b.remove()
	r.record(info)
	return info, nil
}

// dropUnsent removes the level-0 file kept for a retry, once no sync will
// send it (the replica stopped).
func (r *Replica) dropUnsent() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.unsent != nil {
		r.unsent.remove()
		r.unsent = nil
	}
}

// upload merges srcs into one file of the given level and stores it. It
// needs no lock: the caller records the file.
func (r *Replica) upload(ctx context.Context, level int, srcs []source, post ltx.Checksum) (ltx.FileInfo, error) {
	b, err := r.build(ctx, r.tmpDir, level, srcs, post)
	if err != nil {
		return ltx.FileInfo{}, err
	}
	defer b.remove()
	return r.send(ctx, level, b)
}

// uploadBaseTimeout is the time any upload may take, besides a second per
// MB (a variable for tests).
var uploadBaseTimeout = time.Minute

// builtFile is an LTX file built for upload, in a temporary file.
type builtFile struct {
	f    *os.File
	hdr  ltx.Header
	size int64
	post ltx.Checksum
}

func (b *builtFile) remove() { b.f.Close(); os.Remove(b.f.Name()) }

// build merges srcs into a temporary file in tmpDir.
func (r *Replica) build(ctx context.Context, tmpDir string, level int, srcs []source, post ltx.Checksum) (*builtFile, error) {
	tmp, err := os.CreateTemp(tmpDir, "upload-*.ltx")
	if err != nil {
		return nil, err
	}
	b := &builtFile{f: tmp, post: post}
	if b.hdr, err = mergeSources(ctx, tmp, srcs, tmpDir, false); err != nil {
		b.remove()
		return nil, fmt.Errorf("build level %d file: %w", level, err)
	}
	if b.size, err = tmp.Seek(0, io.SeekCurrent); err != nil {
		b.remove()
		return nil, err
	}
	return b, nil
}

// send stores a built file.
func (r *Replica) send(ctx context.Context, level int, b *builtFile) (ltx.FileInfo, error) {
	if err := r.takenOver(); err != nil {
		return ltx.FileInfo{}, err
	}
	r.wrote.Store(true)
	r.wroteAny.Store(true)
	if _, err := b.f.Seek(0, io.SeekStart); err != nil {
		return ltx.FileInfo{}, err
	}
	hdr, size := b.hdr, b.size
	ts := time.UnixMilli(hdr.Timestamp).UTC()
	// A connection that stalls without breaking would hold the replica
	// (and, for a sync, every later commit) for good, with nothing logged:
	// an upload gets a minute plus a second per MB.
	wctx, cancel := context.WithTimeout(ctx, uploadBaseTimeout+time.Duration(size>>20)*time.Second)
	defer cancel()
	if err := r.client.WriteLTXFile(wctx, level, hdr.MinTXID, hdr.MaxTXID, b.f, size,
		backends.FileMeta{Timestamp: ts, PostApplyChecksum: b.post}); err != nil {
		return ltx.FileInfo{}, fmt.Errorf("write level %d file %s: %w", level, ltx.FormatFilename(hdr.MinTXID, hdr.MaxTXID), err)
	}
	r.uploaded.Add(size)
	if level == SnapshotLevel {
		r.logger.Info("snapshot uploaded", "txid", hdr.MaxTXID.String(), "bytes", size)
	} else {
		r.logger.Debug("uploaded", "level", level, "min", hdr.MinTXID.String(), "max", hdr.MaxTXID.String(), "bytes", size)
	}
	return ltx.FileInfo{Level: level, MinTXID: hdr.MinTXID, MaxTXID: hdr.MaxTXID, PostApplyChecksum: b.post, Size: size, CreatedAt: ts}, nil
}

// publish uploads a file built by maintenance and records it, taking mu
// only for the record.
func (r *Replica) publish(ctx context.Context, level int, srcs []source, post ltx.Checksum) error {
	info, err := r.upload(ctx, level, srcs, post)
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.record(info)
	r.mu.Unlock()
	return nil
}

// record adds an uploaded file to the replica's listing, in TXID order: a
// snapshot taken by maintenance at an older position may finish after a
// sync shipped a newer one. Call with mu held.
func (r *Replica) record(info ltx.FileInfo) {
	files := r.files[info.Level]
	i := len(files)
	for i > 0 && files[i-1].MaxTXID > info.MaxTXID {
		i--
	}
	r.files[info.Level] = slices.Insert(files, i, info)
	if info.Level == SnapshotLevel || info.Level == 0 {
		if info.MaxTXID > r.pos.TXID {
			r.pos = ltx.Pos{TXID: info.MaxTXID, PostApplyChecksum: info.PostApplyChecksum}
			r.synced.Store(uint64(info.MaxTXID))
		}
	}
}

// maintain compacts levels, takes a snapshot and applies retention, each
// when its interval has passed. It holds mu only to plan and to record.
func (r *Replica) maintain(ctx context.Context, now time.Time) error {
	r.mu.Lock()
	listed := r.listed
	r.mu.Unlock()
	if !listed {
		return nil // the first sync learns what the replica holds
	}
	// Here, off the syncs' path: a commit's way to the replica waits for
	// no extra request. Only a takeover stops the maintenance; a record
	// that cannot be read now is read again next time.
	if err := r.checkWriter(ctx, false); r.takenOver() != nil {
		return err
	} else if err != nil && ctx.Err() == nil {
		r.logger.Debug("cannot check the replica's writer record; again at the next pass", "err", err)
	}
	if err := r.checkListing(ctx, now); err != nil {
		return err
	}
	r.mu.Lock()
	listed = r.listed
	r.mu.Unlock()
	if !listed {
		return nil
	}
	for i, every := range r.opts.CompactIntervals {
		level := i + 1
		r.mu.Lock()
		due := now.Sub(r.lastCompact[level]) >= every
		r.mu.Unlock()
		if !due {
			continue
		}
		if err := r.compact(ctx, level); err != nil {
			return err
		}
		r.mu.Lock()
		r.lastCompact[level] = now
		r.mu.Unlock()
	}
	if err := r.snapshot(ctx, now); err != nil {
		return err
	}
	return r.retain(ctx, now)
}

// checkListing lists the replica's snapshots now and then: the steady state
// lists nothing, so a replica deleted or replaced under lfuse would go on
// receiving level-0 files that no restore can use (no snapshot under them).
// If the newest snapshot lfuse knows is gone, the next sync lists the
// replica again and takes it from what it holds.
func (r *Replica) checkListing(ctx context.Context, now time.Time) error {
	r.mu.Lock()
	snaps := r.files[SnapshotLevel]
	due := now.Sub(r.lastCheck) >= r.opts.CheckInterval && len(snaps) > 0
	var newest ltx.FileInfo
	if len(snaps) > 0 {
		newest = snaps[len(snaps)-1]
	}
	r.mu.Unlock()
	if !due {
		return nil
	}
	infos, err := r.client.LTXFiles(ctx, SnapshotLevel)
	if err != nil {
		return err // the backends' errors say what they were listing
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lastCheck = now
	if !slices.ContainsFunc(infos, func(f ltx.FileInfo) bool { return f.MinTXID == newest.MinTXID && f.MaxTXID == newest.MaxTXID }) {
		r.logger.Warn("the replica no longer holds its newest snapshot (deleted or replaced?); listing it again",
			"file", fmt.Sprintf("%d/%s-%s", SnapshotLevel, newest.MinTXID, newest.MaxTXID))
		r.listed = false
	}
	return nil
}

// compact merges the files of level-1 written since the last file of level
// into one file of level. It reads them from the local log when it still
// holds them, from the replica otherwise.
func (r *Replica) compact(ctx context.Context, level int) error {
	r.maintMu.Lock()
	defer r.maintMu.Unlock()
	r.mu.Lock()
	var after ltx.TXID
	if n := len(r.files[level]); n > 0 {
		after = r.files[level][n-1].MaxTXID
	}
	var run []ltx.FileInfo
	for _, f := range r.files[level-1] {
		if f.MinTXID <= after {
			continue
		}
		if len(run) > 0 && f.MinTXID != run[len(run)-1].MaxTXID+1 {
			run = run[:0] // a new history started (a snapshot): compact that
		}
		run = append(run, f)
	}
	r.mu.Unlock()
	if len(run) < 2 && !(len(run) == 1 && level > 1) {
		return nil
	}
	first, last := run[0], run[len(run)-1]
	var srcs []source
	post := last.PostApplyChecksum
	refs, err := r.maintReader.Refs(first.MinTXID-1, last.MaxTXID)
	if err == nil && len(refs) > 0 && post != 0 && refs[len(refs)-1].Trailer.PostApplyChecksum != post {
		// The local log holds another history under these TXIDs (a state
		// directory put back from elsewhere): merge what the replica holds.
		releaseRefs(refs...)
		err = errLogMoved
	}
	if err == nil && len(refs) > 0 {
		defer releaseRefs(refs...)
		for _, ref := range refs {
			srcs = append(srcs, refSource(ref))
		}
		post = refs[len(refs)-1].Trailer.PostApplyChecksum
	} else {
		for _, f := range run {
			srcs = append(srcs, r.remoteSource(ctx, f))
		}
		if post == 0 {
			meta, err := r.client.FileMeta(ctx, last.Level, last.MinTXID, last.MaxTXID)
			if err != nil {
				return err
			}
			post = meta.PostApplyChecksum
		}
	}
	return r.publish(ctx, level, srcs, post)
}

// remoteSource downloads a replica file into a temporary file, which is
// removed when the merge closes it.
func (r *Replica) remoteSource(ctx context.Context, f ltx.FileInfo) source {
	return func() (io.ReadCloser, error) {
		rc, err := openDownload(ctx, r.client, f, r.logger)
		if err != nil {
			return nil, err
		}
		defer rc.Close()
		tmp, err := os.CreateTemp(r.tmpDir, "download-*.ltx")
		if err != nil {
			return nil, err
		}
		os.Remove(tmp.Name())
		if err := copyBody(tmp, rc); err != nil {
			tmp.Close()
			return nil, err
		}
		if _, err := tmp.Seek(0, io.SeekStart); err != nil {
			tmp.Close()
			return nil, err
		}
		return tmp, nil
	}
}

// snapshot writes a snapshot at the replica's position when the newest one
// is older than the snapshot interval.
func (r *Replica) snapshot(ctx context.Context, now time.Time) error {
	r.maintMu.Lock()
	defer r.maintMu.Unlock()
	r.mu.Lock()
	snaps := r.files[SnapshotLevel]
	pos := r.pos
	var newest ltx.FileInfo
	if len(snaps) > 0 {
		newest = snaps[len(snaps)-1]
	}
	r.mu.Unlock()
	if pos.TXID == 0 {
		return nil // the first sync ships one
	}
	// A replica without a snapshot (its files lost and listed again) gets
	// one at once: no restore can use what it holds.
	if len(snaps) > 0 && (newest.MaxTXID >= pos.TXID || now.Sub(newest.CreatedAt) < r.opts.SnapshotInterval) {
		return nil
	}
	snap, err := r.maintReader.Snapshot()
	if err != nil {
		return err
	}
	defer releaseRefs(snap)
	srcs := []source{refSource(snap)}
	local := snap.Trailer.PostApplyChecksum
	if pos.TXID > snap.TXID() {
		refs, err := r.maintReader.Refs(snap.TXID(), pos.TXID)
		if err != nil || len(refs) == 0 {
			return nil // the log moved on; its new snapshot is shipped by the next sync
		}
		defer releaseRefs(refs...)
		for _, ref := range refs {
			srcs = append(srcs, refSource(ref))
		}
		local = refs[len(refs)-1].Trailer.PostApplyChecksum
	} else if snap.TXID() != pos.TXID {
		return nil
	}
	if pos.PostApplyChecksum != 0 && local != pos.PostApplyChecksum {
		// The local log is not the replica's history at this TXID; the
		// sync is starting a new one, which brings its own snapshot.
		r.logger.Debug("scheduled snapshot skipped: the local log differs from the replica", "txid", pos.TXID.String())
		return nil
	}
	return r.publish(ctx, SnapshotLevel, srcs, pos.PostApplyChecksum)
}

// retain deletes what no point in the retention window needs: the newest
// snapshot taken before the window opened, and everything after it, stays.
func (r *Replica) retain(ctx context.Context, now time.Time) error {
	r.maintMu.Lock()
	defer r.maintMu.Unlock()
	// A listing's CreatedAt can be cut to the second (S3's LastModified):
	// a snapshot listed at the cutoff may have been made up to a second
	// after it, holding a state newer than the window's start.
	cutoff := now.Add(-r.opts.Retention - time.Second)
	r.mu.Lock()
	snaps := r.files[SnapshotLevel]
	keep := -1
	for i, s := range snaps {
		if !s.CreatedAt.After(cutoff) {
			keep = i
		}
	}
	if keep <= 0 {
		r.mu.Unlock()
		return nil
	}
	base := snaps[keep].MaxTXID
	// Syncs and resnapshots meanwhile only add files above base, so the
	// same test picks out exactly these files again afterwards.
	expired := func(f ltx.FileInfo) bool {
		return (f.Level == SnapshotLevel && f.MaxTXID < base) || (f.Level != SnapshotLevel && f.MaxTXID <= base)
	}
	// Snapshots are deleted first, in a call of their own: a restore that
	// lists the snapshots after the other levels (PlanRestore) then never
	// sees an old snapshot without the files that follow it, which it
	// would take for the newest state at a time inside their range.
	var snapsGone, restGone []ltx.FileInfo
	for level := range r.files {
		for _, f := range r.files[level] {
			switch {
			case !expired(f):
			case level == SnapshotLevel:
				snapsGone = append(snapsGone, f)
			default:
				restGone = append(restGone, f)
			}
		}
	}
	r.mu.Unlock()
	if len(snapsGone)+len(restGone) == 0 {
		return nil
	}
	for _, batch := range [][]ltx.FileInfo{snapsGone, restGone} {
		if len(batch) == 0 {
			continue
		}
		if err := r.takenOver(); err != nil {
			return err
		}
		r.wrote.Store(true)
		if err := r.client.DeleteLTXFiles(ctx, batch); err != nil {
			return fmt.Errorf("delete files past retention: %w", err)
		}
	}
	r.mu.Lock()
	for level := range r.files {
		r.files[level] = slices.DeleteFunc(r.files[level], expired)
	}
	r.mu.Unlock()
	r.logger.Info("deleted files past retention", "files", len(snapsGone)+len(restGone), "before_txid", base.String())
	return nil
}
