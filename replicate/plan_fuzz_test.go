package replicate

import (
	"cmp"
	"context"
	"errors"
	"io"
	"slices"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends"
	"github.com/superfly/ltx"
)

// listing is a replica that only lists: the restore planner's whole input.
type listing struct {
	files  [SnapshotLevel + 1][]ltx.FileInfo
	approx bool
}

func (l *listing) Type() string   { return "fuzz" }
func (l *listing) String() string { return "fuzz://" }
func (l *listing) LTXFiles(ctx context.Context, level int) ([]ltx.FileInfo, error) {
	return slices.Clone(l.files[level]), nil
}
func (l *listing) OpenLTXFile(context.Context, int, ltx.TXID, ltx.TXID, int64, int64) (io.ReadCloser, error) {
	return nil, errors.New("not here")
}
func (l *listing) WriteLTXFile(context.Context, int, ltx.TXID, ltx.TXID, io.Reader, int64, backends.FileMeta) error {
	return errors.New("not here")
}
func (l *listing) FileMeta(ctx context.Context, level int, min, max ltx.TXID) (backends.FileMeta, error) {
	for _, f := range l.files[level] {
		if f.MinTXID == min && f.MaxTXID == max {
			return backends.FileMeta{Timestamp: f.CreatedAt}, nil
		}
	}
	return backends.FileMeta{}, backends.ErrNotFound
}
func (l *listing) DeleteLTXFiles(context.Context, []ltx.FileInfo) error {
	return errors.New("not here")
}
func (l *listing) WriteMarker(context.Context, string, []byte) error { return errors.New("not here") }
func (l *listing) ReadMarker(context.Context, string) ([]byte, error) {
	return nil, backends.ErrNotFound
}
func (l *listing) DeleteMarker(context.Context, string) error { return errors.New("not here") }
func (l *listing) ListTimesApprox() bool                      { return l.approx }

// Whatever a replica lists, the planner never panics, and a plan it returns
// is a chain: a snapshot, then files that each continue the previous one
// and go further, ending exactly at the plan's TXID, all within the target.
func FuzzPlanRestore(f *testing.F) {
	f.Add([]byte{9, 0, 5, 1, 0, 3, 2, 9, 0, 0, 7, 7}, uint8(0), uint8(0), false)
	f.Add([]byte{9, 0, 9, 1, 0, 10, 4, 2, 1, 0, 3, 3, 9, 0, 20, 9}, uint8(12), uint8(0), false)
	f.Add([]byte{9, 0, 3, 1, 0, 4, 0, 2, 0, 5, 2, 3}, uint8(0), uint8(3), true)
	f.Fuzz(func(t *testing.T, data []byte, txid, secs uint8, approx bool) {
		l := &listing{approx: approx}
		base := time.Unix(1_700_000_000, 0)
		for i := 0; i+4 <= len(data); i += 4 {
			level := int(data[i]) % (SnapshotLevel + 1)
			min := ltx.TXID(data[i+1]%64) + 1
			if level == SnapshotLevel {
				min = 1
			}
			max := min + ltx.TXID(data[i+2]%32)
			l.files[level] = append(l.files[level], ltx.FileInfo{Level: level, MinTXID: min, MaxTXID: max,
				Size: 100, CreatedAt: base.Add(time.Duration(data[i+3]) * time.Second)})
		}
		for level := range l.files {
			slices.SortStableFunc(l.files[level], func(a, b ltx.FileInfo) int { return cmp.Compare(a.MinTXID, b.MinTXID) })
		}
		target := Target{TXID: ltx.TXID(txid)}
		if secs > 0 {
			target = Target{Time: base.Add(time.Duration(secs) * time.Second)}
		}
		plan, err := PlanRestore(context.Background(), l, target)
		if err != nil {
			return
		}
		if len(plan.Files) == 0 || plan.Files[0].Level != SnapshotLevel {
			t.Fatalf("a plan without a snapshot first: %+v", plan.Files)
		}
		for i := 1; i < len(plan.Files); i++ {
			prev, f := plan.Files[i-1], plan.Files[i]
			if f.MinTXID > prev.MaxTXID+1 || f.MaxTXID <= prev.MaxTXID {
				t.Fatalf("file %d (%s-%s) does not continue %s-%s", i, f.MinTXID, f.MaxTXID, prev.MinTXID, prev.MaxTXID)
			}
		}
		last := plan.Files[len(plan.Files)-1]
		if plan.TXID != last.MaxTXID || (target.TXID != 0 && plan.TXID != target.TXID) {
			t.Fatalf("plan ends at %s, its last file at %s, the target is %s", plan.TXID, last.MaxTXID, target)
		}
		if !target.Time.IsZero() && plan.Timestamp.After(target.Time) {
			t.Fatalf("plan committed %s, after the target %s", plan.Timestamp, target.Time)
		}
	})
}
