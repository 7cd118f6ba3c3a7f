package walcapture

import (
	"bytes"
	"database/sql"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/superfly/ltx"
)

// replay applies captured LTX files to base and checks the result is the
// database SQLite itself recovers from (db, wal).
func replay(t *testing.T, base []byte, files [][]byte, pageSize uint32) []byte {
	t.Helper()
	got := base
	for _, f := range files {
		got = applyLTX(t, got, f)
	}
	return got
}

func mustEqualDB(t *testing.T, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		t.Fatalf("replayed database differs from SQLite's: %d bytes vs %d bytes", len(got), len(want))
	}
}

func TestCaptureCommitsInOrderAcrossPageSizes(t *testing.T) {
	for _, ps := range []int{512, 1024, 4096, 8192, 16384, 32768, 65536} {
		t.Run(fmt.Sprint(ps), func(t *testing.T) {
			l := openLive(t, ps)
			l.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
			l.checkpoint("TRUNCATE")
			base, _ := l.files()
			for i := 0; i < 50; i++ {
				l.exec("INSERT INTO t(v) VALUES(?)", strings.Repeat("x", i*37))
			}
			db, wal := l.files()
			if !bytes.Equal(db, base) {
				t.Fatal("database file changed without a checkpoint")
			}
			sums := sumsOf(t, base, uint32(ps))
			var c Capturer
			files, _ := captureAll(t, &c, wal, sums, 2)
			if len(files) != 50 {
				t.Fatalf("captured %d transactions, want 50", len(files))
			}
			for i, f := range files {
				hdr, _, err := ltx.DecodeHeader(bytes.NewReader(f))
				if err != nil {
					t.Fatal(err)
				}
				if hdr.MinTXID != ltx.TXID(i+2) || hdr.MaxTXID != hdr.MinTXID {
					t.Fatalf("file %d has TXIDs %s-%s", i, hdr.MinTXID, hdr.MaxTXID)
				}
			}
			mustEqualDB(t, replay(t, base, files, uint32(ps)), recovered(t, db, wal))

			// A second scan of the same bytes emits nothing: each commit once.
			again, _ := captureAll(t, &c, wal, sums, 100)
			if len(again) != 0 {
				t.Fatalf("rescan emitted %d transactions", len(again))
			}
		})
	}
}

func TestCaptureIgnoresTornAndCorruptFrames(t *testing.T) {
	l := openLive(t, 4096)
	l.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
	l.checkpoint("TRUNCATE")
	base, _ := l.files()
	for i := 0; i < 10; i++ {
		l.exec("INSERT INTO t(v) VALUES(randomblob(3000))")
	}
	_, wal := l.files()
	hdr, err := ParseHeader(wal)
	if err != nil {
		t.Fatal(err)
	}
	nFrames := (int64(len(wal)) - HeaderSize) / hdr.FrameSize()

	// Cut the log in the middle of its last frame: the last transaction
	// was not completely written and must not be captured.
	t.Run("torn", func(t *testing.T) {
		torn := wal[:len(wal)-100]
		files, _ := captureAll(t, &Capturer{}, torn, sumsOf(t, base, 4096), 2)
		if len(files) != 9 {
			t.Fatalf("captured %d transactions from a torn log, want 9", len(files))
		}
		mustEqualDB(t, replay(t, base, files, 4096), recovered(t, base, torn))
	})

	// Flip one byte of a page in the middle of the log: that frame breaks
	// the checksum chain and nothing from its transaction on is committed.
	t.Run("bad checksum", func(t *testing.T) {
		bad := bytes.Clone(wal)
		mid := nFrames / 2
		bad[hdr.FrameOffset(mid)+FrameHeaderSize+77] ^= 0xff
		files, _ := captureAll(t, &Capturer{}, bad, sumsOf(t, base, 4096), 2)
		if len(files) == 0 || len(files) >= 10 {
			t.Fatalf("captured %d transactions across a corrupt frame", len(files))
		}
		mustEqualDB(t, replay(t, base, files, 4096), recovered(t, base, bad))
	})

	// Frames carrying other salts belong to an older generation.
	t.Run("wrong salt", func(t *testing.T) {
		bad := bytes.Clone(wal)
		off := hdr.FrameOffset(3)
		binary.BigEndian.PutUint32(bad[off+8:], hdr.Salt1+1)
		files, _ := captureAll(t, &Capturer{}, bad, sumsOf(t, base, 4096), 2)
		if len(files) >= 10 {
			t.Fatalf("captured %d transactions across a frame with foreign salts", len(files))
		}
		mustEqualDB(t, replay(t, base, files, 4096), recovered(t, base, bad))
	})

	t.Run("bad header", func(t *testing.T) {
		bad := bytes.Clone(wal)
		bad[10] ^= 1
		files, _ := captureAll(t, &Capturer{}, bad, sumsOf(t, base, 4096), 2)
		if len(files) != 0 {
			t.Fatalf("captured %d transactions from a log with a corrupt header", len(files))
		}
	})
}

