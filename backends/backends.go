// Package backends holds what every storage client shares: the metadata
// recorded beside each replica file and the error for a missing one. The
// clients themselves live in subpackages (file, ...) and know nothing of
// SQLite: they store LTX files by level and TXID range.
package backends

import (
	"context"
	"errors"
	"io"
	"time"

	"github.com/superfly/ltx"
)

// FileMeta is recorded beside each replica file. Replica files carry no
// database checksums in their headers (Litestream's restore rejects them), so
// the checksum of the database after applying the file lives here.
type FileMeta struct {
	Timestamp         time.Time
	PostApplyChecksum ltx.Checksum
}

// ErrNotFound is returned for a file that does not exist.
var ErrNotFound = errors.New("not found")

// ContextReader reads r until ctx is done, then fails with ctx's error: for
// transfers whose I/O does not watch a context itself (files, SFTP).
func ContextReader(ctx context.Context, r io.Reader) io.Reader {
	return &ctxReader{ctx: ctx, r: r}
}

type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// ErrConfig marks a failure the user fixes in the configuration rather than
// one that retrying cures: wrong credentials, no permission, a bucket or
// container that does not exist, an untrusted host key.
var ErrConfig = errors.New("replica misconfigured")

// ConfigError marks err as ErrConfig without changing its message.
func ConfigError(err error) error { return configError{err} }

type configError struct{ error }

func (e configError) Unwrap() []error { return []error{e.error, ErrConfig} }
