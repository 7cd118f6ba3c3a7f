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
			if _, err = EncodeTxn(w, wal, txn, sums, 2, 2, time.Now()); err == nil {
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
