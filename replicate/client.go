package replicate

import (
	"context"
	"io"

	"github.com/lfuse/lfuse/backends"
	"github.com/superfly/ltx"
)

// ReplicaClient stores one database's LTX files somewhere: a directory, a
// bucket, a server. It holds no replication state of its own; positions,
// batching, compaction and retention are the Replica's business. Every
// backend implements it for the layout of DESIGN §3.
type ReplicaClient interface {
	// Type names the kind of storage ("file", "s3", ...) for logs and metrics.
	Type() string
	// String is the replica's location, without credentials.
	String() string
	// LTXFiles lists the files of one level, ascending by MinTXID. CreatedAt
	// is the LTX header timestamp of each file (its last commit time).
	LTXFiles(ctx context.Context, level int) ([]ltx.FileInfo, error)
	// OpenLTXFile reads one file from offset on: size bytes, or to its end
	// if size is 0. A missing file is backends.ErrNotFound.
	OpenLTXFile(ctx context.Context, level int, min, max ltx.TXID, offset, size int64) (io.ReadCloser, error)
	// WriteLTXFile stores a complete file of size bytes so that it appears
	// whole or not at all, with meta recorded beside it.
	WriteLTXFile(ctx context.Context, level int, min, max ltx.TXID, r io.Reader, size int64, meta backends.FileMeta) error
	// FileMeta returns what was recorded beside a file.
	FileMeta(ctx context.Context, level int, min, max ltx.TXID) (backends.FileMeta, error)
	// DeleteLTXFiles removes files; files already gone are not an error.
	DeleteLTXFiles(ctx context.Context, files []ltx.FileInfo) error
	// WriteMarker stores a small object, name, at the replica's root beside
	// its levels (where Litestream does not look), whole or not at all,
	// replacing one of that name.
	WriteMarker(ctx context.Context, name string, data []byte) error
	// ReadMarker returns what WriteMarker stored; backends.ErrNotFound
	// when there is none.
	ReadMarker(ctx context.Context, name string) ([]byte, error)
	// DeleteMarker removes it; one already gone is not an error.
	DeleteMarker(ctx context.Context, name string) error
}

// SnapshotLevel is the level of full snapshots in the replica layout.
const SnapshotLevel = 9
