package replicate

import (
	"os"
	"time"

	"github.com/superfly/ltx"
)

// retireEvery is how often a deleted database is checked for whether every
// replica holds all of it yet.
var retireEvery = time.Second

// retireWhenShipped releases a database that is gone (deleted, or renamed
// away) once every replica holds everything captured from it: its local
// log and page checksums (two descriptors and their disk space), its
// replicas' goroutines, and its state directory. Before, each database an
// application deleted kept all of that for as long as lfuse ran and was
// loaded again at every start: an application that made and deleted
// databases filled the state directory. It is called with d.mu held.
func (m *Manager) retireWhenShipped(d *DB) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return
	}
	m.retiring.Add(1)
	go func() {
		defer m.retiring.Done()
		t := time.NewTicker(retireEvery)
		defer t.Stop()
		for {
			select {
			case <-m.closing:
				return
			case <-t.C:
			}
			ready, abort := m.shippedWhileGone(d)
			if abort {
				return
			}
			if ready {
				m.retire(d)
				return
			}
		}
	}()
}

// shippedWhileGone says whether d is gone and every replica holds its last
// record, or whether it is no longer gone (made again at its path).
func (m *Manager) shippedWhileGone(d *DB) (ready, abort bool) {
	m.mu.RLock()
	known := m.dbs[d.rel] == d
	m.mu.RUnlock()
	if !known {
		return false, false // Open has not added it yet
	}
	d.mu.Lock()
	if d.status != statusGone {
		d.mu.Unlock()
		return false, true
	}
	var last ltx.TXID
	if d.log != nil {
		if rec, ok := d.log.Last(); ok {
			last = rec.TXID()
		}
	}
	d.mu.Unlock()
	for _, r := range d.replicas {
		if r.Pos() < last {
			return false, false
		}
	}
	return true, false
}

// retire stops d's replicas and capture, removes its state directory and
// forgets it. Until it is done, an application making a new database at
// the same path waits in walOpened.
func (m *Manager) retire(d *DB) {
	d.mu.Lock()
	if d.status != statusGone || d.retired != nil {
		d.mu.Unlock()
		return
	}
	d.retired = make(chan struct{})
	var last ltx.TXID
	if d.log != nil {
		if rec, ok := d.log.Last(); ok {
			last = rec.TXID()
		}
	}
	d.mu.Unlock()
	defer close(d.retired)
	for _, r := range d.replicas {
		r.Stop()
		r.waitMaintenance()
	}
	d.kickMu.Lock()
	d.closed = true
	d.kickMu.Unlock()
	d.wg.Wait()
	d.mu.Lock()
	err := d.closeLocked()
	if err == nil {
		// Without its state file the directory is no database's, should
		// the removal be cut short.
		if err = os.Remove(d.statePath()); err == nil || os.IsNotExist(err) {
			err = os.RemoveAll(d.dir)
		}
	}
	d.mu.Unlock()
	m.mu.Lock()
	if m.dbs[d.rel] == d {
		delete(m.dbs, d.rel)
	}
	m.mu.Unlock()
	if err != nil {
		d.logger.Warn("released a deleted database, but could not remove its state", "dir", d.dir, "err", err)
		return
	}
	d.logger.Info("released deleted database: every replica holds its last transaction", "txid", last.String())
}
