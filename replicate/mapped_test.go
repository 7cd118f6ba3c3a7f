package replicate

import (
	"bufio"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/superfly/ltx"
)

// mapTestFile writes b to a file and maps it, as a restore does.
func mapTestFile(t *testing.T, b []byte) (*mappedLTX, *os.File) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "test.ltx")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	m, err := mapLTX(f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.unmap)
	return m, f
}

// residentKB is how much of the mapping of path is in this process's
// memory, from /proc/self/smaps.
func residentKB(t *testing.T, path string) int {
	t.Helper()
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	in, kb := false, 0
	for sc.Scan() {
		line := sc.Text()
		if fields := strings.Fields(line); len(fields) > 0 && strings.Contains(fields[0], "-") && !strings.HasSuffix(fields[0], ":") {
			in = strings.HasSuffix(line, " "+path)
			continue
		}
		if v, ok := strings.CutPrefix(line, "Rss:"); ok && in {
			n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			if err != nil {
				t.Fatal(err)
			}
			kb += n
		}
	}
	return kb
}

// A mapped file decodes as the library reads it, and the pages behind the
// decoder leave the process as it goes: restoring a large database must
// not make it resident (issue 3: memory bounded whatever the size).
func TestMappedLTXDecodesAndReleases(t *testing.T) {
	smallBatches(t, 256<<10)
	rng := rand.New(rand.NewPCG(21, 22))
	b := randomLTX(t, rng, 4096, 6000, true, true) // about 24 MB
	want, err := decodeWithLibrary(b)
	if err != nil {
		t.Fatal(err)
	}
	m, f := mapTestFile(t, b)
	got := decoded{pages: map[uint32][]byte{}}
	peak := 0
	err = decodeLTX(context.Background(), m, nil, func(ltx.Header) error { return nil },
		func(uint32) (bool, error) { return true, nil },
		func(pgnos []uint32, data []byte, sum ltx.Checksum) error {
			for i, pgno := range pgnos {
				got.pages[pgno] = append([]byte(nil), data[i*4096:(i+1)*4096]...)
			}
			got.sum ^= sum
			peak = max(peak, residentKB(t, f.Name()))
			return nil
		})
	if err != nil {
		t.Fatal(err)
	}
	samePages(t, "mapped", got, want)
	// A few batches in flight and the kernel's read-around: a few MB, not
	// the file.
	if limit := len(b) / 1024 / 3; peak > limit {
		t.Fatalf("%d KB of the %d KB file were resident at once, want at most %d", peak, len(b)/1024, limit)
	}
	t.Logf("peak resident %d KB of a %d KB file", peak, len(b)/1024)
}

// A mapped file cut short while it is read (another process truncating
// it, or a read error, which the kernel reports the same way: a fault)
// fails the decoding with an error, instead of crashing the process.
func TestMappedLTXCutShortIsAnError(t *testing.T) {
	smallBatches(t, 64<<10)
	rng := rand.New(rand.NewPCG(23, 24))
	b := randomLTX(t, rng, 4096, 2000, true, true)
	m, f := mapTestFile(t, b)
	// At a page boundary: what follows faults (within the last page, the
	// bytes past the end would read as zeros, a mere decoding error).
	if err := os.Truncate(f.Name(), int64(len(b)/3)&^int64(os.Getpagesize()-1)); err != nil {
		t.Fatal(err)
	}
	err := decodeLTX(context.Background(), m, nil, func(ltx.Header) error { return nil },
		func(uint32) (bool, error) { return true, nil },
		func([]uint32, []byte, ltx.Checksum) error { return nil })
	if mf := (mapFault{}); !errors.As(err, &mf) || !strings.Contains(err.Error(), "cut short") {
		t.Fatalf("decoding a file cut short while mapped: %v", err)
	}
}

// Cancelling stops a mapped file in the middle: a restore interrupted
// while it reads the snapshot stops there, not at the end of the file.
func TestMappedLTXStopsWhenCancelled(t *testing.T) {
	smallBatches(t, 64<<10)
	rng := rand.New(rand.NewPCG(25, 26))
	m, _ := mapTestFile(t, randomLTX(t, rng, 4096, 2000, true, true))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	calls := 0
	err := decodeLTX(ctx, m, nil, func(ltx.Header) error { return nil },
		func(uint32) (bool, error) { return true, nil },
		func([]uint32, []byte, ltx.Checksum) error {
			if calls++; calls == 2 {
				cancel()
			}
			return nil
		})
	if !errors.Is(err, context.Canceled) || calls > 2+10 {
		t.Fatalf("cancelled after batch 2 of about 125: %v after %d batches", err, calls)
	}
}
