package replicate

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/superfly/ltx"
)

// A restore into the data directory rebuilt each database from its
// replicas, also when the state directory survived the data and its local
// log held commits no replica had yet (lfuse killed before it shipped
// them, a replica down for hours): the mount then found the restored file
// behind its log, shipped those commits and put a new snapshot of the older
// file above them, so the newest state lost them. Measured by a review: 48
// commits acknowledged to the application gone from a latest restore.

// LocalLogAhead reports whether the local log of the database at rel in
// stateDir goes beyond txid, the newest state a restore found in the
// replicas, and continues the same history: one of those replicas was last
// claimed by an lfuse on this state directory. It returns the log's newest
// TXID. Anything it cannot read or prove says no.
func LocalLogAhead(ctx context.Context, stateDir, rel string, txid ltx.TXID, replicas []ReplicaClient) (ltx.TXID, bool) {
	id, err := os.ReadFile(filepath.Join(stateDir, stateIDName))
	if err != nil || len(bytes.TrimSpace(id)) == 0 {
		return 0, false
	}
	l, err := ReadLog(LogDir(stateDir, rel))
	if err != nil {
		return 0, false
	}
	last, ok := l.Last()
	if !ok || last.TXID() <= txid {
		return 0, false
	}
	for _, c := range replicas {
		if w, ok, err := ReadWriter(ctx, c); err == nil && ok && w.State == string(bytes.TrimSpace(id)) {
			return last.TXID(), true
		}
	}
	return 0, false
}

// RestoreLocalLog rebuilds the database at rel from the local log in
// stateDir and puts it at output, as Restore does from a replica: built
// beside it, checked against the log's last checksum, synced, then moved.
func RestoreLocalLog(stateDir, rel, output string, noReplace bool, logger *slog.Logger) (ltx.TXID, error) {
	l, err := ReadLog(LogDir(stateDir, rel))
	if err != nil {
		return 0, fmt.Errorf("local log: %w", err)
	}
	out, err := createRestoreFile(filepath.Dir(output))
	if err != nil {
		return 0, err
	}
	defer out.discard()
	last, err := l.Restore(out.File)
	if err != nil {
		return 0, fmt.Errorf("rebuild from the local log: %w", err)
	}
	return last.TXID(), out.install(output, noReplace, logger)
}
