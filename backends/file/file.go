// Package file stores replica files in a local directory (another disk, an
// NFS mount), laid out as Litestream v0.5 reads them:
//
//	ROOT/ltx/<level>/<min %016x>-<max %016x>.ltx
//
// Each file's mtime is its LTX header timestamp, which is where Litestream's
// file replica takes a file's time from. The metadata lfuse records beside a
// file goes into "<name>.meta", a name Litestream's listing skips.
package file

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/lfuse/lfuse/backends"
	"github.com/superfly/ltx"
)

// Client is a replica in a directory.
type Client struct {
	root string
}

// New returns a client for the replica rooted at dir (an absolute path).
func New(dir string) *Client { return &Client{root: filepath.Clean(dir)} }

func (c *Client) Type() string   { return "file" }
func (c *Client) String() string { return "file://" + c.root }

// Root is the directory the client stores into.
func (c *Client) Root() string { return c.root }

// holdsLevel says whether the directory at p has a level directory in it.
// A directory that cannot be read holds none, unless the file system is
// failing (backends.Down): that is an error, not a database that is not
// there.
func holdsLevel(p string) (bool, error) {
	ents, err := os.ReadDir(p)
	if backends.Down(err) {
		return false, err
	}
	// Snapshots first: a replica always holds one, and level 0 can hold
	// thousands of files.
	slices.Reverse(ents)
	for _, e := range ents {
		if !e.IsDir() || !backends.IsLevelName(e.Name()) {
			continue
		}
		files, err := os.ReadDir(filepath.Join(p, e.Name()))
		if backends.Down(err) {
			return false, err
		}
		if slices.ContainsFunc(files, func(f fs.DirEntry) bool { return f.Type().IsRegular() && backends.IsLTXName(f.Name()) }) {
			return true, nil
		}
	}
	return false, nil
}

func (c *Client) levelDir(level int) string {
	return filepath.Join(c.root, "ltx", strconv.Itoa(level))
}

func (c *Client) path(level int, min, max ltx.TXID) string {
	return filepath.Join(c.levelDir(level), ltx.FormatFilename(min, max))
}

const metaSuffix = ".meta"

// ListTimesApprox: LTXFiles gives each file's modification time, which
// lfuse sets to its commit time, but a copy of the replica (cp -r, a backup
// tool) sets to when it was copied: later than the commit, never earlier.
// Restores to a point in time then read the exact times from the sidecars
// where it matters (a few per level); taken as commit times, the copy's
// times made restores refuse, or restore an older state than asked.
func (c *Client) ListTimesApprox() bool { return true }

// LTXFiles lists one level. A level that does not exist yet is empty.
// Temporary files that a killed writer left there are removed.
func (c *Client) LTXFiles(ctx context.Context, level int) ([]ltx.FileInfo, error) {
	ents, err := os.ReadDir(c.levelDir(level))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	var infos []ltx.FileInfo
	now := time.Now()
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue // not ours; a symlink could point anywhere
		}
		min, max, err := ltx.ParseFilename(e.Name())
		if err != nil {
			if fi, err := e.Info(); err == nil && backends.StaleTemp(e.Name(), fi.ModTime(), now) {
				os.Remove(filepath.Join(c.levelDir(level), e.Name())) // a read-only replica keeps it
			}
			continue
		}
		fi, err := e.Info()
		if errors.Is(err, fs.ErrNotExist) {
			continue // deleted while listing
		} else if err != nil {
			return nil, err
		}
		infos = append(infos, ltx.FileInfo{Level: level, MinTXID: min, MaxTXID: max, Size: fi.Size(), CreatedAt: fi.ModTime().UTC()})
	}
	slices.SortFunc(infos, func(a, b ltx.FileInfo) int { return cmp.Compare(a.MinTXID, b.MinTXID) })
	return infos, nil
}

