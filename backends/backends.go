// Package backends holds what every storage client shares: the metadata
// recorded beside each replica file and the error for a missing one. The
// clients themselves live in subpackages (file, ...) and know nothing of
// SQLite: they store LTX files by level and TXID range.
package backends

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/superfly/ltx"
	"golang.org/x/sync/errgroup"
)

// FileMeta is recorded beside each replica file. Replica files carry no
// database checksums in their headers (Litestream's restore rejects them), so
// the checksum of the database after applying the file lives here.
type FileMeta struct {
	Timestamp         time.Time
	PostApplyChecksum ltx.Checksum
}

// TempPrefix starts the names of the temporary files that the file and SFTP
// backends write beside a level's files and rename into place.
const TempPrefix = ".tmp-"

// staleTemp is how long a temporary file goes unwritten before it counts
// as abandoned. An upload in progress writes it continually, so only a
// writer that was killed or cut off leaves one this old. A day, not less:
// an SFTP server's clock is compared with this machine's. (The file's time
// is set to the commit time just before its rename: a listing at that
// instant can take it, and the upload fails and is retried.)
const staleTemp = 24 * time.Hour

// StaleTemp says whether a level's entry is a temporary file left behind by
// a writer that was killed or lost its connection, which a listing removes.
func StaleTemp(name string, mtime, now time.Time) bool {
	return strings.HasPrefix(name, TempPrefix) && now.Sub(mtime) > staleTemp
}

// MaxMarker bounds what a backend's ReadMarker reads: a marker is a few
// hundred bytes, and a replica is not trusted to keep it so.
const MaxMarker = 1 << 20

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
func ConfigError(err error) error { return markedError{err, ErrConfig} }

// markedError reads as error and unwraps to it and to mark, a sentinel
// callers classify by.
type markedError struct {
	error
	mark error
}

func (e markedError) Unwrap() []error { return []error{e.error, e.mark} }

// Errorf is an error that reads as the formatted line but unwraps to err:
// the SDKs' own messages run over many lines and repeat request IDs, yet
// callers still need errors.Is/As on them (ErrNotFound, context.Canceled).
func Errorf(err error, format string, args ...any) error {
	return &lineError{msg: fmt.Sprintf(format, args...), err: err}
}

type lineError struct {
	msg string
	err error
}

func (e *lineError) Error() string { return e.msg }
func (e *lineError) Unwrap() error { return e.err }

// ExactReader reads r, failing unless it gives exactly size bytes: an upload
// of a short or long body then fails before the store commits it, rather
// than leaving an object of the wrong size.
func ExactReader(r io.Reader, size int64) io.Reader { return &exactReader{r: r, left: size} }

type exactReader struct {
	r    io.Reader
	left int64
}

var errSize = errors.New("the body's size differs from the size given")

func (e *exactReader) Read(p []byte) (int, error) {
	if e.left <= 0 {
		var one [1]byte
		if n, _ := e.r.Read(one[:]); n > 0 {
			return 0, fmt.Errorf("%w: it is longer", errSize)
		}
		return 0, io.EOF
	}
	if int64(len(p)) > e.left {
		p = p[:e.left]
	}
	n, err := e.r.Read(p)
	e.left -= int64(n)
	if err == io.EOF && e.left > 0 {
		return n, fmt.Errorf("%w: %d bytes short", errSize, e.left)
	}
	if err == io.EOF {
		err = nil // the next call reports EOF after checking for extra bytes
	}
	return n, err
}

// FindDatabases walks an object store's "directories" from root (a prefix
// ending in "/", or "") and returns, relative to root and sorted, those that
// hold a database replica. list gives the prefixes directly under a prefix
// (each ending in "/"); layout picks, from a prefix's children, those that
// are its own replica's levels: a prefix with any is a database. The walk
// goes on into its other children, since a database's path can also name
// a directory that holds others (x.db deleted, then x.db/y.db made: the
// replica keeps both). The prefixes of one depth are listed findAtOnce at
// a time: one after another, forty databases cost eighty round trips to a
// cloud store before a restore of them could start.
func FindDatabases(ctx context.Context, root string, list func(ctx context.Context, prefix string) ([]string, error),
	layout func(ctx context.Context, prefix string, children []string) ([]string, error)) ([]string, error) {
	var (
		mu  sync.Mutex
		dbs []string
	)
	for frontier := []string{root}; len(frontier) > 0; {
		next := make([][]string, len(frontier))
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(findAtOnce)
		for i, prefix := range frontier {
			g.Go(func() error {
				children, err := list(gctx, prefix)
				if err != nil {
					return err
				}
				if prefix != root {
					own, err := layout(gctx, prefix, children)
					if err != nil {
						return err
					}
					if len(own) > 0 {
						mu.Lock()
						dbs = append(dbs, strings.TrimSuffix(strings.TrimPrefix(prefix, root), "/"))
						mu.Unlock()
						children = slices.DeleteFunc(children, func(c string) bool { return slices.Contains(own, c) })
					}
				}
				next[i] = children
				return nil
			})
		}
		if err := g.Wait(); err != nil {
			return nil, err
		}
		frontier = slices.Concat(next...)
	}
	slices.Sort(dbs)
	return dbs, nil
}

