package replicate

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc64"
	"io"
	"math/rand/v2"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pierrec/lz4/v4"
	"github.com/superfly/ltx"
)

// randomLTX encodes an LTX file of n pages of pageSize bytes, some of them
// compressible and some not, as the encoder of a replica would.
func randomLTX(t testing.TB, rng *rand.Rand, pageSize uint32, n int, snapshot, withChecksum bool) []byte {
	t.Helper()
	var buf bytes.Buffer
	enc, err := ltx.NewEncoder(&buf)
	if err != nil {
		t.Fatal(err)
	}
	lock := ltx.LockPgno(pageSize)
	var pgnos []uint32
	for pgno := uint32(1); len(pgnos) < n; pgno++ {
		if pgno != lock && (snapshot || rng.IntN(3) == 0) {
			pgnos = append(pgnos, pgno)
		}
	}
	commit := pgnos[len(pgnos)-1]
	if !snapshot {
		commit += uint32(rng.IntN(10))
		if commit == lock {
			commit++
		}
	}
	hdr := ltx.Header{Version: ltx.Version, PageSize: pageSize, Commit: commit, MinTXID: 1, MaxTXID: 1,
		Timestamp: time.Unix(1, 0).UnixMilli()}
	if !snapshot {
		hdr.MinTXID, hdr.MaxTXID = 5, 9
		if withChecksum {
			hdr.PreApplyChecksum = ltx.ChecksumFlag | 1
		}
	}
	if !withChecksum {
		hdr.Flags = ltx.HeaderFlagNoChecksum
	}
	if err := enc.EncodeHeader(hdr); err != nil {
		t.Fatal(err)
	}
	sum := ltx.ChecksumFlag
	page := make([]byte, pageSize)
	for _, pgno := range pgnos {
		for i := range page {
			if rng.IntN(2) == 0 {
				page[i] = byte(pgno)
			} else {
				page[i] = byte(rng.Uint32())
			}
		}
		if rng.IntN(4) == 0 {
			clear(page[rng.IntN(len(page)):])
		}
		sum ^= ltx.ChecksumPage(pgno, page)
		if err := enc.EncodePage(ltx.PageHeader{Pgno: pgno}, page); err != nil {
			t.Fatal(err)
		}
	}
	if withChecksum {
		enc.SetPostApplyChecksum(ltx.ChecksumFlag | sum)
	}
	if err := enc.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// decoded is what a decoder made of a file: every page, and the XOR of the
// page checksums.
type decoded struct {
	pages map[uint32][]byte
	sum   ltx.Checksum
}

func decodeWithLibrary(b []byte) (decoded, error) {
	d := decoded{pages: map[uint32][]byte{}}
	dec := ltx.NewDecoder(bytes.NewReader(b))
	if err := dec.DecodeHeader(); err != nil {
		return d, err
	}
	for {
		var ph ltx.PageHeader
		page := make([]byte, dec.Header().PageSize)
		if err := dec.DecodePage(&ph, page); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return d, err
		}
		d.pages[ph.Pgno] = page
		d.sum ^= ltx.ChecksumPage(ph.Pgno, page)
	}
	return d, dec.Close()
}

// decodeOurs runs decodeLTX, wanting the pages keep says, both ways it
// reads a file: through a reader, and in place from memory (as from a
// mapped file). The two must agree on whether b is accepted and on what it
// holds; the test fails at once where they do not, whatever it expected
// of b.
func decodeOurs(t testing.TB, b []byte, keep func(uint32) bool) (decoded, error) {
	t.Helper()
	streamed, err := decodeFrom(bytes.NewReader(b), keep)
	inPlace, err2 := decodeFrom(newMappedLTX(b), keep)
	switch {
	case (err == nil) != (err2 == nil):
		t.Fatalf("read, the decoder says %v; in place, %v", err, err2)
	case err != nil:
		return streamed, err
	}
	if len(streamed.pages) != len(inPlace.pages) || streamed.sum != inPlace.sum {
		t.Fatalf("read, %d pages with checksum %s; in place, %d with %s",
			len(streamed.pages), streamed.sum, len(inPlace.pages), inPlace.sum)
	}
	for pgno, page := range streamed.pages {
		if !bytes.Equal(page, inPlace.pages[pgno]) {
			t.Fatalf("page %d differs between read and in place", pgno)
		}
	}
	return streamed, nil
}