func TestCaptureNeverEmitsUncommittedFrames(t *testing.T) {
	l := openLive(t, 4096, "PRAGMA cache_size=5")
	l.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
	l.checkpoint("TRUNCATE")
	base, _ := l.files()

	// A transaction bigger than the page cache spills uncommitted frames
	// into the log; rolled back, they stay in the file.
	tx, err := l.db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	insertBlobs(t, tx, 200)
	_, spilled := l.files()
	if len(spilled) <= HeaderSize {
		t.Fatal("expected the transaction to spill frames into the log")
	}
	files, _ := captureAll(t, &Capturer{}, spilled, sumsOf(t, base, 4096), 2)
	if len(files) != 0 {
		t.Fatalf("captured %d transactions before any commit", len(files))
	}
	if err := tx.Rollback(); err != nil {
		t.Fatal(err)
	}

	l.exec("INSERT INTO t(v) VALUES('after rollback')")
	db, wal := l.files()
	files, _ = captureAll(t, &Capturer{}, wal, sumsOf(t, base, 4096), 2)
	if len(files) != 1 {
		t.Fatalf("captured %d transactions, want 1", len(files))
	}
	mustEqualDB(t, replay(t, base, files, 4096), recovered(t, db, wal))
}

// A long transaction that is remembered between scans and then fails (the
// disk filled up, say) leaves the log ending where its last write stopped.
// The transactions after it reuse its frames without reaching that end, so
// the scan finds nothing past the remembered midpoint; they must still be
// captured. (Found by the torture harness: commits made after a full disk
// were skipped until the log restarted, and never reached the replica.)
func TestCaptureAfterLongTransactionFails(t *testing.T) {
	c, base, sums, db, wal := failedLongTransaction(t)
	// A scan cannot tell this log from the long transaction still being
	// written, and says so; a Recheck finds the commits.
	files, res := captureAll(t, c, wal, sums, 2)
	if len(files) != 0 || res.Unverified == 0 {
		t.Fatalf("scan without a recheck: %d transactions, unverified %d bytes; want 0, more than 0", len(files), res.Unverified)
	}
	c.Recheck()
	files, res = captureAll(t, c, wal, sums, 2)
	if len(files) != 3 || res.Unverified > 0 {
		t.Fatalf("scan after a recheck: %d transactions, unverified %d bytes; want 3, 0", len(files), res.Unverified)
	}
	mustEqualDB(t, replay(t, base, files, 4096), recovered(t, db, wal))
}

// The same log, restarted with new salts before anything rechecked it: the
// scan that moves to the new generation is the last look at the old one's
// frames, so it leaves nothing unverified there.
func TestCaptureAfterLongTransactionFailsAndLogRestarts(t *testing.T) {
	c, base, sums, db, wal := failedLongTransaction(t)
	restarted := slices.Clone(wal)
	h, err := ParseHeader(wal)
	if err != nil {
		t.Fatal(err)
	}
	binary.BigEndian.PutUint32(restarted[16:], h.Salt1+1)
	s1, s2 := Checksum(h.BigEndian, restarted[:24], 0, 0)
	binary.BigEndian.PutUint32(restarted[24:], s1)
	binary.BigEndian.PutUint32(restarted[28:], s2)
	files, res := captureAll(t, c, restarted, sums, 2)
	if len(files) != 3 || !res.NewGeneration {
		t.Fatalf("captured %d transactions (new generation %v), want 3 from the old generation", len(files), res.NewGeneration)
	}
	mustEqualDB(t, replay(t, base, files, 4096), recovered(t, db, wal))
}

