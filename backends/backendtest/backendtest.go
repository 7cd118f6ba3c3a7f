// Package backendtest is the conformance suite every replica backend passes,
// run by each backend's tests against a real server of its kind (and, where
// there is one, an in-process fake), and the helper that finds those servers.
package backendtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends"
	"github.com/superfly/ltx"
)

// Client is the method set of replicate.ReplicaClient, restated here so the
// suite does not depend on the replicator.
type Client interface {
	Type() string
	String() string
	LTXFiles(ctx context.Context, level int) ([]ltx.FileInfo, error)
	OpenLTXFile(ctx context.Context, level int, min, max ltx.TXID, offset, size int64) (io.ReadCloser, error)
	WriteLTXFile(ctx context.Context, level int, min, max ltx.TXID, r io.Reader, size int64, meta backends.FileMeta) error
	FileMeta(ctx context.Context, level int, min, max ltx.TXID) (backends.FileMeta, error)
	DeleteLTXFiles(ctx context.Context, files []ltx.FileInfo) error
	WriteMarker(ctx context.Context, name string, data []byte) error
	ReadMarker(ctx context.Context, name string) ([]byte, error)
	DeleteMarker(ctx context.Context, name string) error
}

// Options describe a backend to the suite.
type Options struct {
	// New returns a client whose files live under root, a path unique to
	// the test ("<test name>/<n>"); two roots never see each other's files.
	New func(t *testing.T, root string) Client
	// ListTimesApprox: the listing's CreatedAt is the upload time (S3's
	// LastModified), not the LTX header timestamp; FileMeta has the exact one.
	ListTimesApprox bool
	// Secrets must never appear in String() or in an error.
	Secrets []string
	// Many is how many files the pagination test writes; default 1,100
	// (more than one 1,000-object page).
	Many int
}

var rootSeq atomic.Int64

// Run runs the suite.
func Run(t *testing.T, o Options) {
	if o.Many == 0 {
		o.Many = 1100
	}
	root := func(t *testing.T) string {
		return fmt.Sprintf("lfuse-test-%d-%d/%s", os.Getpid(), rootSeq.Add(1), strings.ReplaceAll(t.Name(), "/", "-"))
	}
	t.Run("WriteRead", func(t *testing.T) { testWriteRead(t, o, o.New(t, root(t))) })
	t.Run("NotFound", func(t *testing.T) { testNotFound(t, o, o.New(t, root(t))) })
	t.Run("Atomic", func(t *testing.T) { testAtomic(t, o.New(t, root(t))) })
	t.Run("ManyFiles", func(t *testing.T) { testManyFiles(t, o, o.New(t, root(t))) })
	t.Run("Large", func(t *testing.T) { testLarge(t, o.New(t, root(t))) })
	t.Run("Cancel", func(t *testing.T) { testCancel(t, o.New(t, root(t))) })
	t.Run("Markers", func(t *testing.T) { testMarkers(t, o, o.New(t, root(t))) })
	t.Run("TwoClients", func(t *testing.T) {
		base := root(t)
		testTwoClients(t, o.New(t, base+"/a"), o.New(t, base+"/b"))
	})
}

// WriteReadBack writes body as level 9 file 1-9 and reads it back whole:
// the control of tests that first write the same file through a faulty
// path.
func WriteReadBack(t testing.TB, c Client, body []byte, meta backends.FileMeta) {
	t.Helper()
	ctx := context.Background()
	if err := c.WriteLTXFile(ctx, 9, 1, 9, bytes.NewReader(body), int64(len(body)), meta); err != nil {
		t.Fatal(err)
	}
	rc, err := c.OpenLTXFile(ctx, 9, 1, 9, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if got, err := io.ReadAll(rc); err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read back: %d bytes, %v", len(got), err)
	}
}

