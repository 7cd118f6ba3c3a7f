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
	"sort"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"github.com/lfuse/lfuse/backends"
	"github.com/superfly/ltx"
)

// Target is the point a restore aims at; the zero Target is the newest.
type Target struct {
	TXID ltx.TXID  // exactly this TXID
	Time time.Time // the newest restorable state committed at or before Time
}

func (t Target) String() string {
	switch {
	case t.TXID != 0:
		return "TXID " + t.TXID.String()
	case !t.Time.IsZero():
		return t.Time.Format(time.RFC3339Nano)
	}
	return "latest"
}

// Plan is what a restore downloads and applies, in order: a snapshot and
// the fewest files after it that reach the target.
type Plan struct {
	Files     []ltx.FileInfo
	TXID      ltx.TXID
	Timestamp time.Time
	Bytes     int64
	ListTime  time.Duration
	Newest    ltx.TXID // the newest TXID the replica lists, set even when planning fails

	lastMeta *backends.FileMeta // of the last file, if planning read it: Restore need not again
}

// ErrNoBackup is returned when a replica holds nothing for a database.
var ErrNoBackup = errors.New("the replica holds no backup of this database")

// ErrBeforeOldest is returned for a target older than every snapshot: the
// database did not exist then, or its history then is past retention.
var ErrBeforeOldest = errors.New("before the oldest backup")

// ErrAfterNewest is returned for a target TXID beyond the replica's newest
// commit: another replica may hold it.
var ErrAfterNewest = errors.New("after the newest backup")

// ErrNotExact is returned for a target TXID inside one file of commits
// (each replica compacts on its own: another may hold it exactly).
var ErrNotExact = errors.New("cannot be restored exactly: it falls inside a batch of commits")

// ErrGap is returned when no file continues the chain toward the target
// while later files exist: some file is missing.
var ErrGap = errors.New("gap in the TXID chain")

// errNoReplicaSnapshot: the replica holds a history with no snapshot under it.
// Not ErrNoBackup: restoring nothing there (-if-replica-exists,
// restore-if-missing) would start the application on an empty database
// while its history sits in the replica.
var errNoReplicaSnapshot = errors.New("the replica holds transaction files but no snapshot to apply them to (were its level-9 files deleted?): nothing can be restored from it; restore from another replica, or remove this one's files to start afresh")

// PlanRestore lists every level of the replica once and picks the files that
// restore target. A running lfuse may delete files meanwhile: a file the
// plan names can be gone by the time it is downloaded (Restore then fails
// with backends.ErrNotFound, and planning again settles it).
func PlanRestore(ctx context.Context, client ReplicaClient, target Target) (Plan, error) {
	return PlanRestoreAvoiding(ctx, client, target, nil)
}