// A long transaction scanned midway grows further, is rolled back, and a
// short transaction commits over its first frames. The frames it appended
// after the scan still validate from where that scan stopped, so a resumed
// scan cannot tell this log from the transaction still going on: it must
// leave it unverified, and a Recheck finds the commit. (Found in review:
// a first version took those frames as proof and never looked again.)
func TestCaptureRolledBackAfterGrowing(t *testing.T) {
	l, base, sums := spillingLive(t)
	var c Capturer
	tx, err := l.db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	insertBlobs(t, tx, 1500)
	_, mid := l.files()
	if files, _ := captureAll(t, &c, mid, sums, 2); len(files) != 0 || c.partial == nil {
		t.Fatalf("scan midway: %d transactions, remembered %v", len(files), c.partial != nil)
	}
	insertBlobs(t, tx, 200)
	if err := tx.Rollback(); err != nil {
		t.Fatal(err)
	}
	l.exec("INSERT INTO t(v) VALUES('after the rollback')")
	db, wal := l.files()
	files, res := captureAll(t, &c, wal, sums, 2)
	if len(files) == 0 {
		if res.Unverified == 0 {
			t.Fatal("a resumed scan missed the commit and called the transaction verified")
		}
		c.Recheck()
		files, _ = captureAll(t, &c, wal, sums, 2)
	}
	if len(files) != 1 {
		t.Fatalf("captured %d transactions, want 1", len(files))
	}
	mustEqualDB(t, replay(t, base, files, 4096), recovered(t, db, wal))
}

// failedLongTransaction runs a transaction that spills more than partialMin
// into the log, scans it (so it is remembered), rolls it back and commits
// three small transactions, and returns the log cut where the long one
// ended, as a failed write leaves it, with the Capturer that scanned it.
func failedLongTransaction(t *testing.T) (c *Capturer, base []byte, sums *MemSums, db, wal []byte) {
	t.Helper()
	l, base, sums := spillingLive(t)
	c = &Capturer{}
	tx, err := l.db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	insertBlobs(t, tx, 1500)
	_, spilled := l.files()
	if len(spilled) < HeaderSize+partialMin {
		t.Fatalf("the transaction spilled %d bytes, want more than %d", len(spilled), partialMin)
	}
	if files, _ := captureAll(t, c, spilled, sums, 2); len(files) != 0 {
		t.Fatalf("captured %d transactions before any commit", len(files))
	}
	if c.partial == nil {
		t.Fatal("the long transaction was not remembered between scans")
	}
	if err := tx.Rollback(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		l.exec("INSERT INTO t(v) VALUES('after the failure')")
	}
	db, wal = l.files()
	if len(wal) < len(spilled) {
		t.Fatalf("the log shrank from %d to %d bytes", len(spilled), len(wal))
	}
	return c, base, sums, db, wal[:len(spilled)]
}

