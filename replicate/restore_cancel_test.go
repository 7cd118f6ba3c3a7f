package replicate

import (
	"bytes"
	"context"
	"math/rand"
	"path/filepath"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends"
	"github.com/lfuse/lfuse/backends/file"
	"github.com/superfly/ltx"
)

// A restore cancelled at any moment returns. (Found in CI: restore -data
// hung when one database failed and cancelled the others. A cancellation
// that reached the download dispatcher just as the applier caught up with
// it left the applier waiting for a download slot no download held.)
func TestRestoreCancelledAnywhereReturns(t *testing.T) {
	dir := t.TempDir()
	client := file.New(filepath.Join(dir, "replica"))
	ctx := context.Background()
	const n = 60
	var files [][]byte
	for id := ltx.TXID(1); id <= n; id++ {
		level := 0
		if id == 1 {
			level = SnapshotLevel
		}
		pages := map[uint32]byte{}
		for p := uint32(1); p <= 8; p++ {
			if id == 1 || p == uint32(id%8)+1 {
				pages[p] = byte(id)
			}
		}
		b := encodeTest(t, id, id, 8, pages)
		files = append(files, b)
		sum, err := ltx.ChecksumReader(bytes.NewReader(applyAll(t, files)), 512)
		if err != nil {
			t.Fatal(err)
		}
		if err := client.WriteLTXFile(ctx, level, id, id, bytes.NewReader(b), int64(len(b)),
			backends.FileMeta{PostApplyChecksum: ltx.ChecksumFlag | sum}); err != nil {
			t.Fatal(err)
		}
	}
	plan := mustPlan(t, client)
	if len(plan.Files) != n {
		t.Fatalf("plan of %d files, want %d", len(plan.Files), n)
	}
	start := time.Now()
	if _, err := Restore(ctx, client, plan, filepath.Join(dir, "whole.db"), RestoreOptions{}); err != nil {
		t.Fatal(err)
	}
	whole := time.Since(start)

	rng := rand.New(rand.NewSource(1))
	for trial := range 300 {
		cctx, cancel := context.WithCancel(ctx)
		timer := time.AfterFunc(time.Duration(rng.Int63n(int64(whole)+1)), cancel)
		done := make(chan error, 1)
		go func() {
			_, err := Restore(cctx, client, plan, filepath.Join(dir, "out.db"), RestoreOptions{Parallelism: 1 + trial%3})
			done <- err
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("trial %d: a cancelled restore did not return", trial)
		}
		timer.Stop()
		cancel()
	}
}