// PlanRestoreAvoiding plans as PlanRestore does without the files in
// avoid: those a restore could not use (FileError). A replica usually
// holds other ways to the same state (the level-0 files a compaction
// covers, an older snapshot with the history after it); the plan found may
// also end at an older state, which the caller must check.
func PlanRestoreAvoiding(ctx context.Context, client ReplicaClient, target Target, avoid []ltx.FileInfo) (Plan, error) {
	client = withTimeouts(client)
	start := time.Now()
	var levels [SnapshotLevel + 1][]ltx.FileInfo
	// The levels below the snapshots are listed at once: one after another
	// cost ten round trips to a cloud store before the first download
	// could start. The snapshots are listed after them. Retention deletes
	// an old snapshot before the files above it (Replica.retain), so a
	// snapshot still listed then had all its later files listed too.
	// Listed at the same time, a snapshot could be seen while the files
	// after it were already gone, and a timestamp restore then returned
	// that snapshot alone: an older state than asked for, with no error.
	list := func(ctx context.Context, level int) error {
		files, err := client.LTXFiles(ctx, level)
		levels[level] = files
		return err // the backends' errors say what they were listing
	}
	g, gctx := errgroup.WithContext(ctx)
	for level := range SnapshotLevel {
		g.Go(func() error { return list(gctx, level) })
	}
	if err := g.Wait(); err != nil {
		return Plan{}, err
	}
	if err := list(ctx, SnapshotLevel); err != nil {
		return Plan{}, err
	}
	for _, a := range avoid {
		levels[a.Level] = slices.DeleteFunc(levels[a.Level], func(f ltx.FileInfo) bool {
			return f.MinTXID == a.MinTXID && f.MaxTXID == a.MaxTXID
		})
	}
	var newest *ltx.FileInfo
	for level := range levels {
		for i := range levels[level] {
			if f := &levels[level][i]; newest == nil || f.MaxTXID > newest.MaxTXID {
				newest = f
			}
		}
	}
	plan := Plan{ListTime: time.Since(start)}
	if newest != nil {
		plan.Newest = newest.MaxTXID
	}
	approx := false
	guessed := map[fileKey]bool{} // files taken as committed by the target without reading their time
	if a, ok := client.(approxTimes); ok && a.ListTimesApprox() {
		approx = true
		if !target.Time.IsZero() {
			for level := range levels {
				if err := exactTimes(ctx, client, levels[level], target.Time, guessed); err != nil {
					return plan, err
				}
			}
		}
	}
	if !approx || target.Time.IsZero() {
		plan, err := planFrom(&levels, newest, target, plan)
		if err == nil && approx {
			cur := plan.Files[len(plan.Files)-1]
			meta, err := client.FileMeta(ctx, cur.Level, cur.MinTXID, cur.MaxTXID)
			if err != nil {
				return plan, fmt.Errorf("%s: read the time of %s: %w", client, fileName(cur), err)
			}
			plan.Timestamp, plan.lastMeta = meta.Timestamp, &meta
		}
		return plan, err
	}
	// Listed times were narrowed by a binary search, which trusts commit
	// times to rise with TXIDs. A replica that breaks that (or lies) must
	// not make a timestamp restore overshoot: read the exact time of every
	// planned file whose time was guessed, and of the last, and plan again
	// without those committed after the target. Each round settles at
	// least one file, so this ends.
	for {
		p, err := planFrom(&levels, newest, target, plan)
		if err != nil {
			return p, err
		}
		again := false
		for i, f := range p.Files {
			key := fileKey{f.Level, f.MinTXID, f.MaxTXID}
			if !guessed[key] && i < len(p.Files)-1 {
				continue
			}
			delete(guessed, key)
			meta, err := client.FileMeta(ctx, f.Level, f.MinTXID, f.MaxTXID)
			if err != nil {
				return p, fmt.Errorf("%s: read the time of %s: %w", client, fileName(f), err)
			}
			p.Timestamp = meta.Timestamp
			if i == len(p.Files)-1 {
				p.lastMeta = &meta
			}
			if meta.Timestamp.After(target.Time) {
				for i := range levels[f.Level] {
					if g := &levels[f.Level][i]; g.MinTXID == f.MinTXID && g.MaxTXID == f.MaxTXID {
						g.CreatedAt = meta.Timestamp
					}
				}
				again = true
			}
		}
		if !again {
			return p, nil
		}
	}
}

