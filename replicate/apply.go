package replicate

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/superfly/ltx"
)

// ApplyLTX applies one LTX file to the database file dst: every page it
// holds is written in place and the file is cut to the file's commit size.
// A snapshot replaces whatever dst held.
func ApplyLTX(dst *os.File, r io.Reader) (ltx.Header, error) {
	dec := ltx.NewDecoder(bufio.NewReaderSize(r, 256<<10))
	dec.SetRetainPageIndex(false)
	if err := dec.DecodeHeader(); err != nil {
		return ltx.Header{}, err
	}
	hdr := dec.Header()
	if hdr.IsSnapshot() {
		if err := dst.Truncate(0); err != nil {
			return hdr, err
		}
	}
	buf := make([]byte, hdr.PageSize)
	for {
		var ph ltx.PageHeader
		if err := dec.DecodePage(&ph, buf); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return hdr, fmt.Errorf("TXID %s: %w", hdr.MaxTXID, err)
		}
		if _, err := dst.WriteAt(buf, int64(ph.Pgno-1)*int64(hdr.PageSize)); err != nil {
			return hdr, err
		}
	}
	if err := dec.Close(); err != nil {
		return hdr, fmt.Errorf("TXID %s: %w", hdr.MaxTXID, err)
	}
	return hdr, dst.Truncate(int64(hdr.Commit) * int64(hdr.PageSize))
}

// Restore writes the database as of the log's newest record into dst and
// verifies it against that record's post-apply checksum.
func (l *Log) Restore(dst *os.File) (Record, error) {
	var last Record
	if err := l.Each(0, func(rec Record, r io.Reader) error {
		if _, err := ApplyLTX(dst, r); err != nil {
			return err
		}
		last = rec
		return nil
	}); err != nil {
		return last, err
	}
	if _, err := dst.Seek(0, io.SeekStart); err != nil {
		return last, err
	}
	sum, err := ltx.ChecksumReader(bufio.NewReaderSize(dst, 1<<20), int(last.Header.PageSize))
	if err != nil {
		return last, err
	}
	if sum != last.Trailer.PostApplyChecksum {
		return last, fmt.Errorf("restored database has checksum %s, the log says %s", sum, last.Trailer.PostApplyChecksum)
	}
	return last, nil
}