// DatabaseNames are database paths a replica's Databases must find, sorted:
// names that look like a layout's own directories (ltx, levels, ltx/0), and a
// database's path that also names a directory of others (x.db deleted,
// then x.db/y.db made: the replica keeps both).
var DatabaseNames = []string{"a.db", "d/ltx", "h/0003/g.db", "logs/2024/e.db", "ltx/c.db", "sub/b.db", "tenants/cafe/f.db", "v/0000", "x.db", "x.db/y.db", "z/ltx/0"}

// EncodeFile is an LTX file of pages 1..pages (4 KiB each, filled from
// seed) with the given TXIDs and header time.
func EncodeFile(t testing.TB, min, max ltx.TXID, pages int, seed int64, ts time.Time) []byte {
	t.Helper()
	var buf bytes.Buffer
	enc, err := ltx.NewEncoder(&buf)
	if err != nil {
		t.Fatal(err)
	}
	hdr := ltx.Header{Version: ltx.Version, Flags: ltx.HeaderFlagNoChecksum, PageSize: 4096, Commit: uint32(pages),
		MinTXID: min, MaxTXID: max, Timestamp: ts.UnixMilli()}
	if err := enc.EncodeHeader(hdr); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(seed))
	page := make([]byte, 4096)
	for pgno := uint32(1); pgno <= uint32(pages); pgno++ {
		rng.Read(page[:64]) // mostly compressible, like real pages
		if err := enc.EncodePage(ltx.PageHeader{Pgno: pgno}, page); err != nil {
			t.Fatal(err)
		}
	}
	if err := enc.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func write(t *testing.T, c Client, level int, min, max ltx.TXID, b []byte, meta backends.FileMeta) {
	t.Helper()
	if err := c.WriteLTXFile(context.Background(), level, min, max, bytes.NewReader(b), int64(len(b)), meta); err != nil {
		t.Fatalf("write level %d %s-%s: %v", level, min, max, err)
	}
}

