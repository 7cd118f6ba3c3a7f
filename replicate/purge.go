package replicate

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/superfly/ltx"
)

// A released database's files stay in its replicas so that points in time
// before its deletion stay restorable; once the deletion is older than a
// replica's retention no point in the window needs them. Without a purge,
// an application that made and deleted databases all day grew its replicas
// without bound (4 MB to 1 GB in a 20-minute churn test), because retention
// runs only for databases lfuse captures.

// purgeEvery is how often the deletions noted in the state directory are
// checked for whether their retention has passed.
var purgeEvery = time.Minute

// deletedDir, in the state directory, holds one note per released
// database whose replica files are still to be purged.
const deletedDir = "deleted"

type purgeNote struct {
	Path              string `json:"path"`
	TXID              string `json:"txid"`
	PostApplyChecksum string `json:"post_apply_checksum"`
	DeletedAt         string `json:"deleted_at"`
}

func (m *Manager) purgeNotePath(rel string) string {
	return filepath.Join(m.stateDir, deletedDir, stateName(rel)+".json")
}

// notePurge records that rel's replica files are to be purged once its
// deletion del is older than each replica's retention.
func (m *Manager) notePurge(rel string, del Deletion) error {
	m.noteMu.Lock()
	defer m.noteMu.Unlock()
	if err := os.MkdirAll(filepath.Join(m.stateDir, deletedDir), 0o700); err != nil {
		return err
	}
	b, _ := json.Marshal(purgeNote{Path: rel, TXID: del.TXID.String(), PostApplyChecksum: del.PostApplyChecksum.String(),
		DeletedAt: del.At.UTC().Format(time.RFC3339Nano)})
	return writeFileAtomic(m.purgeNotePath(rel), b)
}

// purgeLoop purges, at start and every purgeEvery until Close, the replicas of released
// databases whose retention has passed since their deletion.
func (m *Manager) purgeLoop() {
	defer m.retiring.Done()
	ctx, cancel := untilClosed(m.closing)
	defer cancel()
	t := time.NewTicker(purgeEvery)
	defer t.Stop()
	for {
		// At start too: a container restarted more often than purgeEvery
		// would never get to it.
		m.purgeDue(ctx, time.Now())
		select {
		case <-m.closing:
			return
		case <-t.C:
		}
	}
}

// purgeDue handles every noted deletion whose retention has passed in all of
// its replicas by now.
func (m *Manager) purgeDue(ctx context.Context, now time.Time) {
	m.purgeMu.Lock()
	defer m.purgeMu.Unlock()
	dir := filepath.Join(m.stateDir, deletedDir)
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if ctx.Err() != nil {
			return
		}
		if !strings.HasSuffix(e.Name(), ".json") {
			// A note being written is renamed within moments; one left
			// by a kill -9 is removed.
			if fi, err := e.Info(); err == nil && strings.HasSuffix(e.Name(), ".tmp") && now.Sub(fi.ModTime()) > time.Hour {
				os.Remove(filepath.Join(dir, e.Name()))
			}
			continue
		}
		p := filepath.Join(dir, e.Name())
		rel, del, err := readPurgeNote(p)
		if err != nil || stateName(rel)+".json" != e.Name() {
			m.logger.Warn("removing an unreadable note of a deleted database; its replica files stay", "file", p, "err", err)
			os.Remove(p)
			continue
		}
		if m.purge(ctx, rel, del, now) {
			// Unless a later deletion at the path noted itself meanwhile.
			m.noteMu.Lock()
			if _, again, err := readPurgeNote(p); err == nil && again.TXID == del.TXID && again.At.Equal(del.At) {
				os.Remove(p)
			}
			m.noteMu.Unlock()
		}
	}
}