// planFrom picks, from the listed levels, the files that restore target.
func planFrom(levels *[SnapshotLevel + 1][]ltx.FileInfo, newest *ltx.FileInfo, target Target, plan Plan) (Plan, error) {
	snaps := levels[SnapshotLevel]
	if len(snaps) == 0 {
		for _, files := range levels {
			if len(files) > 0 {
				return plan, errNoReplicaSnapshot
			}
		}
		return plan, ErrNoBackup
	}
	within := func(f ltx.FileInfo) bool {
		return (target.TXID == 0 || f.MaxTXID <= target.TXID) && (target.Time.IsZero() || !f.CreatedAt.After(target.Time))
	}
	if target.TXID > newest.MaxTXID {
		return plan, fmt.Errorf("TXID %s is %w (TXID %s, committed %s)", target.TXID, ErrAfterNewest, newest.MaxTXID, newest.CreatedAt.Format(time.RFC3339Nano))
	}
	if !target.Time.IsZero() && target.Time.After(newest.CreatedAt) && target.Time.After(time.Now()) {
		return plan, fmt.Errorf("timestamp %s is in the future; the newest backup was committed %s", target.Time.Format(time.RFC3339), newest.CreatedAt.Format(time.RFC3339Nano))
	}
	snap := -1
	for i, s := range snaps {
		if within(s) && (snap < 0 || s.MaxTXID > snaps[snap].MaxTXID) {
			snap = i
		}
	}
	if snap < 0 {
		oldest := snaps[0]
		return plan, fmt.Errorf("%s is %w (snapshot at TXID %s, committed %s)", target, ErrBeforeOldest, oldest.MaxTXID, oldest.CreatedAt.Format(time.RFC3339Nano))
	}
	// From the snapshot, take at each step the file that reaches furthest
	// without passing the target; higher levels cover more per file. A
	// compacted file may start before the current TXID: it holds the final
	// image of every page changed in its range, so applying it to any state
	// inside that range gives the state at its end.
	plan.Files = []ltx.FileInfo{snaps[snap]}
	cur := snaps[snap]
	for {
		var best *ltx.FileInfo
		for level := SnapshotLevel - 1; level >= 0; level-- {
			for i := range levels[level] {
				f := &levels[level][i]
				if f.MinTXID <= cur.MaxTXID+1 && f.MaxTXID > cur.MaxTXID && within(*f) && (best == nil || f.MaxTXID > best.MaxTXID) {
					best = f
				}
			}
		}
		if best == nil {
			break
		}
		plan.Files = append(plan.Files, *best)
		cur = *best
	}
	// Anything within the target beyond where the chain stopped means a
	// file is missing: refuse rather than restore an older state silently.
	var gap *ltx.FileInfo
	for level := range levels {
		for i := range levels[level] {
			if f := &levels[level][i]; within(*f) && f.MaxTXID > cur.MaxTXID && (gap == nil || f.MinTXID < gap.MinTXID) {
				gap = f
			}
		}
	}
	if gap != nil {
		return plan, fmt.Errorf("%w: no file continues TXID %s; the next one, %s, starts at TXID %s", ErrGap, cur.MaxTXID, fileName(*gap), gap.MinTXID)
	}
	if target.TXID != 0 && cur.MaxTXID != target.TXID {
		return plan, fmt.Errorf("TXID %s %w; the nearest restorable TXIDs are %s and %s (see lfuse ltx)",
			target.TXID, ErrNotExact, cur.MaxTXID, nextBoundary(levels[:], cur.MaxTXID))
	}
	plan.TXID, plan.Timestamp = cur.MaxTXID, cur.CreatedAt
	for _, f := range plan.Files {
		plan.Bytes += f.Size
	}
	return plan, nil
}

// approxTimes is a client whose listing gives upload times (S3's
// LastModified) rather than the commit times in the files: never earlier,
// but later by up to a sync.
type approxTimes interface{ ListTimesApprox() bool }

// listSlack: upload times in listings may be cut to the second (S3's
// LastModified, versitygw's file times), so one can read up to a second
// before the commit it follows.
const listSlack = time.Second

// exactTimes makes the listed times of one level exact enough to compare
// with t. Commit times rise with TXIDs within a level, so a binary search
// finds the first file committed after t; a file listed more than listSlack
// before t was committed by t without asking, the others cost a FileMeta
// each (a few per level). Files before it get times ≤ t.
type fileKey struct {
	level    int
	min, max ltx.TXID
}