func readAll(t *testing.T, c Client, level int, min, max ltx.TXID, offset, size int64) []byte {
	t.Helper()
	rc, err := c.OpenLTXFile(context.Background(), level, min, max, offset, size)
	if err != nil {
		t.Fatalf("open level %d %s-%s: %v", level, min, max, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("read level %d %s-%s: %v", level, min, max, err)
	}
	return b
}

func list(t *testing.T, c Client, level int) []ltx.FileInfo {
	t.Helper()
	files, err := c.LTXFiles(context.Background(), level)
	if err != nil {
		t.Fatalf("list level %d: %v", level, err)
	}
	return files
}

func checkSecrets(t *testing.T, o Options, what string) {
	t.Helper()
	for _, s := range o.Secrets {
		if s != "" && strings.Contains(what, s) {
			t.Fatalf("a credential shows in %q", what)
		}
	}
}

func testWriteRead(t *testing.T, o Options, c Client) {
	ctx := context.Background()
	checkSecrets(t, o, c.String())
	if c.Type() == "" {
		t.Fatal("empty Type()")
	}
	if files := list(t, c, 0); len(files) != 0 {
		t.Fatalf("a new root lists %d files", len(files))
	}
	ts := time.Date(2026, 3, 4, 5, 6, 7, 891_000_000, time.UTC)
	b := EncodeFile(t, 5, 9, 40, 1, ts)
	meta := backends.FileMeta{Timestamp: ts, PostApplyChecksum: ltx.ChecksumFlag | 0x1234_5678_9abc}
	write(t, c, 0, 5, 9, b, meta)
	snap := EncodeFile(t, 1, 9, 3, 2, ts)
	write(t, c, 9, 1, 9, snap, backends.FileMeta{Timestamp: ts, PostApplyChecksum: ltx.ChecksumFlag | 7})

	if got := readAll(t, c, 0, 5, 9, 0, 0); !bytes.Equal(got, b) {
		t.Fatalf("read back %d bytes, wrote %d (or different bytes)", len(got), len(b))
	}
	if got := readAll(t, c, 9, 1, 9, 0, 0); !bytes.Equal(got, snap) {
		t.Fatal("the snapshot reads back different")
	}
	// Ranges: the header, a slice in the middle, and from an offset to the end.
	for _, r := range [][2]int64{{0, ltx.HeaderSize}, {1000, 333}, {int64(len(b)) - 100, 0}} {
		want := b[r[0]:]
		if r[1] > 0 {
			want = want[:r[1]]
		}
		if got := readAll(t, c, 0, 5, 9, r[0], r[1]); !bytes.Equal(got, want) {
			t.Fatalf("range %d+%d: got %d bytes, want %d", r[0], r[1], len(got), len(want))
		}
	}
	got, err := c.FileMeta(ctx, 0, 5, 9)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Timestamp.Equal(ts) || got.PostApplyChecksum != meta.PostApplyChecksum {
		t.Fatalf("meta %+v, wrote %+v", got, meta)
	}

	files := list(t, c, 0)
	if len(files) != 1 {
		t.Fatalf("level 0 lists %d files, want 1", len(files))
	}
	f := files[0]
	if f.Level != 0 || f.MinTXID != 5 || f.MaxTXID != 9 || f.Size != int64(len(b)) {
		t.Fatalf("listed %+v", f)
	}
	if o.ListTimesApprox {
		if f.CreatedAt.IsZero() {
			t.Fatal("listed without a time")
		}
	} else if !f.CreatedAt.Equal(ts) {
		t.Fatalf("listed time %s, header time %s", f.CreatedAt, ts)
	}
	if n := len(list(t, c, 9)); n != 1 {
		t.Fatalf("level 9 lists %d files", n)
	}
	if n := len(list(t, c, 1)); n != 0 {
		t.Fatalf("level 1 lists %d files", n)
	}

	// Overwriting a file replaces it whole.
	b2 := EncodeFile(t, 5, 9, 10, 3, ts)
	write(t, c, 0, 5, 9, b2, meta)
	if got := readAll(t, c, 0, 5, 9, 0, 0); !bytes.Equal(got, b2) {
		t.Fatal("an overwritten file reads back different")
	}

	if err := c.DeleteLTXFiles(ctx, files); err != nil {
		t.Fatal(err)
	}
	if n := len(list(t, c, 0)); n != 0 {
		t.Fatalf("%d files after delete", n)
	}
	// Deleting what is gone is not an error.
	if err := c.DeleteLTXFiles(ctx, files); err != nil {
		t.Fatalf("delete again: %v", err)
	}
}

func testNotFound(t *testing.T, o Options, c Client) {
	ctx := context.Background()
	_, err := c.OpenLTXFile(ctx, 0, 1, 2, 0, 0)
	if !errors.Is(err, backends.ErrNotFound) {
		t.Fatalf("open a missing file: %v, want ErrNotFound", err)
	}
	if err != nil {
		checkSecrets(t, o, err.Error())
	}
	if _, err := c.FileMeta(ctx, 0, 1, 2); !errors.Is(err, backends.ErrNotFound) {
		t.Fatalf("meta of a missing file: %v, want ErrNotFound", err)
	}
	for level := 0; level <= 9; level++ {
		if n := len(list(t, c, level)); n != 0 {
			t.Fatalf("an empty root lists %d files at level %d", n, level)
		}
	}
}

// A marker is stored beside the levels, read back as written, replaced
// whole, and is no replica file: the levels stay empty.
func testMarkers(t *testing.T, o Options, c Client) {
	ctx := context.Background()
	_, err := c.ReadMarker(ctx, "m.json")
	if !errors.Is(err, backends.ErrNotFound) {
		t.Fatalf("read a missing marker: %v, want ErrNotFound", err)
	}
	checkSecrets(t, o, err.Error())
	for _, body := range []string{`{"a":"first, longer than the next"}`, `{"a":2}`} {
		if err := c.WriteMarker(ctx, "m.json", []byte(body)); err != nil {
			t.Fatal(err)
		}
		if got, err := c.ReadMarker(ctx, "m.json"); err != nil || string(got) != body {
			t.Fatalf("marker read back as %q, %v; want %q", got, err, body)
		}
	}
	if _, err := c.ReadMarker(ctx, "other.json"); !errors.Is(err, backends.ErrNotFound) {
		t.Fatalf("read another marker's name: %v, want ErrNotFound", err)
	}
	if err := c.DeleteMarker(ctx, "other.json"); err != nil {
		t.Fatalf("delete a missing marker: %v", err)
	}
	if err := c.DeleteMarker(ctx, "m.json"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ReadMarker(ctx, "m.json"); !errors.Is(err, backends.ErrNotFound) {
		t.Fatalf("read a deleted marker: %v, want ErrNotFound", err)
	}
	for level := 0; level <= 9; level++ {
		if n := len(list(t, c, level)); n != 0 {
			t.Fatalf("a root with a marker lists %d files at level %d", n, level)
		}
	}
}

// failingReader gives n bytes of r, then an error.
type failingReader struct {
	r io.Reader
	n int64
}

var errInjected = errors.New("injected read failure")

func (f *failingReader) Read(p []byte) (int, error) {
	if f.n <= 0 {
		return 0, errInjected
	}
	if int64(len(p)) > f.n {
		p = p[:f.n]
	}
	n, err := f.r.Read(p)
	f.n -= int64(n)
	return n, err
}

// A write whose body fails halfway leaves nothing behind, and does not
// damage the file it would have replaced.
func testAtomic(t *testing.T, c Client) {
	ctx := context.Background()
	ts := time.Now().UTC().Truncate(time.Millisecond)
	b := EncodeFile(t, 1, 3, 200, 4, ts)
	err := c.WriteLTXFile(ctx, 0, 1, 3, &failingReader{r: bytes.NewReader(b), n: int64(len(b) / 2)}, int64(len(b)), backends.FileMeta{Timestamp: ts})
	if err == nil {
		t.Fatal("a write whose body failed succeeded")
	}
	if n := len(list(t, c, 0)); n != 0 {
		t.Fatalf("a failed write left %d files listed", n)
	}
	write(t, c, 0, 1, 3, b, backends.FileMeta{Timestamp: ts})
	err = c.WriteLTXFile(ctx, 0, 1, 3, &failingReader{r: bytes.NewReader(b), n: 1000}, int64(len(b)), backends.FileMeta{Timestamp: ts})
	if err == nil {
		t.Fatal("a failed overwrite succeeded")
	}
	if got := readAll(t, c, 0, 1, 3, 0, 0); !bytes.Equal(got, b) {
		t.Fatal("a failed overwrite damaged the file")
	}
}

// More files than one listing page, written and deleted in parallel
// batches; the listing is complete and sorted.
func testManyFiles(t *testing.T, o Options, c Client) {
	ctx := context.Background()
	ts := time.Now().UTC().Truncate(time.Millisecond)
	body := EncodeFile(t, 1, 1, 1, 5, ts)
	var wg sync.WaitGroup
	errs := make(chan error, o.Many)
	sem := make(chan struct{}, 16)
	for i := o.Many; i >= 1; i-- { // written out of order on purpose
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			id := ltx.TXID(i)
			if err := c.WriteLTXFile(ctx, 1, id, id, bytes.NewReader(body), int64(len(body)), backends.FileMeta{Timestamp: ts}); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	files := list(t, c, 1)
	if len(files) != o.Many {
		t.Fatalf("listed %d of %d files", len(files), o.Many)
	}
	for i, f := range files {
		if f.MinTXID != ltx.TXID(i+1) || f.Level != 1 {
			t.Fatalf("file %d of the listing is level %d %s-%s", i, f.Level, f.MinTXID, f.MaxTXID)
		}
	}
	if err := c.DeleteLTXFiles(ctx, files[:o.Many-5]); err != nil {
		t.Fatal(err)
	}
	left := list(t, c, 1)
	if len(left) != 5 || left[0].MinTXID != ltx.TXID(o.Many-4) {
		t.Fatalf("after deleting all but 5, %d files are left", len(left))
	}
}

// patternReader is n bytes of a deterministic stream, made on the fly.
type patternReader struct {
	n, off int64
}

func (p *patternReader) Read(b []byte) (int, error) {
	if p.off >= p.n {
		return 0, io.EOF
	}
	if rem := p.n - p.off; int64(len(b)) > rem {
		b = b[:rem]
	}
	for i := range b {
		x := uint64(p.off + int64(i))
		b[i] = byte(x ^ x>>8 ^ x>>17)
	}
	p.off += int64(len(b))
	return len(b), nil
}

// heapWatch samples the live heap until stopped and returns its peak above
// the start.
func heapWatch() (stop func() uint64) {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapInuse
	var peak atomic.Uint64
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > base && ms.HeapInuse-base > peak.Load() {
				peak.Store(ms.HeapInuse - base)
			}
			select {
			case <-done:
				return
			case <-tick.C:
			}
		}
	}()
	return func() uint64 {
		close(done)
		<-finished
		return peak.Load()
	}
}

// A 64 MiB object goes up and comes back as a stream: the client's memory
// stays far below the object's size.
func testLarge(t *testing.T, c Client) {
	ctx := context.Background()
	const size = 64 << 20
	const bound = 40 << 20
	stop := heapWatch()
	err := c.WriteLTXFile(ctx, 9, 1, 100, &patternReader{n: size}, size, backends.FileMeta{Timestamp: time.Now()})
	peak := stop()
	if err != nil {
		t.Fatal(err)
	}
	if peak > bound {
		t.Errorf("writing a %d MiB object took %d MiB of heap", size>>20, peak>>20)
	}
	files := list(t, c, 9)
	if len(files) != 1 || files[0].Size != size {
		t.Fatalf("listed %+v", files)
	}

	stop = heapWatch()
	rc, err := c.OpenLTXFile(ctx, 9, 1, 100, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	got := sha256.New()
	n, err := io.Copy(got, bufio.NewReaderSize(rc, 1<<20))
	rc.Close()
	peak = stop()
	if err != nil || n != size {
		t.Fatalf("read %d bytes: %v", n, err)
	}
	want := sha256.New()
	io.Copy(want, &patternReader{n: size})
	if !bytes.Equal(got.Sum(nil), want.Sum(nil)) {
		t.Fatal("the large object reads back different")
	}
	if peak > bound {
		t.Errorf("reading a %d MiB object took %d MiB of heap", size>>20, peak>>20)
	}
	// A range near the end, without reading the rest.
	tail := readAll(t, c, 9, 1, 100, size-4096, 4096)
	exp := make([]byte, 4096)
	(&patternReader{n: size, off: size - 4096}).Read(exp)
	if !bytes.Equal(tail, exp) {
		t.Fatal("a range at the end of the large object reads back different")
	}
}

// CancelAfter returns r, which cancels with cancel once n bytes have been
// read through it.
func CancelAfter(r io.Reader, n int64, cancel context.CancelFunc) io.Reader {
	return &cancelReader{r: r, n: n, cancel: cancel}
}

// cancelReader cancels a context once n bytes have been read through it.
type cancelReader struct {
	r      io.Reader
	n      int64
	cancel context.CancelFunc
}

func (c *cancelReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n -= int64(n)
	if c.n <= 0 {
		c.cancel()
	}
	return n, err
}

// Cancelling the context mid-transfer stops an upload (nothing appears) and
// a download (the read fails) promptly.
func testCancel(t *testing.T, c Client) {
	const size = 32 << 20
	ctx, cancel := context.WithCancel(context.Background())
	start := time.Now()
	err := c.WriteLTXFile(ctx, 0, 1, 1, &cancelReader{r: &patternReader{n: size}, n: 4 << 20, cancel: cancel}, size, backends.FileMeta{Timestamp: time.Now()})
	if err == nil {
		t.Fatal("an upload whose context was cancelled succeeded")
	}
	if d := time.Since(start); d > 30*time.Second {
		t.Errorf("a cancelled upload took %s to return", d)
	}
	if n := len(list(t, c, 0)); n != 0 {
		t.Fatalf("a cancelled upload left %d files listed", n)
	}

	if err := c.WriteLTXFile(context.Background(), 0, 1, 1, &patternReader{n: size}, size, backends.FileMeta{Timestamp: time.Now()}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel = context.WithCancel(context.Background())
	defer cancel()
	rc, err := c.OpenLTXFile(ctx, 0, 1, 1, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if _, err := io.CopyN(io.Discard, rc, 1<<20); err != nil {
		t.Fatal(err)
	}
	cancel()
	if n, err := io.Copy(io.Discard, rc); err == nil {
		t.Fatalf("a download went on to read %d more bytes after its context was cancelled", n)
	}
}

// Two clients on different roots write at once without seeing each other.
func testTwoClients(t *testing.T, a, b Client) {
	ts := time.Now().UTC().Truncate(time.Millisecond)
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for i, c := range []Client{a, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 1; j <= 20; j++ {
				body := EncodeFile(t, ltx.TXID(j), ltx.TXID(j), 2, int64(i*100+j), ts)
				if err := c.WriteLTXFile(context.Background(), 0, ltx.TXID(j), ltx.TXID(j), bytes.NewReader(body), int64(len(body)), backends.FileMeta{Timestamp: ts}); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for i, c := range []Client{a, b} {
		if n := len(list(t, c, 0)); n != 20 {
			t.Fatalf("client %d lists %d files, wrote 20", i, n)
		}
		if got, want := readAll(t, c, 0, 7, 7, 0, 0), EncodeFile(t, 7, 7, 2, int64(i*100+7), ts); !bytes.Equal(got, want) {
			t.Fatalf("client %d reads another client's file", i)
		}
	}
}

// Servers returns the settings scripts/servers.sh wrote for the running
// test servers. Without them the test skips, naming the script — or fails,
// when LFUSE_REQUIRE_SERVERS=1 (CI), where no backend test may skip.
func Servers(t testing.TB) map[string]string {
	t.Helper()
	dir := os.Getenv("LFUSE_SERVERS_DIR")
	if dir == "" {
		dir = "/tmp/lfuse-servers"
	}
	b, err := os.ReadFile(filepath.Join(dir, "env"))
	if err != nil {
		msg := "no test servers running: start them with scripts/servers.sh start"
		if os.Getenv("LFUSE_REQUIRE_SERVERS") == "1" {
			t.Fatalf("%s (%v)", msg, err)
		}
		t.Skip(msg)
	}
	env := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			env[k] = v
		}
	}
	// A settings file outlives its servers (a reboot keeps /tmp): the
	// clients then retried connecting until the test timed out, ten
	// minutes later, with no word of why.
	for _, k := range []string{"LFUSE_TEST_S3_ENDPOINT", "LFUSE_TEST_GCS_ENDPOINT", "LFUSE_TEST_AZURE_ENDPOINT", "LFUSE_TEST_SFTP_ADDR"} {
		addr := env[k]
		if u, err := url.Parse(addr); err == nil && u.Host != "" {
			addr = u.Host
		}
		if addr == "" {
			continue
		}
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			msg := fmt.Sprintf("test server %s (%s, from %s) does not answer: start the servers again with scripts/servers.sh start", addr, k, filepath.Join(dir, "env"))
			if os.Getenv("LFUSE_REQUIRE_SERVERS") == "1" {
				t.Fatalf("%s (%v)", msg, err)
			}
			t.Skip(msg)
		}
		c.Close()
	}
	return env
}

// Unavailable runs call against an HTTP store that answers every request
// with 503, as a store that is down behind its load balancer does, and
// checks that call gave up after want requests with an error backends.Down
// knows.
func Unavailable(t *testing.T, want int64, call func(ctx context.Context, endpoint string) error) {
	t.Helper()
	var requests atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	t.Cleanup(srv.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := call(ctx, srv.URL)
	if !backends.Down(err) || requests.Load() != want {
		t.Fatalf("against a store answering 503: %d requests, err %v (down: %v); want %d and a down error", requests.Load(), err, backends.Down(err), want)
	}
}
