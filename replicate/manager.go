// Package replicate holds the policy side of lfuse: which databases are
// captured, the durable local log each one's transactions go to, snapshots
// when continuity is lost, and the proof of continuity on start.
package replicate

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/lfuse/lfuse/walcapture"
	"github.com/superfly/ltx"
)

// Manager discovers the SQLite databases under a backing directory as the
// application uses them and captures each one. Its methods Opened, Modified
// and Before* are the events the FUSE layer reports; they must return quickly
// for files that are not databases.
type Manager struct {
	dataDir  string
	stateDir string
	logger   *slog.Logger

	// Replicas returns where the database at rel (relative to the mount
	// root) is shipped. Set it before Open; nil means nowhere.
	Replicas func(rel string) []ReplicaSpec
	// ShutdownTimeout bounds how long Close waits for replicas to receive
	// every captured transaction. Default 30 s.
	ShutdownTimeout time.Duration

	mu     sync.RWMutex
	dbs    map[string]*DB // by path relative to the mount root
	noted  map[string]bool
	closed bool

	// Databases gone from the mount waiting to be released (retire.go),
	// and what stops their waiting at Close.
	retiring sync.WaitGroup
	closing  chan struct{}
	// purgeMu is held by a purge pass; purgeWarned holds the purges that
	// failed and were warned of, by database and replica (purge.go).
	purgeMu     sync.Mutex
	purgeWarned map[string]bool
	noteMu      sync.Mutex // a purge note's write, and its removal once done

	writer Writer // this lfuse, as it claims its replicas (writer.go)
}

// NewManager returns a Manager for the databases under dataDir, keeping its
// state under stateDir.
func NewManager(dataDir, stateDir string, logger *slog.Logger) *Manager {
	if logger == nil {
		logger = slog.Default()
	}
	return &Manager{
		dataDir:  dataDir,
		stateDir: stateDir,
		logger:   logger,
		dbs:      make(map[string]*DB),
		noted:    make(map[string]bool),
		closing:  make(chan struct{}),
		writer:   newWriter(),

		purgeWarned: make(map[string]bool),
	}
}

// Open loads every database lfuse captured before and proves that each one
// continues its local log, capturing what its WAL still holds. It must run
// before the mount serves the application.
func (m *Manager) Open(ctx context.Context) error {
	if id, err := stateID(m.stateDir); err != nil {
		// Nothing is lost: a claim taken from this lfuse's predecessor
		// then starts its history above it, as from another machine.
		m.logger.Warn("cannot read or keep the state directory's identity; taking over a replica uploads a new snapshot", "err", err)
	} else {
		m.writer.State = id
	}
	sweepReleased(filepath.Join(m.stateDir, "dbs"))
	rels, err := Databases(m.stateDir)
	if err != nil {
		return err
	}
	for _, rel := range restoredOnly(m.stateDir) {
		if _, err := os.Stat(filepath.Join(m.dataDir, rel)); err == nil {
			rels = append(rels, rel)
		}
	}
	for _, rel := range rels {
		if err := ctx.Err(); err != nil {
			return err
		}
		d := m.newDB(rel)
		d.mu.Lock()
		d.serving = false // what Open finds gone went before this start
		if err := d.openState(); err != nil {
			// Capture catches up with a snapshot once the state
			// directory works again; the application is not held up.
			d.status, d.reason = statusNeedSnapshot, "state directory unusable"
			d.fail(fmt.Errorf("open state: %w", err))
		} else if err := d.recoverLocked(); err != nil {
			d.needSnapshot(fmt.Sprintf("recovery failed: %v", err))
			d.fail(err)
		} else if d.status == statusTracking {
			// Proven to match the log; with no WAL, a later change to
			// the file is someone else's (checkNoWAL).
			if id, err := statID(d.path); err == nil && !walExists(d.path) {
				d.setNoWAL(id)
			}
		} else if d.status == statusNeedSnapshot {
			if err := d.snapshotLocked(); err != nil {
				d.fail(err)
			}
		}
		if d.status != statusGone {
			d.back() // here after all (recovery returns early for an empty log)
		}
		d.serving = true
		d.mu.Unlock()
		m.mu.Lock()
		m.dbs[rel] = d
		m.mu.Unlock()
		d.startReplicas()
	}
	m.mu.Lock()
	if !m.closed {
		m.retiring.Add(1)
		go m.purgeLoop()
	}
	m.mu.Unlock()
	return nil
}

