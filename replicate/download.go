package replicate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/lfuse/lfuse/backends"
	"github.com/superfly/ltx"
)

// Downloads from a replica survive a broken or stalled connection: a body
// whose read fails is opened again at the offset reached. A restore of a
// large snapshot used to end at the first connection reset (reported as a
// corrupt file), and a read that stalled held a restore or a compaction
// until the client's own timeout, where it had one.
var (
	// readIdleTimeout is how long a read may give nothing before the
	// attempt is abandoned and the file opened again.
	readIdleTimeout = time.Minute
	// downloadBackoff is the wait before the first retry, doubled for each
	// further failure without progress, up to downloadMaxBackoff.
	downloadBackoff    = 250 * time.Millisecond
	downloadMaxBackoff = 8 * time.Second
)

// downloadAttempts is how many times in a row an open or read may fail
// without a byte read in between before the download gives up.
const downloadAttempts = 6

// downloadError is a download that failed for good after its retries: the
// replica could not be read, which is not the same as a corrupt file.
type downloadError struct{ err error }

func (e downloadError) Error() string { return e.err.Error() }
func (e downloadError) Unwrap() error { return e.err }

// openDownload opens a replica file for reading from its start, retrying
// failed opens and resuming failed reads. A missing file or a
// configuration error is returned at once. A local file's body keeps its
// WholeFile (restore maps it). Close may be called while a Read is under
// way, and ends it.
func openDownload(ctx context.Context, client ReplicaClient, f ltx.FileInfo, logger *slog.Logger) (io.ReadCloser, error) {
	ctx, cancel := context.WithCancel(ctx)
	d := &download{ctx: ctx, cancelAll: cancel, client: client, f: f, logger: logger}
	if err := d.open(); err != nil {
		cancel()
		return nil, err
	}
	if wholeFile(d.a.rc) != nil {
		return &wholeBody{ReadCloser: d.a.rc, cancel: cancel}, nil
	}
	return d, nil
}

// wholeBody is a local file's body, read in place rather than resumed.
type wholeBody struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (b *wholeBody) WholeFile() *os.File { return wholeFile(b.ReadCloser) }

func (b *wholeBody) Close() error {
	b.cancel()
	return b.ReadCloser.Close()
}

type download struct {
	ctx       context.Context
	cancelAll context.CancelFunc // ends the download: Close
	client    ReplicaClient
	f         ltx.FileInfo
	logger    *slog.Logger

	off   int64 // bytes handed to the caller
	fails int   // failures since the last byte read
	err   error

	mu sync.Mutex // a, which Close ends from any goroutine
	a  *attempt   // the current attempt, or nil
}

// attempt is one open of the file. Its body is read on a goroutine of its
// own, into a buffer of its own, so that a read that never returns (an
// SFTP file's read holds its lock, and its Close waits for it; a hung
// network file system) is abandoned rather than waited for.
type attempt struct {
	rc     io.ReadCloser
	cancel context.CancelFunc
	buf    []byte
	res    chan readResult
	once   sync.Once
}

type readResult struct {
	n   int
	err error
}

// end cancels the attempt and closes its body, on another goroutine: a
// body's Close may wait for the read it ends.
func (a *attempt) end() {
	a.once.Do(func() {
		a.cancel()
		go a.rc.Close()
	})
}

// open opens the file at d.off, retrying errors that retrying may cure.
func (d *download) open() error {
	for {
		actx, cancel := context.WithCancel(d.ctx)
		rc, err := d.client.OpenLTXFile(actx, d.f.Level, d.f.MinTXID, d.f.MaxTXID, d.off, 0)
		if err == nil {
			d.mu.Lock()
			d.a = &attempt{rc: rc, cancel: cancel, res: make(chan readResult, 1)}
			d.mu.Unlock()
			return nil
		}
		cancel()
		if d.ctx.Err() != nil || errors.Is(err, backends.ErrNotFound) || errors.Is(err, backends.ErrConfig) {
			return err
		}
		if werr := d.retry(err); werr != nil {
			return werr
		}
	}
}