func decodeFrom(r io.Reader, keep func(uint32) bool) (decoded, error) {
	d := decoded{pages: map[uint32][]byte{}}
	var pageSize int
	err := decodeLTX(context.Background(), r, nil,
		func(h ltx.Header) error { pageSize = int(h.PageSize); return nil },
		func(pgno uint32) (bool, error) { return keep(pgno), nil },
		func(pgnos []uint32, data []byte, sum ltx.Checksum) error {
			if len(data) != len(pgnos)*pageSize {
				return fmt.Errorf("%d pages in %d bytes", len(pgnos), len(data))
			}
			for i, pgno := range pgnos {
				d.pages[pgno] = bytes.Clone(data[i*pageSize : (i+1)*pageSize])
			}
			d.sum ^= sum
			return nil
		})
	return d, err
}

func samePages(t *testing.T, what string, got, want decoded) {
	t.Helper()
	if len(got.pages) != len(want.pages) {
		t.Fatalf("%s: %d pages, want %d", what, len(got.pages), len(want.pages))
	}
	for pgno, page := range want.pages {
		if !bytes.Equal(got.pages[pgno], page) {
			t.Fatalf("%s: page %d differs", what, pgno)
		}
	}
	if (got.sum^want.sum)&^ltx.ChecksumFlag != 0 {
		t.Fatalf("%s: page checksums %s, want %s", what, got.sum, want.sum)
	}
}

// smallBatches makes decodeLTX cut files into batches of a few pages, so
// that small test files cross many batch boundaries.
func smallBatches(t testing.TB, bytes int) {
	old := batchBytes
	batchBytes = bytes
	t.Cleanup(func() { batchBytes = old })
}

// The parallel decoder gives what ltx.Decoder gives, for every page size,
// both kinds of file, with and without checksums, and any choice of pages.
func TestDecodeLTXMatchesLibrary(t *testing.T) {
	smallBatches(t, 64<<10)
	rng := rand.New(rand.NewPCG(3, 4))
	for _, pageSize := range []uint32{512, 1024, 4096, 65536} {
		for _, snapshot := range []bool{true, false} {
			for _, withChecksum := range []bool{true, false} {
				name := fmt.Sprintf("page=%d/snapshot=%v/checksum=%v", pageSize, snapshot, withChecksum)
				t.Run(name, func(t *testing.T) {
					n := 1 + rng.IntN(int(1<<20/pageSize)) // up to 16 batches
					b := randomLTX(t, rng, pageSize, n, snapshot, withChecksum)
					want, err := decodeWithLibrary(b)
					if err != nil {
						t.Fatal(err)
					}
					got, err := decodeOurs(t, b, func(uint32) bool { return true })
					if err != nil {
						t.Fatal(err)
					}
					samePages(t, "all pages", got, want)

					picked := decoded{pages: map[uint32][]byte{}}
					chosen := map[uint32]bool{}
					for pgno, page := range want.pages {
						if rng.IntN(2) == 0 {
							chosen[pgno] = true
							picked.pages[pgno] = page
							picked.sum ^= ltx.ChecksumPage(pgno, page)
						}
					}
					got, err = decodeOurs(t, b, func(pgno uint32) bool { return chosen[pgno] })
					if err != nil {
						t.Fatal(err)
					}
					samePages(t, "some pages", got, picked)
				})
			}
		}
	}
}

// Any damage to a file is refused: every byte that can change is covered
// by the file checksum, the index must match the frames, and the file must
// end where the trailer does. (A changed LZ4 block can still decompress to
// the same page, a match pointing at equal bytes elsewhere; that damage
// changes nothing and may pass.)
func TestDecodeLTXRefusesDamage(t *testing.T) {
	smallBatches(t, 8<<10)
	rng := rand.New(rand.NewPCG(5, 6))
	b := randomLTX(t, rng, 1024, 150, false, false) // 19 batches
	want, err := decodeOurs(t, b, func(uint32) bool { return true })
	if err != nil {
		t.Fatal(err)
	}
	// Every byte of the header, the first frame's head and the trailer, and
	// samples of the index and the rest.
	var positions []int
	for i := range b {
		if i < 300 || i >= len(b)-1200 || rng.IntN(100) == 0 {
			positions = append(positions, i)
		}
	}
	for _, i := range positions {
		flip := byte(1 + rng.IntN(255))
		b[i] ^= flip
		got, err := decodeOurs(t, b, func(uint32) bool { return true })
		var libErr error
		if err == nil {
			_, libErr = decodeWithLibrary(b)
		}
		b[i] ^= flip
		if err != nil {
			continue
		}
		if libErr != nil {
			t.Fatalf("byte %d of %d changed: accepted, though ltx.Decoder says %v", i, len(b), libErr)
		}
		samePages(t, fmt.Sprintf("byte %d changed and accepted", i), got, want)
	}
	for range 200 {
		n := rng.IntN(len(b))
		if _, err := decodeOurs(t, b[:n], func(uint32) bool { return true }); err == nil {
			t.Fatalf("file cut to %d of %d bytes was accepted", n, len(b))
		}
	}
	if _, err := decodeOurs(t, append(bytes.Clone(b), 0), func(uint32) bool { return true }); err == nil {
		t.Fatal("a byte after the trailer was accepted")
	}
	t.Logf("%d damaged copies tried", len(positions))
}

