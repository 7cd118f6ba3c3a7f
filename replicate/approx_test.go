package replicate

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends"
	"github.com/lfuse/lfuse/backends/file"
	"github.com/superfly/ltx"
)

// lateLister lists upload times, as S3 does: each file's time shows up to
// lag after its commit time, which only FileMeta has.
type lateLister struct {
	*file.Client
	lag   func(ltx.FileInfo) time.Duration
	metas int
}

func (l *lateLister) ListTimesApprox() bool { return true }

func (l *lateLister) LTXFiles(ctx context.Context, level int) ([]ltx.FileInfo, error) {
	files, err := l.Client.LTXFiles(ctx, level)
	for i := range files {
		files[i].CreatedAt = files[i].CreatedAt.Add(l.lag(files[i]))
	}
	return files, err
}

func (l *lateLister) FileMeta(ctx context.Context, level int, min, max ltx.TXID) (backends.FileMeta, error) {
	l.metas++
	return l.Client.FileMeta(ctx, level, min, max)
}

// With upload times in the listing, a timestamp restore still picks the
// files committed by then, reading the commit times of a few files only.
func TestPlanWithUploadTimes(t *testing.T) {
	ctx := context.Background()
	exact := file.New(filepath.Join(t.TempDir(), "replica"))
	write := func(level int, min, max ltx.TXID) {
		b := encodeTest(t, min, max, 1, map[uint32]byte{1: byte(max)})
		// encodeTest's header time is max seconds; the file backend lists
		// its mtime, which WriteLTXFile sets from the meta time below.
		if err := exact.WriteLTXFile(ctx, level, min, max, bytes.NewReader(b), int64(len(b)),
			backends.FileMeta{Timestamp: time.Unix(int64(max), 500e6)}); err != nil {
			t.Fatal(err)
		}
	}
	write(SnapshotLevel, 1, 1)
	for id := ltx.TXID(2); id <= 200; id++ {
		write(0, id, id)
	}
	write(1, 2, 100)
	late := &lateLister{Client: exact, lag: func(f ltx.FileInfo) time.Duration {
		// Uneven upload delays, and times cut to the second (a commit at
		// 5.5 s listed at 5 s).
		return time.Duration(f.MaxTXID%7)*time.Second - 500*time.Millisecond
	}}
	for _, ms := range []int64{1500, 2000, 2600, 7_100, 98_200, 140_300, 140_450, 50_000, 99_400, 99_500, 100_700, 150_000, 199_999, 200_500, 500_000} {
		sec := ms
		target := Target{Time: time.UnixMilli(ms)}
		want, err := PlanRestore(ctx, exact, target)
		if err != nil {
			t.Fatal(err)
		}
		late.metas = 0
		got, err := PlanRestore(ctx, late, target)
		if err != nil {
			t.Fatalf("at %d: %v", sec, err)
		}
		if got.TXID != want.TXID || len(got.Files) != len(want.Files) || !got.Timestamp.Equal(want.Timestamp) {
			t.Fatalf("at %d s: TXID %s in %d files at %s, want %s in %d files at %s", sec,
				got.TXID, len(got.Files), got.Timestamp, want.TXID, len(want.Files), want.Timestamp)
		}
		if late.metas > 40 {
			t.Errorf("at %d s: %d metadata reads for 200 files", sec, late.metas)
		}
	}
}

// A file replica copied without its times (cp -r) lists the copy's times:
// a restore to a point in time still picks the files committed by then.
func TestPlanFromCopiedFileReplica(t *testing.T) {
	ctx := context.Background()
	root := filepath.Join(t.TempDir(), "replica")
	c := file.New(root)
	write := func(level int, min, max ltx.TXID) {
		b := encodeTest(t, min, max, 1, map[uint32]byte{1: byte(max)})
		if err := c.WriteLTXFile(ctx, level, min, max, bytes.NewReader(b), int64(len(b)),
			backends.FileMeta{Timestamp: time.Unix(int64(max), 500e6)}); err != nil {
			t.Fatal(err)
		}
	}
	write(SnapshotLevel, 1, 1)
	for id := ltx.TXID(2); id <= 60; id++ {
		write(0, id, id)
	}
	write(1, 2, 30)
	targets := []int64{1600, 2600, 29_500, 30_700, 45_000, 60_600}
	want := map[int64]ltx.TXID{}
	for _, ms := range targets {
		p, err := PlanRestore(ctx, c, Target{Time: time.UnixMilli(ms)})
		if err != nil {
			t.Fatal(err)
		}
		want[ms] = p.TXID
	}
	// The copy: every file gets the time it was copied, long after its
	// commit, one after another.
	copied := time.UnixMilli(40_000)
	matches, _ := filepath.Glob(filepath.Join(root, "ltx", "*", "*.ltx"))
	for i, m := range matches {
		at := copied.Add(time.Duration(i) * time.Millisecond)
		if err := os.Chtimes(m, at, at); err != nil {
			t.Fatal(err)
		}
	}
	for _, ms := range targets {
		p, err := PlanRestore(ctx, c, Target{Time: time.UnixMilli(ms)})
		if err != nil || p.TXID != want[ms] {
			t.Errorf("at %d ms: TXID %s, %v; want %s as before the copy", ms, p.TXID, err, want[ms])
		}
	}
}
