package replicate

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"

	"github.com/superfly/ltx"
)

// assembler builds a restored database from LTX files given newest first.
// Each page is written once, by the newest file that holds it, so the
// history costs no rewrites and no reads of replaced pages, and the
// database checksum is the XOR of the written pages' checksums.
//
// Applying files oldest first would cut a database that shrinks (a smaller
// commit size) and zero-fill it where it grows again. Newest first, that is
// limit: the smallest commit size among the files seen so far. An older
// file's page above it was cut off later; a page at or below the newest
// file's size that no file gives (nor the snapshot, within limit) reads as
// zeros, which the sparse output already does.
type assembler struct {
	out      *os.File
	pageSize int
	lock     uint32
	commit   uint32 // pages in the result: the newest file's commit size
	limit    uint32
	written  []uint64 // bit per page: holds its final content
	sum      ltx.Checksum
	started  bool
}

func (a *assembler) isWritten(pgno uint32) bool {
	return a.written[(pgno-1)/64]&(1<<((pgno-1)%64)) != 0
}

func (a *assembler) markWritten(pgno uint32) {
	a.written[(pgno-1)/64] |= 1 << ((pgno - 1) % 64)
}

// apply reads one LTX file and writes the pages of it that are still the
// final content of the database. It is a pipeline, because CRC-64 is most
// of the cost: one goroutine decodes (LZ4, and the file's own CRC) and picks
// the pages that count, workers checksum batches of them, and the caller
// writes them in order, coalescing runs of adjacent pages. Memory is a few
// batches of pages and a bit per database page.
func (a *assembler) apply(r io.Reader, snapshot bool) error {
	dec := ltx.NewDecoder(bufio.NewReaderSize(r, 1<<20))
	dec.SetRetainPageIndex(false)
	if err := dec.DecodeHeader(); err != nil {
		return err
	}
	hdr := dec.Header()
	switch {
	case snapshot && !hdr.IsSnapshot():
		return errors.New("the first file of a restore must be a snapshot")
	case !snapshot && hdr.IsSnapshot():
		return errors.New("unexpected snapshot in the middle of a restore")
	}
	if !a.started {
		a.started = true
		a.pageSize = int(hdr.PageSize)
		a.lock = ltx.LockPgno(hdr.PageSize)
		a.commit, a.limit = hdr.Commit, hdr.Commit
		a.written = make([]uint64, (int(hdr.Commit)+63)/64)
		if err := a.out.Truncate(int64(hdr.Commit) * int64(hdr.PageSize)); err != nil {
			return err
		}
	} else if int(hdr.PageSize) != a.pageSize {
		return fmt.Errorf("page size %d, the newer files' %d", hdr.PageSize, a.pageSize)
	}
	a.limit = min(a.limit, hdr.Commit)
	pageSize := a.pageSize

	type batch struct {
		pgnos []uint32
		data  []byte
		sum   ltx.Checksum
		done  chan struct{}
	}
	const batchPages = 256
	pool := sync.Pool{New: func() any {
		return &batch{pgnos: make([]uint32, 0, batchPages), data: make([]byte, 0, batchPages*pageSize)}
	}}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	work := make(chan *batch, 4)
	ordered := make(chan *batch, 8)
	var decErr error
	go func() { // decode, and pick the pages that count
		defer close(work)
		defer close(ordered)
		b := pool.Get().(*batch)
		send := func() bool {
			if len(b.pgnos) == 0 {
				return true
			}
			b.done = make(chan struct{})
			select {
			case work <- b:
			case <-ctx.Done():
				return false
			}
			select {
			case ordered <- b:
			case <-ctx.Done():
				return false
			}
			b = pool.Get().(*batch)
			b.pgnos, b.data, b.sum = b.pgnos[:0], b.data[:0], 0
			return true
		}
		var prev uint32
		for {
			if len(b.pgnos) == batchPages && !send() {
				return
			}
			n := len(b.data)
			b.data = b.data[:n+pageSize]
			var ph ltx.PageHeader
			err := dec.DecodePage(&ph, b.data[n:])
			if errors.Is(err, io.EOF) {
				b.data = b.data[:n]
				break
			} else if err != nil {
				decErr = err
				return
			}
			switch {
			case ph.Pgno > hdr.Commit || ph.Pgno == a.lock || ph.Pgno <= prev:
				decErr = fmt.Errorf("page %d out of order or outside the database of %d pages", ph.Pgno, hdr.Commit)
				return
			case snapshot && ph.Pgno != prev+1 && !(ph.Pgno == a.lock+1 && prev == a.lock-1):
				decErr = fmt.Errorf("snapshot page %d follows page %d", ph.Pgno, prev)
				return
			}
			prev = ph.Pgno
			if ph.Pgno > a.limit || a.isWritten(ph.Pgno) {
				b.data = b.data[:n] // a newer file has its final content, or cut it off
				continue
			}
			a.markWritten(ph.Pgno)
			b.pgnos = append(b.pgnos, ph.Pgno)
		}
		if snapshot && prev != hdr.Commit && !(prev == a.lock-1 && hdr.Commit == a.lock) {
			decErr = fmt.Errorf("snapshot ends at page %d of %d", prev, hdr.Commit)
			return
		}
		if !send() {
			return
		}
		decErr = dec.Close()
	}()
	var wg sync.WaitGroup
	defer wg.Wait()
	for range max(1, runtime.GOMAXPROCS(0)-1) {
		wg.Add(1)
		go func() { // checksum
			defer wg.Done()
			h := ltx.NewHasher()
			for b := range work {
				for i, pgno := range b.pgnos {
					b.sum ^= ltx.ChecksumPageWithHasher(h, pgno, b.data[i*pageSize:(i+1)*pageSize])
				}
				close(b.done)
			}
		}()
	}

	for b := range ordered {
		<-b.done
		a.sum ^= b.sum
		for i := 0; i < len(b.pgnos); {
			j := i + 1
			for j < len(b.pgnos) && b.pgnos[j] == b.pgnos[j-1]+1 {
				j++
			}
			if _, err := a.out.WriteAt(b.data[i*pageSize:j*pageSize], int64(b.pgnos[i]-1)*int64(pageSize)); err != nil {
				cancel()
				return err
			}
			i = j
		}
		pool.Put(b)
	}
	return decErr
}

// finish accounts for the pages no file gave, which read as zeros, and
// returns the database checksum.
func (a *assembler) finish() ltx.Checksum {
	var zero []byte
	h := ltx.NewHasher()
	for pgno := uint32(1); pgno <= a.commit; pgno++ {
		if pgno == a.lock || a.isWritten(pgno) {
			continue
		}
		if zero == nil {
			zero = make([]byte, a.pageSize)
		}
		a.sum ^= ltx.ChecksumPageWithHasher(h, pgno, zero)
	}
	// Page checksums carry the flag bit, which XOR toggles; the database
	// checksum always has it set.
	return ltx.ChecksumFlag | a.sum
}