// retry counts a failure and waits before the next attempt, or says why
// not to make one.
func (d *download) retry(err error) error {
	d.fails++
	if d.fails >= downloadAttempts {
		return downloadError{fmt.Errorf("%w (gave up after %d attempts)", err, d.fails)}
	}
	wait := min(downloadBackoff<<(d.fails-1), downloadMaxBackoff)
	d.log().Warn("replica download failed; retrying", "file", fileName(d.f), "offset", d.off, "err", err, "retry_in", wait)
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-d.ctx.Done():
		return d.ctx.Err()
	}
}

func (d *download) log() *slog.Logger {
	if d.logger != nil {
		return d.logger
	}
	return slog.Default()
}

// read reads the attempt's body into p, giving up after readIdleTimeout
// without an answer or when the download is closed.
func (d *download) read(p []byte) (int, error) {
	a := d.a
	// Small enough that a slow link (down to about 5 KB/s) fills one
	// read within readIdleTimeout.
	if len(p) > 256<<10 {
		p = p[:256<<10]
	}
	if cap(a.buf) < len(p) {
		a.buf = make([]byte, len(p))
	}
	buf := a.buf[:len(p)]
	go func() {
		n, err := a.rc.Read(buf)
		a.res <- readResult{n, err}
	}()
	t := time.NewTimer(readIdleTimeout)
	defer t.Stop()
	select {
	case r := <-a.res:
		return copy(p, buf[:r.n]), r.err
	case <-t.C:
		return 0, fmt.Errorf("no data for %s", readIdleTimeout)
	case <-d.ctx.Done():
		return 0, d.ctx.Err()
	}
}

func (d *download) Read(p []byte) (int, error) {
	for {
		if d.err == nil && d.ctx.Err() != nil {
			d.err = d.ctx.Err()
			d.drop()
		}
		if d.err != nil {
			return 0, d.err
		}
		if d.a == nil {
			if err := d.open(); err != nil {
				// A file gone or credentials revoked midway is still a
				// download that failed, not a corrupt file.
				if d.ctx.Err() == nil && !errors.As(err, &downloadError{}) {
					err = downloadError{err}
				}
				d.err = err
				return 0, err
			}
		}
		n, err := d.read(p)
		d.off += int64(n)
		if n > 0 {
			d.fails = 0
		}
		complete := d.f.Size > 0 && d.off >= d.f.Size
		if err == io.EOF && !complete && d.f.Size > 0 {
			err = fmt.Errorf("the body ended at byte %d of %d", d.off, d.f.Size)
		}
		if err == nil || err == io.EOF {
			return n, err
		}
		if d.ctx.Err() != nil {
			d.err = d.ctx.Err()
			d.drop()
			return n, d.err
		}
		d.drop() // a stalled read is abandoned with its attempt
		if complete {
			// Every byte the listing promised arrived, and what failed was
			// the end (a stall before EOF, a transfer check): nothing is
			// left to read, and the decoder checks what was.
			d.err = io.EOF
			return n, nil
		}
		if n > 0 {
			// Hand over what arrived; the next call resumes after it.
			d.fails++
			d.log().Warn("replica download broke off; resuming", "file", fileName(d.f), "offset", d.off, "err", err)
			return n, nil
		}
		if werr := d.retry(err); werr != nil {
			d.err = werr
			return 0, werr
		}
	}
}

// drop ends the current attempt.
func (d *download) drop() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.a != nil {
		d.a.end()
		d.a = nil
	}
}

// Close ends the download. Called while a Read waits on another goroutine
// (a decoder that failed closes its source to end a stalled read), it ends
// that read at once.
func (d *download) Close() error {
	d.cancelAll()
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.a != nil {
		d.a.end()
	}
	return nil
}

// copyBody copies a download into f in reads of 1 MiB: io.Copy would read
// 32 KiB at a time (os.File's ReadFrom falls back to that), and each read
// of a download costs a goroutine's start and a timer.
func copyBody(f *os.File, body io.Reader) error {
	_, err := io.CopyBuffer(struct{ io.Writer }{f}, body, make([]byte, 1<<20))
	return err
}