func (m *Manager) newDB(rel string) *DB {
	d := &DB{
		rel:     rel,
		path:    filepath.Join(m.dataDir, rel),
		dir:     filepath.Join(m.stateDir, "dbs", stateName(rel)),
		logger:  m.logger.With("db", rel),
		closing: m.closing,
		serving: true,
	}
	d.onGone = func() { m.retireWhenShipped(d) }
	if m.Replicas != nil {
		for _, spec := range m.Replicas(rel) {
			d.replicas = append(d.replicas, newReplica(d, spec.Client, spec.Options, m.writer, d.logger))
		}
	}
	return d
}

// restoredName, in a database's state directory, holds the TXID a restore
// put the database at (NoteRestored).
const restoredName = "restored"

// NoteRestored records in stateDir that the database at rel was restored
// at txid. Taken up afresh, the database's first snapshot then takes that
// TXID: where it holds what the replica holds there (the same checksum),
// the replica is already up to date. Without it, each container start
// that restored before mounting began a history above the replica's and
// uploaded every database again in full. A wrong hint costs only that
// upload: replicas compare checksums before they continue a history.
//
// Open takes up every database so noted at once, before the application
// can write to it: its first snapshot must be of the restored file alone.
func NoteRestored(stateDir, rel string, txid ltx.TXID) error {
	dir := filepath.Join(stateDir, "dbs", stateName(rel))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	b, err := json.Marshal(restoredHint{Path: rel, TXID: txid.String()})
	if err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(dir, restoredName), b)
}

// restoredHint is what NoteRestored writes.
type restoredHint struct {
	Path string `json:"path"`
	TXID string `json:"txid"`
}

// readRestoredHint reads the hint in a database's state directory.
func readRestoredHint(dir string) (rel string, txid ltx.TXID, ok bool) {
	b, err := os.ReadFile(filepath.Join(dir, restoredName))
	if err != nil {
		return "", 0, false
	}
	var h restoredHint
	if json.Unmarshal(b, &h) != nil || h.Path == "" || !filepath.IsLocal(h.Path) {
		return "", 0, false
	}
	if txid, err = ltx.ParseTXID(h.TXID); err != nil {
		return "", 0, false
	}
	return h.Path, txid, true
}

// restoredOnly lists the databases that a restore noted (NoteRestored) and
// lfuse has not taken up yet.
func restoredOnly(stateDir string) []string {
	dbsDir := filepath.Join(stateDir, "dbs")
	ents, _ := os.ReadDir(dbsDir)
	var rels []string
	for _, e := range ents {
		dir := filepath.Join(dbsDir, e.Name())
		if _, err := os.Stat(filepath.Join(dir, "state.json")); err == nil {
			continue
		}
		if rel, _, ok := readRestoredHint(dir); ok && stateName(rel) == e.Name() {
			rels = append(rels, rel)
		}
	}
	return rels
}

// ReplicaSpec is one replica of a database.
type ReplicaSpec struct {
	Client  ReplicaClient
	Options ReplicaOptions
}

// Databases lists the databases that have state under stateDir, by their
// path relative to the mount root.
func Databases(stateDir string) ([]string, error) {
	dbsDir := filepath.Join(stateDir, "dbs")
	ents, err := os.ReadDir(dbsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, fmt.Errorf("read state directory: %w", err)
	}
	var rels []string
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dbsDir, e.Name(), "state.json"))
		if err != nil {
			continue
		}
		var st stateFile
		if err := json.Unmarshal(b, &st); err != nil || st.Path == "" || !filepath.IsLocal(st.Path) {
			slog.Warn("ignoring unreadable database state", "dir", filepath.Join(dbsDir, e.Name()))
			continue
		}
		rels = append(rels, st.Path)
	}
	slices.Sort(rels)
	return rels, nil
}

// LogDir is where the local log of the database at rel (relative to the
// mount root) lives under stateDir.
func LogDir(stateDir, rel string) string {
	return filepath.Join(stateDir, "dbs", stateName(rel), "log")
}

// stateName maps a database path to one directory name.
func stateName(rel string) string {
	name := strings.NewReplacer("%", "%25", "/", "%2F").Replace(rel)
	if len(name) > 200 {
		sum := sha256.Sum256([]byte(rel))
		name = name[:100] + "~" + hex.EncodeToString(sum[:8])
	}
	return name
}

