package integration

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"math/rand"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// The torture workload. Each writer process records, outside the mount,
// every transaction it commits: an intent line with the content digest the
// database will have once the commit lands ("I epoch seq digest unixnano"),
// written before COMMIT, then "K epoch seq unixnano" once COMMIT returned,
// or "F epoch seq" when it failed. The digest is computed inside the write
// transaction, so it is exactly the committed state. seq is the database's
// own commit counter (the commits table); epoch changes when the harness
// puts an older copy of the database back, after which seqs repeat.

// tortureSchema is each database's starting point. Every table has an
// INTEGER PRIMARY KEY so VACUUM keeps rowids and with them the digest.
const tortureSchema = `PRAGMA auto_vacuum=INCREMENTAL;
PRAGMA journal_mode=WAL;
BEGIN;
CREATE TABLE commits(seq INTEGER PRIMARY KEY, epoch INTEGER, writer TEXT);
CREATE TABLE items(id INTEGER PRIMARY KEY, k INTEGER, v BLOB);
CREATE INDEX items_k ON items(k);
INSERT INTO commits VALUES(0, 0, 'schema');
COMMIT;
`

type queryer interface {
	QueryContext(ctx context.Context, q string, args ...any) (*sql.Rows, error)
}

// contentDigest hashes the schema and every row of every table in rowid
// order: two databases with the same digest hold the same data, whatever
// their page layout.
func contentDigest(ctx context.Context, q queryer) (string, error) {
	h := sha256.New()
	rows, err := q.QueryContext(ctx, "SELECT type, name, coalesce(sql, '') FROM sqlite_schema ORDER BY type, name")
	if err != nil {
		return "", err
	}
	var tables []string
	for rows.Next() {
		var typ, name, text string
		if err := rows.Scan(&typ, &name, &text); err != nil {
			rows.Close()
			return "", err
		}
		fmt.Fprintf(h, "%s\x00%s\x00%s\x00", typ, name, text)
		if typ == "table" && !strings.HasPrefix(name, "sqlite_") {
			tables = append(tables, name)
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return "", err
	}
	var num [8]byte
	for _, tbl := range tables {
		fmt.Fprintf(h, "T%s\x00", tbl)
		rows, err := q.QueryContext(ctx, `SELECT * FROM "`+tbl+`" ORDER BY rowid`)
		if err != nil {
			return "", err
		}
		cols, _ := rows.Columns()
		vals := make([]any, len(cols))
		ptrs := make([]any, len(cols))
		for i := range vals {
			ptrs[i] = &vals[i]
		}
		for rows.Next() {
			if err := rows.Scan(ptrs...); err != nil {
				rows.Close()
				return "", err
			}
			for _, v := range vals {
				switch v := v.(type) {
				case nil:
					h.Write([]byte{'n'})
				case int64:
					binary.LittleEndian.PutUint64(num[:], uint64(v))
					h.Write([]byte{'i'})
					h.Write(num[:])
				case float64:
					binary.LittleEndian.PutUint64(num[:], math.Float64bits(v))
					h.Write([]byte{'f'})
					h.Write(num[:])
				case []byte:
					binary.LittleEndian.PutUint64(num[:], uint64(len(v)))
					h.Write([]byte{'b'})
					h.Write(num[:])
					h.Write(v)
				case string:
					binary.LittleEndian.PutUint64(num[:], uint64(len(v)))
					h.Write([]byte{'s'})
					h.Write(num[:])
					h.Write([]byte(v))
				default:
					fmt.Fprintf(h, "?%v", v)
				}
			}
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return "", err
		}
	}
	return hex.EncodeToString(h.Sum(nil)[:12]), nil
}

// tortureReady is what a torture worker prints once SIGTERM asks it to stop
// rather than killing it.
const tortureReady = "ready for SIGTERM"

// runTortureWriter commits random transactions until SIGTERM, which lets
// the current one finish. Errors other than a full disk end it with
// status 2 (3 if SQLite saw corruption).
func runTortureWriter() int {
	seed, _ := strconv.ParseInt(os.Getenv("SEED"), 10, 64)
	epoch, _ := strconv.Atoi(os.Getenv("EPOCH"))
	name := os.Getenv("NAME")
	rng := rand.New(rand.NewSource(seed))
	var stopping atomic.Bool
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)
	go func() { <-sigs; stopping.Store(true) }()
	fmt.Println(tortureReady)

	rec, err := os.OpenFile(os.Getenv("RECORD"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return fail(err)
	}
	defer rec.Close()
	// A small page cache makes the large transactions spill uncommitted
	// frames into the WAL before they commit.
	db, err := sql.Open("sqlite3", os.Getenv("DB")+"?_busy_timeout=60000&_txlock=immediate&_cache_size=-256")
	if err != nil {
		return fail(err)
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	ctx := context.Background()

	for !stopping.Load() {
		var err error
		switch p := rng.Intn(100); {
		case p < 4:
			_, err = db.Exec("VACUUM")
		case p < 10:
			_, err = db.Exec("PRAGMA wal_checkpoint(" + checkpointModes[rng.Intn(len(checkpointModes))] + ")")
		default:
			err = tortureTxn(ctx, db, rec, rng, epoch, name)
		}
		if err != nil {
			if isFull(err) {
				// The harness filled the disk: SQLite's answer is the app's
				// to handle, and this app waits for space.
				time.Sleep(time.Duration(5+rng.Intn(20)) * time.Millisecond)
				continue
			}
			return fail(err)
		}
		if rng.Intn(4) == 0 {
			time.Sleep(time.Duration(rng.Intn(15)) * time.Millisecond)
		}
	}
	return 0
}

func isFull(err error) bool {
	return strings.Contains(err.Error(), "database or disk is full") || strings.Contains(err.Error(), "no space left")
}

// tortureTxn runs one recorded write transaction of a random kind.
func tortureTxn(ctx context.Context, db *sql.DB, rec *os.File, rng *rand.Rand, epoch int, name string) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	var size int64
	if err := tx.QueryRowContext(ctx, "SELECT page_count * page_size FROM pragma_page_count, pragma_page_size").Scan(&size); err != nil {
		return err
	}
	exec := func(q string, args ...any) {
		if err == nil {
			_, err = tx.ExecContext(ctx, q, args...)
		}
	}
	switch p := rng.Intn(100); {
	case size > 6<<20 || p < 6:
		// Deletes that shrink the file (auto_vacuum=INCREMENTAL).
		exec("DELETE FROM items WHERE id IN (SELECT id FROM items ORDER BY random() LIMIT (SELECT count(*) / 2 + 1 FROM items))")
		exec("PRAGMA incremental_vacuum")
	case p < 10:
		// Larger than the page cache (256 KB): 0.5-1.5 MB.
		for i, n := 0, 8+rng.Intn(16); i < n; i++ {
			exec("INSERT INTO items(k, v) VALUES(?, randomblob(65536))", rng.Intn(1000))
		}
	case p < 15:
		if e := tortureSchemaChange(exec, tx, rng); e != nil && err == nil {
			err = e
		}
	default:
		for i, n := 0, 1+rng.Intn(5); i < n; i++ {
			exec("INSERT INTO items(k, v) VALUES(?, randomblob(?))", rng.Intn(1000), 10+rng.Intn(3000))
		}
		exec("UPDATE items SET k = k + 1 WHERE id = (SELECT max(id) FROM items) - ?", rng.Intn(50))
	}
	exec("INSERT INTO commits VALUES((SELECT max(seq) + 1 FROM commits), ?, ?)", epoch, name)
	if err != nil {
		return err
	}
	var seq int64
	if err := tx.QueryRowContext(ctx, "SELECT max(seq) FROM commits").Scan(&seq); err != nil {
		return err
	}
	digest, err := contentDigest(ctx, tx)
	if err != nil {
		return err
	}
	fmt.Fprintf(rec, "I %d %d %s %d\n", epoch, seq, digest, time.Now().UnixNano())
	if err := tx.Commit(); err != nil {
		fmt.Fprintf(rec, "F %d %d\n", epoch, seq)
		return err
	}
	fmt.Fprintf(rec, "K %d %d %d\n", epoch, seq, time.Now().UnixNano())
	return nil
}

// tortureSchemaChange creates or drops a side table, adds a column or an
// index.
func tortureSchemaChange(exec func(string, ...any), tx *sql.Tx, rng *rand.Rand) error {
	var tables []string
	rows, err := tx.Query("SELECT name FROM sqlite_schema WHERE type = 'table' AND name LIKE 'side%' ORDER BY name")
	if err != nil {
		return err
	}
	for rows.Next() {
		var n string
		rows.Scan(&n)
		tables = append(tables, n)
	}
	rows.Close()
	switch {
	case len(tables) > 0 && rng.Intn(3) == 0:
		exec(`DROP TABLE "` + tables[rng.Intn(len(tables))] + `"`)
	case len(tables) > 0 && rng.Intn(2) == 0:
		t := tables[rng.Intn(len(tables))]
		exec(fmt.Sprintf(`ALTER TABLE "%s" ADD COLUMN c%d TEXT DEFAULT 'x%d'`, t, rng.Intn(1<<30), rng.Intn(100)))
		exec(fmt.Sprintf(`CREATE INDEX IF NOT EXISTS "%s_b" ON "%s"(b)`, t, t))
	default:
		t := fmt.Sprintf("side%d", rng.Intn(1<<30))
		exec(`CREATE TABLE "` + t + `"(id INTEGER PRIMARY KEY, b BLOB)`)
		exec(`INSERT INTO "`+t+`"(b) SELECT randomblob(100) FROM items LIMIT ?`, rng.Intn(200))
	}
	return nil
}

// runTortureReader reads until SIGTERM; a failed quick_check ends it with
// status 3.
func runTortureReader() int {
	seed, _ := strconv.ParseInt(os.Getenv("SEED"), 10, 64)
	rng := rand.New(rand.NewSource(seed))
	var stopping atomic.Bool
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)
	go func() { <-sigs; stopping.Store(true) }()
	fmt.Println(tortureReady)
	db, err := sql.Open("sqlite3", os.Getenv("DB")+"?_busy_timeout=60000")
	if err != nil {
		return fail(err)
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	for i := 0; !stopping.Load(); i++ {
		if i%25 == 0 {
			var res string
			if err := db.QueryRow("PRAGMA quick_check").Scan(&res); err != nil {
				return fail(err)
			}
			if res != "ok" {
				return fail(errors.New("quick_check: corrupt: " + res))
			}
		} else {
			var n, sum sql.NullInt64
			if err := db.QueryRow("SELECT count(*), sum(length(v)) FROM items WHERE k >= ?", rng.Intn(1000)).Scan(&n, &sum); err != nil {
				return fail(err)
			}
		}
		time.Sleep(time.Duration(rng.Intn(10)) * time.Millisecond)
	}
	return 0
}
