package replicate

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lfuse/lfuse/walcapture"
	"github.com/superfly/ltx"
)

// encodeTest writes one LTX file holding pages (pgno → fill byte).
func encodeTest(t *testing.T, min, max ltx.TXID, commit uint32, pages map[uint32]byte) []byte {
	t.Helper()
	const pageSize = 512
	var buf bytes.Buffer
	enc, err := ltx.NewEncoder(&buf)
	if err != nil {
		t.Fatal(err)
	}
	hdr := ltx.Header{Version: ltx.Version, Flags: ltx.HeaderFlagNoChecksum, PageSize: pageSize, Commit: commit,
		MinTXID: min, MaxTXID: max, Timestamp: time.Unix(int64(max), 0).UnixMilli()}
	if err := enc.EncodeHeader(hdr); err != nil {
		t.Fatal(err)
	}
	for pgno := uint32(1); pgno <= commit; pgno++ {
		fill, ok := pages[pgno]
		if !ok {
			continue
		}
		if err := enc.EncodePage(ltx.PageHeader{Pgno: pgno}, bytes.Repeat([]byte{fill}, pageSize)); err != nil {
			t.Fatal(err)
		}
	}
	if err := enc.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func applyAll(t *testing.T, files [][]byte) []byte {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "db"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, b := range files {
		if _, err := ApplyLTX(f, bytes.NewReader(b)); err != nil {
			t.Fatal(err)
		}
	}
	out, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Merging any run of files, snapshot first or not, must give what applying
// them one by one gives — including databases that shrink and grow again.
func TestMergeMatchesSequentialApply(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	for trial := 0; trial < 200; trial++ {
		commit := uint32(1 + rng.Intn(40))
		snap := map[uint32]byte{}
		for p := uint32(1); p <= commit; p++ {
			snap[p] = byte(rng.Intn(250) + 1)
		}
		files := [][]byte{encodeTest(t, 1, 1, commit, snap)}
		txid := ltx.TXID(2)
		for i := 0; i < 1+rng.Intn(6); i++ {
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
		want := applyAll(t, files)

		// Merge all, and merge only the deltas onto the snapshot.
		for _, from := range []int{0, 1} {
			if from >= len(files) {
				continue
			}
			var rs []io.Reader
			for _, b := range files[from:] {
				rs = append(rs, bytes.NewReader(b))
			}
			var out bytes.Buffer
			hdr, _, err := mergeLTX(&out, rs, t.TempDir(), false)
			if err != nil {
				t.Fatalf("trial %d: %v", trial, err)
			}
			if hdr.MinTXID != ltx.TXID(from+1) || hdr.MaxTXID != txid-1 {
				t.Fatalf("trial %d: merged TXIDs %s-%s", trial, hdr.MinTXID, hdr.MaxTXID)
			}
			got := applyAll(t, append(append([][]byte{}, files[:from]...), out.Bytes()))
			if !bytes.Equal(got, want) {
				t.Fatalf("trial %d from %d: merged result differs from sequential apply", trial, from)
			}
		}
	}
}

// A merge of a file with more pages than walcapture.IndexSpillEntries moves
// its page index to the spill directory instead of holding it in memory
// (a 2 GB snapshot held 12.6 MB per encoder with the library's default),
// and the result is the same file, with nothing left in the directory.
func TestMergeSpillsLargeIndex(t *testing.T) {
	n := uint32(walcapture.IndexSpillEntries + 100)
	pages := make(map[uint32]byte, n)
	for p := uint32(1); p <= n; p++ {
		if p != ltx.LockPgno(512) {
			pages[p] = byte(p)
		}
	}
	in := encodeTest(t, 2, 2, n, pages)
	merge := func(dir string) ([]byte, error) {
		var out bytes.Buffer
		_, _, err := mergeLTX(&out, []io.Reader{bytes.NewReader(in)}, dir, false)
		return out.Bytes(), err
	}
	inMemory, err := merge("")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	spilled, err := merge(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(spilled, inMemory) {
		t.Fatal("the merge with its index spilled differs from the one in memory")
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Fatalf("left in the spill directory: %v", left)
	}
	// A spill directory that cannot hold a file shows that the index went
	// there: the merge fails.
	notDir := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(notDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := merge(notDir); err == nil || !strings.Contains(err.Error(), "spill") {
		t.Fatalf("merge with an unusable spill directory: %v", err)
	}
}

// stopReader counts the reads made once stop has run, and runs stop after
// its own first read, or at its end, if set.
type stopReader struct {
	r       io.Reader
	stopped *atomic.Bool
	late    *atomic.Int64
	stop    func()
	atEOF   bool
}

func (s *stopReader) Read(p []byte) (int, error) {
	if s.stopped.Load() {
		s.late.Add(1)
	}
	n, err := s.r.Read(p)
	if s.stop != nil && (!s.atEOF || err == io.EOF) {
		s.stop()
		s.stop = nil
	}
	return n, err
}

func (s *stopReader) Close() error { return nil }

// A merge told to stop reads no further, in its first round or its last:
// building a large snapshot held a stop 9.6 s against a 2 s shutdown timeout.
func TestMergeStopsWithContext(t *testing.T) {
	pages := make(map[uint32]byte)
	for pgno := uint32(1); pgno <= 4000; pgno++ {
		pages[pgno] = byte(pgno)
	}
	files := [][]byte{encodeTest(t, 1, 1, 4000, pages)}
	for txid := ltx.TXID(2); txid <= mergeFanIn+10; txid++ {
		files = append(files, encodeTest(t, txid, txid, 4000, map[uint32]byte{uint32(txid): 1}))
	}
	// Stop during the snapshot, read in the first of two rounds; and once
	// the last input is read to its end, when only the last round, over
	// the first round's temporary files, is left.
	for _, c := range []struct {
		input int
		atEOF bool
	}{{0, false}, {len(files) - 1, true}} {
		ctx, cancel := context.WithCancel(context.Background())
		var stopped atomic.Bool
		var late atomic.Int64
		var srcs []source
		for i, b := range files {
			srcs = append(srcs, func() (io.ReadCloser, error) {
				sr := &stopReader{r: bytes.NewReader(b), stopped: &stopped, late: &late}
				if i == c.input {
					sr.stop, sr.atEOF = func() { stopped.Store(true); cancel() }, c.atEOF
				}
				return sr, nil
			})
		}
		_, err := mergeSources(ctx, io.Discard, srcs, t.TempDir(), false)
		cancel()
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("stop at input %d (at its end: %v): merge returned %v, want context.Canceled", c.input, c.atEOF, err)
		}
		if n := late.Load(); n != 0 {
			t.Fatalf("stop at input %d: %d reads after the stop", c.input, n)
		}
	}
}
