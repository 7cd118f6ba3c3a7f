package replicate

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/lfuse/lfuse/backends"
	"github.com/superfly/ltx"
)

// Limits on requests that move no file body. A server that accepts the
// connection and never answers held the GCS and Azure clients for good (S3
// gave up after five tries of two minutes): a replica then sat in its first
// listing or a retention pass with nothing logged. Bodies have their own
// limits: uploads in Replica.upload, downloads in download.go.
var (
	listTimeout   = 5 * time.Minute // a level can be tens of thousands of files
	headTimeout   = time.Minute
	deleteTimeout = time.Minute // and 100 ms more per file
)

// timedClient bounds each request of a client that is not a file transfer.
type timedClient struct{ ReplicaClient }

// withTimeouts wraps c, once.
func withTimeouts(c ReplicaClient) ReplicaClient {
	if _, ok := c.(timedClient); ok {
		return c
	}
	return timedClient{c}
}

// bounded runs f with ctx limited to d, and says so when that limit, not
// ctx, ended it.
func bounded(ctx context.Context, d time.Duration, f func(ctx context.Context) error) error {
	tctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	err := f(tctx)
	if err != nil && ctx.Err() == nil && errors.Is(tctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("%w (no answer within %s)", err, d)
	}
	return err
}

func (c timedClient) LTXFiles(ctx context.Context, level int) (files []ltx.FileInfo, err error) {
	err = bounded(ctx, listTimeout, func(ctx context.Context) error {
		files, err = c.ReplicaClient.LTXFiles(ctx, level)
		return err
	})
	return files, err
}

func (c timedClient) FileMeta(ctx context.Context, level int, min, max ltx.TXID) (meta backends.FileMeta, err error) {
	err = bounded(ctx, headTimeout, func(ctx context.Context) error {
		meta, err = c.ReplicaClient.FileMeta(ctx, level, min, max)
		return err
	})
	return meta, err
}

func (c timedClient) DeleteLTXFiles(ctx context.Context, files []ltx.FileInfo) error {
	d := deleteTimeout + time.Duration(len(files))*100*time.Millisecond
	return bounded(ctx, d, func(ctx context.Context) error { return c.ReplicaClient.DeleteLTXFiles(ctx, files) })
}

func (c timedClient) WriteMarker(ctx context.Context, name string, data []byte) error {
	return bounded(ctx, headTimeout, func(ctx context.Context) error { return c.ReplicaClient.WriteMarker(ctx, name, data) })
}

func (c timedClient) ReadMarker(ctx context.Context, name string) (b []byte, err error) {
	err = bounded(ctx, headTimeout, func(ctx context.Context) error {
		b, err = c.ReplicaClient.ReadMarker(ctx, name)
		return err
	})
	return b, err
}

func (c timedClient) DeleteMarker(ctx context.Context, name string) error {
	return bounded(ctx, deleteTimeout, func(ctx context.Context) error { return c.ReplicaClient.DeleteMarker(ctx, name) })
}

// ListTimesApprox passes on what the wrapped client says of its listings.
func (c timedClient) ListTimesApprox() bool {
	a, ok := c.ReplicaClient.(approxTimes)
	return ok && a.ListTimesApprox()
}
