package walcapture

import (
	"bytes"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	_ "github.com/mattn/go-sqlite3"
	"github.com/superfly/ltx"
)

// liveDB is a real SQLite database in WAL mode with automatic checkpoints off,
// so its -wal file keeps every frame until the test checkpoints.
type liveDB struct {
	t    testing.TB
	dir  string
	path string
	db   *sql.DB
}

func openLive(t testing.TB, pageSize int, pragmas ...string) *liveDB {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "test.db")
	db, err := sql.Open("sqlite3", path)
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(1)
	t.Cleanup(func() { db.Close() })
	l := &liveDB{t: t, dir: dir, path: path, db: db}
	l.exec(fmt.Sprintf("PRAGMA page_size=%d", pageSize))
	l.exec("PRAGMA journal_mode=WAL")
	l.exec("PRAGMA wal_autocheckpoint=0")
	for _, p := range pragmas {
		l.exec(p)
	}
	return l
}

func (l *liveDB) exec(query string, args ...any) {
	l.t.Helper()
	if _, err := l.db.Exec(query, args...); err != nil {
		l.t.Fatalf("%s: %v", query, err)
	}
}

func (l *liveDB) checkpoint(mode string) {
	l.t.Helper()
	var busy, logN, ckpt int
	if err := l.db.QueryRow("PRAGMA wal_checkpoint("+mode+")").Scan(&busy, &logN, &ckpt); err != nil {
		l.t.Fatal(err)
	}
	if busy != 0 {
		l.t.Fatalf("checkpoint %s busy", mode)
	}
}

// files returns copies of the database file and its log as they are now.
func (l *liveDB) files() (db, wal []byte) {
	l.t.Helper()
	return readFile(l.t, l.path), readFile(l.t, l.path+"-wal")
}

func readFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return b
}

// recovered returns the database SQLite itself recovers from a copy of db and
// wal: the reference every captured history must reproduce.
func recovered(t *testing.T, db, wal []byte) []byte {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "r.db")
	if err := os.WriteFile(path, db, 0o644); err != nil {
		t.Fatal(err)
	}
	if wal != nil {
		if err := os.WriteFile(path+"-wal", wal, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	conn, err := sql.Open("sqlite3", path)
	if err != nil {
		t.Fatal(err)
	}
	var n int
	if err := conn.QueryRow("PRAGMA wal_checkpoint(TRUNCATE)").Scan(&n, &n, &n); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	return readFile(t, path)
}

// captureAll scans wal with c and returns each emitted transaction as an LTX
// file, keeping sums up to date.
func captureAll(t *testing.T, c *Capturer, wal []byte, sums *MemSums, firstID ltx.TXID) ([][]byte, ScanResult) {
	t.Helper()
	var out [][]byte
	id := firstID
	res, err := c.Scan(bytes.NewReader(wal), func(txn Txn) error {
		var buf bytes.Buffer
		u, err := EncodeTxn(&buf, bytes.NewReader(wal), txn, sums, id, id, time.Now(), "")
		if err != nil {
			return err
		}
		sums.Apply(u)
		out = append(out, buf.Bytes())
		id++
		return nil
	})
	if err != nil {
		t.Fatalf("scan: %v", err)
	}
	return out, res
}

// applyLTX applies one LTX file to an in-memory database image, checking its
// checksums against the image before and after.
func applyLTX(t *testing.T, db []byte, file []byte) []byte {
	t.Helper()
	dec := ltx.NewDecoder(bytes.NewReader(file))
	if err := dec.DecodeHeader(); err != nil {
		t.Fatal(err)
	}
	hdr := dec.Header()
	db = bytes.Clone(db) // never write into the caller's image
	if !hdr.IsSnapshot() {
		if got := dbChecksum(t, db, hdr.PageSize); got != hdr.PreApplyChecksum {
			t.Fatalf("TXID %s: pre-apply checksum %s, database is %s", hdr.MinTXID, hdr.PreApplyChecksum, got)
		}
	} else {
		db = nil
	}
	ps := int(hdr.PageSize)
	buf := make([]byte, ps)
	for {
		var ph ltx.PageHeader
		if err := dec.DecodePage(&ph, buf); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("decode page: %v", err)
		}
		end := int(ph.Pgno) * ps
		for len(db) < end {
			db = append(db, make([]byte, ps)...)
		}
		copy(db[end-ps:end], buf)
	}
	if err := dec.Close(); err != nil {
		t.Fatalf("close LTX: %v", err)
	}
	if n := int(hdr.Commit) * ps; len(db) > n {
		db = db[:n]
	} else {
		for len(db) < n {
			db = append(db, make([]byte, ps)...)
		}
	}
	if got := dbChecksum(t, db, hdr.PageSize); got != dec.Trailer().PostApplyChecksum {
		t.Fatalf("TXID %s: post-apply checksum %s, database is %s", hdr.MaxTXID, dec.Trailer().PostApplyChecksum, got)
	}
	return db
}

func dbChecksum(t *testing.T, db []byte, pageSize uint32) ltx.Checksum {
	t.Helper()
	sum, err := ltx.ChecksumReader(bytes.NewReader(db), int(pageSize))
	if err != nil {
		t.Fatal(err)
	}
	return sum
}

func sumsOf(t *testing.T, db []byte, pageSize uint32) *MemSums {
	t.Helper()
	m := &MemSums{}
	lock := LockPgno(pageSize)
	ps := int(pageSize)
	for i := 0; i+ps <= len(db); i += ps {
		pgno := uint32(i/ps) + 1
		if pgno == lock {
			m.Set(pgno, 0)
			continue
		}
		m.Set(pgno, ltx.ChecksumPage(pgno, db[i:i+ps]))
	}
	return m
}

var nowish = time.Unix(1_700_000_000, 0)

// seekBuf is an in-memory io.ReadWriteSeeker.
type seekBuf struct {
	b   []byte
	off int
}

func (s *seekBuf) Write(p []byte) (int, error) {
	if need := s.off + len(p); need > len(s.b) {
		s.b = append(s.b, make([]byte, need-len(s.b))...)
	}
	copy(s.b[s.off:], p)
	s.off += len(p)
	return len(p), nil
}

func (s *seekBuf) Read(p []byte) (int, error) {
	if s.off >= len(s.b) {
		return 0, io.EOF
	}
	n := copy(p, s.b[s.off:])
	s.off += n
	return n, nil
}

func (s *seekBuf) Seek(off int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
		s.off = int(off)
	case io.SeekCurrent:
		s.off += int(off)
	case io.SeekEnd:
		s.off = len(s.b) + int(off)
	}
	return int64(s.off), nil
}

func (s *seekBuf) Bytes() []byte { return s.b }

// switchingReader serves old for its first switchAfter reads and new from
// then on: a file that changes under a reader.
type switchingReader struct {
	old, new    []byte
	switchAfter int
	reads       int
	switched    bool
}

func (r *switchingReader) ReadAt(p []byte, off int64) (int, error) {
	if r.reads++; r.reads > r.switchAfter {
		r.switched = true
	}
	src := r.old
	if r.switched {
		src = r.new
	}
	return bytes.NewReader(src).ReadAt(p, off)
}

// followReader switches from old to new when sw does.
type followReader struct {
	sw       *switchingReader
	old, new []byte
}

func (r *followReader) ReadAt(p []byte, off int64) (int, error) {
	if r.sw.switched {
		return bytes.NewReader(r.new).ReadAt(p, off)
	}
	return bytes.NewReader(r.old).ReadAt(p, off)
}