func readPurgeNote(p string) (string, Deletion, error) {
	var n purgeNote
	var del Deletion
	b, err := os.ReadFile(p)
	if err != nil {
		return "", del, err
	}
	if err := json.Unmarshal(b, &n); err != nil {
		return "", del, err
	}
	if n.Path == "" || !filepath.IsLocal(n.Path) {
		return "", del, fmt.Errorf("bad path %q", n.Path)
	}
	if del.TXID, err = ltx.ParseTXID(n.TXID); err != nil {
		return "", del, err
	}
	if del.PostApplyChecksum, err = ltx.ParseChecksum(n.PostApplyChecksum); err != nil {
		return "", del, err
	}
	if del.At, err = time.Parse(time.RFC3339Nano, n.DeletedAt); err != nil {
		return "", del, err
	}
	return n.Path, del, nil
}

// purge deletes rel's files from each of its replicas whose retention has
// passed since the deletion, and says whether the note is done with: all
// purged, or rel is captured again (its files are that database's history
// now, which its own retention looks after).
func (m *Manager) purge(ctx context.Context, rel string, del Deletion, now time.Time) bool {
	m.mu.RLock()
	d := m.dbs[rel]
	m.mu.RUnlock()
	if d != nil {
		d.mu.Lock()
		live := d.status != statusGone
		d.mu.Unlock()
		if live {
			return true
		}
		return false // gone but not released yet: its release notes it again
	}
	if m.Replicas == nil {
		return true
	}
	// Checked again just before files go: a database can be taken up at
	// the path while the replica is listed.
	unclaimed := func() bool {
		m.mu.RLock()
		defer m.mu.RUnlock()
		return m.dbs[rel] == nil
	}
	done := true
	for _, spec := range m.Replicas(rel) {
		if now.Sub(del.At) < spec.Options.WithDefaults().Retention {
			done = false
			continue
		}
		client := withTimeouts(spec.Client)
		n, err := purgeReplica(ctx, client, del, unclaimed)
		key := rel + "\x00" + client.String()
		if err != nil {
			if ctx.Err() == nil && !m.purgeWarned[key] {
				m.purgeWarned[key] = true // one line per outage, not one a minute
				m.logger.Warn("cannot purge a deleted database from its replica; trying again", "db", rel, "replica", client.String(),
					"every", purgeEvery, "err", err)
			}
			done = false
			continue
		}
		delete(m.purgeWarned, key)
		if n > 0 {
			m.logger.Info("purged a deleted database from its replica: its deletion is older than the retention", "db", rel,
				"replica", client.String(), "files", n, "deleted_at", del.At.Format(time.RFC3339))
		}
	}
	return done
}

// purgeReplica deletes a deleted database's files from client, then its
// deletion record, if the replica still holds exactly that deleted history:
// the record is there with the same TXID and checksum, and no file goes
// beyond it (a database made at the path since, by another lfuse or before
// this one noticed, keeps everything). It returns how many files it deleted.
func purgeReplica(ctx context.Context, client ReplicaClient, del Deletion, unclaimed func() bool) (int, error) {
	rec, ok, err := ReadDeletion(ctx, client)
	if err != nil || !ok || rec.TXID != del.TXID || rec.PostApplyChecksum != del.PostApplyChecksum {
		return 0, err
	}
	var files []ltx.FileInfo
	for level := 0; level <= SnapshotLevel; level++ {
		l, err := client.LTXFiles(ctx, level)
		if err != nil {
			return 0, err
		}
		for _, f := range l {
			if f.MaxTXID > del.TXID {
				return 0, nil
			}
		}
		files = append(files, l...)
	}
	if !unclaimed() {
		return 0, nil
	}
	if err := client.DeleteLTXFiles(ctx, files); err != nil {
		return 0, err
	}
	// The writer records go with the history they were about: a path made
	// and deleted all day must not leave two objects behind each time.
	for _, name := range []string{writerMarker, stoppedMarker} {
		if err := client.DeleteMarker(ctx, name); err != nil {
			return len(files), err
		}
	}
	// Last: a purge cut short is taken up again while the record is there.
	if err := client.DeleteMarker(ctx, deletedMarker); err != nil {
		return len(files), err
	}
	return len(files), nil
}