// IsLevelName says whether name is a level directory's name in the
// <db>/ltx/<level>/ layout: 0 to 9 (SnapshotLevel).
func IsLevelName(name string) bool {
	return len(name) == 1 && name[0] >= '0' && name[0] <= '9'
}

// IsLTXName reports whether name is an LTX file's name (min-max.ltx). A
// level directory counts as a replica's only when it holds one: a database
// can be called ltx/0 too.
func IsLTXName(name string) bool {
	_, _, err := ltx.ParseFilename(name)
	return err == nil
}

// findAtOnce is how many prefixes FindDatabases lists at the same time.
const findAtOnce = 8

// HasLTXLevels is FindDatabases' layout for <db>/ltx/<level>/ (gs, abs):
// a prefix's ltx/ child is its replica's when one of its levels holds an
// LTX file (holdsLTX). Otherwise ltx/ is a directory like any other (a
// database ltx/app.db, or ones named a/ltx or z/ltx/0) and the walk goes
// into it.
func HasLTXLevels(list func(ctx context.Context, prefix string) ([]string, error),
	holdsLTX func(ctx context.Context, prefix string) (bool, error)) func(ctx context.Context, prefix string, children []string) ([]string, error) {
	return func(ctx context.Context, prefix string, children []string) ([]string, error) {
		if !slices.Contains(children, prefix+"ltx/") {
			return nil, nil
		}
		levels, err := list(ctx, prefix+"ltx/")
		if err != nil {
			return nil, err
		}
		for _, l := range levels {
			if !IsLevelName(strings.TrimSuffix(strings.TrimPrefix(l, prefix+"ltx/"), "/")) {
				continue
			}
			if ok, err := holdsLTX(ctx, l); err != nil || ok {
				return []string{prefix + "ltx/"}, err
			}
		}
		return nil, nil
	}
}

// ErrUnavailable marks a failure of the store rather than of the request:
// it answered that it cannot serve now (HTTP 5xx), or the connection to it
// broke. With Unreachable, it is what Down reports.
var ErrUnavailable = errors.New("replica unavailable")

// UnavailableStatus says whether an HTTP status means that the store cannot
// serve now, rather than that it will not (501 Not Implemented).
func UnavailableStatus(code int) bool {
	switch code {
	case 500, 502, 503, 504:
		return true
	}
	return false
}

// UnavailableError marks err as ErrUnavailable without changing its message.
func UnavailableError(err error) error { return markedError{err, ErrUnavailable} }

// Down says whether err, from a request to a replica, means the store is
// down rather than that the request was wrong: it could not be reached,
// gave no answer in time, answered that it cannot serve now, or (a file
// replica on a network file system) the mount failed. A store that
// answered (a missing file, denied access, a file that does not decode)
// is not down. The caller tells its own cancellation apart.
func Down(err error) bool {
	var op *net.OpError
	switch {
	case errors.Is(err, ErrConfig):
		return false
	case errors.As(err, &op) && (op.Op == "remote error" || op.Op == "local error"):
		// A TLS alert: the server answered and refused the handshake
		// (a client certificate required, no common protocol).
		return false
	case errors.Is(err, ErrUnavailable), Unreachable(err) != nil, errors.Is(err, context.DeadlineExceeded):
		return true
	}
	for _, errno := range []syscall.Errno{syscall.EIO, syscall.ETIMEDOUT, syscall.EHOSTDOWN, syscall.EHOSTUNREACH, syscall.ENOTCONN, syscall.ESTALE} {
		if errors.Is(err, errno) {
			return true
		}
	}
	return false
}

// Unreachable returns why an HTTP store could not be reached, or nil if err
// is not that: a name that does not resolve, a connection that failed, or
// a request the deadline cut off with no answer. It looks past the context
// error, so that retries that end with the context still report the
// connection failure behind them.
func Unreachable(err error) error {
	var dns *net.DNSError
	var op *net.OpError
	var ue *url.Error
	switch {
	case errors.As(err, &dns):
		return dns
	case errors.As(err, &op):
		return op
	case errors.As(err, &ue) && errors.Is(err, context.DeadlineExceeded):
		// The time ran out in the middle of an attempt, after retries
		// that may have been refused: the endpoint gave no answer.
		return errors.New("no response before the deadline")
	}
	// A connection closed before any answer (EOF) is not counted: a proxy
	// whose store is down does that, but so does a TLS port spoken to in
	// plain HTTP, and restore -skip-unreachable then left out a replica
	// that was only misconfigured (a review).
	return nil
}
