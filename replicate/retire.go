package replicate

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/superfly/ltx"
)

// retireEvery is how often a deleted database is checked for whether every
// replica holds all of it yet.
var retireEvery = time.Second

// releasedPrefix starts the name a released database's state directory is
// renamed to before it is removed. stateName never makes such a name (it
// writes '%' as "%25"), and Open removes what a stopped lfuse left of them.
const releasedPrefix = "%released-"

// retireWhenShipped releases a database that is gone (deleted, or renamed
// away) once every replica holds everything captured from it: its local
// log and page checksums (two descriptors and their disk space), its
// replicas' goroutines, and its state directory. Before, each database an
// application deleted kept all of that for as long as lfuse ran and was
// loaded again at every start: an application that made and deleted
// databases filled the state directory. It is called with d.mu held; one
// waiting goroutine per database at most.
func (m *Manager) retireWhenShipped(d *DB) {
	if d.retireArmed || d.retired {
		return
	}
	// Under m.mu, so that Close, which sets closed under it before waiting,
	// never waits while this adds.
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return
	}
	d.retireArmed = true
	m.retiring.Add(1)
	go func() {
		defer m.retiring.Done()
		t := time.NewTicker(retireEvery)
		defer t.Stop()
		ctx, cancel := untilClosed(m.closing)
		defer cancel()
		marks := newDeletionMarks()
		for {
			select {
			case <-m.closing:
				d.disarmRetire()
				return
			case <-t.C:
			}
			ready, abort := m.shippedWhileGone(d)
			if abort {
				return
			}
			if ready && m.markDeleted(ctx, d, marks) && m.retire(d) {
				return
			}
		}
	}()
}

func (d *DB) disarmRetire() {
	d.mu.Lock()
	d.retireArmed = false
	d.mu.Unlock()
}

// shippedWhileGone says whether d is gone and every replica holds its last
// record, or whether to stop waiting: d is no longer gone (made again at
// its path), or its local log cannot be read, which leaves it in place
// for an operator (its commits may be nowhere else). Stopping disarms in
// the same hold of d.mu, so that a gone() right after arms a new wait.
func (m *Manager) shippedWhileGone(d *DB) (ready, abort bool) {
	d.mu.Lock()
	if d.status != statusGone || d.retired {
		d.retireArmed = false
		d.mu.Unlock()
		return false, true
	}
	var last Record
	var haveLast bool
	if d.log != nil {
		last, haveLast = d.log.Last()
	} else if _, err := os.Stat(d.dir); err == nil || !os.IsNotExist(err) {
		d.retireArmed = false
		d.mu.Unlock()
		return false, true
	}
	d.mu.Unlock()
	m.mu.RLock()
	ours := m.dbs[d.rel] == d
	m.mu.RUnlock()
	if ours && isSQLite(d.path) {
		// A database is at the path again (a backup copied in), not yet
		// opened: not a deletion. Taken up now if in WAL mode, as its
		// first open would; the next check sees it captured.
		m.foundAt(d.rel)
		return false, false
	}
	if !haveLast {
		return true, false // nothing was ever captured
	}
	for _, r := range d.replicas {
		if !r.holds(last.TXID(), last.Trailer.PostApplyChecksum) {
			return false, false
		}
	}
	return true, false
}

// deletionMarks is where markDeleted is with each replica.
type deletionMarks struct {
	done, warned map[*Replica]bool
}

func newDeletionMarks() *deletionMarks {
	return &deletionMarks{done: map[*Replica]bool{}, warned: map[*Replica]bool{}}
}

// markDeleted records in each replica that d was deleted, once every
// replica holds its last transaction, and says whether all have it. A
// replica that cannot take it now is tried again at the next check (one
// warning): released before, the database came back at the next
// restore-if-missing.
func (m *Manager) markDeleted(ctx context.Context, d *DB, marks *deletionMarks) bool {
	d.mu.Lock()
	var del Deletion
	var have bool
	if !d.goneSeen {
		d.mu.Unlock()
		return true // deleted while lfuse was not running: see goneSince
	}
	if d.log != nil {
		var last Record
		if last, have = d.log.Last(); have {
			del = Deletion{TXID: last.TXID(), PostApplyChecksum: last.Trailer.PostApplyChecksum, At: d.goneAt}
		}
	}
	d.mu.Unlock()
	if !have {
		return true // nothing of it reached a replica
	}
	all := true
	for _, r := range d.replicas {
		if marks.done[r] || r.takenOver() != nil {
			continue // a replica another lfuse took over is its history now
		}
		if had, ok, err := ReadDeletion(ctx, r.client); err == nil && ok && had.TXID == del.TXID && had.PostApplyChecksum == del.PostApplyChecksum {
			// Recorded before a restart: its time, not the restart's, is
			// when the file went.
			marks.done[r] = true
			continue
		}
		if err := writeDeletion(ctx, r.client, del); err != nil {
			if ctx.Err() == nil && !marks.warned[r] {
				marks.warned[r] = true
				r.logger.Warn("cannot record the deletion of the database in the replica; trying again", "every", retireEvery, "err", err)
			}
			all = false
			continue
		}
		marks.done[r] = true
		r.logger.Info("recorded the deletion in the replica: restores of every database leave it out", "txid", del.TXID.String())
	}
	if all {
		if err := m.notePurge(d.rel, del); err != nil {
			d.logger.Warn("cannot note the deleted database for its purge after the retention; its replica files stay", "err", err)
		}
	}
	return all
}

