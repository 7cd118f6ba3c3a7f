package walcapture

import (
	"bufio"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/superfly/ltx"
)

// The capture of one committed 200,000-row insert (about 1,400 pages), as
// lfuse does it when the commit lands: validate the transaction's frames,
// then encode its pages into an LTX file on disk.
func BenchmarkCaptureBulkTxn(b *testing.B) {
	l := openLive(b, 4096)
	tx, err := l.db.Begin()
	if err != nil {
		b.Fatal(err)
	}
	tx.Exec("CREATE TABLE t(id INTEGER PRIMARY KEY, a INTEGER, v TEXT)")
	stmt, _ := tx.Prepare("INSERT INTO t(a, v) VALUES(?, ?)")
	for r := 0; r < 200_000; r++ {
		stmt.Exec(r, "bulk row payload")
	}
	stmt.Close()
	if err := tx.Commit(); err != nil {
		b.Fatal(err)
	}
	walPath := l.path + "-wal"
	wal, err := os.Open(walPath)
	if err != nil {
		b.Fatal(err)
	}
	defer wal.Close()
	fi, _ := wal.Stat()
	b.SetBytes(fi.Size())
	out := filepath.Join(l.dir, "out.ltx")
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		var c Capturer
		sums := &MemSums{}
		n := 0
		_, err := c.Scan(wal, func(txn Txn) error {
			f, err := os.Create(out)
			if err != nil {
				return err
			}
			defer f.Close()
			w := bufio.NewWriterSize(f, 64<<10) // as the local log writes
			if _, err = EncodeTxn(w, wal, txn, sums, 2, 2, time.Now(), ""); err == nil {
				err = w.Flush()
			}
			n++
			return err
		})
		if err != nil || n != 1 {
			b.Fatalf("scan: %v, %d txns", err, n)
		}
	}
}

func TestChecksumPageMatchesLTX(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for _, size := range []int{512, 1024, 4096, 65536} {
		page := make([]byte, size)
		for range 20 {
			for i := range page {
				page[i] = byte(rng.Uint32())
			}
			pgno := rng.Uint32()
			if got, want := ChecksumPage(pgno, page), ltx.ChecksumPage(pgno, page); got != want {
				t.Fatalf("page %d of %d bytes: got %s, want %s", pgno, size, got, want)
			}
		}
	}
}

// Merge against the obvious model: apply the transactions one by one to a
// map of page → offset, cutting it at each commit size. Sizes shrink and
// grow again, pages repeat, and the lock page never appears.
func TestMergeMatchesOneByOne(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	const pageSize = 512
	lock := LockPgno(pageSize)
	for round := 0; round < 500; round++ {
		hdr := Header{PageSize: pageSize, Salt1: 7, Salt2: 9}
		off := int64(HeaderSize)
		var txns []Txn
		model := map[uint32]uint32{} // page: frame of its final image
		frame := uint32(0)
		for range 1 + rng.IntN(6) {
			commit := uint32(1 + rng.IntN(40))
			if rng.IntN(8) == 0 {
				commit = lock + uint32(rng.IntN(3)) // around the lock page
			}
			t := Txn{Header: hdr, Offset: off, Commit: commit}
			var frames []Page
			for range rng.IntN(30) {
				pgno := uint32(1 + rng.IntN(int(commit)+5)) // some beyond commit
				if rng.IntN(10) == 0 {
					pgno = max(1, lock-1+uint32(rng.IntN(3)))
				}
				frames = append(frames, Page{Pgno: pgno, Frame: frame})
				off += hdr.FrameSize()
				frame++
			}
			frames = append(frames, Page{Pgno: 1, Frame: frame}) // the commit frame
			off += hdr.FrameSize()
			frame++
			t.Size = off - t.Offset
			t.Pages = finalPages(frames, commit, pageSize)
			for pgno := range model {
				if pgno > commit {
					delete(model, pgno)
				}
			}
			for _, p := range t.Pages {
				model[p.Pgno] = p.Frame
			}
			txns = append(txns, t)
		}
		got := Merge(txns)
		if got.Commit != txns[len(txns)-1].Commit || got.Offset != txns[0].Offset || got.End() != off {
			t.Fatalf("round %d: merged commit %d at %d-%d", round, got.Commit, got.Offset, got.End())
		}
		if len(got.Pages) != len(model) {
			t.Fatalf("round %d: merged %d pages, model %d", round, len(got.Pages), len(model))
		}
		for i, p := range got.Pages {
			if i > 0 && got.Pages[i-1].Pgno >= p.Pgno {
				t.Fatalf("round %d: pages out of order: %d then %d", round, got.Pages[i-1].Pgno, p.Pgno)
			}
			if p.Pgno == lock || model[p.Pgno] != p.Frame {
				t.Fatalf("round %d: page %d in frame %d, model %d", round, p.Pgno, p.Frame, model[p.Pgno])
			}
		}
	}
}

// A page written twice in one transaction is captured from its last frame.
func TestFinalPagesKeepsLastFrame(t *testing.T) {
	frames := []Page{{3, 100}, {1, 200}, {3, 300}, {9, 400}, {1, 500}, {2, 600}}
	got := finalPages(frames, 8, 4096)
	want := []Page{{1, 500}, {2, 600}, {3, 300}}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
}
