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
	if wholeFile(d.rc) != nil {
		return &wholeBody{ReadCloser: d.rc, cancel: cancel}, nil
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

	mu     sync.Mutex // the current attempt, which Close ends from any goroutine
	rc     io.ReadCloser
	cancel context.CancelFunc // ends the current attempt
	stall  *stallWatch
}

// open opens the file at d.off, retrying errors that retrying may cure.
func (d *download) open() error {
	for {
		actx, cancel := context.WithCancel(d.ctx)
		rc, err := d.client.OpenLTXFile(actx, d.f.Level, d.f.MinTXID, d.f.MaxTXID, d.off, 0)
		if err == nil {
			d.mu.Lock()
			d.rc, d.cancel = rc, cancel
			d.stall = &stallWatch{cancel: cancel, rc: rc}
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

func (d *download) Read(p []byte) (int, error) {
	for {
		if d.err == nil && d.ctx.Err() != nil {
			d.err = d.ctx.Err()
			d.drop()
		}
		if d.err != nil {
			return 0, d.err
		}
		if d.rc == nil {
			if err := d.open(); err != nil {
				d.err = err
				return 0, err
			}
		}
		d.stall.arm()
		n, err := d.rc.Read(p)
		stalled := d.stall.disarm()
		d.off += int64(n)
		if n > 0 {
			d.fails = 0
		}
		if err == io.EOF && !stalled && d.f.Size > 0 && d.off < d.f.Size {
			err = fmt.Errorf("the body ended at byte %d of %d", d.off, d.f.Size)
		}
		if err == nil || (err == io.EOF && !stalled) {
			return n, err
		}
		if d.ctx.Err() != nil {
			d.err = d.ctx.Err()
			d.drop()
			return n, d.err
		}
		if stalled {
			err = fmt.Errorf("no data for %s", readIdleTimeout)
		}
		d.drop()
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
	if d.rc != nil {
		d.cancel()
		d.stall.close()
		d.rc, d.cancel, d.stall = nil, nil, nil
	}
}

// Close ends the download. Called while a Read waits (a decoder that
// failed closes its source to end a stalled read), it cancels that read;
// the Read then lets the body go.
func (d *download) Close() error {
	d.cancelAll()
	d.mu.Lock()
	w := d.stall
	d.mu.Unlock()
	if w != nil {
		go w.close() // a body that ignores its context; Close may wait for the read
	}
	return nil
}

// stallWatch ends an attempt whose read gives nothing for readIdleTimeout:
// it cancels the attempt's context (an HTTP body's read then returns) and
// closes the body (for bodies that do not watch their context).
type stallWatch struct {
	cancel context.CancelFunc
	rc     io.Closer

	mu      sync.Mutex
	timer   *time.Timer
	stalled bool
	once    sync.Once
}

func (w *stallWatch) arm() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.timer == nil {
		w.timer = time.AfterFunc(readIdleTimeout, w.fire)
	} else {
		w.timer.Reset(readIdleTimeout)
	}
}

func (w *stallWatch) fire() {
	w.mu.Lock()
	w.stalled = true
	w.mu.Unlock()
	w.cancel()
	// A body's Close may wait for the read it ends: not on this goroutine's
	// caller, which is the timer's.
	go w.close()
}

// disarm stops the timer and says whether it fired.
func (w *stallWatch) disarm() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.timer.Stop()
	return w.stalled
}

func (w *stallWatch) close() { w.once.Do(func() { w.rc.Close() }) }
