package replicate

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends/file"
	"github.com/superfly/ltx"
)

// silentLists never answers a listing until its context ends, as a client
// did against a server that accepted connections and said nothing.
type silentLists struct{ ReplicaClient }

func (c silentLists) LTXFiles(ctx context.Context, level int) ([]ltx.FileInfo, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

type approxClient struct{ ReplicaClient }

func (approxClient) ListTimesApprox() bool { return true }

// A listing that gets no answer fails after listTimeout, saying so, rather
// than holding a restore (or a replica) for good.
func TestSilentListingTimesOut(t *testing.T) {
	old := listTimeout
	listTimeout = 100 * time.Millisecond
	t.Cleanup(func() { listTimeout = old })
	c := silentLists{file.New(filepath.Join(t.TempDir(), "replica"))}
	start := time.Now()
	_, err := PlanRestore(context.Background(), c, Target{})
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "no answer within 100ms") {
		t.Fatalf("got %v, want a timeout that says so", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("took %s", d)
	}
	// The caller's own cancellation is not reported as the limit.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := PlanRestore(ctx, c, Target{}); err == nil || strings.Contains(err.Error(), "no answer") {
		t.Fatalf("cancelled: %v", err)
	}
	// What the wrapped client says of its listing times passes through.
	if a, ok := withTimeouts(approxClient{c}).(approxTimes); !ok || !a.ListTimesApprox() {
		t.Fatal("ListTimesApprox lost by the wrapper")
	}
}

// A replica whose store never answers its first listing counts the
// failure and retries, instead of waiting in the listing for good.
func TestReplicaSilentListingFails(t *testing.T) {
	old := listTimeout
	listTimeout = 50 * time.Millisecond
	t.Cleanup(func() { listTimeout = old })
	rs := newWrappedReplicaSetup(t, ReplicaOptions{SyncInterval: 10 * time.Millisecond},
		func(c ReplicaClient) ReplicaClient { return silentLists{c} })
	if _, err := rs.db.Exec("CREATE TABLE t(v)"); err != nil {
		t.Fatal(err)
	}
	rs.m.Opened("app.db-wal", true)
	rs.m.SyncAll()
	r := rs.m.DB("app.db").Replicas()[0]
	for deadline := time.Now().Add(10 * time.Second); r.errs.Load() < 2; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d failed syncs after 10 s: the listing is not bounded", r.errs.Load())
		}
	}
	rs.m.ShutdownTimeout = 100 * time.Millisecond
	rs.m.Close()
}