// A failure in the caller's emit stops the decoding: the error comes back
// and no goroutine is left reading.
func TestDecodeLTXStopsOnEmitError(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	smallBatches(t, 16<<10)
	b := randomLTX(t, rng, 4096, 100, true, false)
	before := runtime.NumGoroutine()
	calls := 0
	stop := errors.New("disk full")
	err := decodeLTX(context.Background(), bytes.NewReader(b), nil, func(ltx.Header) error { return nil },
		func(uint32) (bool, error) { return true, nil },
		func([]uint32, []byte, ltx.Checksum) error {
			if calls++; calls == 3 {
				return stop
			}
			return nil
		})
	if !errors.Is(err, stop) || calls != 3 {
		t.Fatalf("err %v after %d calls, want %v after 3", err, calls, stop)
	}
	// A goroutine that has returned may still be counted for a moment.
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines before, %d after", before, runtime.NumGoroutine())
		}
		runtime.Gosched()
	}
}

// A failure must not wait on a source that has stopped sending (a remote
// body stalled mid-file): the decoder closes it, which ends the read. Here
// emit fails only once the splitter is stuck in a read of the stalled half.
func TestDecodeLTXClosesStalledSourceOnError(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	smallBatches(t, 64<<10) // the half read fits in the channels: the splitter reaches the stall
	b := randomLTX(t, rng, 4096, 100, true, false)
	src := &stallingReader{b: b[:len(b)/2], stalled: make(chan struct{}), closed: make(chan struct{})}
	stop := errors.New("disk full")
	done := make(chan error, 1)
	go func() {
		done <- decodeLTX(context.Background(), src, nil, func(ltx.Header) error { return nil },
			func(uint32) (bool, error) { return true, nil },
			func([]uint32, []byte, ltx.Checksum) error {
				<-src.stalled
				return stop
			})
	}()
	select {
	case err := <-done:
		if !errors.Is(err, stop) {
			t.Fatalf("err %v, want %v", err, stop)
		}
	case <-time.After(30 * time.Second): // a hang, not a speed limit
		src.Close()
		<-done
		t.Fatal("decodeLTX waited on a stalled source after emit failed")
	}
}

// stallingReader serves b, then blocks until closed.
type stallingReader struct {
	b               []byte
	stalled, closed chan struct{}
	once, stall     sync.Once
}

func (s *stallingReader) Read(p []byte) (int, error) {
	if len(s.b) > 0 {
		n := copy(p, s.b)
		s.b = s.b[n:]
		return n, nil
	}
	s.stall.Do(func() { close(s.stalled) })
	<-s.closed
	return 0, errors.New("read on a closed body")
}

func (s *stallingReader) Close() error {
	s.once.Do(func() { close(s.closed) })
	return nil
}

// FuzzDecodeLTX: no input makes the decoder panic, and whatever it accepts,
// ltx.Decoder accepts too, with the same pages.
func FuzzDecodeLTX(f *testing.F) {
	rng := rand.New(rand.NewPCG(9, 10))
	f.Add(randomLTX(f, rng, 512, 3, true, true))
	f.Add(randomLTX(f, rng, 512, 5, false, false))
	f.Fuzz(func(t *testing.T, b []byte) {
		got, err := decodeOurs(t, b, func(uint32) bool { return true })
		if err != nil {
			return
		}
		want, err := decodeWithLibrary(b)
		if err != nil {
			t.Fatalf("accepted a file ltx.Decoder refuses: %v", err)
		}
		samePages(t, "fuzzed", got, want)
	})
}

