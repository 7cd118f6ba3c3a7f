package integration

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/lfuse/lfuse/backends/file"
)

// litestreamBin finds the Litestream binary scripts/litestream.sh installs.
func litestreamBin(t *testing.T) string {
	if p := os.Getenv("LFUSE_LITESTREAM"); p != "" {
		return p
	}
	if p, err := exec.LookPath("litestream"); err == nil {
		return p
	}
	if out, err := exec.Command("../scripts/litestream.sh").Output(); err == nil {
		return string(bytes.TrimSpace(out))
	}
	if os.Getenv("LFUSE_REQUIRE_FUSE") == "1" {
		t.Fatal("litestream is not installed and scripts/litestream.sh failed")
	}
	t.Skip("litestream not installed: run scripts/litestream.sh")
	return ""
}

// Litestream v0.5 restores what lfuse replicates, byte for byte, to the
// newest state and to a TXID.
func TestLitestreamRestoresReplica(t *testing.T) {
	e := newEnv(t)
	bin := litestreamBin(t)
	cfgPath, repl := e.replicaConfig("")
	e.replicateSeq(cfgPath, 300)

	url := "file://" + repl + "/app.db"
	// lfuse's deletion record sits beside ltx/, where Litestream does not
	// look (it would be there had the database been deleted).
	if err := file.New(filepath.Join(repl, "app.db")).WriteMarker(context.Background(), "lfuse-deleted.json", []byte("{}")); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(e.root, "litestream.db")
	if o, err := exec.Command(bin, "restore", "-o", out, url).CombinedOutput(); err != nil {
		t.Fatalf("litestream restore: %v\n%s", err, o)
	}
	got, _ := os.ReadFile(out)
	if want := liveBytes(t, e); !bytes.Equal(got, want) {
		t.Fatalf("litestream restored %d bytes, different from the live %d bytes at %s", len(got), len(want), firstDiff(got, want))
	}

	// A TXID in the middle: the end of a level-0 file.
	l0, err := file.New(filepath.Join(repl, "app.db")).LTXFiles(context.Background(), 0)
	if err != nil || len(l0) < 4 {
		t.Fatalf("%d level-0 files: %v", len(l0), err)
	}
	mid := l0[len(l0)/2].MaxTXID
	os.Remove(out)
	if o, err := exec.Command(bin, "restore", "-o", out, "-txid", mid.String(), url).CombinedOutput(); err != nil {
		t.Fatalf("litestream restore -txid %s: %v\n%s", mid, err, o)
	}
	ours := filepath.Join(e.root, "lfuse.db")
	if code, log := runLfuse(t, "restore", "-o", ours, "-txid", mid.String(), url); code != 0 {
		t.Fatalf("lfuse restore -txid %s: %d\n%s", mid, code, log)
	}
	a, _ := os.ReadFile(out)
	b, _ := os.ReadFile(ours)
	if !bytes.Equal(a, b) {
		t.Fatalf("at TXID %s Litestream and lfuse restore different databases", mid)
	}
	if k := seqRows(t, out); k < 1 || k >= 300 {
		t.Fatalf("litestream restore -txid %s holds %d rows", mid, k)
	}
}
