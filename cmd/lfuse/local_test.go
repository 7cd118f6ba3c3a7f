package main

import (
	"bytes"
	"context"
	"database/sql"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lfuse/lfuse/replicate"
	_ "github.com/mattn/go-sqlite3"
)

// The data directory is lost, the state directory is not, and its local
// log holds commits the replica lacks: a restore into the data directory
// gives the log's newest state, and the next mount goes on from it. Before,
// the restore took the replica's older state, and the mount put a new
// snapshot of it above the commits only the log held (found by a review:
// 48 acknowledged commits gone from a latest restore).
func TestRestorePrefersALocalLogAhead(t *testing.T) {
	base := t.TempDir()
	data, state, repl := filepath.Join(base, "data"), filepath.Join(base, "state"), filepath.Join(base, "replica")
	os.MkdirAll(data, 0o755)
	cfg := defaultConfig()
	cfg.DataDir, cfg.StateDir, cfg.Replicas = data, state, []ReplicaConfig{{URL: repl}}
	var logs bytes.Buffer
	logger := slog.New(slog.NewTextHandler(&logs, nil))

	// run opens a mount's manager, commits n rows, and stops it cleanly
	// (which ships every commit) before the application closes.
	rows := 0
	run := func(n int) {
		t.Helper()
		mgr := replicate.NewManager(data, state, logger)
		mgr.Replicas = replicaSpecs(cfg)
		if err := mgr.Open(context.Background()); err != nil {
			t.Fatal(err)
		}
		db, err := sql.Open("sqlite3", filepath.Join(data, "app.db")+"?_journal_mode=WAL")
		if err != nil {
			t.Fatal(err)
		}
		db.SetMaxOpenConns(1)
		for range n {
			if _, err := db.Exec("CREATE TABLE IF NOT EXISTS t(v); INSERT INTO t VALUES(randomblob(3000))"); err != nil {
				t.Fatal(err)
			}
			mgr.Opened("app.db-wal", false)
			mgr.Modified("app.db-wal")
			rows++
		}
		if err := mgr.Close(); err != nil {
			t.Fatal(err)
		}
		db.Close()
	}
	run(20)
	// The replica as it was then; the commits after it reach only the
	// local log (lfuse killed before it shipped them).
	old := filepath.Join(base, "replica-then")
	if out, err := exec.Command("cp", "-a", repl, old).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	run(30)
	os.RemoveAll(repl)
	if err := os.Rename(old, repl); err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(data)

	// Claimed since by an lfuse on another state directory, the replica
	// is not this log's history: its state is restored, not the log's.
	marker := filepath.Join(repl, "app.db", "lfuse-writer.json")
	mine, err := os.ReadFile(marker)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(marker, []byte(`{"id":"x","state":"another","host":"h","pid":1,"started_at":"2026-01-01T00:00:00Z"}`), 0o644)
	if n, err := restoreAll(context.Background(), logger, io.Discard, cfg, replicate.Target{}, restoreFlags{ifDBNotExists: true, parallelism: 8}); err != nil || n != 1 || strings.Contains(logs.String(), "from the local log") {
		t.Fatalf("replica of another state: restored %d, %v\n%s", n, err, logs.String())
	}
	os.RemoveAll(data)
	os.WriteFile(marker, mine, 0o644)

	logs.Reset()
	n, err := restoreAll(context.Background(), logger, io.Discard, cfg, replicate.Target{}, restoreFlags{ifDBNotExists: true, parallelism: 8})
	if err != nil || n != 1 || !strings.Contains(logs.String(), "restored from the local log") {
		t.Fatalf("restored %d, %v\n%s", n, err, logs.String())
	}
	// Decided before anything was written: the replica's older state, put
	// in place first, was all a restore killed in between left.
	if strings.Contains(logs.String(), "restore plan") {
		t.Fatalf("the replica's state was restored before the log's:\n%s", logs.String())
	}
	db, err := sql.Open("sqlite3", filepath.Join(data, "app.db"))
	if err != nil {
		t.Fatal(err)
	}
	var got int
	if err := db.QueryRow("SELECT count(*) FROM t").Scan(&got); err != nil || got != rows {
		t.Fatalf("%d rows restored (%v), %d committed", got, err, rows)
	}
	db.Close()

	// The next mount verifies the file against its log and ships the rest.
	logs.Reset()
	run(1)
	if strings.Contains(logs.String(), "does not match") || strings.Contains(logs.String(), "snapshot taken") {
		t.Fatalf("the mount after the restore did not go on from its log:\n%s", logs.String())
	}
	os.RemoveAll(data)
	n, err = restoreAll(context.Background(), logger, io.Discard, cfg, replicate.Target{}, restoreFlags{ifDBNotExists: true, parallelism: 8})
	if err != nil || n != 1 || strings.Contains(logs.String(), "restored from the local log") {
		t.Fatalf("second restore: %d, %v\n%s", n, err, logs.String())
	}
	db, _ = sql.Open("sqlite3", filepath.Join(data, "app.db"))
	defer db.Close()
	if err := db.QueryRow("SELECT count(*) FROM t").Scan(&got); err != nil || got != rows {
		t.Fatalf("from the replica alone: %d rows (%v), %d committed", got, err, rows)
	}
}