// Scans of a long transaction as it grows resume where the last one stopped
// and do not re-validate it from its start (that cost made capture quadratic
// in the transaction's size); each says the transaction is unverified, and
// a Recheck validates it from its first frame once. The commit is then
// captured exactly once.
func TestCaptureLongTransactionScansResume(t *testing.T) {
	l, base, sums := spillingLive(t)
	var c Capturer
	tx, err := l.db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	var prevOff int64
	rechecked := false
	for rows := 100; rows <= 3000; rows += 100 {
		insertBlobs(t, tx, 100)
		_, mid := l.files()
		for range 2 { // the second scan finds nothing new
			resumed := c.partial != nil
			res, read := scanUncommitted(t, &c, mid)
			if !resumed {
				continue
			}
			if c.partial == nil || c.partial.off < prevOff {
				t.Fatalf("after %d rows the scan lost the remembered transaction", rows)
			}
			if limit := int64(len(mid)) - prevOff + frameChunk; read > limit || res.Unverified != c.partial.off-c.partial.start {
				t.Fatalf("after %d rows a resumed scan read %d bytes (at most %d) and left %d bytes unverified (want %d)",
					rows, read, limit, res.Unverified, c.partial.off-c.partial.start)
			}
			prevOff = c.partial.off
		}
		if c.partial != nil && !rechecked && rows > 2000 {
			rechecked = true
			size := c.partial.off - c.partial.start
			c.Recheck()
			if res, read := scanUncommitted(t, &c, mid); res.Unverified != 0 || read < size {
				t.Fatalf("a rechecked scan read %d bytes of a %d-byte transaction and left %d unverified", read, size, res.Unverified)
			}
		}
	}
	if prevOff == 0 || !rechecked {
		t.Fatal("the transaction was never remembered between scans")
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	captureOne(t, &c, l, base, sums)
}

// scanUncommitted scans a log that holds no new commit and says how many
// bytes the scan read.
func scanUncommitted(t *testing.T, c *Capturer, wal []byte) (ScanResult, int64) {
	t.Helper()
	r := &countingReaderAt{r: bytes.NewReader(wal)}
	res, err := c.Scan(r, func(Txn) error { return errors.New("emitted a transaction before its commit") })
	if err != nil {
		t.Fatal(err)
	}
	return res, r.n
}

type countingReaderAt struct {
	r io.ReaderAt
	n int64
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.r.ReadAt(p, off)
	c.n += int64(n)
	return n, err
}

// captureOne scans the live database's log, which must hold exactly one
// transaction not yet captured, and checks that replaying it onto base gives
// the database SQLite recovers.
func captureOne(t *testing.T, c *Capturer, l *liveDB, base []byte, sums *MemSums) []byte {
	t.Helper()
	db, wal := l.files()
	files, res := captureAll(t, c, wal, sums, 2)
	if len(files) != 1 || res.Unverified > 0 {
		t.Fatalf("captured %d transactions (unverified %d bytes), want 1", len(files), res.Unverified)
	}
	mustEqualDB(t, replay(t, base, files, 4096), recovered(t, db, wal))
	return wal
}

// A long transaction rolled back leaves frames beyond where the next one
// writes. While the next, also long, transaction grows over them, a scan
// that stops at the same leftover as the last one has learnt nothing new and
// does not re-validate from the start. Its commit is captured exactly once.
func TestCaptureLongTransactionOverRolledBackFrames(t *testing.T) {
	l, base, sums := spillingLive(t)
	var c Capturer
	a, err := l.db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	insertBlobs(t, a, 2500)
	if err := a.Rollback(); err != nil {
		t.Fatal(err)
	}
	_, leftover := l.files()

	b, err := l.db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	insertBlobs(t, b, 1200)
	_, wal := l.files()
	if len(wal) != len(leftover) {
		t.Fatalf("the log changed size from %d to %d bytes", len(leftover), len(wal))
	}
	if res, _ := scanUncommitted(t, &c, wal); res.Unverified != 0 || c.partial == nil || c.partial.stale == nil {
		t.Fatalf("first scan: unverified %d bytes, remembered %v; want 0, up to a leftover", res.Unverified, c.partial != nil)
	}
	at := c.partial.off
	if res, read := scanUncommitted(t, &c, wal); res.Unverified == 0 || c.partial == nil || c.partial.off != at || read > frameChunk {
		t.Fatalf("scan that found nothing new: unverified %d bytes, read %d; want unverified, still at %d, no re-validation", res.Unverified, read, at)
	}
	insertBlobs(t, b, 100)
	_, wal = l.files()
	if res, read := scanUncommitted(t, &c, wal); res.Unverified == 0 || c.partial == nil || c.partial.off <= at || read > int64(len(wal))-at+frameChunk {
		t.Fatalf("scan of a grown transaction: unverified %d bytes, read %d; want unverified, past %d, no re-validation", res.Unverified, read, at)
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	wal = captureOne(t, &c, l, base, sums)
	if files, _ := captureAll(t, &c, wal, sums, 3); len(files) != 0 {
		t.Fatalf("captured %d transactions twice", len(files))
	}
}

// A writer that restarts the log and dies before its first commit leaves
// the new salts in SQLite's WAL index. The next writer rewrites the header
// with those salts but its own checkpoint counter, so the header checksum,
// which seeds every frame's checksum chain, differs. Salts alone do not
// identify a generation: capture must take the chain from the header in the
// file. (Found by the torture harness: after kill -9 of a writer, capture
// stopped silently and six acknowledged commits never reached a replica.)
func TestCaptureHeaderRewrittenWithSameSalts(t *testing.T) {
	l := openLive(t, 4096)
	l.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
	l.checkpoint("TRUNCATE")
	base, _ := l.files()
	l.exec(insertN(20, "randomblob(300)"))
	db, wal := l.files()

	// The dead writer's header: same salts, another checkpoint counter.
	dead := slices.Clone(wal[:HeaderSize])
	binary.BigEndian.PutUint32(dead[12:], binary.BigEndian.Uint32(wal[12:])+1)
	h, err := ParseHeader(wal)
	if err != nil {
		t.Fatal(err)
	}
	s1, s2 := Checksum(h.BigEndian, dead[:24], 0, 0)
	binary.BigEndian.PutUint32(dead[24:], s1)
	binary.BigEndian.PutUint32(dead[28:], s2)

	var c Capturer
	sums := sumsOf(t, base, 4096)
	if files, _ := captureAll(t, &c, dead, sums, 2); len(files) != 0 {
		t.Fatalf("captured %d transactions from a bare header", len(files))
	}
	files, _ := captureAll(t, &c, wal, sums, 2)
	if len(files) != 1 {
		t.Fatalf("captured %d transactions, want 1", len(files))
	}
	mustEqualDB(t, replay(t, base, files, 4096), recovered(t, db, wal))
}

// A transaction larger than the page cache spills pages to the log before it
// commits and, when it changes a spilled page again, rewrites that frame in
// place and recomputes the checksums of the frames after it at commit.
func TestCaptureLargeTransactionWithRewrittenFrames(t *testing.T) {
	l := openLive(t, 1024, "PRAGMA cache_size=10")
	l.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
	l.exec("CREATE INDEX t_v ON t(v)")
	l.checkpoint("TRUNCATE")
	base, _ := l.files()

	var c Capturer
	sums := sumsOf(t, base, 1024)
	var all [][]byte
	tx, err := l.db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3000; i++ {
		if _, err := tx.Exec("INSERT INTO t(v) VALUES(randomblob(200))"); err != nil {
			t.Fatal(err)
		}
		if i%500 == 0 {
			// Scanning mid-transaction must not emit anything, and must
			// not confuse the scan that finally sees the commit.
			_, mid := l.files()
			files, _ := captureAll(t, &c, mid, sums, 2)
			all = append(all, files...)
		}
	}
	if _, err := tx.Exec("UPDATE t SET v = randomblob(210) WHERE id % 7 = 0"); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if len(all) != 0 {
		t.Fatalf("emitted %d transactions before the commit", len(all))
	}
	db, wal := l.files()
	files, _ := captureAll(t, &c, wal, sums, 2)
	if len(files) != 1 {
		t.Fatalf("captured %d transactions, want 1", len(files))
	}
	mustEqualDB(t, replay(t, base, files, 1024), recovered(t, db, wal))
}

func TestCaptureShrinkingDatabaseAndVacuum(t *testing.T) {
	l := openLive(t, 4096)
	l.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
	l.exec(insertN(300, "randomblob(3000)"))
	l.checkpoint("TRUNCATE")
	base, _ := l.files()
	l.exec("DELETE FROM t WHERE id > 10")
	l.exec("VACUUM")
	l.exec("INSERT INTO t(v) VALUES('x')")
	db, wal := l.files()
	files, _ := captureAll(t, &Capturer{}, wal, sumsOf(t, base, 4096), 2)
	if len(files) != 3 {
		t.Fatalf("captured %d transactions, want 3", len(files))
	}
	want := recovered(t, db, wal)
	if len(want) >= len(base) {
		t.Fatalf("expected the database to shrink: %d -> %d bytes", len(base), len(want))
	}
	mustEqualDB(t, replay(t, base, files, 4096), want)
}

// After a checkpoint has copied every frame into the database, SQLite's next
// writer restarts the log from offset 0 with new salts.
func TestCaptureFollowsLogRestarts(t *testing.T) {
	l := openLive(t, 4096)
	l.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
	l.checkpoint("TRUNCATE")
	base, _ := l.files()
	sums := sumsOf(t, base, 4096)
	var c Capturer
	var all [][]byte

	for gen := 0; gen < 4; gen++ {
		for i := 0; i < 20; i++ {
			l.exec("INSERT INTO t(v) VALUES(?)", fmt.Sprint(gen, i))
		}
		_, wal := l.files()
		files, res := captureAll(t, &c, wal, sums, ltx.TXID(len(all)+2))
		if len(files) != 20 {
			t.Fatalf("generation %d: captured %d transactions, want 20", gen, len(files))
		}
		if res.NewGeneration != (gen > 0) {
			t.Fatalf("generation %d: NewGeneration=%v", gen, res.NewGeneration)
		}
		all = append(all, files...)
		l.checkpoint("PASSIVE") // every frame copied; the next write restarts the log
	}
	db, wal := l.files()
	mustEqualDB(t, replay(t, base, all, 4096), recovered(t, db, wal))
}

func TestCaptureResume(t *testing.T) {
	l := openLive(t, 4096)
	l.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
	l.checkpoint("TRUNCATE")
	base, _ := l.files()
	sums := sumsOf(t, base, 4096)
	var c Capturer
	for i := 0; i < 5; i++ {
		l.exec("INSERT INTO t(v) VALUES('a')")
	}
	_, wal := l.files()
	first, _ := captureAll(t, &c, wal, sums, 2)
	pos := c.Pos()

	for i := 0; i < 5; i++ {
		l.exec("INSERT INTO t(v) VALUES('b')")
	}
	db, wal := l.files()
	var resumed Capturer
	if err := resumed.Resume(bytes.NewReader(wal), pos); err != nil {
		t.Fatal(err)
	}
	rest, _ := captureAll(t, &resumed, wal, sums, 7)
	if len(rest) != 5 {
		t.Fatalf("resumed capture emitted %d transactions, want 5", len(rest))
	}
	mustEqualDB(t, replay(t, base, append(first, rest...), 4096), recovered(t, db, wal))

	// A position the log does not hold is refused.
	bad := pos
	bad.Offset += 4096 + FrameHeaderSize
	if err := (&Capturer{}).Resume(bytes.NewReader(wal[:pos.Offset]), bad); !errors.Is(err, ErrDiverged) {
		t.Fatalf("Resume past the end of the log: %v, want ErrDiverged", err)
	}
}

// If SQLite discards a transaction after its frames validated (the writer
// died before publishing it), the next writer overwrites them; the Capturer
// must say so instead of silently continuing on a different history.
func TestCaptureDetectsDiscardedTransaction(t *testing.T) {
	l := openLive(t, 4096)
	l.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
	l.checkpoint("TRUNCATE")
	base, _ := l.files()
	for i := 0; i < 3; i++ {
		l.exec("INSERT INTO t(v) VALUES('a')")
	}
	_, wal := l.files()
	var c Capturer
	captureAll(t, &c, wal, sumsOf(t, base, 4096), 2)

	hdr, _ := ParseHeader(wal)
	bad := bytes.Clone(wal)
	last := hdr.FrameOffset((int64(len(wal))-HeaderSize)/hdr.FrameSize() - 1)
	bad[last+FrameHeaderSize+5] ^= 0x55 // a different frame in the same place
	binary.BigEndian.PutUint32(bad[last+16:], 12345)
	_, err := c.Scan(bytes.NewReader(bad), func(Txn) error { return nil })
	if !errors.Is(err, ErrDiverged) {
		t.Fatalf("scan after the captured commit was replaced: %v, want ErrDiverged", err)
	}
}

func TestSnapshot(t *testing.T) {
	l := openLive(t, 4096)
	l.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
	l.exec(insertN(2000, "randomblob(500)"))
	l.checkpoint("TRUNCATE")
	l.exec("UPDATE t SET v = randomblob(600) WHERE id < 200")
	l.exec(insertN(100, "randomblob(500)"))

	t.Run("quiet", func(t *testing.T) {
		db, wal := l.files()
		var c Capturer
		var a, b seekBuf
		sums := &MemSums{}
		res, err := c.Snapshot(bytes.NewReader(db), bytes.NewReader(wal), int64(len(db)), &a, &b, 9, nowish, sums.Set)
		if err != nil {
			t.Fatal(err)
		}
		if res.Merged {
			t.Fatal("merged without concurrent commits")
		}
		want := recovered(t, db, wal)
		mustEqualDB(t, applyLTX(t, nil, a.Bytes()), want)
		if sums.Total() != dbChecksum(t, want, 4096) || res.Total != sums.Total() {
			t.Fatal("page sums disagree with the snapshot")
		}
		// Capture continues after the snapshot's position.
		l.exec("INSERT INTO t(v) VALUES('next')")
		db2, wal2 := l.files()
		sums.Truncate(res.Commit)
		files, _ := captureAll(t, &c, wal2, sums, 10)
		if len(files) != 1 {
			t.Fatalf("captured %d transactions after the snapshot, want 1", len(files))
		}
		mustEqualDB(t, applyLTX(t, want, files[0]), recovered(t, db2, wal2))
	})

	// A checkpoint that copies newer commits into the database file while
	// the snapshot reads it must not leave a mix of two states.
	t.Run("concurrent checkpoint", func(t *testing.T) {
		db0, wal0 := l.files()
		l.exec("UPDATE t SET v = randomblob(700) WHERE id BETWEEN 1000 AND 1100")
		l.exec(insertN(50, "randomblob(500)"))
		l.checkpoint("PASSIVE")
		db1, wal1 := l.files()

		// The reader sees the old files for the first few reads of the
		// database, then the checkpointed database and the longer log.
		dbR := &switchingReader{old: db0, new: db1, switchAfter: 5}
		walR := &followReader{sw: dbR, old: wal0, new: wal1}
		var c Capturer
		var a, b seekBuf
		sums := &MemSums{}
		res, err := c.Snapshot(dbR, walR, int64(len(db0)), &a, &b, 20, nowish, sums.Set)
		if err != nil {
			t.Fatal(err)
		}
		if !res.Merged {
			t.Fatal("expected a merge after commits landed during the read")
		}
		want := recovered(t, db1, wal1)
		mustEqualDB(t, applyLTX(t, nil, b.Bytes()), want)
		sums.Truncate(res.Commit)
		if sums.Total() != dbChecksum(t, want, 4096) {
			t.Fatal("page sums disagree with the merged snapshot")
		}
	})

	// The log restarts while the snapshot reads (the checkpoint that
	// allowed it ended before the read began), and a checkpoint copies the
	// new generation's commits into the database file meanwhile. The
	// frames of the generation read first are gone: the snapshot must say
	// so rather than mix the two. (Found by the torture harness: a
	// snapshot taken after a full state directory was corrupt.)
	t.Run("log restarted during the read", func(t *testing.T) {
		l.exec("UPDATE t SET v = randomblob(300) WHERE id % 5 = 0")
		db0, wal0 := l.files()
		l.checkpoint("RESTART")
		l.exec("UPDATE t SET v = randomblob(900) WHERE id % 3 = 0")
		l.exec(insertN(80, "randomblob(700)"))
		l.checkpoint("PASSIVE")
		l.exec("DELETE FROM t WHERE id % 7 = 0")
		db1, wal1 := l.files()
		if bytes.Equal(wal0[16:24], wal1[16:24]) {
			t.Fatal("the log was not restarted")
		}
		for _, after := range []int{1, 3, 5, 20} {
			dbR := &switchingReader{old: db0, new: db1, switchAfter: after}
			walR := &followReader{sw: dbR, old: wal0, new: wal1}
			var c Capturer
			var a, b seekBuf
			res, err := c.Snapshot(dbR, walR, int64(len(db0)), &a, &b, 30, nowish, (&MemSums{}).Set)
			if errors.Is(err, ErrLogRestarted) {
				continue // the caller takes it again
			} else if err != nil {
				t.Fatal(err)
			}
			got := a.Bytes()
			if res.Merged {
				got = b.Bytes()
			}
			if want := recovered(t, db1, wal1); !bytes.Equal(applyLTX(t, nil, got), want) && !bytes.Equal(applyLTX(t, nil, got), recovered(t, db0, wal0)) {
				t.Fatalf("switching after %d reads: the snapshot is neither the state before nor after", after)
			}
		}
	})
}

func TestEmptyDatabaseSnapshot(t *testing.T) {
	var c Capturer
	var a, b seekBuf
	_, err := c.Snapshot(bytes.NewReader(nil), bytes.NewReader(nil), 0, &a, &b, 2, nowish, (&MemSums{}).Set)
	if !errors.Is(err, ErrEmptyDatabase) {
		t.Fatalf("snapshot of nothing: %v", err)
	}
}

// insertBlobs inserts n rows of 1000 random bytes into t inside tx.
func insertBlobs(t *testing.T, tx *sql.Tx, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		if _, err := tx.Exec("INSERT INTO t(v) VALUES(randomblob(1000))"); err != nil {
			t.Fatal(err)
		}
	}
}

// insertN inserts n rows with value expression v into t.
func insertN(n int, v string) string {
	return fmt.Sprintf("WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < %d) INSERT INTO t(v) SELECT %s FROM s", n, v)
}

// spillingLive opens a live database whose tiny page cache makes a long
// transaction spill its pages into the log before it commits, with an
// empty table t(id, v) checkpointed into base.
func spillingLive(t *testing.T) (*liveDB, []byte, *MemSums) {
	t.Helper()
	l := openLive(t, 4096, "PRAGMA cache_size=5")
	l.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
	l.checkpoint("TRUNCATE")
	base, _ := l.files()
	return l, base, sumsOf(t, base, 4096)
}

// A snapshot of more pages than IndexSpillEntries keeps its page index in
// SpillDir rather than in memory, and is the same database.
func TestSnapshotSpillsLargeIndex(t *testing.T) {
	l := openLive(t, 512)
	l.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
	l.exec(insertN(IndexSpillEntries+1000, "zeroblob(400)")) // a row a page
	l.checkpoint("TRUNCATE")
	db, wal := l.files()
	snapshot := func(dir string) ([]byte, error) {
		c := Capturer{SpillDir: dir}
		var a, b seekBuf
		_, err := c.Snapshot(bytes.NewReader(db), bytes.NewReader(wal), int64(len(db)), &a, &b, 9, nowish, (&MemSums{}).Set)
		return a.Bytes(), err
	}
	dir := t.TempDir()
	got, err := snapshot(dir)
	if err != nil {
		t.Fatal(err)
	}
	mustEqualDB(t, applyLTX(t, nil, got), recovered(t, db, wal))
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Fatalf("left in the spill directory: %v", left)
	}
	// A spill directory that cannot hold a file shows the index went there.
	if _, err := snapshot(unusableDir(t)); err == nil || !strings.Contains(err.Error(), "spill") {
		t.Fatalf("snapshot with an unusable spill directory: %v", err)
	}
}

