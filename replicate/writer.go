package replicate

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/lfuse/lfuse/backends"
)

// Two lfuse processes that ship different histories to one replica (two
// pods during a rolling update, two machines with the same config) wrote
// files of the same names over each other, and each went on believing its
// replica whole. Measured with a restored pod beside the old one: the
// restore then gave the old pod's history, and the new pod's commits were
// gone from the replica while it ran on. So:
//   - each lfuse claims every replica it starts shipping to, and the one
//     that claimed last keeps it: the other notices at its next check (or
//     its final flush), stops writing there and says so;
//   - an lfuse that claims a replica from another that did not stop
//     cleanly (it may still be running) starts its history jumpTXIDs above
//     the replica's, with a new snapshot: what the other writes until it
//     notices has lower TXIDs and overwrites nothing of the new history,
//     which a latest restore, taking the highest TXID, then gives.

// writerMarker names the object that says which lfuse writes the replica;
// stoppedMarker the one that says which lfuse stopped writing it cleanly.
const (
	writerMarker  = "lfuse-writer.json"
	stoppedMarker = "lfuse-writer-stopped.json"
)

// jumpTXIDs is how far above another writer's TXIDs a takeover starts: far
// more than it can commit before it notices (a minute or so, or the length
// of a snapshot upload).
const jumpTXIDs = 1 << 32

// DefaultWriterCheckInterval is how often a replica being written is
// checked for another writer: a GET, only while lfuse writes to it.
const DefaultWriterCheckInterval = 30 * time.Second

// Writer identifies one running lfuse: a Manager. State identifies its
// state directory, which outlives the process: an lfuse restarted on the
// same state knows its predecessor is not running.
type Writer struct {
	ID      string    `json:"id"`
	State   string    `json:"state,omitempty"`
	Host    string    `json:"host"`
	PID     int       `json:"pid"`
	Started time.Time `json:"started_at"`
}

func newWriter() Writer {
	host, _ := os.Hostname()
	return Writer{ID: randomID(), Host: host, PID: os.Getpid(), Started: time.Now().UTC()}
}

func randomID() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// stateIDName, in the state directory, holds its identity (Writer.State).
const stateIDName = "state-id"

// stateID reads the state directory's identity, making it the first time.
func stateID(stateDir string) (string, error) {
	path := filepath.Join(stateDir, stateIDName)
	if b, err := os.ReadFile(path); err == nil && len(bytes.TrimSpace(b)) > 0 {
		return string(bytes.TrimSpace(b)), nil
	} else if err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return "", err
	}
	id := randomID()
	if err := writeFileAtomic(path, []byte(id+"\n")); err != nil {
		return "", err
	}
	return id, nil
}

func (w Writer) String() string {
	if w.ID == "" {
		return "not an lfuse this version knows"
	}
	return fmt.Sprintf("host %s, pid %d, started %s", w.Host, w.PID, w.Started.Format(time.RFC3339))
}

// TakenOverError says that another lfuse claimed the replica after this
// one did: this one writes nothing more to it.
type TakenOverError struct{ By Writer }

func (e *TakenOverError) Error() string {
	return fmt.Sprintf("another lfuse (%s) took this replica over; this one no longer writes to it, "+
		"so its commits since are not there: give each machine its own replica path, or stop the old lfuse before the new one starts", e.By)
}

// ReadWriter reads which lfuse last claimed client's replica; ok is false
// when none did (a replica written by Litestream, or before lfuse claimed
// replicas).
func ReadWriter(ctx context.Context, client ReplicaClient) (w Writer, ok bool, err error) {
	return readWriterMarker(ctx, client, writerMarker)
}

func readWriterMarker(ctx context.Context, client ReplicaClient, name string) (w Writer, ok bool, err error) {
	b, err := withTimeouts(client).ReadMarker(ctx, name)
	if errors.Is(err, backends.ErrNotFound) {
		return Writer{}, false, nil
	} else if err != nil {
		return Writer{}, false, err
	}
	if err := json.Unmarshal(b, &w); err != nil || w.ID == "" {
		// Not one of ours, then: whoever wrote it is not this process.
		return Writer{}, true, nil
	}
	return w, true, nil
}

