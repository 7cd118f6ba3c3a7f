package replicate

import (
	"bytes"
	"context"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/lfuse/lfuse/backends"
	"github.com/lfuse/lfuse/backends/file"
	"github.com/superfly/ltx"
)

// Restore writes each page once, newest file first; whatever the history
// (pages rewritten, the database shrinking and growing again), the result
// must be byte for byte what applying the files oldest first gives, and
// its checksum the one recorded.
func TestRestoreMatchesSequentialApply(t *testing.T) {
	rng := rand.New(rand.NewSource(2))
	ctx := context.Background()
	for trial := 0; trial < 150; trial++ {
		dir := t.TempDir()
		client := file.New(filepath.Join(dir, "replica"))
		commit := uint32(1 + rng.Intn(40))
		snap := map[uint32]byte{}
		for p := uint32(1); p <= commit; p++ {
			snap[p] = byte(rng.Intn(250) + 1)
		}
		files := [][]byte{encodeTest(t, 1, 1, commit, snap)}
		txid := ltx.TXID(2)
		for i := 0; i < rng.Intn(7); i++ {
			commit = uint32(1 + rng.Intn(40))
			pages := map[uint32]byte{}
			for p := uint32(1); p <= commit; p++ {
				if rng.Intn(3) == 0 {
					pages[p] = byte(rng.Intn(250) + 1)
				}
			}
			files = append(files, encodeTest(t, txid, txid, commit, pages))
			txid++
		}
		for i, b := range files {
			want := applyAll(t, files[:i+1])
			sum, err := ltx.ChecksumReader(bytes.NewReader(want), 512)
			if err != nil {
				t.Fatal(err)
			}
			level := 0
			if i == 0 {
				level = SnapshotLevel
			}
			id := ltx.TXID(i + 1)
			if err := client.WriteLTXFile(ctx, level, id, id, bytes.NewReader(b), int64(len(b)),
				backends.FileMeta{PostApplyChecksum: ltx.ChecksumFlag | sum}); err != nil {
				t.Fatal(err)
			}
		}
		want := applyAll(t, files)
		plan, err := PlanRestore(ctx, client, Target{})
		if err != nil {
			t.Fatal(err)
		}
		if len(plan.Files) != len(files) {
			t.Fatalf("trial %d: plan of %d files for %d", trial, len(plan.Files), len(files))
		}
		out := filepath.Join(dir, "restored.db")
		if _, err := Restore(ctx, client, plan, out, RestoreOptions{}); err != nil {
			t.Fatalf("trial %d: %v", trial, err)
		}
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("trial %d (%d files): restored database differs from sequential apply", trial, len(files))
		}
	}
}