func exactTimes(ctx context.Context, client ReplicaClient, files []ltx.FileInfo, t time.Time, guessed map[fileKey]bool) error {
	var err error
	first := sort.Search(len(files), func(i int) bool {
		f := &files[i]
		if err != nil || !f.CreatedAt.Add(listSlack).After(t) {
			return err != nil
		}
		var meta backends.FileMeta
		if meta, err = client.FileMeta(ctx, f.Level, f.MinTXID, f.MaxTXID); err != nil {
			err = fmt.Errorf("%s: read the time of %s: %w", client, fileName(*f), err)
			return true
		}
		f.CreatedAt = meta.Timestamp
		return meta.Timestamp.After(t)
	})
	if err != nil {
		return err
	}
	for i := range files {
		switch {
		case i < first && files[i].CreatedAt.After(t):
			files[i].CreatedAt = t // committed by t if times rise with TXIDs; checked if planned
			guessed[fileKey{files[i].Level, files[i].MinTXID, files[i].MaxTXID}] = true
		case i >= first && !files[i].CreatedAt.After(t):
			files[i].CreatedAt = t.Add(time.Millisecond) // listed early, committed after t
		}
	}
	return nil
}

// nextBoundary is the smallest file end after txid that continues it.
func nextBoundary(levels [][]ltx.FileInfo, txid ltx.TXID) string {
	var next ltx.TXID
	for _, files := range levels {
		for _, f := range files {
			if f.MinTXID <= txid+1 && f.MaxTXID > txid && (next == 0 || f.MaxTXID < next) {
				next = f.MaxTXID
			}
		}
	}
	if next == 0 {
		return "none after it"
	}
	return next.String()
}

// FileError is a restore's failure on one file of the replica: corrupt, not
// fitting the files before it, or unreadable after retries. A plan that
// avoids the file (PlanRestoreAvoiding) may still reach the same state.
type FileError struct {
	File ltx.FileInfo
	Err  error
}

func (e *FileError) Error() string { return e.Err.Error() }
func (e *FileError) Unwrap() error { return e.Err }

// RestoreOptions tune Restore.
type RestoreOptions struct {
	Parallelism int          // concurrent downloads; default 8
	Logger      *slog.Logger // default slog.Default()
	Progress    func(done, total int64)
	// NoReplace keeps a file that appears at the output while the restore
	// runs: the restore fails instead of replacing it.
	NoReplace bool
}

// RestoreStats says where a restore's time went.
type RestoreStats struct {
	Files                         int
	Bytes, DBBytes                int64
	Download, Apply, Verify, Sync time.Duration
}