// unheldMarkers makes the writer record's requests return when their
// context ends, whether or not the client does: a replica whose requests
// ignore their context (a file replica on an NFS server that stopped
// answering) must not hold a stop, or a replica's loop, on a record.
type unheldMarkers struct{ ReplicaClient }

func unheld[T any](ctx context.Context, f func() (T, error)) (T, error) {
	ctx, cancel := context.WithTimeout(ctx, headTimeout)
	defer cancel()
	type result struct {
		v   T
		err error
	}
	done := make(chan result, 1)
	go func() {
		v, err := f()
		done <- result{v, err}
	}()
	select {
	case res := <-done:
		return res.v, res.err
	case <-ctx.Done():
		var zero T
		return zero, ctx.Err()
	}
}

func (c unheldMarkers) ReadMarker(ctx context.Context, name string) ([]byte, error) {
	return unheld(ctx, func() ([]byte, error) { return c.ReplicaClient.ReadMarker(ctx, name) })
}

func (c unheldMarkers) WriteMarker(ctx context.Context, name string, data []byte) error {
	_, err := unheld(ctx, func() (struct{}, error) { return struct{}{}, c.ReplicaClient.WriteMarker(ctx, name, data) })
	return err
}

// markers is the replica's client for the writer records.
func (r *Replica) markers() ReplicaClient { return unheldMarkers{r.client} }

// writeRecord stores this lfuse as the record name: its claim, or its
// clean stop.
func (r *Replica) writeRecord(ctx context.Context, name string) error {
	b, _ := json.Marshal(r.writer)
	if err := r.markers().WriteMarker(ctx, name, append(b, '\n')); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	return nil
}

// claim records this lfuse as the replica's writer. Call after listing
// the replica, before writing to it. It returns the writer it takes the
// replica from if that one may still be running: claimed by another
// process, and not marked as stopped since.
func (r *Replica) claim(ctx context.Context) (*Writer, error) {
	if err := r.takenOver(); err != nil {
		return nil, err
	}
	prev, ok, err := ReadWriter(ctx, r.markers())
	if err != nil {
		return nil, fmt.Errorf("read the replica's writer record: %w", err)
	}
	if ok && prev.ID != r.writer.ID && (r.claimed.Load() || r.wroteAny.Load() && prev.Started.After(r.writer.Started.Add(clockSkew))) {
		// Listed again (its newest snapshot went): a record that names
		// another lfuse now is one that took the replica over since,
		// perhaps while this one wrote nothing and so never checked.
		// Claimed again, the replica went back to the older lfuse. So
		// is, once this lfuse has written unclaimed (its first claim
		// failed), a record of an lfuse started after it: a predecessor
		// started before.
		return nil, r.tookOver(prev)
	}
	var live *Writer
	sameState := prev.State != "" && prev.State == r.writer.State
	if ok && prev.ID != r.writer.ID && !sameState {
		stopped, sok, err := readWriterMarker(ctx, r.markers(), stoppedMarker)
		if err != nil {
			return nil, fmt.Errorf("read the replica's record of a clean stop: %w", err)
		}
		if !sok || stopped.ID != prev.ID || prev.ID == "" {
			live = &prev
		}
	}
	if err := r.writeRecord(ctx, writerMarker); err != nil {
		return nil, err
	}
	r.ownMu.Lock()
	r.lastOwnCheck = time.Now()
	r.ownMu.Unlock()
	r.claimed.Store(true)
	return live, nil
}

