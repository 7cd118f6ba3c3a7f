package integration

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// lfuse status asks the running lfuse, through the socket in its state
// directory (or the metrics address), for each database and its replicas.
func TestStatus(t *testing.T) {
	e := newEnv(t)
	cfgPath, _ := e.replicaConfig("")
	addr := freeAddr(t)
	lf := e.mount("-config", cfgPath, "-metrics-addr", addr)
	defer lf.stop()
	dbPath := e.path("app.db")
	createSeq(t, dbPath)
	seqWrite(t, dbPath, 1, 20)
	// A checkpoint truncates the database file and the WAL: lfuse holds
	// both until capture is done, and counts the holds.
	checkpointTruncate(t, dbPath)

	// The replica catches up within a few sync intervals of 100 ms.
	var rep struct {
		Databases []struct {
			Path, Status, TXID string
			Size               int64   `json:"size_bytes"`
			Holds              int64   `json:"holds"`
			Held               float64 `json:"held_seconds"`
			Replicas           []struct {
				Replica, Type, TXID string
				LagTXIDs            uint64 `json:"lag_txids"`
			}
		}
	}
	deadline := time.Now().Add(time.Minute)
	for {
		code, out := runLfuse(t, "status", "-data", e.data, "-json")
		if code != 0 {
			t.Fatalf("lfuse status exited %d:\n%s", code, out)
		}
		if err := json.Unmarshal([]byte(out), &rep); err != nil {
			t.Fatalf("lfuse status -json: %v\n%s", err, out)
		}
		if len(rep.Databases) == 1 && len(rep.Databases[0].Replicas) == 1 && rep.Databases[0].Replicas[0].LagTXIDs == 0 &&
			rep.Databases[0].Replicas[0].TXID == rep.Databases[0].TXID {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the replica did not catch up in status:\n%s", out)
		}
		time.Sleep(100 * time.Millisecond) // polling lfuse's state: no event to wait for
	}
	d := rep.Databases[0]
	if d.Path != "app.db" || d.Status == "" || d.TXID < "0000000000000015" || d.Size < 4096 || d.Replicas[0].Type != "file" ||
		d.Holds < 2 || d.Held <= 0 {
		t.Fatalf("status: %+v", d)
	}
	if v := scrape(t, addr, `lfuse_db_holds_total{db="app.db"}`); v != float64(d.Holds) {
		t.Fatalf("lfuse_db_holds_total %v, status said %d", v, d.Holds)
	}
	// The table, over the metrics address.
	code, out := runLfuse(t, "status", "-addr", addr)
	if code != 0 || !strings.Contains(out, "app.db") || !strings.Contains(out, "in sync") || !strings.Contains(out, d.TXID) {
		t.Fatalf("lfuse status -addr exited %d:\n%s", code, out)
	}
	// No lfuse there: one clear line.
	code, out = runLfuse(t, "status", "-data", t.TempDir())
	if code == 0 || !strings.Contains(out, "no lfuse answers") {
		t.Fatalf("status of a directory without lfuse exited %d:\n%s", code, out)
	}

	// From a review: the address as a URL is taken; a server that is not
	// lfuse's, a stray argument, and a default config that needs the
	// service's environment each get what they deserve.
	if code, out := runLfuse(t, "status", "-addr", "http://"+addr); code != 0 || !strings.Contains(out, "app.db") {
		t.Fatalf("status -addr http://%s exited %d:\n%s", addr, code, out)
	}
	if code, out := runLfuse(t, "status", "-addr", addr+"/metrics"); code == 0 || !strings.Contains(out, "answered 404") {
		t.Fatalf("status -addr at a path that is not lfuse's exited %d:\n%s", code, out)
	}
	if code, out := runLfuse(t, "status", "-data", e.data, "extra", "-json"); code == 0 || !strings.Contains(out, `unexpected argument "extra"`) {
		t.Fatalf("status with a stray argument exited %d:\n%s", code, out)
	}
	svc := filepath.Join(e.root, "service.toml")
	os.WriteFile(svc, []byte("[[replicas]]\nurl = \"s3://b/p\"\nsecret-access-key = \"${LFUSE_TEST_ONLY_IN_THE_SERVICE}\"\n"), 0o600)
	if code, out := runLfuseEnv(t, []string{"LFUSE_CONFIG=" + svc}, "status", "-data", e.data); code != 0 || !strings.Contains(out, "app.db") {
		t.Fatalf("status -data with a default config that needs the service's environment exited %d:\n%s", code, out)
	}
	os.WriteFile(svc, []byte("state-dir = /somewhere\n"), 0o600)
	if code, out := runLfuseEnv(t, []string{"LFUSE_CONFIG=" + svc}, "status", "-data", e.data); code == 0 || !strings.Contains(out, "line 1") {
		t.Fatalf("status -data with a broken default config exited %d:\n%s", code, out)
	}
}

// A state directory too deep for a unix socket's path (108 bytes) still
// answers lfuse status: it said "invalid argument" while lfuse ran.
func TestStatusDeepStateDir(t *testing.T) {
	e := newEnv(t)
	state := filepath.Join(e.root, strings.Repeat("deep-state-directory/", 6))
	if err := os.MkdirAll(state, 0o700); err != nil {
		t.Fatal(err)
	}
	lf := e.mount("-state", state)
	defer lf.stop()
	if code, out := runLfuse(t, "status", "-state", state); code != 0 {
		t.Fatalf("lfuse status with a %d-byte state directory: exit %d\n%s", len(state), code, out)
	}
}
