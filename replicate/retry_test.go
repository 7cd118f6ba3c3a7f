package replicate

import (
	"database/sql"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A capture that fails again (on a write) while its retry timer is pending
// moves the retry later. The timer must then come back at the new time
// rather than kick early and leave nothing to wake the capture: after the
// application's last commit no write comes to do it (seen as a capture that
// never recovered from a full state directory until lfuse stopped).
func TestRetryAfterFailingAgain(t *testing.T) {
	data, state := t.TempDir(), filepath.Join(t.TempDir(), "state")
	m, logs := newTestManager(t, data, state)
	defer m.Close()
	db, err := sql.Open("sqlite3", filepath.Join(data, "app.db")+"?_journal_mode=WAL")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec("CREATE TABLE t(v)"); err != nil {
		t.Fatal(err)
	}
	m.Opened("app.db-wal", true)
	m.SyncAll()
	d := m.DB("app.db")
	if d == nil {
		t.Fatal("database not discovered")
	}

	// An outage: the timer is armed for 200 ms; then, before it fires, a
	// second failure moves the retry to 600 ms.
	d.mu.Lock()
	d.failing = true
	d.retryAt = time.Now().Add(200 * time.Millisecond)
	d.armRetry()
	d.retryAt = time.Now().Add(600 * time.Millisecond)
	d.mu.Unlock()
	if _, err := db.Exec("INSERT INTO t VALUES (1)"); err != nil { // the last commit
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(logs.String(), "capture recovered") {
		if time.Now().After(deadline) {
			t.Fatalf("capture did not come back by itself:\n%s", logs)
		}
		time.Sleep(20 * time.Millisecond) // polling a log: the test has no event for it
	}
}