// claimLocked claims the replica after a listing (the first, or one taken
// again because its newest snapshot went). A first claim that fails does
// not hold replication up: commits matter more than the record, which is
// tried again, less and less often; a final flush makes no first claim (a
// record that hangs must not keep its commits from the replica). A claim
// after a listing taken again must succeed before anything is written.
// Call with mu held.
func (r *Replica) claimLocked(ctx context.Context) error {
	if err := r.takenOver(); err != nil {
		return err
	}
	if !r.needClaim {
		return nil
	}
	// A listing taken again after a claim must read the record before
	// anything is written: its newest snapshot went, perhaps to the
	// retention of an lfuse that took the replica over, above whose
	// history this one's resnapshot would otherwise land. That holds for
	// a final flush too; only a first claim is let go.
	again := r.claimed.Load()
	if !again {
		select {
		case <-r.stop:
			return nil
		default:
		}
		if r.claimErr != nil && time.Now().Before(r.nextClaim) {
			return nil
		}
	}
	cctx, cancel := context.WithTimeout(ctx, claimTimeout)
	defer cancel()
	live, err := r.claim(cctx)
	if taken := r.takenOver(); taken != nil {
		return taken
	}
	if err != nil {
		if again {
			return fmt.Errorf("check the replica's writer record after listing it again: %w", err)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if r.claimErr == nil {
			r.logger.Warn("cannot record this lfuse as the replica's writer; replicating anyway, and trying again", "err", err)
		}
		// From the end of the attempt, growing: a record that hangs
		// holds mu (and the syncs) for claimTimeout at each try.
		r.claimWait = min(max(2*r.claimWait, r.opts.WriterCheckInterval), 10*time.Minute)
		r.nextClaim = time.Now().Add(r.claimWait)
		r.claimErr = err
		return nil
	}
	if r.claimErr != nil {
		r.logger.Info("recorded this lfuse as the replica's writer")
	}
	r.needClaim, r.claimErr, r.claimWait = false, nil, 0
	r.jumpFrom = live
	return nil
}

// clockSkew is how far ahead another machine's clock may run: a
// predecessor that started just before this lfuse, on a clock ahead of
// this one, is not taken for a newer lfuse (which would stop this one's
// replication for good).
const clockSkew = time.Minute

// claimTimeout bounds one claim: it holds a sync.
const claimTimeout = 10 * time.Second

// markStopped records, after a final flush, that this lfuse stopped writing
// the replica cleanly: the next one to claim it continues its history
// instead of jumping above it. Only while the replica is still this
// lfuse's; the record has an object of its own, so that writing it can
// never replace the claim of an lfuse that took over meanwhile.
func (r *Replica) markStopped(ctx context.Context) error {
	if !r.claimed.Load() {
		return nil
	}
	if err := r.checkWriter(ctx, true); err != nil {
		return err
	}
	return r.writeRecord(ctx, stoppedMarker)
}

// takenOver returns the error that stops every write once another lfuse
// has claimed the replica, nil before.
func (r *Replica) takenOver() error {
	if e := r.takenBy.Load(); e != nil {
		return e
	}
	return nil
}

// checkWriter reads the replica's writer record and stops this replica's
// writes for good if another lfuse claimed it. Unless force, it reads only
// when the interval has passed and something was written since the last
// look: an idle database costs no request.
func (r *Replica) checkWriter(ctx context.Context, force bool) error {
	r.ownMu.Lock()
	defer r.ownMu.Unlock()
	if err := r.takenOver(); err != nil {
		return err
	}
	if !r.claimed.Load() {
		return nil // the record names whoever wrote before: not a takeover
	}
	if !force && (!r.wrote.Load() || time.Since(r.lastOwnCheck) < r.opts.WriterCheckInterval) {
		return nil
	}
	r.wrote.Store(false)
	w, ok, err := ReadWriter(ctx, r.markers())
	if err != nil {
		r.wrote.Store(true) // look again next time
		return fmt.Errorf("read the replica's writer record: %w", err)
	}
	r.lastOwnCheck = time.Now()
	if !ok {
		// Gone: the replica was emptied under lfuse (which lists it again
		// in time, see checkListing). Nobody else claimed it.
		if err := r.writeRecord(ctx, writerMarker); err != nil {
			r.wrote.Store(true)
			return err
		}
		return nil
	}
	if w.ID == r.writer.ID {
		return nil
	}
	return r.tookOver(w)
}

// tookOver notes that w claimed the replica after this lfuse, once.
func (r *Replica) tookOver(w Writer) error {
	e := &TakenOverError{By: w}
	if !r.takenBy.CompareAndSwap(nil, e) {
		return r.takenOver()
	}
	r.logger.Error("another lfuse took this replica over; this one stops writing to it, and its commits from now on are not backed up there. "+
		"Give each machine its own replica path, or stop the old lfuse before starting the new one",
		"other_host", w.Host, "other_pid", w.PID, "other_started", w.Started.Format(time.RFC3339), "txid", r.Pos().String())
	return e
}
