package replicate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/lfuse/lfuse/backends"
	"github.com/superfly/ltx"
)

// deletedMarker names the object that says a database was deleted. A
// replica keeps a deleted database's files (its history stays restorable
// to a point before the deletion), so without it `restore -data` and every
// restore-if-missing at a container's start brought deleted databases back.
const deletedMarker = "lfuse-deleted.json"

// Deletion is what the marker records: the database's last transaction and
// when lfuse saw the file go.
type Deletion struct {
	TXID              ltx.TXID
	PostApplyChecksum ltx.Checksum
	At                time.Time
}

type deletionJSON struct {
	TXID              string `json:"txid"`
	PostApplyChecksum string `json:"post_apply_checksum"`
	DeletedAt         string `json:"deleted_at"`
}

// writeDeletion records d in the replica.
func writeDeletion(ctx context.Context, client ReplicaClient, d Deletion) error {
	b, _ := json.Marshal(deletionJSON{TXID: d.TXID.String(), PostApplyChecksum: d.PostApplyChecksum.String(),
		DeletedAt: d.At.UTC().Format(time.RFC3339Nano)})
	return client.WriteMarker(ctx, deletedMarker, append(b, '\n'))
}

// ReadDeletion reads the deletion recorded in the replica, if any.
func ReadDeletion(ctx context.Context, client ReplicaClient) (Deletion, bool, error) {
	b, err := withTimeouts(client).ReadMarker(ctx, deletedMarker)
	if errors.Is(err, backends.ErrNotFound) {
		return Deletion{}, false, nil
	} else if err != nil {
		return Deletion{}, false, err
	}
	var j deletionJSON
	var d Deletion
	if err := json.Unmarshal(b, &j); err != nil {
		return d, false, fmt.Errorf("%s: %w", deletedMarker, err)
	}
	if d.TXID, err = ltx.ParseTXID(j.TXID); err != nil {
		return d, false, fmt.Errorf("%s: txid: %w", deletedMarker, err)
	}
	if d.PostApplyChecksum, err = ltx.ParseChecksum(j.PostApplyChecksum); err != nil {
		return d, false, fmt.Errorf("%s: checksum: %w", deletedMarker, err)
	}
	if d.At, err = time.Parse(time.RFC3339Nano, j.DeletedAt); err != nil {
		return d, false, fmt.Errorf("%s: deleted_at: %w", deletedMarker, err)
	}
	return d, true, nil
}

// DeletedBy reads the deletion recorded in client's replica, if any, and
// says whether it hides plan for target (see Hides).
func DeletedBy(ctx context.Context, client ReplicaClient, plan Plan, target Target) (Deletion, bool, error) {
	d, ok, err := ReadDeletion(ctx, client)
	if err != nil || !ok {
		return d, false, err
	}
	hide, err := d.Hides(ctx, client, plan, target)
	return d, hide, err
}

// Hides says whether a restore of every database should leave out the one
// this plan (from client) restores, being deleted by then: the target is
// the latest state or a time after the deletion, and the plan ends at the
// deleted database's last state, the same TXID and checksum. A database
// made again at the path has a history above it; one whose history ends
// anywhere else (a replica written since by some other means) is not the
// one deleted, and a record that wrongly hid it would start its
// application on an empty database. A target TXID is restored as asked.
func (d Deletion) Hides(ctx context.Context, client ReplicaClient, plan Plan, target Target) (bool, error) {
	if plan.TXID != d.TXID || target.TXID != 0 || len(plan.Files) == 0 {
		return false, nil
	}
	if !target.Time.IsZero() && target.Time.Before(d.At) {
		return false, nil
	}
	meta := plan.lastMeta
	if meta == nil {
		last := plan.Files[len(plan.Files)-1]
		m, err := withTimeouts(client).FileMeta(ctx, last.Level, last.MinTXID, last.MaxTXID)
		if err != nil {
			return false, err
		}
		meta = &m
	}
	return meta.PostApplyChecksum == d.PostApplyChecksum, nil
}