// Close stops capture after a final pass over every database, ships what
// was captured to every replica (for at most ShutdownTimeout, or until ctx
// ends), and records where each database stands, so the next start can
// resume without re-reading them.
func (m *Manager) Close() error { return m.CloseContext(context.Background()) }

// CloseContext is Close with a context that cuts the wait for replicas short.
func (m *Manager) CloseContext(ctx context.Context) error {
	m.mu.Lock()
	if !m.closed {
		close(m.closing)
	}
	m.closed = true
	m.mu.Unlock()
	// Releases under way finish (a compaction of a released database may
	// take a while to notice the stop; its directory is swept at the next
	// start otherwise); databases waiting for release are flushed below.
	waitCtx, cancelWait := context.WithTimeout(ctx, cmp.Or(m.ShutdownTimeout, 30*time.Second))
	waitGroupContext(waitCtx, &m.retiring)
	cancelWait()
	m.mu.Lock()
	dbs := make([]*DB, 0, len(m.dbs))
	for _, d := range m.dbs {
		dbs = append(dbs, d)
	}
	m.mu.Unlock()
	errs := eachDB(dbs, func(d *DB) error {
		d.kickMu.Lock()
		d.closed = true
		d.kickMu.Unlock()
		d.wg.Wait()
		return d.finalSync()
	})
	errs = append(errs, m.flush(ctx, dbs)...)
	errs = append(errs, eachDB(dbs, func(d *DB) error {
		d.mu.Lock()
		defer d.mu.Unlock()
		if err := d.closeLocked(); err != nil {
			return fmt.Errorf("%s: %w", d.rel, err)
		}
		return nil
	})...)
	return errors.Join(errs...)
}

// closeAtOnce is how many databases a stop closes at the same time. One at
// a time, each a few fsyncs, a thousand databases took over a minute to
// close, past the grace a supervisor gives before SIGKILL.
const closeAtOnce = 8

// eachDB runs f for every database, closeAtOnce at a time, and returns
// the errors in the order of dbs.
func eachDB(dbs []*DB, f func(*DB) error) []error {
	errs := make([]error, len(dbs))
	var wg sync.WaitGroup
	sem := make(chan struct{}, closeAtOnce)
	for i, d := range dbs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			errs[i] = f(d)
		}()
	}
	wg.Wait()
	return slices.DeleteFunc(errs, func(err error) bool { return err == nil })
}

// flush stops every replica's loop and ships what is left, all replicas at
// once.
func (m *Manager) flush(parent context.Context, dbs []*DB) []error {
	timeout := m.ShutdownTimeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(parent, timeout)
	defer cancel()
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
		n    int
		// The replicas to record a clean stop in, once the rest is done.
		flushed []*Replica
	)
	start := time.Now()
	for _, d := range dbs {
		for _, r := range d.replicas {
			n++
			wg.Add(1)
			go func() {
				defer wg.Done()
				r.Stop()
				defer r.dropUnsent()
				before := r.Pos()
				defer r.logRequests()
				defer r.waitMaintenance()
				if err := r.Flush(ctx); err != nil {
					mu.Lock()
					errs = append(errs, fmt.Errorf("%s: %w", d.rel, err))
					mu.Unlock()
					return
				}
				if after := r.Pos(); after > before {
					r.logger.Info("flushed to replica", "txid", after.String(), "transactions", uint64(after-before))
				}
				mu.Lock()
				flushed = append(flushed, r)
				mu.Unlock()
			}()
		}
	}
	wg.Wait()
	// A database deleted shortly before the stop is marked now: its
	// release, which marks it, did not come. Not waited for past the
	// timeout: a replica whose I/O ignores its context (a file replica on
	// an NFS server that stopped answering) held the stop for good. The
	// state directory keeps the deletion for the next start.
	var gone []*DB
	for _, d := range dbs {
		d.mu.Lock()
		if d.status == statusGone && !d.retired {
			gone = append(gone, d)
		}
		d.mu.Unlock()
	}
	if len(gone) > 0 {
		marked := make(chan struct{})
		go func() {
			defer close(marked)
			eachDB(gone, func(d *DB) error {
				if ready, _ := m.shippedWhileGone(d); ready {
					m.markDeleted(ctx, d, newDeletionMarks())
				}
				return nil
			})
		}()
		select {
		case <-marked:
		case <-ctx.Done():
			m.logger.Warn("stopped waiting to record deleted databases in the replicas; the next start records them", "err", ctx.Err())
		}
	}
	// A replica that kept failing may have used up the timeout; the
	// others' clean stops are still worth a request or two: without one,
	// the next lfuse to claim such a replica uploads a new snapshot.
	deadline, _ := ctx.Deadline()
	recCtx, cancelRec := context.WithTimeout(parent, max(time.Until(deadline), stopRecordGrace))
	defer cancelRec()
	errs = append(errs, m.markStopped(recCtx, flushed)...)
	if n > 0 && len(errs) == 0 {
		m.logger.Info("every captured transaction is in every replica", "replicas", n, "seconds", time.Since(start).Seconds())
	}
	return errs
}