// unusableDir is a path where no file can be created: a file.
func unusableDir(t *testing.T) string {
	notDir := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(notDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	return notDir
}

// One transaction of more pages than IndexSpillEntries (a bulk load, a
// VACUUM) keeps its LTX page index on disk while it is encoded, and the
// file is the same as with the index in memory.
func TestEncodeTxnSpillsLargeIndex(t *testing.T) {
	l := openLive(t, 512)
	l.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
	l.checkpoint("TRUNCATE")
	base, _ := l.files()
	l.exec(insertN(IndexSpillEntries+1000, "zeroblob(400)")) // a row a page
	db, wal := l.files()
	var c Capturer
	var txn Txn
	if _, err := c.Scan(bytes.NewReader(wal), func(t Txn) error { txn = t; return nil }); err != nil {
		t.Fatal(err)
	}
	if len(txn.Pages) <= IndexSpillEntries {
		t.Fatalf("the transaction has %d pages", len(txn.Pages))
	}
	encode := func(dir string) ([]byte, error) {
		var buf bytes.Buffer
		_, err := EncodeTxn(&buf, bytes.NewReader(wal), txn, sumsOf(t, base, 512), 2, 2, nowish, dir)
		return buf.Bytes(), err
	}
	inMemory, err := encode("")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	spilled, err := encode(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(spilled, inMemory) {
		t.Fatal("the file with its index spilled differs from the one in memory")
	}
	mustEqualDB(t, applyLTX(t, base, spilled), recovered(t, db, wal))
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Fatalf("left in the spill directory: %v", left)
	}
	if _, err := encode(unusableDir(t)); err == nil || !strings.Contains(err.Error(), "spill") {
		t.Fatalf("encode with an unusable spill directory: %v", err)
	}
}

// A database file shorter than its header, with no log, has no page size
// to read by: an error, not a division by zero. (Found by an adversarial
// run: a captured database truncated to nothing crashed lfuse's start.)
func TestDatabaseChecksumOfShortFile(t *testing.T) {
	for _, n := range []int{0, 5, 99} {
		db := bytes.NewReader(make([]byte, n))
		if _, _, _, err := DatabaseChecksum(db, bytes.NewReader(nil), int64(n)); !errors.Is(err, ErrEmptyDatabase) {
			t.Fatalf("%d bytes: %v, want ErrEmptyDatabase", n, err)
		}
	}
	db := bytes.NewReader(bytes.Repeat([]byte("x"), 4096))
	if _, _, _, err := DatabaseChecksum(db, bytes.NewReader(nil), 4096); !errors.Is(err, ErrNotDatabase) {
		t.Fatalf("a file that is not a database: %v, want ErrNotDatabase", err)
	}
}
