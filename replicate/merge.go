package replicate

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/lfuse/lfuse/backends"
	"github.com/lfuse/lfuse/walcapture"
	"github.com/superfly/ltx"
)

// mergeLTX writes to w one LTX file that has the effect of applying inputs in
// order: for each page the image from the last input that holds it, pages
// beyond the final commit size dropped. The inputs must have contiguous
// TXIDs; if the first one is a snapshot, so is the result. The result carries
// no database checksums (flags HeaderFlagNoChecksum), the form replicas are
// written in, unless checksums is set (the local log's form); the final
// post-apply checksum of the inputs is returned either way.
//
// Memory is one page and one decoder per input; callers bound the fan-in.
func mergeLTX(w io.Writer, inputs []io.Reader, spillDir string, checksums bool) (ltx.Header, ltx.Checksum, error) {
	if len(inputs) == 0 {
		return ltx.Header{}, 0, errors.New("merge: no inputs")
	}
	type input struct {
		dec  *ltx.Decoder
		ph   ltx.PageHeader
		data []byte
		done bool
	}
	ins := make([]*input, len(inputs))
	for i, r := range inputs {
		dec := ltx.NewDecoder(bufio.NewReaderSize(r, 64<<10))
		dec.SetRetainPageIndex(false)
		if err := dec.DecodeHeader(); err != nil {
			return ltx.Header{}, 0, fmt.Errorf("merge input %d: %w", i, err)
		}
		ins[i] = &input{dec: dec, data: make([]byte, dec.Header().PageSize)}
		if i > 0 {
			prev, cur := ins[i-1].dec.Header(), dec.Header()
			if cur.PageSize != prev.PageSize {
				return ltx.Header{}, 0, fmt.Errorf("merge: page size changes from %d to %d at TXID %s", prev.PageSize, cur.PageSize, cur.MinTXID)
			}
			if cur.MinTXID != prev.MaxTXID+1 {
				return ltx.Header{}, 0, fmt.Errorf("merge: TXID %s does not follow %s", cur.MinTXID, prev.MaxTXID)
			}
		}
	}
	first, last := ins[0].dec.Header(), ins[len(ins)-1].dec.Header()
	hdr := ltx.Header{
		Version:   ltx.Version,
		Flags:     ltx.HeaderFlagNoChecksum,
		PageSize:  first.PageSize,
		Commit:    last.Commit,
		MinTXID:   first.MinTXID,
		MaxTXID:   last.MaxTXID,
		Timestamp: last.Timestamp,
	}
	if checksums {
		hdr.Flags = 0
		if !hdr.IsSnapshot() {
			hdr.PreApplyChecksum = first.PreApplyChecksum
		}
	}
	enc, err := walcapture.NewEncoder(w, spillDir)
	if err != nil {
		return hdr, 0, err
	}
	defer enc.Cleanup()
	if err := enc.EncodeHeader(hdr); err != nil {
		return hdr, 0, err
	}
	next := func(in *input) error {
		err := in.dec.DecodePage(&in.ph, in.data)
		if errors.Is(err, io.EOF) {
			in.done = true
			return nil
		}
		return err
	}
	for i, in := range ins {
		if err := next(in); err != nil {
			return hdr, 0, fmt.Errorf("merge input %d: %w", i, err)
		}
	}
	// A page survives from the input that last wrote it only if no later
	// input cut the database below it; a page that was cut and not written
	// again, or that lies between the smallest commit size and the final one
	// without being written, reads as zeros, as it would after applying the
	// inputs one by one.
	laterMin := make([]uint32, len(ins)) // smallest commit size of the inputs after i
	minCommit := hdr.Commit
	for i := len(ins) - 1; i >= 0; i-- {
		laterMin[i] = minCommit
		minCommit = min(minCommit, ins[i].dec.Header().Commit)
	}
	zero := make([]byte, hdr.PageSize)
	lockPgno := ltx.LockPgno(hdr.PageSize)
	gap := minCommit + 1 // next page of the range that may need zeros
	for {
		var pgno uint32
		src := -1
		for i, in := range ins {
			if in.done {
				continue
			}
			if src < 0 || in.ph.Pgno <= pgno {
				pgno, src = in.ph.Pgno, i
			}
		}
		if gap == lockPgno {
			gap++
		}
		if gap <= hdr.Commit && (src < 0 || gap < pgno) {
			pgno, src = gap, -1
		} else if src < 0 {
			break
		}
		if pgno == gap {
			gap++
		}
		if pgno > hdr.Commit || pgno == lockPgno {
			// dropped by the final commit size
		} else if src >= 0 && pgno <= laterMin[src] {
			if err := enc.EncodePage(ltx.PageHeader{Pgno: pgno}, ins[src].data); err != nil {
				return hdr, 0, err
			}
		} else if err := enc.EncodePage(ltx.PageHeader{Pgno: pgno}, zero); err != nil {
			return hdr, 0, err
		}
		for i, in := range ins {
			if !in.done && in.ph.Pgno == pgno {
				if err := next(in); err != nil {
					return hdr, 0, fmt.Errorf("merge input %d: %w", i, err)
				}
			}
		}
	}
	for i, in := range ins {
		if err := in.dec.Close(); err != nil {
			return hdr, 0, fmt.Errorf("merge input %d: %w", i, err)
		}
	}
	post := ins[len(ins)-1].dec.Trailer().PostApplyChecksum
	if checksums {
		enc.SetPostApplyChecksum(post)
	}
	if err := enc.Close(); err != nil {
		return hdr, 0, err
	}
	return hdr, post, nil
}