// stopRecordGrace is what recording clean stops gets after a flush that
// took the whole shutdown timeout. Each record is two small requests.
const stopRecordGrace = time.Second

// markStopped records a clean stop in each replica that was flushed, last
// (it is worth less than a deletion record), and returns the takeovers it
// finds: their replicas do not hold this lfuse's last commits as the
// latest state.
func (m *Manager) markStopped(ctx context.Context, rs []*Replica) []error {
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		errs     []error
		unmarked int
		why      error
	)
	for _, r := range rs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var taken *TakenOverError
			err := r.markStopped(ctx)
			mu.Lock()
			defer mu.Unlock()
			if errors.As(err, &taken) {
				errs = append(errs, fmt.Errorf("%s: replica %s: %w", r.db.rel, r.client, err))
			} else if err != nil {
				unmarked++
				why = fmt.Errorf("%s: replica %s: %w", r.db.rel, r.client, err)
			}
		}()
	}
	wg.Wait()
	if unmarked > 0 {
		// Nothing is lost: an lfuse that claims those replicas from
		// another state directory starts its history above this one's.
		m.logger.Warn("cannot record the clean stop in every replica; an lfuse started on another state directory uploads a new snapshot to those",
			"replicas", unmarked, "err", why)
	}
	return errs
}

// DBs returns the databases being captured, sorted by path.
func (m *Manager) DBs() []*DB {
	m.mu.RLock()
	defer m.mu.RUnlock()
	out := make([]*DB, 0, len(m.dbs))
	for _, d := range m.dbs {
		out = append(out, d)
	}
	slices.SortFunc(out, func(a, b *DB) int { return strings.Compare(a.rel, b.rel) })
	return out
}

// DB returns the database at rel, if it is being captured.
func (m *Manager) DB(rel string) *DB {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.dbs[rel]
}

// SyncAll runs a capture pass over every database and waits for it.
func (m *Manager) SyncAll() {
	for _, d := range m.DBs() {
		d.Sync()
	}
}

// Opened is called when a file was opened or created through the mount,
// before the open returns to the application.
func (m *Manager) Opened(rel string, created bool) {
	switch {
	case strings.HasSuffix(rel, "-wal"):
		m.walOpened(strings.TrimSuffix(rel, "-wal"))
	case strings.HasSuffix(rel, "-journal") && !created:
		// A journal that already existed is a persistent one.
		m.noteRollback(strings.TrimSuffix(rel, "-journal"))
	}
}

func (m *Manager) walOpened(rel string) {
	m.mu.RLock()
	d, closed := m.dbs[rel], m.closed
	m.mu.RUnlock()
	if closed {
		return
	}
	if d != nil {
		d.mu.Lock()
		if d.retired {
			// Released as this ran (and gone from m.dbs): a new database.
			d.mu.Unlock()
			m.walOpened(rel)
			return
		}
		if d.status == statusGone {
			d.back()
			d.status = statusTracking
			d.setNoWAL(nil)
			d.needSnapshot("database file was created again")
		} else {
			d.walReappeared()
		}
		d.mu.Unlock()
		d.kick()
		return
	}
	if !isSQLite(filepath.Join(m.dataDir, rel)) {
		return
	}
	m.mu.Lock()
	if d = m.dbs[rel]; d != nil || m.closed {
		m.mu.Unlock()
		return
	}
	d = m.newDB(rel)
	m.dbs[rel] = d
	m.mu.Unlock()
	d.logger.Info("discovered database")
	d.mu.Lock()
	d.status, d.reason = statusNeedSnapshot, "new database"
	d.mu.Unlock()
	d.kick()
	d.startReplicas()
}

