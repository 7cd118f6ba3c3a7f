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
	"runtime"
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
		rc   io.ReadCloser
		err  error
		took time.Duration
	}
	results := make([]chan download, len(plan.Files))
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
			if i == 0 {
				// The snapshot, usually most of the bytes, streams
				// straight into the apply; the files after it are
				// fetched meanwhile.
				rc, err := client.OpenLTXFile(ctx, f.Level, f.MinTXID, f.MaxTXID)
				results[i] <- download{rc: rc, err: err}
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				start := time.Now()
				rc, err := client.OpenLTXFile(ctx, f.Level, f.MinTXID, f.MaxTXID)
				if err == nil {
					if _, local := rc.(*os.File); !local {
						// A remote body: fetch it now, while earlier
						// files are applied.
						rc, err = fetch(rc, filepath.Join(tmpDir, fmt.Sprintf("%d.ltx", i)))
					}
				}
				results[i] <- download{rc: rc, err: err, took: time.Since(start)}
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
		cr := &countingReader{r: d.rc}
		hdr, err := applyFile(cr, out, &sum, i == 0)
		d.rc.Close()
		if err == nil && f.Size > 0 && cr.n != f.Size {
			err = fmt.Errorf("read %d bytes, the listing said %d", cr.n, f.Size)
		}
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

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
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
	if _, err := io.Copy(f, body); err != nil {
		f.Close()
		return nil, err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// applyFile applies one LTX file to out, keeping *sum, the database
// checksum, up to date page by page so that verifying the result needs no
// second read of the database.
//
// It is a pipeline, because CRC-64 is most of the cost: one goroutine
// decodes (LZ4, and the file's own CRC), workers checksum batches of pages
// (reading the pages they replace), and the caller writes them in order.
// Memory is a few batches of pages, whatever the database size.
func applyFile(r io.Reader, out *os.File, sum *ltx.Checksum, first bool) (ltx.Header, error) {
	dec := ltx.NewDecoder(bufio.NewReaderSize(r, 1<<20))
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
	pageSize := int(hdr.PageSize)
	lock := ltx.LockPgno(hdr.PageSize)
	var size uint32 // pages in out before this file
	if first {
		*sum = 0
		if err := out.Truncate(0); err != nil {
			return hdr, err
		}
	} else {
		fi, err := out.Stat()
		if err != nil {
			return hdr, err
		}
		size = uint32(fi.Size() / int64(pageSize))
	}

	type batch struct {
		pgnos []uint32
		data  []byte
		sum   ltx.Checksum
		err   error
		done  chan struct{}
	}
	const batchPages = 256
	pool := sync.Pool{New: func() any {
		return &batch{pgnos: make([]uint32, 0, batchPages), data: make([]byte, 0, batchPages*pageSize)}
	}}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	work := make(chan *batch, 4)
	ordered := make(chan *batch, 8)
	var decErr error
	go func() { // decode
		defer close(work)
		defer close(ordered)
		b := pool.Get().(*batch)
		send := func() bool {
			if len(b.pgnos) == 0 {
				return true
			}
			b.done = make(chan struct{})
			select {
			case work <- b:
			case <-ctx.Done():
				return false
			}
			select {
			case ordered <- b:
			case <-ctx.Done():
				return false
			}
			b = pool.Get().(*batch)
			b.pgnos, b.data, b.sum, b.err = b.pgnos[:0], b.data[:0], 0, nil
			return true
		}
		var prev uint32
		for {
			if len(b.pgnos) == batchPages && !send() {
				return
			}
			n := len(b.data)
			b.data = b.data[:n+pageSize]
			var ph ltx.PageHeader
			err := dec.DecodePage(&ph, b.data[n:])
			if errors.Is(err, io.EOF) {
				b.data = b.data[:n]
				break
			} else if err != nil {
				decErr = err
				return
			}
			switch {
			case ph.Pgno > hdr.Commit || ph.Pgno == lock || ph.Pgno <= prev:
				decErr = fmt.Errorf("page %d out of order or outside the database of %d pages", ph.Pgno, hdr.Commit)
				return
			case first && ph.Pgno != prev+1 && !(ph.Pgno == lock+1 && prev == lock-1):
				decErr = fmt.Errorf("snapshot page %d follows page %d", ph.Pgno, prev)
				return
			}
			prev = ph.Pgno
			b.pgnos = append(b.pgnos, ph.Pgno)
		}
		if first && prev != hdr.Commit && !(prev == lock-1 && hdr.Commit == lock) {
			decErr = fmt.Errorf("snapshot ends at page %d of %d", prev, hdr.Commit)
			return
		}
		if !send() {
			return
		}
		decErr = dec.Close()
	}()
	workers := max(1, runtime.GOMAXPROCS(0)-1)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() { // checksum: the new pages in, the pages they replace out
			defer wg.Done()
			old := make([]byte, pageSize)
			for b := range work {
				for i, pgno := range b.pgnos {
					page := b.data[i*pageSize : (i+1)*pageSize]
					b.sum ^= ltx.ChecksumPage(pgno, page)
					if pgno <= size {
						if _, err := out.ReadAt(old, int64(pgno-1)*int64(pageSize)); err != nil {
							b.err = err
							break
						}
						b.sum ^= ltx.ChecksumPage(pgno, old)
					}
				}
				close(b.done)
			}
		}()
	}
	defer wg.Wait()

	zero := make([]byte, pageSize)
	w := bufio.NewWriterSize(out, 1<<20)
	grown := size // pages out holds, as written so far
	for b := range ordered {
		<-b.done
		if b.err != nil {
			cancel()
			return hdr, b.err
		}
		*sum ^= b.sum
		for i, pgno := range b.pgnos {
			page := b.data[i*pageSize : (i+1)*pageSize]
			if first {
				if pgno == lock+1 {
					if _, err := w.Write(zero); err != nil { // the lock page
						cancel()
						return hdr, err
					}
				}
				if _, err := w.Write(page); err != nil {
					cancel()
					return hdr, err
				}
				continue
			}
			// Pages skipped over when the file grows read as zeros.
			for p := grown + 1; p < pgno; p++ {
				if p != lock {
					*sum ^= ltx.ChecksumPage(p, zero)
				}
			}
			grown = max(grown, pgno)
			if _, err := out.WriteAt(page, int64(pgno-1)*int64(pageSize)); err != nil {
				cancel()
				return hdr, err
			}
		}
		pool.Put(b)
	}
	if decErr != nil {
		return hdr, decErr
	}
	if first {
		if hdr.Commit == lock {
			if _, err := w.Write(zero); err != nil {
				return hdr, err
			}
		}
		return hdr, w.Flush()
	}
	// Pages cut off by a smaller commit size leave the checksum; pages added
	// by a larger one without being written are zeros.
	old := make([]byte, pageSize)
	for p := hdr.Commit + 1; p <= grown; p++ {
		if p == lock {
			continue
		}
		if _, err := out.ReadAt(old, int64(p-1)*int64(pageSize)); err != nil {
			return hdr, err
		}
		*sum ^= ltx.ChecksumPage(p, old)
	}
	for p := grown + 1; p <= hdr.Commit; p++ {
		if p != lock {
			*sum ^= ltx.ChecksumPage(p, zero)
		}
	}
	return hdr, out.Truncate(int64(hdr.Commit) * int64(pageSize))
}