// Restore downloads the plan's files (in parallel, ahead of applying them
// in order), writes the database to a temporary file beside output, checks
// every file's CRC and the database checksum recorded with the last file,
// and only then moves it to output. Stale -wal, -journal and -shm files of
// output are removed. Memory is bounded: files stream through temporary files.
func Restore(ctx context.Context, client ReplicaClient, plan Plan, output string, opts RestoreOptions) (RestoreStats, error) {
	var st RestoreStats
	client = withTimeouts(client)
	if opts.Parallelism <= 0 {
		opts.Parallelism = 8
	}
	if len(plan.Files) == 0 {
		return st, ErrNoBackup
	}
	last := plan.Files[len(plan.Files)-1]
	var meta backends.FileMeta
	if plan.lastMeta != nil {
		meta = *plan.lastMeta // a round trip less per database
	} else {
		var err error
		if meta, err = client.FileMeta(ctx, last.Level, last.MinTXID, last.MaxTXID); err != nil {
			return st, fmt.Errorf("%s: read the checksum recorded with %s: %w", client, fileName(last), err)
		}
	}

	dir := filepath.Dir(output)
	logger := opts.Logger
	if logger == nil {
		logger = slog.Default()
	}
	SweepLeftovers(dir, logger)
	out, err := createRestoreFile(dir)
	if err != nil {
		return st, err
	}
	defer out.discard()
	tmpDir := out.tmpDir

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// The files are applied newest first, so that every page is written
	// once, by the newest file that holds it, and the snapshot — most of the
	// bytes — streams last into whatever the history left unwritten.
	n := len(plan.Files)
	order := func(k int) ltx.FileInfo { return plan.Files[n-1-k] }
	type download struct {
		rc  io.ReadCloser
		err error
	}
	results := make([]chan download, n-1)
	for i := range results {
		results[i] = make(chan download, 1)
	}
	sem := make(chan struct{}, opts.Parallelism)
	var wg sync.WaitGroup
	defer func() {
		// After a failure, close what was fetched but not applied.
		cancel()
		wg.Wait()
		for _, ch := range results {
			select {
			case d := <-ch:
				if d.rc != nil {
					d.rc.Close()
				}
			default:
			}
		}
	}()
	wg.Add(1) // so that the deferred Wait also waits for every download this starts
	go func() {
		defer wg.Done()
		// The snapshot is opened when its turn comes: a remote body left
		// unread while the history is applied could time out.
		for k := 0; k < n-1; k++ {
			f := order(k)
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return // the applier stops on ctx too
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				rc, err := openDownload(ctx, client, f, opts.Logger)
				if err == nil {
					if wf := wholeFile(rc); wf != nil {
						prefetch(wf, f.Size)
					} else {
						// A remote body: fetch it now, while newer
						// files are applied.
						rc, err = fetch(rc, filepath.Join(tmpDir, fmt.Sprintf("%d.ltx", k)))
					}
				}
				results[k] <- download{rc: rc, err: err}
			}()
		}
	}()

	asm := &assembler{out: out.File}
	// An interrupted restore (Ctrl-C) ends here, whichever file it was in:
	// not the replica's fault.
	stopped := func() error { return fmt.Errorf("restore stopped: %w", context.Cause(ctx)) }
	var done int64
	for k := 0; k < n; k++ {
		f := order(k)
		if ctx.Err() != nil {
			return st, stopped()
		}
		waitStart := time.Now()
		var d download
		if k < n-1 {
			// Every result comes from a started download, which holds a
			// slot. (The dispatcher used to post the cancellation in the
			// place of downloads it had not started; the applier then
			// waited for their slots forever.)
			select {
			case d = <-results[k]:
				<-sem
			case <-ctx.Done():
				return st, stopped()
			}
		} else {
			d.rc, d.err = openDownload(ctx, client, f, opts.Logger)
		}
		st.Download += time.Since(waitStart)
		if d.err != nil && ctx.Err() != nil {
			return st, stopped()
		}
		if d.err != nil {
			return st, &FileError{f, fmt.Errorf("%s: download %s: %w", client, fileName(f), d.err)}
		}
		applyStart := time.Now()
		cr := &countingReader{r: d.rc}
		var body io.Reader = cr
		var m *mappedLTX
		if wf := wholeFile(d.rc); wf != nil {
			if m, err = mapLTX(wf); err == nil {
				body, cr.n = m, int64(len(m.data)) // decodeLTX reads all of it or fails
			}
		}
		err = asm.apply(ctx, body, f, k == n-1)
		if m != nil {
			m.unmap()
		}
		d.rc.Close()
		if err == nil && f.Size > 0 && cr.n != f.Size {
			err = fmt.Errorf("read %d bytes, the listing said %d", cr.n, f.Size)
		}
		if err != nil && ctx.Err() != nil {
			return st, stopped()
		}
		if de := (downloadError{}); errors.As(err, &de) {
			return st, &FileError{f, fmt.Errorf("%s: download %s: %w", client, fileName(f), de)}
		}
		if mf := (mapFault{}); errors.As(err, &mf) {
			return st, &FileError{f, fmt.Errorf("%s: read %s: %w", client, fileName(f), mf)}
		}
		if oe := (outputError{}); errors.As(err, &oe) {
			return st, fmt.Errorf("write the restored database beside %s: %w", output, oe.err)
		}
		if err != nil {
			return st, &FileError{f, fmt.Errorf("%s: %s is corrupt or does not fit: %w", client, fileName(f), err)}
		}
		st.Apply += time.Since(applyStart)
		st.Files++
		st.Bytes += f.Size
		done += f.Size
		if opts.Progress != nil {
			opts.Progress(done, plan.Bytes)
		}
	}
	sum := asm.finish()
	verifyStart := time.Now()
	if sum != meta.PostApplyChecksum {
		// The fault is in some file, or in the checksum recorded with the
		// last: a plan that ends with another file may not meet it.
		return st, &FileError{last, fmt.Errorf("%s: the restored database has checksum %s, but %s was recorded with %s: refusing to write it",
			client, sum, fileName(last), meta.PostApplyChecksum)}
	}
	st.Verify = time.Since(verifyStart)
	syncStart := time.Now()
	if fi, err := out.Stat(); err == nil {
		st.DBBytes = fi.Size()
	}
	if err := out.install(output, opts.NoReplace, logger); err != nil {
		return st, err
	}
	st.Sync = time.Since(syncStart)
	return st, nil
}