// OpenLTXFile's body of a whole file gives the open file (WholeFile), which
// lets a restore read it in place instead of fetching a copy first.
func (c *Client) OpenLTXFile(ctx context.Context, level int, min, max ltx.TXID, offset, size int64) (io.ReadCloser, error) {
	f, err := os.Open(c.path(level, min, max))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", c.rel(level, min, max), backends.ErrNotFound)
	} else if err != nil {
		return nil, err
	}
	if _, err := f.Seek(offset, io.SeekStart); err != nil {
		f.Close()
		return nil, err
	}
	var r io.Reader = f
	if size > 0 {
		r = io.LimitReader(f, size)
	}
	return &localBody{Reader: backends.ContextReader(ctx, r), f: f, whole: offset == 0 && size <= 0}, nil
}

type localBody struct {
	io.Reader
	f     *os.File
	whole bool
}

func (b *localBody) Close() error { return b.f.Close() }

// WholeFile is the open file, when the body is all of it, for a reader
// that would rather map it than read it.
func (b *localBody) WholeFile() *os.File {
	if b.whole {
		return b.f
	}
	return nil
}

func (c *Client) rel(level int, min, max ltx.TXID) string {
	return fmt.Sprintf("ltx/%d/%s", level, ltx.FormatFilename(min, max))
}

type metaFile struct {
	Timestamp         string `json:"timestamp"`
	PostApplyChecksum string `json:"post_apply_checksum"`
}

// WriteLTXFile writes the metadata, then the file, each to a temporary name
// that is fsynced and renamed, so a crash leaves either no file or a whole
// one with its metadata.
func (c *Client) WriteLTXFile(ctx context.Context, level int, min, max ltx.TXID, r io.Reader, size int64, meta backends.FileMeta) error {
	dir := c.levelDir(level)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	path := c.path(level, min, max)
	mb, _ := json.Marshal(metaFile{Timestamp: ltx.FormatTimestamp(meta.Timestamp), PostApplyChecksum: meta.PostApplyChecksum.String()})
	if err := writeAtomic(path+metaSuffix, strings.NewReader(string(mb)), -1, time.Time{}); err != nil {
		return err
	}
	if err := writeAtomic(path, backends.ContextReader(ctx, r), size, meta.Timestamp); err != nil {
		return err
	}
	return syncDir(dir)
}

// FileMeta reads the metadata written beside a file.
func (c *Client) FileMeta(ctx context.Context, level int, min, max ltx.TXID) (backends.FileMeta, error) {
	b, err := os.ReadFile(c.path(level, min, max) + metaSuffix)
	if errors.Is(err, fs.ErrNotExist) {
		return backends.FileMeta{}, fmt.Errorf("%s%s: %w", c.rel(level, min, max), metaSuffix, backends.ErrNotFound)
	} else if err != nil {
		return backends.FileMeta{}, err
	}
	var m metaFile
	if err := json.Unmarshal(b, &m); err != nil {
		return backends.FileMeta{}, fmt.Errorf("%s%s: %w", c.rel(level, min, max), metaSuffix, err)
	}
	var meta backends.FileMeta
	if meta.Timestamp, err = ltx.ParseTimestamp(m.Timestamp); err != nil {
		return meta, fmt.Errorf("%s%s: timestamp: %w", c.rel(level, min, max), metaSuffix, err)
	}
	if meta.PostApplyChecksum, err = ltx.ParseChecksum(m.PostApplyChecksum); err != nil {
		return meta, fmt.Errorf("%s%s: checksum: %w", c.rel(level, min, max), metaSuffix, err)
	}
	return meta, nil
}

// DeleteLTXFiles removes files and their metadata.
func (c *Client) DeleteLTXFiles(ctx context.Context, files []ltx.FileInfo) error {
	dirs := map[string]bool{}
	for _, f := range files {
		if err := ctx.Err(); err != nil {
			return err
		}
		path := c.path(f.Level, f.MinTXID, f.MaxTXID)
		for _, p := range []string{path, path + metaSuffix} {
			if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
		}
		dirs[filepath.Dir(path)] = true
	}
	for dir := range dirs {
		if err := syncDir(dir); err != nil {
			return err
		}
	}
	return nil
}

