package replicate

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends"
	"github.com/lfuse/lfuse/backends/file"
	"github.com/superfly/ltx"
)

// flakyReads serves a replica's files as a network store with a bad
// connection would: each body gives at most cut bytes and then fails (or,
// with stall, hangs until its context ends), and the first failOpens opens
// fail.
type flakyReads struct {
	ReplicaClient
	cut   int64
	stall bool
	// deaf: a stalled read ignores its context and Close waits for it, as
	// an SFTP file's does, until release is closed.
	deaf    bool
	release chan struct{}

	mu        sync.Mutex
	failOpens int
	opens     int
}

func (c *flakyReads) OpenLTXFile(ctx context.Context, level int, min, max ltx.TXID, offset, size int64) (io.ReadCloser, error) {
	c.mu.Lock()
	c.opens++
	fail := c.failOpens > 0
	if fail {
		c.failOpens--
	}
	c.mu.Unlock()
	if fail {
		return nil, syscall.ECONNREFUSED
	}
	rc, err := c.ReplicaClient.OpenLTXFile(ctx, level, min, max, offset, size)
	if err != nil {
		return nil, err
	}
	return &flakyBody{ctx: ctx, rc: rc, left: c.cut, stall: c.stall, deaf: c.deaf, release: c.release}, nil
}

type flakyBody struct {
	ctx     context.Context
	rc      io.ReadCloser
	left    int64
	stall   bool
	deaf    bool
	release chan struct{}
	mu      sync.Mutex // held by a read, and taken by Close
}

func (b *flakyBody) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.left <= 0 {
		switch {
		case b.deaf:
			<-b.release
			return 0, io.ErrClosedPipe
		case b.stall:
			<-b.ctx.Done()
			return 0, b.ctx.Err()
		}
		return 0, syscall.ECONNRESET
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.rc.Read(p)
	b.left -= int64(n)
	return n, err
}

func (b *flakyBody) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.rc.Close()
}

// flakySetup writes a replica of a snapshot and three later files, and
// returns it with the database they restore to.
func flakySetup(t *testing.T) (ReplicaClient, []byte) {
	t.Helper()
	client := file.New(filepath.Join(t.TempDir(), "replica"))
	var files [][]byte
	for id := ltx.TXID(1); id <= 4; id++ {
		pages := map[uint32]byte{}
		for p := uint32(1); p <= 30; p++ {
			if id == 1 || p%uint32(id) == 0 {
				pages[p] = byte(int(p)*7 + int(id))
			}
		}
		level := 0
		if id == 1 {
			level = SnapshotLevel
		}
		b := encodeTest(t, id, id, 30, pages)
		files = append(files, b)
		sum, err := ltx.ChecksumReader(bytes.NewReader(applyAll(t, files)), 512)
		if err != nil {
			t.Fatal(err)
		}
		meta := backends.FileMeta{PostApplyChecksum: ltx.ChecksumFlag | sum}
		if err := client.WriteLTXFile(context.Background(), level, id, id, bytes.NewReader(b), int64(len(b)), meta); err != nil {
			t.Fatal(err)
		}
	}
	return client, applyAll(t, files)
}

func fastRetries(t *testing.T) {
	oldIdle, oldBackoff := readIdleTimeout, downloadBackoff
	readIdleTimeout, downloadBackoff = 200*time.Millisecond, time.Millisecond
	t.Cleanup(func() { readIdleTimeout, downloadBackoff = oldIdle, oldBackoff })
}

// A connection that breaks every few bytes, or hangs, or refuses the first
// opens, slows a restore down but does not fail it: each file is opened
// again where it broke off. A restore used to end at the first reset,
// calling the file corrupt.
func TestRestoreResumesDownloads(t *testing.T) {
	fastRetries(t)
	for _, c := range []struct {
		name   string
		client *flakyReads
	}{
		{"reset", &flakyReads{cut: 40}},
		{"stall", &flakyReads{cut: 100, stall: true}},
		{"deaf stall", &flakyReads{cut: 100, stall: true, deaf: true, release: make(chan struct{})}},
		{"refused", &flakyReads{cut: 1 << 30, failOpens: downloadAttempts - 1}},
	} {
		t.Run(c.name, func(t *testing.T) {
			inner, want := flakySetup(t)
			client := c.client
			client.ReplicaClient = inner
			if client.release != nil {
				defer close(client.release)
			}
			out := filepath.Join(t.TempDir(), "restored.db")
			if _, err := Restore(context.Background(), client, mustPlan(t, inner), out, RestoreOptions{Parallelism: 2}); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(out)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatal("restored database differs")
			}
			if client.opens <= 4 {
				t.Fatalf("%d opens for 4 files: the faults were not hit", client.opens)
			}
		})
	}
}

// A replica that cannot be read at all fails the restore as a download,
// naming the file, after a bounded number of attempts; nothing is written.
func TestRestoreGivesUpOnDeadReplica(t *testing.T) {
	fastRetries(t)
	inner, _ := flakySetup(t)
	for _, c := range []*flakyReads{{cut: 0}, {failOpens: 1 << 30}} {
		c.ReplicaClient = inner
		dir := t.TempDir()
		out := filepath.Join(dir, "restored.db")
		_, err := Restore(context.Background(), c, mustPlan(t, inner), out, RestoreOptions{Parallelism: 1})
		if err == nil || !strings.Contains(err.Error(), "download level") || strings.Contains(err.Error(), "corrupt") ||
			!errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("got %v, want a download error", err)
		}
		c.mu.Lock()
		opens := c.opens
		c.mu.Unlock()
		if opens > 4*downloadAttempts {
			t.Fatalf("%d opens: retries are not bounded", opens)
		}
		if left, _ := os.ReadDir(dir); len(left) != 0 {
			t.Fatalf("left behind: %v", left)
		}
	}
}

// A missing file is not retried.
func TestDownloadMissingNotRetried(t *testing.T) {
	fastRetries(t)
	inner, _ := flakySetup(t)
	c := &flakyReads{ReplicaClient: inner, cut: 1 << 30}
	_, err := openDownload(context.Background(), c, ltx.FileInfo{Level: 0, MinTXID: 7, MaxTXID: 7}, nil)
	if !errors.Is(err, backends.ErrNotFound) || c.opens != 1 {
		t.Fatalf("got %v after %d opens, want not found after one", err, c.opens)
	}
}

// Close from another goroutine ends a read that is waiting on a stalled
// body (a decoder that failed does this to its source), well before the
// idle timeout.
func TestDownloadCloseEndsRead(t *testing.T) {
	inner, _ := flakySetup(t)
	c := &flakyReads{ReplicaClient: inner, cut: 10, stall: true}
	rc, err := openDownload(context.Background(), c, mustPlan(t, inner).Files[0], nil)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := io.ReadAll(rc)
		done <- err
	}()
	time.Sleep(50 * time.Millisecond) // let the read reach the stall; a Close before it works too
	rc.Close()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("read ended with %v, want context.Canceled", err)
		}
	case <-time.After(readIdleTimeout / 2):
		t.Fatal("Close did not end the read")
	}
}