func (d *DB) startReplicas() {
	for _, r := range d.replicas {
		r.start()
	}
}

// walReappeared checks, when a database's WAL is opened again after being
// removed, that nothing wrote the database file in between (a rollback
// journal mode, or a process outside the mount).
func (d *DB) walReappeared() {
	if d.noWAL == nil {
		return
	}
	now, err := statID(d.path)
	was := d.noWAL
	d.setNoWAL(nil)
	if d.status == statusRollback || err != nil || *now != *was {
		d.status = statusTracking
		d.needSnapshot("database file changed while it had no WAL")
		return
	}
	if !walExists(d.path) {
		d.setNoWAL(now) // taken up again by a rename, still closed
	}
}

// markRollback notes, once, that the database left WAL mode: it is not
// captured until it returns. Call with mu held.
func (d *DB) markRollback() {
	if d.status != statusRollback && d.status != statusGone {
		d.logger.Warn("database switched to a rollback journal: not replicated until it returns to WAL mode")
		d.status, d.reason = statusRollback, "rollback journal"
	}
}

// walExists reports whether the database at path has a WAL file.
func walExists(path string) bool {
	_, err := os.Lstat(path + "-wal")
	return !errors.Is(err, os.ErrNotExist)
}

// noteRollback logs once that a database uses a rollback journal and so is
// not captured.
func (m *Manager) noteRollback(rel string) {
	path := filepath.Join(m.dataDir, rel)
	if isWALMode(path) {
		return
	}
	if d := m.DB(rel); d != nil {
		d.mu.Lock()
		d.markRollback()
		d.mu.Unlock()
		return
	}
	// SQLite creates every database, WAL or not, with a rollback journal
	// (page 1 first, then the WAL flag): only a database that went on to
	// hold a table in that mode is worth the warning.
	if !isSQLite(path) || !beyondFirstPage(path) {
		return
	}
	m.mu.Lock()
	first := !m.noted[rel]
	m.noted[rel] = true
	m.mu.Unlock()
	if first {
		m.logger.Warn("database uses a rollback journal: not replicated (switch it to WAL mode with PRAGMA journal_mode=WAL)", "db", rel)
	}
}

// Modified is called when files under the mount were written; "" means
// that writes may have gone unreported (the kernel's event queue overflowed).
func (m *Manager) Modified(rel string) {
	if rel == "" {
		for _, d := range m.DBs() {
			d.kick()
		}
		return
	}
	d, isWAL := m.dbFor(rel)
	if d == nil {
		return
	}
	d.touch()
	if isWAL {
		d.kick()
	} else if d.walGone.Load() {
		d.checkNoWALSoon()
	}
}

// Syncing is called when an fsync of a file under the mount starts, and
// what it returns when it ends: for a database or its WAL, the application
// is busy with it meanwhile.
func (m *Manager) Syncing(rel string) func() {
	d, _ := m.dbFor(rel)
	if d == nil {
		return nil
	}
	d.syncing.Add(1)
	return func() {
		d.touch()
		d.syncing.Add(-1)
	}
}

// dbFor returns the captured database a file belongs to, and whether the
// file is its WAL.
func (m *Manager) dbFor(rel string) (*DB, bool) {
	if strings.HasSuffix(rel, "-wal") {
		return m.DB(strings.TrimSuffix(rel, "-wal")), true
	}
	return m.DB(rel), false
}

// BeforeTruncate is called before a file is truncated (or opened with
// O_TRUNC). For a database it captures first: SQLite truncates the database
// file at the end of every checkpoint that copied the whole WAL, which is
// the step that lets the next writer restart the WAL over frames. There a
// large backlog is copied aside instead (DB.HoldCheckpoint).
func (m *Manager) BeforeTruncate(rel string) func(ok bool) {
	d, isWAL := m.dbFor(rel)
	if d == nil {
		m.journalEnded(rel)
		return nil
	}
	hold := d.Hold
	if !isWAL {
		hold = d.HoldCheckpoint
	}
	release := hold()
	return func(bool) { release() }
}

