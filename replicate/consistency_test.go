package replicate

import (
	"bytes"
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends"
	"github.com/lfuse/lfuse/backends/file"
	"github.com/superfly/ltx"
)

// listOrder records when each level's listing starts and ends; the lower
// levels answer after a delay, as a cloud store's listings do.
type listOrder struct {
	*file.Client
	mu        sync.Mutex
	lowerOpen int  // lower-level listings under way
	early     bool // the snapshots were listed while a lower level was
}

func (l *listOrder) LTXFiles(ctx context.Context, level int) ([]ltx.FileInfo, error) {
	l.mu.Lock()
	if level == SnapshotLevel && l.lowerOpen > 0 {
		l.early = true
	}
	if level != SnapshotLevel {
		l.lowerOpen++
	}
	l.mu.Unlock()
	if level != SnapshotLevel {
		time.Sleep(2 * time.Millisecond) // latency, not synchronisation
		defer func() { l.mu.Lock(); l.lowerOpen--; l.mu.Unlock() }()
	}
	return l.Client.LTXFiles(ctx, level)
}

// A restore lists the snapshots only once the other levels are listed:
// retention deletes old snapshots before the files after them, so a
// snapshot seen then comes with every file that follows it. Listed at the
// same time, a timestamp restore racing retention returned an old
// snapshot alone, seconds of commits short of its target, without error.
func TestPlanListsSnapshotsLast(t *testing.T) {
	ctx := context.Background()
	c := &listOrder{Client: file.New(filepath.Join(t.TempDir(), "replica"))}
	for _, f := range []struct {
		level    int
		min, max ltx.TXID
	}{{SnapshotLevel, 1, 1}, {0, 2, 2}, {1, 2, 2}} {
		b := encodeTest(t, f.min, f.max, 1, map[uint32]byte{1: byte(f.max)})
		if err := c.WriteLTXFile(ctx, f.level, f.min, f.max, bytes.NewReader(b), int64(len(b)), backends.FileMeta{Timestamp: time.Unix(int64(f.max), 0)}); err != nil {
			t.Fatal(err)
		}
	}
	for range 5 {
		if _, err := PlanRestore(ctx, c, Target{}); err != nil {
			t.Fatal(err)
		}
	}
	if c.early {
		t.Fatal("the snapshots were listed while a lower level was still being listed")
	}
}

// retentionOrder checks, at each deletion, that no snapshot older than a
// non-snapshot file being deleted is still in the replica.
type retentionOrder struct {
	ReplicaClient
	mu       sync.Mutex
	deletes  int
	violated string
}

func (r *retentionOrder) DeleteLTXFiles(ctx context.Context, files []ltx.FileInfo) error {
	snaps, err := r.ReplicaClient.LTXFiles(ctx, SnapshotLevel)
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.deletes++
	for _, f := range files {
		if f.Level == SnapshotLevel {
			continue
		}
		for _, s := range snaps {
			if s.MaxTXID < f.MaxTXID && r.violated == "" {
				r.violated = fmt.Sprintf("level %d file %s-%s deleted while snapshot %s is still there", f.Level, f.MinTXID, f.MaxTXID, s.MaxTXID)
			}
		}
	}
	r.mu.Unlock()
	return r.ReplicaClient.DeleteLTXFiles(ctx, files)
}