// handLTX encodes an LTX file the way ltx.Encoder does, but with whatever
// page numbers it is given, in that order: what a damaged or hostile
// writer could produce, with a consistent index and a correct checksum.
func handLTX(t *testing.T, pageSize, commit uint32, pgnos []uint32) []byte {
	t.Helper()
	var out bytes.Buffer
	h := crc64.New(crc64.MakeTable(crc64.ISO)) // the standard library, not the code under test
	both := func(b []byte) { out.Write(b); h.Write(b) }
	hb, err := (&ltx.Header{Version: ltx.Version, Flags: ltx.HeaderFlagNoChecksum, PageSize: pageSize,
		Commit: commit, MinTXID: 5, MaxTXID: 9, Timestamp: 1000}).MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	both(hb)
	var index []byte
	block := make([]byte, lz4.CompressBlockBound(int(pageSize)))
	for _, pgno := range pgnos {
		page := bytes.Repeat([]byte{byte(pgno)}, int(pageSize))
		n, err := lz4.CompressBlock(page, block, nil)
		if err != nil || n == 0 {
			t.Fatalf("compress: %d %v", n, err)
		}
		offset := out.Len()
		ph, _ := (&ltx.PageHeader{Pgno: pgno, Flags: ltx.PageHeaderFlagSize}).MarshalBinary()
		both(ph)
		both(binary.BigEndian.AppendUint32(nil, uint32(n)))
		out.Write(block[:n])
		h.Write(page)
		index = binary.AppendUvarint(index, uint64(pgno))
		index = binary.AppendUvarint(index, uint64(offset))
		index = binary.AppendUvarint(index, uint64(out.Len()-offset))
	}
	end, _ := (&ltx.PageHeader{}).MarshalBinary()
	both(end)
	index = binary.AppendUvarint(index, 0)
	both(index)
	both(binary.BigEndian.AppendUint64(nil, uint64(len(index))))
	both(binary.BigEndian.AppendUint64(nil, uint64(ltx.ChecksumFlag)))
	out.Write(binary.BigEndian.AppendUint64(nil, uint64(ltx.ChecksumFlag|ltx.Checksum(h.Sum64()))))
	return out.Bytes()
}

// The page order and bounds are checked by decodeLTX itself, whatever the
// caller keeps: a well-formed file whose pages lie outside the database,
// repeat, go backwards or include SQLite's lock page is refused.
func TestDecodeLTXChecksPageOrder(t *testing.T) {
	if _, err := decodeOurs(t, handLTX(t, 512, 5, []uint32{1, 2, 3}), func(uint32) bool { return true }); err != nil {
		t.Fatalf("a well-formed file: %v", err)
	}
	lock := ltx.LockPgno(512)
	for name, c := range map[string]struct {
		commit uint32
		pgnos  []uint32
	}{
		"beyond the commit size": {5, []uint32{1, 2, 9}},
		"backwards":              {5, []uint32{1, 3, 2}},
		"repeated":               {5, []uint32{1, 2, 2}},
		"the lock page":          {lock + 2, []uint32{1, lock}},
	} {
		b := handLTX(t, 512, c.commit, c.pgnos)
		if _, err := decodeOurs(t, b, func(uint32) bool { return true }); err == nil || !strings.Contains(err.Error(), "out of order or outside") {
			t.Errorf("%s: got %v, want a refusal naming the page order", name, err)
		}
		if _, err := decodeWithLibrary(b); err == nil && name != "the lock page" {
			t.Errorf("%s: ltx.Decoder accepts it", name)
		}
	}
}

// The buffers of a restore outlive garbage collections: the next file
// decodes into the batches the last one used. They were in sync.Pools,
// which every collection empties, and lfuse's memory limit makes
// collections frequent; a restore of 1.44 GB allocated 455 MB of buffers.
func TestDecodeReusesBuffersAcrossCollections(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	file := randomLTX(t, rng, 4096, 2000, true, true) // 8 MB of pages: 8 batches
	bufs := newDecodeBuffers()
	decode := func() {
		err := decodeLTX(context.Background(), bytes.NewReader(file), bufs, func(ltx.Header) error { return nil },
			func(uint32) (bool, error) { return true, nil },
			func([]uint32, []byte, ltx.Checksum) error { return nil })
		if err != nil {
			t.Fatal(err)
		}
	}
	decode()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range 3 {
		runtime.GC()
		runtime.GC()
		decode()
	}
	runtime.ReadMemStats(&after)
	// A decode that reuses nothing allocates about 17 MB. Reusing, a later
	// decode only adds a batch when more are in flight than ever before
	// (at most about ten of 2 MB, whatever the goroutines' timing).
	if got := after.TotalAlloc - before.TotalAlloc; got > 24<<20 {
		t.Fatalf("decoding 8 MB of pages three more times allocated %d bytes; the batches were not reused", got)
	}
}
