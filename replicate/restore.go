package replicate

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

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
}

// ErrNoBackup is returned when a replica holds nothing for a database.
var ErrNoBackup = errors.New("the replica holds no backup of this database")

// PlanRestore lists every level of the replica once and picks the files that
// restore target.
func PlanRestore(ctx context.Context, client ReplicaClient, target Target) (Plan, error) {
	start := time.Now()
	var levels [SnapshotLevel + 1][]ltx.FileInfo
	var newest *ltx.FileInfo
	for level := range levels {
		files, err := client.LTXFiles(ctx, level)
		if err != nil {
			return Plan{}, fmt.Errorf("list level %d of %s: %w", level, client, err)
		}
		levels[level] = files
		for i := range files {
			if newest == nil || files[i].MaxTXID > newest.MaxTXID {
				newest = &files[i]
			}
		}
	}
	plan := Plan{ListTime: time.Since(start)}
	snaps := levels[SnapshotLevel]
	if len(snaps) == 0 {
		return plan, ErrNoBackup
	}
	within := func(f ltx.FileInfo) bool {
		return (target.TXID == 0 || f.MaxTXID <= target.TXID) && (target.Time.IsZero() || !f.CreatedAt.After(target.Time))
	}
	if target.TXID > newest.MaxTXID {
		return plan, fmt.Errorf("TXID %s is after the newest backup (TXID %s, committed %s)", target.TXID, newest.MaxTXID, newest.CreatedAt.Format(time.RFC3339))
	}
	if !target.Time.IsZero() && target.Time.After(newest.CreatedAt) && target.Time.After(time.Now()) {
		return plan, fmt.Errorf("timestamp %s is in the future; the newest backup was committed %s", target.Time.Format(time.RFC3339), newest.CreatedAt.Format(time.RFC3339))
	}
	snap := -1
	for i, s := range snaps {
		if within(s) && (snap < 0 || s.MaxTXID > snaps[snap].MaxTXID) {
			snap = i
		}
	}
	if snap < 0 {
		oldest := snaps[0]
		return plan, fmt.Errorf("%s is before the oldest backup (snapshot at TXID %s, committed %s)", target, oldest.MaxTXID, oldest.CreatedAt.Format(time.RFC3339))
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
		return plan, fmt.Errorf("gap in the TXID chain: no file continues TXID %s; the next one, %s, starts at TXID %s", cur.MaxTXID, fileName(*gap), gap.MinTXID)
	}
	if target.TXID != 0 && cur.MaxTXID != target.TXID {
		return plan, fmt.Errorf("TXID %s cannot be restored exactly: it falls inside a batch of commits; the nearest restorable TXIDs are %s and %s (see lfuse ltx)",
			target.TXID, cur.MaxTXID, nextBoundary(levels[:], cur.MaxTXID))
	}
	plan.TXID, plan.Timestamp = cur.MaxTXID, cur.CreatedAt
	for _, f := range plan.Files {
		plan.Bytes += f.Size
	}
	return plan, nil
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

// RestoreOptions tune Restore.
type RestoreOptions struct {
	Parallelism int          // concurrent downloads; default 8
	Logger      *slog.Logger // default slog.Default()
	Progress    func(done, total int64)
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
// and only then moves it to output. Stale -wal and -shm files of output are
// removed. Memory is bounded: files stream through temporary files.
func Restore(ctx context.Context, client ReplicaClient, plan Plan, output string, opts RestoreOptions) (RestoreStats, error) {
	var st RestoreStats
	if opts.Parallelism <= 0 {
		opts.Parallelism = 8
	}
	if len(plan.Files) == 0 {
		return st, ErrNoBackup
	}
	last := plan.Files[len(plan.Files)-1]
	meta, err := client.FileMeta(ctx, last.Level, last.MinTXID, last.MaxTXID)
	if err != nil {
		return st, fmt.Errorf("%s: read the checksum recorded with %s: %w", client, fileName(last), err)
	}

	dir := filepath.Dir(output)
	tmpDir, err := os.MkdirTemp(dir, ".lfuse-restore-*")
	if err != nil {
		return st, err
	}
	defer os.RemoveAll(tmpDir)
	out, err := os.Create(filepath.Join(tmpDir, "db"))
	if err != nil {
		return st, err
	}
	defer out.Close()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type download struct {
		path string
		err  error
		took time.Duration
	}
	results := make([]chan download, len(plan.Files))
	for i := range results {
		results[i] = make(chan download, 1)
	}
	sem := make(chan struct{}, opts.Parallelism)
	var wg sync.WaitGroup
	defer wg.Wait()
	go func() {
		for i, f := range plan.Files {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				for _, ch := range results[i:] {
					ch <- download{err: ctx.Err()}
				}
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				start := time.Now()
				path := filepath.Join(tmpDir, fmt.Sprintf("%d.ltx", i))
				err := fetch(ctx, client, f, path)
				results[i] <- download{path: path, err: err, took: time.Since(start)}
			}()
		}
	}()

	var sum ltx.Checksum
	var pageSize uint32
	var done int64
	for i, f := range plan.Files {
		waitStart := time.Now()
		d := <-results[i]
		st.Download += time.Since(waitStart)
		<-sem
		if d.err != nil {
			return st, fmt.Errorf("%s: download %s: %w", client, fileName(f), d.err)
		}
		applyStart := time.Now()
		hdr, err := applyFile(d.path, out, &sum, i == 0)
		os.Remove(d.path)
		if err != nil {
			return st, fmt.Errorf("%s: %s is corrupt or does not fit: %w", client, fileName(f), err)
		}
		st.Apply += time.Since(applyStart)
		if i == 0 {
			pageSize = hdr.PageSize
		} else if hdr.PageSize != pageSize {
			return st, fmt.Errorf("%s: %s has page size %d, the snapshot %d", client, fileName(f), hdr.PageSize, pageSize)
		}
		st.Files++
		st.Bytes += f.Size
		done += f.Size
		if opts.Progress != nil {
			opts.Progress(done, plan.Bytes)
		}
	}
	verifyStart := time.Now()
	// Page checksums carry the flag bit, which XOR toggles; the database
	// checksum always has it set.
	sum = ltx.ChecksumFlag | sum
	if sum != meta.PostApplyChecksum {
		return st, fmt.Errorf("%s: the restored database has checksum %s, but %s was recorded with %s: refusing to write it",
			client, sum, fileName(last), meta.PostApplyChecksum)
	}
	st.Verify = time.Since(verifyStart)
	syncStart := time.Now()
	if fi, err := out.Stat(); err == nil {
		st.DBBytes = fi.Size()
	}
	if err := out.Sync(); err != nil {
		return st, err
	}
	if err := out.Close(); err != nil {
		return st, err
	}
	if err := os.Rename(out.Name(), output); err != nil {
		return st, err
	}
	for _, suffix := range []string{"-wal", "-shm"} {
		if err := os.Remove(output + suffix); err != nil && !errors.Is(err, os.ErrNotExist) {
			return st, fmt.Errorf("remove stale %s: %w", output+suffix, err)
		}
	}
	if err := syncDir(dir); err != nil {
		return st, err
	}
	st.Sync = time.Since(syncStart)
	return st, nil
}

func fileName(f ltx.FileInfo) string {
	return fmt.Sprintf("level %d file %s", f.Level, ltx.FormatFilename(f.MinTXID, f.MaxTXID))
}

// fetch downloads one file to path.
func fetch(ctx context.Context, client ReplicaClient, f ltx.FileInfo, path string) error {
	rc, err := client.OpenLTXFile(ctx, f.Level, f.MinTXID, f.MaxTXID)
	if err != nil {
		return err
	}
	defer rc.Close()
	w, err := os.Create(path)
	if err != nil {
		return err
	}
	n, err := io.Copy(w, rc)
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if err == nil && f.Size > 0 && n != f.Size {
		err = fmt.Errorf("got %d bytes, the listing said %d", n, f.Size)
	}
	return err
}

// applyFile applies one downloaded LTX file to out, keeping *sum, the
// database checksum, up to date page by page so that verifying the result
// needs no second read of the database.
func applyFile(path string, out *os.File, sum *ltx.Checksum, first bool) (ltx.Header, error) {
	f, err := os.Open(path)
	if err != nil {
		return ltx.Header{}, err
	}
	defer f.Close()
	dec := ltx.NewDecoder(bufio.NewReaderSize(f, 256<<10))
	dec.SetRetainPageIndex(false)
	if err := dec.DecodeHeader(); err != nil {
		return ltx.Header{}, err
	}
	hdr := dec.Header()
	if first != hdr.IsSnapshot() {
		if first {
			return hdr, errors.New("the first file of a restore must be a snapshot")
		}
		return hdr, errors.New("unexpected snapshot in the middle of a restore")
	}
	lock := ltx.LockPgno(hdr.PageSize)
	if first {
		// A snapshot holds every page in order: write it sequentially.
		w := bufio.NewWriterSize(out, 1<<20)
		*sum = ltx.ChecksumFlag
		data := make([]byte, hdr.PageSize)
		zero := make([]byte, hdr.PageSize)
		for pgno := uint32(1); pgno <= hdr.Commit; pgno++ {
			buf := zero
			if pgno != lock {
				var ph ltx.PageHeader
				if err := dec.DecodePage(&ph, data); err != nil {
					return hdr, fmt.Errorf("page %d: %w", pgno, err)
				} else if ph.Pgno != pgno {
					return hdr, fmt.Errorf("snapshot page %d where %d was expected", ph.Pgno, pgno)
				}
				buf = data
				*sum ^= ltx.ChecksumPage(pgno, data)
			}
			if _, err := w.Write(buf); err != nil {
				return hdr, err
			}
		}
		var ph ltx.PageHeader
		if err := dec.DecodePage(&ph, data); !errors.Is(err, io.EOF) {
			return hdr, fmt.Errorf("snapshot holds more pages than its size of %d", hdr.Commit)
		}
		if err := dec.Close(); err != nil {
			return hdr, err
		}
		return hdr, w.Flush()
	}

	fi, err := out.Stat()
	if err != nil {
		return hdr, err
	}
	size := uint32(fi.Size() / int64(hdr.PageSize))
	data := make([]byte, hdr.PageSize)
	old := make([]byte, hdr.PageSize)
	zero := make([]byte, hdr.PageSize)
	for {
		var ph ltx.PageHeader
		if err := dec.DecodePage(&ph, data); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return hdr, err
		}
		if ph.Pgno > hdr.Commit || ph.Pgno == lock {
			return hdr, fmt.Errorf("page %d outside the database of %d pages", ph.Pgno, hdr.Commit)
		}
		off := int64(ph.Pgno-1) * int64(hdr.PageSize)
		if ph.Pgno <= size {
			if _, err := out.ReadAt(old, off); err != nil {
				return hdr, err
			}
			*sum ^= ltx.ChecksumPage(ph.Pgno, old)
		}
		if _, err := out.WriteAt(data, off); err != nil {
			return hdr, err
		}
		*sum ^= ltx.ChecksumPage(ph.Pgno, data)
		if ph.Pgno > size {
			// Pages skipped over when the file grew read as zeros.
			for p := size + 1; p < ph.Pgno; p++ {
				if p != lock {
					*sum ^= ltx.ChecksumPage(p, zero)
				}
			}
			size = ph.Pgno
		}
	}
	if err := dec.Close(); err != nil {
		return hdr, err
	}
	// Pages cut off by a smaller commit size leave the checksum.
	for p := hdr.Commit + 1; p <= size; p++ {
		if p == lock {
			continue
		}
		if _, err := out.ReadAt(old, int64(p-1)*int64(hdr.PageSize)); err != nil {
			return hdr, err
		}
		*sum ^= ltx.ChecksumPage(p, old)
	}
	// Pages added by a larger commit size without being written are zeros.
	for p := size + 1; p <= hdr.Commit; p++ {
		if p != lock {
			*sum ^= ltx.ChecksumPage(p, zero)
		}
	}
	return hdr, out.Truncate(int64(hdr.Commit) * int64(hdr.PageSize))
}