// WriteMarker writes a small file at the replica's root, beside its "ltx"
// directory, where Litestream does not look.
func (c *Client) WriteMarker(ctx context.Context, name string, data []byte) error {
	if err := os.MkdirAll(c.root, 0o755); err != nil {
		return err
	}
	if err := writeAtomic(filepath.Join(c.root, name), bytes.NewReader(data), int64(len(data)), time.Time{}); err != nil {
		return err
	}
	return syncDir(c.root)
}

// ReadMarker reads what WriteMarker wrote.
func (c *Client) ReadMarker(ctx context.Context, name string) ([]byte, error) {
	b, err := os.ReadFile(filepath.Join(c.root, name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", name, backends.ErrNotFound)
	}
	return b, err
}

// DeleteMarker removes what WriteMarker wrote.
func (c *Client) DeleteMarker(ctx context.Context, name string) error {
	if err := os.Remove(filepath.Join(c.root, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// writeAtomic writes r to a temporary file beside path, checks that it got
// size bytes (unless size < 0), fsyncs it, sets its mtime (unless zero) and
// renames it into place.
func writeAtomic(path string, r io.Reader, size int64, mtime time.Time) (err error) {
	f, err := os.CreateTemp(filepath.Dir(path), backends.TempPrefix+"*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	n, err := io.Copy(f, r)
	if err != nil {
		return err
	}
	if size >= 0 && n != size {
		return fmt.Errorf("%s: wrote %d bytes, expected %d", filepath.Base(path), n, size)
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if !mtime.IsZero() {
		if err := os.Chtimes(f.Name(), mtime, mtime); err != nil {
			return err
		}
	}
	return os.Rename(f.Name(), path)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// Sub is a client for the database replica at ROOT/rel.
func (c *Client) Sub(rel string) *Client {
	return New(filepath.Join(c.root, filepath.FromSlash(path.Clean("/"+rel))))
}

// Check proves the replica directory can be written: it creates it (a
// first start) and a temporary file in it.
func (c *Client) Check(ctx context.Context) error {
	if err := os.MkdirAll(c.root, 0o755); err != nil {
		return fmt.Errorf("%s: cannot create the replica directory: %w", c, err)
	}
	f, err := os.CreateTemp(c.root, ".check-*")
	if err != nil {
		return fmt.Errorf("%s: cannot write to the replica directory: %w", c, err)
	}
	f.Close()
	return os.Remove(f.Name())
}

// Databases lists the database replicas under the root, as slash paths
// relative to it: every directory whose "ltx" directory holds a level. An
// "ltx" without levels is walked like any other directory (a database can
// be ltx/app.db, or be called ltx), and so is the rest of a database's
// directory (x.db deleted, then x.db/y.db made: the replica keeps both). A
// root that does not exist yet holds none.
func (c *Client) Databases(ctx context.Context) ([]string, error) {
	// WalkDir does not follow a root that is a symlink (/backup ->
	// /mnt/nfs/lfuse): such a replica listed as empty, and a restore of
	// every database restored none.
	root, err := filepath.EvalSymlinks(c.root)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, fmt.Errorf("%s: %w", c, err)
	}
	if st, err := os.Stat(root); err != nil {
		return nil, fmt.Errorf("%s: %w", c, err)
	} else if !st.IsDir() {
		// Listed as empty, the replica seemed to hold no database.
		return nil, fmt.Errorf("%s: %s is not a directory", c, c.root)
	}
	var rels []string
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			// A directory removed meanwhile is not a database; one
			// that a failing network file system cannot read may be.
			if p == root || backends.Down(err) {
				return err
			}
			return nil
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if !d.IsDir() || d.Name() != "ltx" {
			return nil
		}
		if ok, err := holdsLevel(p); err != nil {
			return err
		} else if !ok {
			return nil
		}
		if rel, err := filepath.Rel(root, filepath.Dir(p)); err == nil && rel != "." && filepath.IsLocal(rel) {
			rels = append(rels, filepath.ToSlash(rel))
		}
		return filepath.SkipDir
	})
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	slices.Sort(rels)
	return rels, err
}