// holds says whether the replica is known to end exactly at txid with the
// database checksum post: the same history, not just as far.
//
// A sync under way holds mu for as long as its upload takes, and a stalled
// one ends only at the replica's Stop, which CloseContext makes after
// waiting for the releases: waiting for mu here held a stop for its whole
// shutdown timeout. The release asks again at its next tick instead.
func (r *Replica) holds(txid ltx.TXID, post ltx.Checksum) bool {
	if !r.mu.TryLock() {
		return false
	}
	defer r.mu.Unlock()
	if r.takenOver() != nil {
		return true // it takes nothing more: not a reason to keep the database
	}
	return r.listed && r.pos.TXID == txid && r.pos.PostApplyChecksum == post
}

// retire forgets d and moves its state directory aside, at once, so that a
// database made again at the same path starts afresh without waiting;
// then it stops d's replicas and removes the directory. It says whether d
// was released.
//
// Everything of d that writes to its state directory by path stops first:
// its capture loop and any fold of its log (compactMu, closed), which
// could otherwise write into the new database's directory. Its replicas
// only read there and upload; they are stopped right after, and an upload
// after Stop fails.
func (m *Manager) retire(d *DB) bool {
	d.compactMu.Lock() // waits for a fold under way; none starts while held
	defer d.compactMu.Unlock()
	d.mu.Lock()
	if d.status != statusGone || d.retired {
		d.mu.Unlock()
		return false
	}
	aside := filepath.Join(filepath.Dir(d.dir), fmt.Sprintf("%s%d-%s", releasedPrefix, time.Now().UnixNano(), filepath.Base(d.dir)))
	if err := os.Rename(d.dir, aside); err != nil && !os.IsNotExist(err) {
		d.mu.Unlock()
		d.logger.Warn("cannot release deleted database: its state directory cannot be moved", "err", err)
		return false
	}
	d.kickMu.Lock()
	d.closed = true
	d.kickMu.Unlock()
	var last ltx.TXID
	if d.log != nil {
		if rec, ok := d.log.Last(); ok {
			last = rec.TXID()
		}
	}
	d.retired = true
	d.releasing.Store(true)
	lost := d.lostAtGone
	m.mu.Lock()
	if m.dbs[d.rel] == d {
		delete(m.dbs, d.rel)
	}
	m.mu.Unlock()
	d.mu.Unlock()

	for _, r := range d.replicas {
		r.Stop()
		r.dropUnsent()
	}
	for _, r := range d.replicas {
		r.waitMaintenance()
	}
	d.wg.Wait()
	d.mu.Lock()
	err := d.closeLocked()
	d.mu.Unlock()
	if rerr := os.RemoveAll(aside); err == nil {
		err = rerr
	}
	if err != nil {
		d.logger.Warn("released deleted database, but could not remove its state", "dir", aside, "err", err)
		return true
	}
	if lost != nil {
		d.logger.Error("released deleted database, but its last commits before it went could not be captured and are in no replica",
			"txid", last.String(), "err", lost)
		return true
	}
	d.logger.Info("released deleted database: every replica holds its last transaction", "txid", last.String())
	return true
}

// sweepReleased removes the state directories of released databases that a
// stopped lfuse had not finished removing.
func sweepReleased(dbsDir string) {
	ents, _ := os.ReadDir(dbsDir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), releasedPrefix) {
			os.RemoveAll(filepath.Join(dbsDir, e.Name()))
		}
	}
}

// waitGroupContext waits for wg until ctx ends.
func waitGroupContext(ctx context.Context, wg *sync.WaitGroup) {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
	}
}