// BeforeUnlink is called before a file is removed.
func (m *Manager) BeforeUnlink(rel string) func(ok bool) {
	d, isWAL := m.dbFor(rel)
	if d == nil {
		m.journalEnded(rel)
		return nil
	}
	release := d.Hold()
	return func(ok bool) {
		if ok {
			if isWAL {
				id, _ := statID(d.path)
				d.setNoWAL(id)
			} else {
				d.gone("database file was deleted")
			}
		}
		release()
	}
}

// BeforeRename is called before a file is renamed (over newRel, if it
// exists).
func (m *Manager) BeforeRename(oldRel, newRel string) func(ok bool) {
	src, srcWAL := m.dbFor(oldRel)
	dst, dstWAL := m.dbFor(newRel)
	if src == nil && dst == nil {
		if moved := m.dbsUnder(oldRel); len(moved) > 0 {
			return m.renameDir(moved, oldRel, newRel)
		}
		m.journalEnded(oldRel)
		return func(ok bool) {
			if ok {
				m.foundAt(newRel)
			}
		}
	}
	// Hold both in path order, so two renames cannot deadlock.
	var releases []func()
	for _, d := range sortedDBs(src, dst) {
		releases = append(releases, d.Hold())
	}
	return func(ok bool) {
		if ok {
			if src != nil && !srcWAL {
				src.gone("database file was renamed to " + newRel)
			} else if src != nil {
				id, _ := statID(src.path)
				src.setNoWAL(id)
			}
			if dst != nil && !dstWAL && dst != src {
				dst.needSnapshot("database file was replaced by a rename")
			}
		}
		for i := len(releases) - 1; i >= 0; i-- {
			releases[i]()
		}
		if ok {
			m.foundAt(newRel)
		}
	}
}

// BeforeExchange is called before aRel and bRel swap what they hold
// (renameat2 with RENAME_EXCHANGE, `mv --exchange`). Every database
// captured at either path or under it, or whose WAL is one of them, then
// has another file at its path (or another WAL beside it): its history
// there ends, as after a rename, and what each path holds now is taken up
// from a snapshot. Without this a path's replica went on from its old
// history with the other database's pages.
func (m *Manager) BeforeExchange(aRel, bRel string) func(ok bool) {
	var moved []*DB
	add := func(d *DB) {
		if d != nil && !slices.Contains(moved, d) {
			moved = append(moved, d)
		}
	}
	for _, rel := range []string{aRel, bRel} {
		d, _ := m.dbFor(rel)
		add(d)
		for _, d := range m.dbsUnder(rel) {
			add(d)
		}
		m.journalEnded(rel)
	}
	// Held in path order, so that two renames cannot deadlock.
	slices.SortFunc(moved, func(x, y *DB) int { return strings.Compare(x.rel, y.rel) })
	done := holdUntilGone(moved, "exchanged with another file by a rename")
	return func(ok bool) {
		done(ok)
		if !ok {
			return
		}
		m.foundAt(aRel)
		m.foundAt(bRel)
		for _, d := range moved {
			m.foundAt(d.rel)
			if rest, under := cutDir(d.rel, aRel); under {
				m.foundAt(bRel + rest)
			} else if rest, under := cutDir(d.rel, bRel); under {
				m.foundAt(aRel + rest)
			}
		}
	}
}

// cutDir returns what follows dir in path, if path is dir or under it.
func cutDir(path, dir string) (rest string, ok bool) {
	rest, ok = strings.CutPrefix(path, dir)
	return rest, ok && (rest == "" || rest[0] == '/')
}

// holdUntilGone holds each database, in the order given, until the
// operation that moves them away is done; if it succeeded they are gone,
// for why.
func holdUntilGone(ds []*DB, why string) func(ok bool) {
	releases := make([]func(), len(ds))
	for i, d := range ds {
		releases[i] = d.Hold()
	}
	return func(ok bool) {
		for i, d := range ds {
			if ok {
				d.gone(why)
			}
			releases[i]()
		}
	}
}

// dbsUnder returns the databases captured under the directory dir, in path
// order.
func (m *Manager) dbsUnder(dir string) []*DB {
	var out []*DB
	for _, d := range m.DBs() {
		if strings.HasPrefix(d.rel, dir+"/") {
			out = append(out, d)
		}
	}
	return out
}

