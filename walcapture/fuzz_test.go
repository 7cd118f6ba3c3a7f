package walcapture

import (
	"bytes"
	"testing"
)

// FuzzScan feeds arbitrary bytes to the WAL parser. Whatever the input, it
// must not panic, must emit transactions whose pages lie inside the file and
// the database, must emit the same history twice, and must be able to resume
// at the position it reached. The seed corpus in testdata/fuzz/FuzzScan holds
// logs written by real SQLite (kept as files: SQLite inside fuzz workers
// stalls them).
func FuzzScan(f *testing.F) {
	f.Add([]byte{})
	f.Add(make([]byte, HeaderSize))

	f.Fuzz(func(t *testing.T, wal []byte) {
		scan := func(c *Capturer) []Txn {
			var out []Txn
			if _, err := c.Scan(bytes.NewReader(wal), func(txn Txn) error {
				out = append(out, txn)
				return nil
			}); err != nil {
				t.Fatalf("scan of static bytes failed: %v", err)
			}
			return out
		}
		var c Capturer
		txns := scan(&c)
		for _, txn := range txns {
			if txn.Commit == 0 {
				t.Fatal("transaction with commit size 0")
			}
			if txn.End() > int64(len(wal)) || txn.Offset < HeaderSize {
				t.Fatalf("transaction [%d,%d) outside a %d-byte file", txn.Offset, txn.End(), len(wal))
			}
			var prev uint32
			for _, p := range txn.Pages {
				if p.Pgno <= prev || p.Pgno > txn.Commit {
					t.Fatalf("page %d out of order or beyond commit %d", p.Pgno, txn.Commit)
				}
				if off := txn.Header.PageOffset(p.Frame); off < txn.Offset || off+int64(txn.Header.PageSize) > txn.End() {
					t.Fatalf("page %d data outside its transaction's frames", p.Pgno)
				}
				prev = p.Pgno
			}
		}
		if again := scan(&Capturer{}); len(again) != len(txns) {
			t.Fatalf("second scan found %d transactions, first %d", len(again), len(txns))
		}
		var r Capturer
		if err := r.Resume(bytes.NewReader(wal), c.Pos()); err != nil {
			t.Fatalf("resume at %+v: %v", c.Pos(), err)
		}
		if more := scan(&r); len(more) != 0 {
			t.Fatalf("resumed capture emitted %d transactions already captured", len(more))
		}
	})
}