// restoreFile is a database being built beside its output, in a locked
// directory: the lock tells a later restore's sweep that this one runs.
type restoreFile struct {
	*os.File
	tmpDir string
	lock   *os.File
	keep   bool // tmpDir holds an old database's file that could not be put back
}

func createRestoreFile(dir string) (*restoreFile, error) {
	tmpDir, lock, err := makeRestoreDir(dir)
	if err != nil {
		return nil, err
	}
	r := &restoreFile{tmpDir: tmpDir, lock: lock}
	if r.File, err = os.Create(filepath.Join(tmpDir, "db")); err != nil {
		r.discard()
		return nil, err
	}
	return r, nil
}

// install makes the finished database output's: its owner and mode, synced,
// moved into place, the directory synced.
func (r *restoreFile) install(output string, noReplace bool, logger *slog.Logger) error {
	if err := takeOwner(r.File, output); err != nil {
		return err
	}
	if err := r.Sync(); err != nil {
		return err
	}
	if err := r.Close(); err != nil {
		return err
	}
	keep, err := replaceDB(r.Name(), output, r.tmpDir, noReplace, logger)
	if err != nil {
		r.keep = keep
		return err
	}
	return syncDir(filepath.Dir(output))
}

// discard removes what install did not take, unless it must be kept.
func (r *restoreFile) discard() {
	if r.File != nil {
		r.File.Close()
	}
	if !r.keep {
		os.RemoveAll(r.tmpDir)
	}
	if r.lock != nil {
		r.lock.Close()
	}
}

// sideFiles are what SQLite keeps beside a database and applies to it when
// it next opens it: a WAL, or a hot rollback journal, replayed onto the
// restored file would give a state the replica never held (a journal
// rolled the restored database back to the old one's size: "malformed").
var sideFiles = []string{"-wal", "-journal", "-shm"}

// replaceDB moves the restored file db to output. The old database's side
// files are moved into aside first, and back if the move fails: removed
// first, a failed rename (output bind-mounted, immutable) lost the commits
// the old WAL held, with the restored file not in place either. With
// noReplace, an output that appeared since the restore checked is kept.
// keepAside says that aside holds a file that could not be put back.
func replaceDB(db, output, aside string, noReplace bool, logger *slog.Logger) (keepAside bool, _ error) {
	var moved []string
	putBack := func() {
		for _, suffix := range moved {
			if err := os.Rename(filepath.Join(aside, suffix), output+suffix); err != nil {
				// Out of the restore's directory, which the next restore
				// beside it would sweep away with the commits it holds.
				kept := output + suffix + ".lfuse-kept"
				if os.Rename(filepath.Join(aside, suffix), kept) != nil {
					kept, keepAside = filepath.Join(aside, suffix), true
				}
				logger.Error("the old database's file could not be put back: move it back by hand before opening the database", "file", kept, "to", output+suffix, "err", err)
			}
		}
	}
	for _, suffix := range sideFiles {
		if st, err := os.Lstat(output + suffix); err == nil && !st.Mode().IsRegular() {
			// Moved aside, it would be removed with aside: not lfuse's to delete.
			return false, fmt.Errorf("%s is not a regular file, so not the old database's: move it away, then restore again", output+suffix)
		}
		err := os.Rename(output+suffix, filepath.Join(aside, suffix))
		if errors.Is(err, os.ErrNotExist) {
			continue
		} else if err != nil {
			putBack()
			return keepAside, fmt.Errorf("move the old %s aside before putting the restored database in place: %w", output+suffix, err)
		}
		moved = append(moved, suffix)
	}
	var err error
	if noReplace {
		err = unix.Renameat2(unix.AT_FDCWD, db, unix.AT_FDCWD, output, unix.RENAME_NOREPLACE)
		if errors.Is(err, unix.EINVAL) { // a filesystem without the flag
			err = os.Rename(db, output)
		}
		if errors.Is(err, unix.EEXIST) {
			putBack()
			return keepAside, fmt.Errorf("%s appeared while the restore ran: kept; use -force to overwrite it", output)
		}
	} else {
		err = os.Rename(db, output)
	}
	if err != nil {
		putBack()
		return keepAside, fmt.Errorf("put the restored database in place: %w", err)
	}
	return false, nil
}

