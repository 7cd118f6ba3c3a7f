package file

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends"
	"github.com/lfuse/lfuse/backends/backendtest"
	"github.com/superfly/ltx"
)

func TestClient(t *testing.T) {
	ctx := context.Background()
	root := filepath.Join(t.TempDir(), "replica", "app.db")
	c := New(root)
	if files, err := c.LTXFiles(ctx, 0); err != nil || len(files) != 0 {
		t.Fatalf("empty replica: %v %v", files, err)
	}
	ts := time.Date(2026, 11, 22, 6, 0, 0, 123e6, time.UTC)
	meta := backends.FileMeta{Timestamp: ts, PostApplyChecksum: ltx.ChecksumFlag | 42}
	for _, r := range [][2]ltx.TXID{{5, 9}, {1, 4}, {10, 10}} {
		body := strings.Repeat("x", int(r[1]))
		if err := c.WriteLTXFile(ctx, 0, r[0], r[1], strings.NewReader(body), int64(len(body)), meta); err != nil {
			t.Fatal(err)
		}
	}
	// A short body is refused and leaves nothing behind.
	if err := c.WriteLTXFile(ctx, 0, 11, 12, strings.NewReader("ab"), 5, meta); err == nil {
		t.Fatal("a short body was accepted")
	}
	// Names that are not LTX files, and symlinks, are not listed.
	os.WriteFile(filepath.Join(root, "ltx", "0", "notes.txt"), nil, 0o644)
	os.Symlink("/etc/passwd", filepath.Join(root, "ltx", "0", ltx.FormatFilename(20, 20)))

	files, err := c.LTXFiles(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 3 || files[0].MinTXID != 1 || files[1].MinTXID != 5 || files[2].MinTXID != 10 {
		t.Fatalf("listing: %+v", files)
	}
	if files[1].Size != 9 || !files[1].CreatedAt.Equal(ts) {
		t.Fatalf("file 5-9: size %d, time %s (want the commit time as mtime)", files[1].Size, files[1].CreatedAt)
	}
	got, err := c.FileMeta(ctx, 0, 5, 9)
	if err != nil || got.PostApplyChecksum != meta.PostApplyChecksum || !got.Timestamp.Equal(ts) {
		t.Fatalf("meta: %+v %v", got, err)
	}
	rc, err := c.OpenLTXFile(ctx, 0, 5, 9, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(rc)
	rc.Close()
	if !bytes.Equal(b, []byte("xxxxxxxxx")) {
		t.Fatalf("read %q", b)
	}
	if err := c.DeleteLTXFiles(ctx, files[:2]); err != nil {
		t.Fatal(err)
	}
	if err := c.DeleteLTXFiles(ctx, files[:1]); err != nil {
		t.Fatalf("deleting a file already gone: %v", err)
	}
	if _, err := c.OpenLTXFile(ctx, 0, 1, 4, 0, 0); !errors.Is(err, backends.ErrNotFound) {
		t.Fatalf("open of a deleted file: %v", err)
	}
	if _, err := c.FileMeta(ctx, 0, 1, 4); !errors.Is(err, backends.ErrNotFound) {
		t.Fatalf("meta of a deleted file: %v", err)
	}
	if files, _ := c.LTXFiles(ctx, 0); len(files) != 1 {
		t.Fatalf("%d files after deleting two of three", len(files))
	}
	if m, _ := filepath.Glob(filepath.Join(root, "ltx", "0", ".tmp-*")); len(m) != 0 {
		t.Fatalf("temporary files left: %v", m)
	}
}

// A temporary file nothing has written for over a day was left by a
// killed writer, and a listing removes it; a fresh one may be an upload in
// progress and stays.
func TestStaleTempsRemoved(t *testing.T) {
	c := New(filepath.Join(t.TempDir(), "replica"))
	dir := filepath.Join(c.Root(), "ltx", "9")
	os.MkdirAll(dir, 0o755)
	old, fresh := filepath.Join(dir, backends.TempPrefix+"old"), filepath.Join(dir, backends.TempPrefix+"fresh")
	for _, p := range []string{old, fresh} {
		if err := os.WriteFile(p, []byte("partial"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ago := time.Now().Add(-25 * time.Hour)
	os.Chtimes(old, ago, ago)
	if _, err := c.LTXFiles(context.Background(), 9); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(old); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("stale temporary file: %v", err)
	}
	if _, err := os.Stat(fresh); err != nil {
		t.Fatalf("fresh temporary file: %v", err)
	}
}

func TestDatabases(t *testing.T) {
	ctx := context.Background()
	root := filepath.Join(t.TempDir(), "replica")
	c := New(root)
	if dbs, err := c.Databases(ctx); err != nil || dbs != nil {
		t.Fatalf("a root that does not exist: %q, %v", dbs, err)
	}
	ts := time.Now()
	for i, rel := range backendtest.DatabaseNames {
		b := backendtest.EncodeFile(t, 1, 1, 1, int64(i), ts)
		if err := c.Sub(rel).WriteLTXFile(ctx, i%10, 1, 1, bytes.NewReader(b), int64(len(b)), backends.FileMeta{Timestamp: ts}); err != nil {
			t.Fatal(err)
		}
		// A deletion marker beside it is no database of its own.
		if err := c.Sub(rel).WriteMarker(ctx, "lfuse-deleted.json", []byte("{}")); err != nil {
			t.Fatal(err)
		}
	}
	// Not a database: an ltx directory without levels.
	if err := os.MkdirAll(filepath.Join(root, "c.db", "ltx", "notalevel"), 0o755); err != nil {
		t.Fatal(err)
	}
	if dbs, err := c.Databases(ctx); err != nil || !slices.Equal(dbs, backendtest.DatabaseNames) {
		t.Fatalf("databases %q, %v; want %q", dbs, err, backendtest.DatabaseNames)
	}
	// A file where the replica's directory belongs is no empty replica.
	notDir := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(notDir, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if dbs, err := New(notDir).Databases(ctx); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Fatalf("a root that is a file: %q, %v; want an error saying so", dbs, err)
	}
	// A root that is a symlink to the replica (/backup -> /mnt/nfs/lfuse)
	// lists what the replica holds: it used to list nothing.
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(root, link); err != nil {
		t.Fatal(err)
	}
	if dbs, err := New(link).Databases(ctx); err != nil || !slices.Equal(dbs, backendtest.DatabaseNames) {
		t.Fatalf("through a symlink: databases %q, %v; want %q", dbs, err, backendtest.DatabaseNames)
	}
}
