package replicate

import (
	"context"
	"io"
	"sync/atomic"

	"github.com/lfuse/lfuse/backends"
	"github.com/superfly/ltx"
)

// Operation kinds, as storage providers bill them.
const (
	OpGet = iota
	OpPut
	OpList
	OpDelete
	numOps
)

// OpNames names the operation kinds for metrics and logs.
var OpNames = [numOps]string{"GET", "PUT", "LIST", "DELETE"}

// opCounter counts what a Replica asks of its client: a call of each
// method is one operation of its kind, and a delete one per file (GCS,
// Azure, SFTP and files bill or work per object; S3 takes up to 1,000 in
// one request).
type opCounter struct {
	ReplicaClient
	ops, bytes [numOps]atomic.Int64
}

func (c *opCounter) LTXFiles(ctx context.Context, level int) ([]ltx.FileInfo, error) {
	c.ops[OpList].Add(1)
	return c.ReplicaClient.LTXFiles(ctx, level)
}

func (c *opCounter) OpenLTXFile(ctx context.Context, level int, min, max ltx.TXID, offset, size int64) (io.ReadCloser, error) {
	c.ops[OpGet].Add(1)
	rc, err := c.ReplicaClient.OpenLTXFile(ctx, level, min, max, offset, size)
	if err != nil {
		return nil, err
	}
	return &countedBody{ReadCloser: rc, n: &c.bytes[OpGet]}, nil
}

func (c *opCounter) WriteLTXFile(ctx context.Context, level int, min, max ltx.TXID, r io.Reader, size int64, meta backends.FileMeta) error {
	c.ops[OpPut].Add(1)
	err := c.ReplicaClient.WriteLTXFile(ctx, level, min, max, r, size, meta)
	if err == nil {
		c.bytes[OpPut].Add(size)
	}
	return err
}

func (c *opCounter) FileMeta(ctx context.Context, level int, min, max ltx.TXID) (backends.FileMeta, error) {
	c.ops[OpGet].Add(1) // a HEAD: billed with GETs
	return c.ReplicaClient.FileMeta(ctx, level, min, max)
}

func (c *opCounter) DeleteLTXFiles(ctx context.Context, files []ltx.FileInfo) error {
	c.ops[OpDelete].Add(int64(len(files)))
	return c.ReplicaClient.DeleteLTXFiles(ctx, files)
}

func (c *opCounter) WriteMarker(ctx context.Context, name string, data []byte) error {
	c.ops[OpPut].Add(1)
	err := c.ReplicaClient.WriteMarker(ctx, name, data)
	if err == nil {
		c.bytes[OpPut].Add(int64(len(data)))
	}
	return err
}

func (c *opCounter) ReadMarker(ctx context.Context, name string) ([]byte, error) {
	c.ops[OpGet].Add(1)
	b, err := c.ReplicaClient.ReadMarker(ctx, name)
	c.bytes[OpGet].Add(int64(len(b)))
	return b, err
}

func (c *opCounter) DeleteMarker(ctx context.Context, name string) error {
	c.ops[OpDelete].Add(1)
	return c.ReplicaClient.DeleteMarker(ctx, name)
}

type countedBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (b *countedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n.Add(int64(n))
	return n, err
}

// ReplicaStats is a replica's state and what it has cost, for metrics.
type ReplicaStats struct {
	Type, Name  string
	TXID        ltx.TXID // newest in the replica
	SyncedAt    int64    // unix nanoseconds of the last good sync; 0 before
	StartedAt   int64    // unix nanoseconds when lfuse began shipping to it
	Syncs, Errs int64
	Failing     bool
	// TakenOverBy is the other lfuse that claimed the replica, once one
	// has: this one writes nothing more to it.
	TakenOverBy string
	Ops, Bytes  [numOps]int64
}

// Stats reads the replica's counters.
func (r *Replica) Stats() ReplicaStats {
	st := ReplicaStats{Type: r.client.Type(), Name: r.client.String(), TXID: r.Pos(), SyncedAt: r.syncedAt.Load(),
		StartedAt: r.startedAt, Syncs: r.syncs.Load(), Errs: r.errs.Load()}
	for i := range st.Ops {
		st.Ops[i] = r.ops.ops[i].Load()
		st.Bytes[i] = r.ops.bytes[i].Load()
	}
	st.Failing = r.syncOutage.now.Load() || r.maintOutage.now.Load()
	if e := r.takenBy.Load(); e != nil {
		st.Failing, st.TakenOverBy = true, e.By.String()
	}
	return st
}

// logRequests says at shutdown what the replica cost while lfuse ran.
func (r *Replica) logRequests() {
	st := r.Stats()
	r.logger.Info("replica requests", "get", st.Ops[OpGet], "put", st.Ops[OpPut], "list", st.Ops[OpList],
		"delete", st.Ops[OpDelete], "get_bytes", st.Bytes[OpGet], "put_bytes", st.Bytes[OpPut])
}