// mergeFanIn bounds how many inputs one merge decodes at once.
const mergeFanIn = 64

// source opens one LTX file for a merge.
type source func() (io.ReadCloser, error)

// mergeSources merges any number of sources into w, in rounds of at most
// mergeFanIn through temporary files in tmpDir, so memory stays bounded
// however long the history.
//
// Every read fails once ctx ends, in the last round too.
func mergeSources(ctx context.Context, w io.Writer, srcs []source, tmpDir string, checksums bool) (ltx.Header, error) {
	srcs = withContext(ctx, srcs)
	for len(srcs) > mergeFanIn {
		var next []source
		var tmps []string
		cleanup := func() {
			for _, p := range tmps {
				os.Remove(p)
			}
		}
		for i := 0; i < len(srcs); i += mergeFanIn {
			f, err := os.CreateTemp(tmpDir, "merge-*.ltx")
			if err != nil {
				cleanup()
				return ltx.Header{}, err
			}
			tmps = append(tmps, f.Name())
			_, err = mergeOpen(f, srcs[i:min(i+mergeFanIn, len(srcs))], tmpDir, checksums)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				cleanup()
				return ltx.Header{}, err
			}
			path := f.Name()
			next = append(next, func() (io.ReadCloser, error) { return os.Open(path) })
		}
		defer cleanup()
		srcs = withContext(ctx, next)
	}
	return mergeOpen(w, srcs, tmpDir, checksums)
}

func mergeOpen(w io.Writer, srcs []source, tmpDir string, checksums bool) (ltx.Header, error) {
	var rs []io.Reader
	for _, open := range srcs {
		rc, err := open()
		if err != nil {
			for _, r := range rs {
				r.(io.Closer).Close()
			}
			return ltx.Header{}, err
		}
		rs = append(rs, rc)
	}
	defer func() {
		for _, r := range rs {
			r.(io.Closer).Close()
		}
	}()
	hdr, _, err := mergeLTX(w, rs, tmpDir, checksums)
	return hdr, err
}

// withContext makes every read of srcs fail once ctx ends. Building a
// snapshot of a large database takes seconds of local work; without this a
// stop waited for it past its shutdown timeout.
func withContext(ctx context.Context, srcs []source) []source {
	out := make([]source, len(srcs))
	for i, open := range srcs {
		out[i] = func() (io.ReadCloser, error) {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			rc, err := open()
			if err != nil {
				return nil, err
			}
			return struct {
				io.Reader
				io.Closer
			}{backends.ContextReader(ctx, rc), rc}, nil
		}
	}
	return out
}

// refSource reads a record of the local log through the file its ref holds
// open.
func refSource(r Ref) source {
	return func() (io.ReadCloser, error) {
		return io.NopCloser(io.NewSectionReader(r.file, r.Off, r.Size)), nil
	}
}
