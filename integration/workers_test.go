package integration

import (
	"database/sql"
	"fmt"
	"math/rand"
	"os"
	"strconv"
	"strings"
	"time"

	_ "github.com/mattn/go-sqlite3"
)

// The bank workload: transfers between accounts keep the total balance
// constant, so every reader can check that it never sees a half-applied or
// corrupted state; each transfer also appends a history row of random size.

const (
	bankAccounts = 100
	bankTotal    = bankAccounts * 1000
)

var checkpointModes = []string{"PASSIVE", "FULL", "RESTART", "TRUNCATE"}

// bankSchema creates the bank tables.
const bankSchema = `
CREATE TABLE accounts(id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);
CREATE TABLE history(id INTEGER PRIMARY KEY, worker TEXT, n INTEGER, payload BLOB);
CREATE INDEX history_worker ON history(worker, n);
WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < 100)
INSERT INTO accounts SELECT i, 1000 FROM s;
`

func runWorker(mode string) int {
	if mode == "lock-holder" {
		return runLockHolder()
	}
	if mode == "symlink-racer" {
		return runSymlinkRacer()
	}
	if mode == "seq-writer" {
		return runSeqWriter()
	}
	if mode == "torture-writer" {
		return runTortureWriter()
	}
	if mode == "torture-reader" {
		return runTortureReader()
	}
	// SQLite's busy handler polls rather than queues, so a writer can starve
	// behind others that commit back to back. With the race-built lfuse in
	// cached mode on a loaded machine, one writer waited out a 20 s timeout
	// about once in six runs while the others kept committing and no FUSE
	// request took over 0.5 s: a property of the workload, not of lfuse. A
	// generous timeout keeps the test about what lfuse does.
	n, _ := strconv.Atoi(os.Getenv("N"))
	seed, _ := strconv.ParseInt(os.Getenv("SEED"), 10, 64)
	rng := rand.New(rand.NewSource(seed))
	dsn := os.Getenv("DB") + "?_busy_timeout=60000&_journal_mode=WAL&_txlock=immediate"
	db, err := sql.Open("sqlite3", dsn)
	if err != nil {
		return fail(err)
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	switch mode {
	case "bank-writer":
		ckpt, _ := strconv.Atoi(os.Getenv("CKPT"))
		name := os.Getenv("NAME")
		for i := 0; i < n; i++ {
			if err := transfer(db, rng, name, i); err != nil {
				return fail(fmt.Errorf("transfer %d: %w", i, err))
			}
			if i%500 == 499 {
				fmt.Printf("committed %d\n", i+1)
			}
			if ckpt > 0 && i%ckpt == ckpt-1 {
				mode := checkpointModes[(i/ckpt)%len(checkpointModes)]
				if _, err := db.Exec("PRAGMA wal_checkpoint(" + mode + ")"); err != nil {
					return fail(fmt.Errorf("checkpoint %s: %w", mode, err))
				}
			}
		}
	case "bank-reader":
		for i := 0; i < n; i++ {
			if err := audit(db, rng); err != nil {
				return fail(fmt.Errorf("read %d: %w", i, err))
			}
		}
	default:
		return fail(fmt.Errorf("unknown worker %q", mode))
	}
	return 0
}

func transfer(db *sql.DB, rng *rand.Rand, name string, i int) error {
	tx, err := db.Begin()
	if err != nil {
		return err
	}
	defer tx.Rollback()
	a, b := rng.Intn(bankAccounts)+1, rng.Intn(bankAccounts)+1
	amount := rng.Intn(50)
	if _, err := tx.Exec("UPDATE accounts SET balance = balance - ? WHERE id = ?", amount, a); err != nil {
		return err
	}
	if _, err := tx.Exec("UPDATE accounts SET balance = balance + ? WHERE id = ?", amount, b); err != nil {
		return err
	}
	rows := 1
	if rng.Intn(200) == 0 {
		rows = 300 // now and then a transaction of many pages
	}
	for r := 0; r < rows; r++ {
		if _, err := tx.Exec("INSERT INTO history(worker, n, payload) VALUES(?, ?, randomblob(?))", name, i, 10+rng.Intn(2000)); err != nil {
			return err
		}
	}
	if rng.Intn(100) == 0 {
		// Free pages now and then, so the database also shrinks and reuses.
		if _, err := tx.Exec("DELETE FROM history WHERE worker = ? AND n < ? AND n % 3 = 0", name, i-50); err != nil {
			return err
		}
	}
	return tx.Commit()
}

func audit(db *sql.DB, rng *rand.Rand) error {
	tx, err := db.Begin()
	if err != nil {
		return err
	}
	defer tx.Rollback()
	var total int
	if err := tx.QueryRow("SELECT SUM(balance) FROM accounts").Scan(&total); err != nil {
		return err
	}
	if total != bankTotal {
		return fmt.Errorf("total balance %d, want %d: a reader saw a torn or corrupt state", total, bankTotal)
	}
	var payload []byte
	err = tx.QueryRow("SELECT payload FROM history WHERE id = ?", rng.Intn(5000)+1).Scan(&payload)
	if err != nil && err != sql.ErrNoRows {
		return err
	}
	return tx.Commit()
}

func fail(err error) int {
	fmt.Fprintln(os.Stderr, "worker:", err)
	if strings.Contains(err.Error(), "malformed") || strings.Contains(err.Error(), "corrupt") {
		return 3
	}
	return 2
}

// cliTransfers is a sqlite3 shell script of n bank transfers.
func cliTransfers(name string, n int, seed int64) string {
	rng := rand.New(rand.NewSource(seed))
	var b strings.Builder
	for i := 0; i < n; i++ {
		a, c := rng.Intn(bankAccounts)+1, rng.Intn(bankAccounts)+1
		amount := rng.Intn(50)
		fmt.Fprintf(&b, "BEGIN IMMEDIATE;\nUPDATE accounts SET balance = balance - %d WHERE id = %d;\nUPDATE accounts SET balance = balance + %d WHERE id = %d;\nINSERT INTO history(worker, n, payload) VALUES('%s', %d, randomblob(%d));\nCOMMIT;\n",
			amount, a, amount, c, name, i, 10+rng.Intn(1500))
		if i%700 == 699 {
			b.WriteString("PRAGMA wal_checkpoint(PASSIVE);\n")
		}
	}
	return b.String()
}

// seqRow is the payload of row k of the seq workload: the state after its
// k-th commit is exactly rows 1..k, so any restored copy says which commit
// it is.
func seqRow(k int) []byte {
	rng := rand.New(rand.NewSource(int64(k)))
	b := make([]byte, 20+rng.Intn(3000))
	rng.Read(b)
	return b
}

// runSeqWriter commits rows FROM..TO of the seq workload, one per
// transaction, PAUSE apart, and prints "k <unix ns before its commit>" after
// each commit.
func runSeqWriter() int {
	from, _ := strconv.Atoi(os.Getenv("FROM"))
	to, _ := strconv.Atoi(os.Getenv("TO"))
	pause, _ := time.ParseDuration(os.Getenv("PAUSE"))
	db, err := sql.Open("sqlite3", os.Getenv("DB")+"?_busy_timeout=60000&_journal_mode=WAL&_txlock=immediate")
	if err != nil {
		return fail(err)
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	if _, err := db.Exec("CREATE TABLE IF NOT EXISTS seq(k INTEGER PRIMARY KEY, v BLOB)"); err != nil {
		return fail(err)
	}
	for k := from; k <= to; k++ {
		before := time.Now()
		if _, err := db.Exec("INSERT INTO seq(k, v) VALUES(?, ?)", k, seqRow(k)); err != nil {
			return fail(fmt.Errorf("row %d: %w", k, err))
		}
		fmt.Printf("%d %d\n", k, before.UnixNano())
		time.Sleep(pause)
	}
	return 0
}
