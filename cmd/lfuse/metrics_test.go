package main

import (
	"context"
	"database/sql"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lfuse/lfuse/replicate"
	_ "github.com/mattn/go-sqlite3"
)

// One bad series does not take the whole scrape down (found by a review:
// a database whose name is not UTF-8, or two replicas that print alike,
// answered every scrape with a 500).
func TestMetricsSurviveOddNames(t *testing.T) {
	data, state, rep := t.TempDir(), filepath.Join(t.TempDir(), "state"), t.TempDir()
	cfg := defaultConfig()
	cfg.Replicas = []ReplicaConfig{{URL: rep}, {URL: "file://localhost" + rep}}
	mgr := replicate.NewManager(data, state, slog.New(slog.DiscardHandler))
	mgr.Replicas = replicaSpecs(cfg)
	if err := mgr.Open(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mgr.Close() })
	name := "bad\xff.db"
	db, err := sql.Open("sqlite3", filepath.Join(data, name)+"?_journal_mode=WAL")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec("CREATE TABLE t(v)"); err != nil {
		t.Fatal(err)
	}
	mgr.Opened(name+"-wal", true)
	mgr.SyncAll()
	if len(mgr.DBs()) != 1 {
		t.Fatalf("%d databases tracked", len(mgr.DBs()))
	}

	srv := httptest.NewServer(metricsHandler(noRequests{}, mgr))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `lfuse_db_txid{db="bad\\xff.db"}`) ||
		strings.Count(string(body), "lfuse_replica_txid{") != 1 {
		t.Fatalf("scrape: %s\n%s", resp.Status, body)
	}
}

type noRequests struct{}

func (noRequests) Requests() map[string]uint64 { return nil }