// takeOwner gives the restored file the owner, group and mode of the
// database it replaces, or, when it replaces none and the restore runs as
// root, the owner and group of the directory it goes into: restored by
// root for an application that runs as another user, it was owned by root
// and the application could not write to it.
func takeOwner(f *os.File, output string) error {
	var old unix.Stat_t
	err := unix.Lstat(output, &old)
	if err == nil && old.Mode&unix.S_IFMT == unix.S_IFREG {
		if err := f.Chmod(os.FileMode(old.Mode & 0o777)); err != nil {
			return err
		}
		if os.Geteuid() == 0 {
			return f.Chown(int(old.Uid), int(old.Gid))
		}
		return nil
	}
	if os.Geteuid() != 0 || err == nil {
		return nil // not root, or output is not a plain file (swapped since the check): the defaults
	}
	var dir unix.Stat_t
	if err := unix.Stat(filepath.Dir(output), &dir); err != nil {
		return err
	}
	return f.Chown(int(dir.Uid), int(dir.Gid))
}

func fileName(f ltx.FileInfo) string {
	return fmt.Sprintf("level %d file %s", f.Level, ltx.FormatFilename(f.MinTXID, f.MaxTXID))
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// Close closes the body, which a failed apply does to end a stalled read.
func (c *countingReader) Close() error {
	if cl, ok := c.r.(io.Closer); ok {
		return cl.Close()
	}
	return nil
}

// prefetchBytes is how much of each file queued for a restore is read
// ahead, up to Parallelism files ahead of the one being applied.
const prefetchBytes = 16 << 20

// prefetch asks the kernel to start reading the beginning of a local file
// that a restore will apply shortly. Each history file used to start cold:
// the decoder waited for the disk on its first pages while the cores sat
// idle (a fifth of each file's time for the benchmark's 12 MB files). Only
// a hint, bounded so that a small container's page cache is not flooded.
func prefetch(f *os.File, size int64) {
	if size <= 0 || size > prefetchBytes {
		size = prefetchBytes
	}
	_ = unix.Fadvise(int(f.Fd()), 0, size, unix.FADV_WILLNEED)
}

// wholeFile is the file behind body when body reads a whole local file
// (a file replica's, or a fetched copy), which a restore reads in place
// (mapped) rather than fetching a copy first.
func wholeFile(body io.Reader) *os.File {
	switch b := body.(type) {
	case *os.File:
		return b
	case interface{ WholeFile() *os.File }:
		return b.WholeFile()
	}
	return nil
}

// fetch copies a remote body into a temporary file at path (removed at
// once: the open descriptor keeps it) and returns it for reading.
func fetch(body io.ReadCloser, path string) (io.ReadCloser, error) {
	defer body.Close()
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	os.Remove(path)
	if err := copyBody(f, body); err != nil {
		f.Close()
		return nil, err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}