// renameDir is BeforeRename for a directory holding captured databases. A
// database keeps its history under the path it had (its replicas are by
// path); at its new path it is a new database, which an application that
// keeps it open goes on writing: it is taken up there at once, from a
// snapshot, rather than when something next opens its WAL.
func (m *Manager) renameDir(moved []*DB, oldRel, newRel string) func(ok bool) {
	done := holdUntilGone(moved, "its directory was renamed to "+newRel)
	return func(ok bool) {
		done(ok)
		if ok {
			for _, d := range moved {
				m.foundAt(newRel + strings.TrimPrefix(d.rel, oldRel))
			}
		}
	}
}

// foundAt takes up a database that a rename put at rel (rel being the
// database or its WAL) if it is in WAL mode with its WAL beside it: one that
// an application may have open and go on writing, where nothing would open
// its WAL again to make it known.
func (m *Manager) foundAt(rel string) {
	rel = strings.TrimSuffix(rel, "-wal")
	// A closed database has no WAL: its header says WAL mode. Taken up only
	// beside its WAL, a database renamed while closed was replicated under
	// no name until an application opened it again.
	if !isWALMode(filepath.Join(m.dataDir, rel)) {
		return
	}
	m.walOpened(rel)
}

// Discover takes up every database in WAL mode under the data directory
// that lfuse is not capturing yet. lfuse otherwise learns of a database
// when an application opens it through the mount: one that no application
// opened since (a monthly report's, an archive) was in no replica, and was
// lost with the disk. It reads the first bytes of every file, once, and
// stops when ctx ends.
func (m *Manager) Discover(ctx context.Context) int {
	n := 0
	filepath.WalkDir(m.dataDir, func(p string, e fs.DirEntry, err error) error {
		if err != nil || ctx.Err() != nil {
			return ctx.Err()
		}
		if e.IsDir() {
			if p == m.stateDir {
				return filepath.SkipDir
			}
			return nil
		}
		if !e.Type().IsRegular() || strings.HasSuffix(p, "-wal") || strings.HasSuffix(p, "-shm") || strings.HasSuffix(p, "-journal") {
			return nil
		}
		rel, err := filepath.Rel(m.dataDir, p)
		if err != nil {
			return nil
		}
		if m.DB(rel) != nil || !isWALMode(p) {
			return nil
		}
		m.walOpened(rel)
		if m.DB(rel) != nil {
			n++
		}
		return nil
	})
	return n
}

func sortedDBs(a, b *DB) []*DB {
	switch {
	case a == nil && b == nil:
		return nil
	case a == nil || a == b:
		return []*DB{b}
	case b == nil:
		return []*DB{a}
	case a.rel < b.rel:
		return []*DB{a, b}
	}
	return []*DB{b, a}
}

// journalEnded notices the end of a rollback-journal transaction (its
// journal deleted or truncated) on a database not in WAL mode.
func (m *Manager) journalEnded(rel string) {
	if strings.HasSuffix(rel, "-journal") {
		m.noteRollback(strings.TrimSuffix(rel, "-journal"))
	}
}

func isSQLite(path string) bool {
	b := readHead(path)
	return walcapture.IsDBHeader(b)
}

func isWALMode(path string) bool {
	return walcapture.DBHeaderWAL(readHead(path))
}

// beyondFirstPage reports whether a database file is longer than its
// header page.
func beyondFirstPage(path string) bool {
	fi, err := os.Stat(path)
	if err != nil {
		return false
	}
	b := readHead(path)
	if len(b) < 18 {
		return false
	}
	pageSize := int64(binary.BigEndian.Uint16(b[16:18]))
	if pageSize == 1 {
		pageSize = 65536
	}
	return fi.Size() > pageSize
}

func readHead(path string) []byte {
	// Without blocking and only of a regular file: a FIFO renamed inside
	// the mount would hold the rename (and its directory) until a writer
	// came, and the start-up walk with it.
	// Nor does a look by lfuse count as an access: an application (or a
	// cleanup job) may go by the atime.
	const flags = os.O_RDONLY | syscall.O_NONBLOCK | syscall.O_NOFOLLOW
	f, err := os.OpenFile(path, flags|syscall.O_NOATIME, 0)
	if errors.Is(err, syscall.EPERM) { // neither the owner nor CAP_FOWNER
		f, err = os.OpenFile(path, flags, 0)
	}
	if err != nil {
		return nil
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		return nil
	}
	b := make([]byte, 100)
	n, _ := io.ReadFull(f, b)
	return b[:n]
}
