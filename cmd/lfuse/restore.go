package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/superfly/ltx"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"github.com/lfuse/lfuse/backends"
	"github.com/lfuse/lfuse/replicate"
)

type restoreFlags struct {
	output          string
	txid            string
	timestamp       string
	ifReplicaExists bool
	ifDBNotExists   bool
	parallelism     int
	force           bool
	noProgress      bool
	// Restores of every database leave out those recorded as deleted by
	// the target, unless withDeleted.
	skipDeleted bool
	withDeleted bool
	// A replica that cannot be reached is left out as if not configured,
	// rather than failing the restore.
	skipUnreachable bool
	// localLog, if set, may restore output from a local log that goes
	// beyond best, the newest state the replicas hold (restoreAll).
	localLog func(ctx context.Context, best ltx.TXID, clients []replicate.ReplicaClient, output string, noReplace bool) (ltx.TXID, bool)
}

func runRestore(args []string, stdout, stderr io.Writer) error {
	fl := flag.NewFlagSet("restore", flag.ContinueOnError)
	fl.SetOutput(stderr)
	var f restoreFlags
	cf := addConfigFlags(fl, "restore every database of the configured replicas into data-dir")
	dataDir := fl.String("data", "", "restore every database of -replica into this directory")
	stateDir := fl.String("state", "", "the state directory the mount will use (state-dir; default DATA/.lfuse): restored positions are noted there, so the mount uploads nothing again")
	var replicas multiFlag
	fl.Var(&replicas, "replica", "replica URL to restore every database from, with -data (repeatable: each database comes from the one holding its newest state)")
	fl.StringVar(&f.output, "o", "", "output file, to restore the single database whose replica is REPLICA_URL")
	fl.StringVar(&f.txid, "txid", "", "restore exactly this TXID (hex, as lfuse ltx prints it)")
	fl.StringVar(&f.timestamp, "timestamp", "", "restore the newest state the replica holds whose last commit is at or before this time (RFC 3339; the replica keeps a state per sync, 1 s by default)")
	fl.BoolVar(&f.ifReplicaExists, "if-replica-exists", false, "exit 0 with a message when the replica holds no backup")
	fl.BoolVar(&f.ifDBNotExists, "if-db-not-exists", false, "skip (exit 0) a database that already exists")
	fl.IntVar(&f.parallelism, "parallelism", 8, "concurrent downloads")
	fl.BoolVar(&f.force, "force", false, "overwrite a database that exists")
	fl.BoolVar(&f.skipUnreachable, "skip-unreachable", false, "with several replicas: leave out, with a warning, a replica that cannot be reached, as if it were not configured; what only it holds is not restored (restore-skip-unreachable in the config)")
	fl.BoolVar(&f.withDeleted, "include-deleted", false, "with -data or -config: also restore the databases that were deleted (by the target), as they were last")
	logLevel := fl.String("log-level", "info", "debug, info, warn or error")
	fl.Usage = func() {
		fmt.Fprintf(stderr, `Usage:
  lfuse restore [flags] -o OUTPUT REPLICA_URL    restore one database
  lfuse restore [flags] -config FILE             restore every database of the configured replicas into data-dir
  lfuse restore [flags] -data DIR -replica URL   restore every database of the replica into DIR

REPLICA_URL is the replica of one database, as a replica URL of the mount
(file:///path or a plain path, s3://, gs://, abs://, sftp://; see
litefs.toml.example) followed by the database's path: for a mount
replicating to s3://bucket/prod, app.db is at s3://bucket/prod/app.db.

Flags:
`)
		fl.PrintDefaults()
	}
	if err := fl.Parse(args); err != nil {
		return err
	}
	level, err := parseLevel(*logLevel)
	if err != nil {
		return err
	}
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	target, err := f.target()
	if err != nil {
		return err
	}
	if f.parallelism < 1 {
		return fmt.Errorf("-parallelism %d: must be at least 1", f.parallelism)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	if f.output != "" {
		if fl.NArg() != 1 || cf.given() || *dataDir != "" || *stateDir != "" || len(replicas) > 0 {
			fl.Usage()
			return fmt.Errorf("%w: -o OUTPUT takes exactly one REPLICA_URL and no -config, -data, -state or -replica", errUsage)
		}
		root, err := openReplica(ctx, ReplicaConfig{URL: fl.Arg(0)})
		if err != nil {
			return err
		}
		out, err := filepath.Abs(f.output)
		if err != nil {
			return err
		}
		unlock, err := lockServed(filepath.Dir(out))
		if err != nil {
			return err
		}
		defer unlock()
		_, err = restoreOne(ctx, logger, stderr, []replicate.ReplicaClient{root.client}, out, target, f)
		return err
	}
	if fl.NArg() != 0 {
		fl.Usage()
		return fmt.Errorf("%w: give -o OUTPUT with a REPLICA_URL, or -config / -data with -replica", errUsage)
	}
	cfg, err := cf.load()
	if err != nil {
		return err
	}
	if *dataDir != "" {
		cfg.DataDir = *dataDir
	}
	if *stateDir != "" {
		cfg.StateDir = *stateDir
	}
	if len(replicas) > 0 {
		cfg.Replicas = nil
		for _, r := range replicas {
			cfg.Replicas = append(cfg.Replicas, ReplicaConfig{URL: r})
		}
	}
	if cfg.DataDir == "" {
		fl.Usage()
		return fmt.Errorf("%w: no data directory: give -data DIR or data-dir in the config", errUsage)
	}
	if len(cfg.Replicas) == 0 && len(cfg.Databases) == 0 {
		return errors.New("no replica: give -replica URL or replicas in the config")
	}
	if err := cfg.validate(); err != nil {
		return err
	}
	if !flagSet(fl, "skip-unreachable") {
		f.skipUnreachable = cfg.RestoreSkipUnreachable
	}
	dataAbs, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return err
	}
	unlock, err := lockServed(dataAbs)
	if err != nil {
		return err
	}
	defer unlock()
	_, err = restoreAll(ctx, logger, stderr, cfg, target, f)
	return err
}

// lockServed refuses a restore into a directory that a running lfuse mount
// serves, or under one (a mount holds an exclusive flock on its data
// directory): the next checkpoint of the application there would write
// over the restored database, which would never be replicated. It holds a
// shared lock on dir itself, which other restores share and which keeps a
// mount from starting there until the restore is done.
func lockServed(dir string) (func(), error) {
	var unlock func()
	for d := dir; ; d = filepath.Dir(d) {
		u, err := flockDir(d, syscall.LOCK_SH)
		if errors.Is(err, syscall.EWOULDBLOCK) {
			if unlock != nil {
				unlock()
			}
			return nil, fmt.Errorf("%s is served by a running lfuse mount: stop it first", d)
		}
		if err == nil {
			if unlock == nil {
				unlock = u
			} else {
				u()
			}
		}
		if filepath.Dir(d) == d {
			break
		}
	}
	if unlock == nil {
		unlock = func() {}
	}
	return unlock, nil
}

func (f restoreFlags) target() (replicate.Target, error) {
	var t replicate.Target
	if f.txid != "" && f.timestamp != "" {
		return t, errors.New("give -txid or -timestamp, not both")
	}
	if f.txid != "" {
		id, err := strconv.ParseUint(strings.TrimPrefix(f.txid, "0x"), 16, 64)
		if err != nil || id == 0 {
			return t, fmt.Errorf("-txid %q: expected a TXID in hex, like 000000000000002a or 2a", f.txid)
		}
		t.TXID = ltx.TXID(id)
	}
	if f.timestamp != "" {
		ts, err := time.Parse(time.RFC3339Nano, f.timestamp)
		if err != nil {
			return t, fmt.Errorf("-timestamp %q: expected RFC 3339, like 2026-01-02T15:04:05Z", f.timestamp)
		}
		t.Time = ts
	}
	return t, nil
}

// restoreAll restores every database the configured replicas hold into the
// data directory. It returns how many it restored.
func restoreAll(ctx context.Context, logger *slog.Logger, stderr io.Writer, cfg Config, target replicate.Target, f restoreFlags) (int, error) {
	dataDir, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return 0, err
	}
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return 0, fmt.Errorf("data directory: %w", err)
	}
	// Where the mount keeps its state: restored positions are noted there.
	// A state directory the mount would refuse gets none.
	stateDir, _, stateErr := resolveStateDir(cfg.StateDir, dataDir, cfg.MountDir)
	// The databases: those listed in the config, and those found under
	// each global replica.
	var rels []string
	seen := map[string]bool{}
	configured := map[string]bool{}
	for _, d := range cfg.Databases {
		configured[filepath.ToSlash(filepath.Clean(d.Path))] = true
		rels, seen[filepath.ToSlash(filepath.Clean(d.Path))] = append(rels, filepath.ToSlash(filepath.Clean(d.Path))), true
	}
	var reached []ReplicaConfig
	type down struct {
		name string
		err  error
	}
	var unreached []down // warned of once the restore goes on without them
	for _, r := range cfg.Replicas {
		root, err := openReplica(ctx, r)
		if err != nil {
			return 0, err
		}
		// Bounded: a server that takes the connection and never answers
		// held the restore, and the mount behind it, for good.
		lctx, cancel := context.WithTimeout(ctx, listDatabasesTimeout)
		found, err := root.databases(lctx)
		cancel()
		if err != nil {
			err = fmt.Errorf("list the databases: %w", namedError(root.client, err))
			if !unreachable(ctx, err) {
				return 0, err
			}
			unreached = append(unreached, down{root.client.String(), err})
			continue
		}
		reached = append(reached, r)
		for _, rel := range found {
			if !localDBPath(rel) {
				// A replica is not trusted to name where files go.
				logger.Warn("skipping a database whose name would leave the data directory", "replica", root.client.String(), "name", rel)
				continue
			}
			if !seen[rel] {
				rels, seen[rel] = append(rels, rel), true
			}
		}
	}
	// The databases under the global replicas have no others (those of
	// [[databases]] are not theirs), and a replica left out must not turn
	// into nothing restored: it may hold every database.
	switch {
	case len(unreached) == 0:
	case len(reached) == 0:
		return 0, unreached[0].err
	case !f.skipUnreachable:
		return 0, withSkipHint(unreached[0].err)
	case len(rels) == len(cfg.Databases):
		return 0, fmt.Errorf("%w; the replicas that answered hold no database", unreached[0].err)
	}
	cfg.Replicas = reached
	if len(rels) == 0 {
		if f.ifReplicaExists {
			fmt.Fprintln(stderr, "lfuse: "+noDatabases)
			return 0, nil
		}
		return 0, errors.New("the replicas hold no database (use -if-replica-exists to make this not an error)")
	}
	rels, err = dropShadowed(ctx, logger, cfg, target, rels, len(unreached) > 0)
	if err != nil {
		return 0, err
	}
	for _, u := range unreached {
		logger.Warn(skippedUnreachable, "replica", u.name, "err", u.err)
	}
	// Every output is checked before any is written: one that exists
	// used to stop the restore after the databases before it.
	if !f.force && !f.ifDBNotExists {
		var exist []string
		for _, rel := range rels {
			out := filepath.Join(dataDir, filepath.FromSlash(rel))
			if st, err := os.Lstat(out); err == nil && !emptyDB(out, st) {
				exist = append(exist, rel)
			}
		}
		if len(exist) > 0 {
			return 0, fmt.Errorf("%s already in %s: use -force to overwrite, or -if-db-not-exists to keep them", strings.Join(exist, ", "), dataDir)
		}
	}
	if f.force {
		for _, rel := range rels {
			if err := inUse(filepath.Join(dataDir, filepath.FromSlash(rel))); err != nil {
				return 0, err
			}
		}
	}
	// Databases are restored dbsAtOnce at a time: a small one costs a few
	// round trips to the store and little else, so a mount of many
	// tenants' databases came back at a few round trips per database.
	// The first failure stops the others.
	if len(rels) > 1 {
		f.noProgress = true // one bar per database would be drawn over each other
	}
	var n atomic.Int64
	var (
		unusedMu sync.Mutex
		unused   [][]string // directories made for databases not restored
	)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(dbsAtOnce)
	for _, rel := range rels {
		var clients []replicate.ReplicaClient
		for _, t := range replicaTargets(cfg, rel) {
			clients = append(clients, t.client)
		}
		out := filepath.Join(dataDir, filepath.FromSlash(rel))
		f := f
		f.skipDeleted = !f.withDeleted
		if !configured[rel] {
			// Found in a listing with no file in it yet (its first
			// snapshot still uploading): nothing to restore, not a
			// failure of the others.
			f.ifReplicaExists = true
		}
		g.Go(func() error {
			if f.skipDeleted && target == (replicate.Target{}) && stateErr == nil && replicate.DeletedThroughMount(stateDir, rel) {
				// Its deletion may not have reached the replica yet (it
				// could not be written when the mount stopped). A target
				// in the past goes by the record, which says when.
				logger.Info("not restored: the mount saw the database deleted (use -include-deleted to restore it as it was last)", "db", rel)
				return nil
			}
			made, err := makeDirs(dataDir, filepath.Dir(rel))
			if err != nil {
				return fmt.Errorf("%s: %w", rel, err)
			}
			fromLog := false
			if stateErr == nil {
				f.localLog = func(ctx context.Context, best ltx.TXID, clients []replicate.ReplicaClient, output string, noReplace bool) (ltx.TXID, bool) {
					newest, ahead := replicate.LocalLogAhead(ctx, stateDir, rel, best, clients)
					if !ahead {
						return 0, false
					}
					// The state directory outlived the data, holding
					// commits the replicas lack: the newest state is there.
					local, err := replicate.RestoreLocalLog(stateDir, rel, output, noReplace, logger)
					if err != nil {
						logger.Warn("the local log holds commits the replicas lack, but the database cannot be rebuilt from it; restoring the replicas' state, and those commits stay in the replicas below a new snapshot", "db", rel,
							"replica_txid", best.String(), "local_txid", newest.String(), "err", err)
						return 0, false
					}
					logger.Info("restored from the local log, which holds commits the replicas lack; the mount ships them", "db", rel,
						"replica_txid", best.String(), "txid", local.String())
					fromLog = true
					return local, true
				}
			}
			txid, err := restoreOne(gctx, logger.With("db", rel), stderr, clients, out, target, f)
			ok := txid != 0
			if ok && stateErr == nil && !fromLog {
				// The mount's first snapshot of it then takes this
				// TXID, and a replica holding the same needs no upload.
				if err := replicate.NoteRestored(stateDir, rel, txid); err != nil {
					logger.Warn("cannot note the restored position; the first mount uploads this database again in full", "db", rel, "err", err)
				}
			}
			if !ok {
				unusedMu.Lock()
				unused = append(unused, made) // removed once all are done: another may need them
				unusedMu.Unlock()
			}
			if errors.Is(err, replicate.ErrBeforeOldest) && !target.Time.IsZero() && !configured[rel] {
				if len(unreached) > 0 {
					// Not left out for a replica left out: it may hold it.
					return fmt.Errorf("%s: %w; the replica left out may hold it at the target", rel, err)
				}
				// The directory as it was then did not hold this database
				// (made later), or its history then is past retention.
				// One named in the config is not left out so quietly.
				logger.Warn(notAtTarget, "db", rel, "err", err)
				return nil
			}
			if err != nil {
				return fmt.Errorf("%s: %w", rel, err)
			}
			if ok {
				n.Add(1)
			}
			return nil
		})
	}
	err = g.Wait()
	for _, made := range unused {
		removeEmpty(made) // a database not restored leaves no trace
	}
	return int(n.Load()), err
}

const notAtTarget = "not restored: it has no backup at or before the target (made since, or its history then is past retention)"

// makeDirs makes the directories of rel under root that are missing, owned
// like root when root restores (for an application that runs as another
// user), and returns the ones it made, deepest last.
func makeDirs(root, rel string) ([]string, error) {
	var made []string
	dir := root
	for _, name := range strings.Split(filepath.ToSlash(rel), "/") {
		if name == "." || name == "" {
			continue
		}
		dir = filepath.Join(dir, name)
		err := os.Mkdir(dir, 0o755)
		if errors.Is(err, os.ErrExist) {
			if st, serr := os.Stat(dir); serr == nil && !st.IsDir() {
				return made, fmt.Errorf("%s is a file, not a directory: move it away to restore the databases under it", dir)
			}
			continue
		} else if err != nil {
			return made, err
		}
		made = append(made, dir)
		var st unix.Stat_t
		if os.Geteuid() == 0 && unix.Stat(root, &st) == nil {
			os.Lchown(dir, int(st.Uid), int(st.Gid))
		}
	}
	return made, nil
}

// removeEmpty removes the directories made, deepest first, while empty.
func removeEmpty(made []string) {
	for i := len(made) - 1; i >= 0; i-- {
		if os.Remove(made[i]) != nil {
			return
		}
	}
}

// dropShadowed settles names that cannot both be restored: a database x.db
// and databases under x.db/ (x.db deleted, then x.db/y.db made; the replica
// keeps both). Of two that both existed at the target, the one with the
// newer commit then is restored, and the other is named in a warning; if
// their times cannot be read, both are kept and the restore reports the
// clash.
func dropShadowed(ctx context.Context, logger *slog.Logger, cfg Config, target replicate.Target, rels []string, leftOut bool) ([]string, error) {
	var clash [][2]string // a database, and one under its name
	for _, a := range rels {
		for _, b := range rels {
			if strings.HasPrefix(b, a+"/") {
				clash = append(clash, [2]string{a, b})
			}
		}
	}
	if len(clash) == 0 {
		return rels, nil
	}
	type state struct {
		at     time.Time
		absent bool // no backup at or before the target
		ok     bool
	}
	states := map[string]state{}
	at := func(rel string) state {
		if s, ok := states[rel]; ok {
			return s
		}
		// As restoreOne does, by the newest state any replica holds.
		var s state
		for _, t := range replicaTargets(cfg, rel) {
			plan, err := replicate.PlanRestore(ctx, t.client, target)
			switch {
			case err == nil:
				if !s.ok || s.absent || plan.Timestamp.After(s.at) {
					s = state{at: plan.Timestamp, ok: true}
				}
			case errors.Is(err, replicate.ErrBeforeOldest) || errors.Is(err, replicate.ErrNoBackup):
				if !s.ok {
					s = state{absent: true, ok: true}
				}
			}
		}
		states[rel] = s
		return s
	}
	drop := map[string]bool{}
	absent := map[string]bool{} // left out here: made first, its directory would stop the other
	for _, c := range clash {
		a, b := at(c[0]), at(c[1])
		switch {
		case !a.ok || !b.ok:
		case a.absent || b.absent:
			absent[c[0]], absent[c[1]] = a.absent, b.absent
		case a.at.After(b.at):
			drop[c[1]] = true
		default:
			drop[c[0]] = true
		}
	}
	for rel, gone := range absent {
		if gone && leftOut {
			// Not left out for a replica left out: it may hold it.
			return nil, fmt.Errorf("%s: the replicas that answered hold no backup at the target; the replica left out may hold it", rel)
		}
		if gone {
			drop[rel] = true
			logger.Warn(notAtTarget, "db", rel)
		}
	}
	for rel := range drop {
		if !absent[rel] {
			logger.Warn("not restored: a database with a newer commit takes its place in the directory (the replica keeps deleted databases)", "db", rel)
		}
	}
	return slices.DeleteFunc(rels, func(rel string) bool { return drop[rel] }), nil
}

// unreachable says whether err, from reading a replica, means that the
// replica is down (and may hold commits the others lack once it is back),
// not that it answered with something unusable (a corrupt or missing
// file, denied access) or that this restore was stopped.
func unreachable(ctx context.Context, err error) bool {
	return ctx.Err() == nil && backends.Down(err)
}

// withSkipHint says what to do about a replica that cannot be reached
// while others can: the restore does not take their state for the newest
// on its own.
func withSkipHint(err error) error {
	return fmt.Errorf("%w; it may hold commits the other replicas lack: restore once it is reachable, or leave it out (restore -skip-unreachable, mount -restore-skip-unreachable, restore-skip-unreachable in the config)", err)
}

// joinLine is errors.Join on one line: the errors of several replicas
// read as one message.
func joinLine(errs []error) error {
	if len(errs) == 0 {
		return nil
	}
	return lineJoin(errs)
}

type lineJoin []error

func (j lineJoin) Error() string {
	msgs := make([]string, len(j))
	for i, err := range j {
		msgs[i] = err.Error()
	}
	return strings.Join(msgs, "; ")
}

func (j lineJoin) Unwrap() []error { return j }

// targetError says whether err is about the target: a replica holds
// backups, but none at it.
func targetError(err error) bool {
	return errors.Is(err, replicate.ErrBeforeOldest) || errors.Is(err, replicate.ErrAfterNewest) || errors.Is(err, replicate.ErrNotExact)
}

// flagSet says whether the flag name was given on the command line.
func flagSet(fl *flag.FlagSet, name string) (set bool) {
	fl.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

// listDatabasesTimeout bounds the listing of a replica's databases, as
// replicate bounds the listing of a level.
var listDatabasesTimeout = 5 * time.Minute

// skippedUnreachable is logged for a replica a restore leaves out.
const skippedUnreachable = "replica cannot be reached; restoring without it (-skip-unreachable): what only it holds is not restored"

// noDatabases is what a restore says of replicas that hold no database.
const noDatabases = "no database in the replicas; nothing to restore"

// replanAttempts is how often a restore plans again when a file it planned
// is deleted before it is downloaded.
const replanAttempts = 3

// avoidAttempts is how many unusable files (FileError) a restore from one
// replica plans around before it gives up on that replica.
const avoidAttempts = 3

// dbsAtOnce is how many databases restoreAll restores at the same time,
// each with its own -parallelism downloads.
const dbsAtOnce = 4

// emptyDB reports whether the file at path, described by st, is an empty
// database: zero bytes, with no WAL holding commits beside it.
func emptyDB(path string, st os.FileInfo) bool {
	if !st.Mode().IsRegular() || st.Size() != 0 {
		return false
	}
	wal, err := os.Stat(path + "-wal")
	return errors.Is(err, os.ErrNotExist) || err == nil && wal.Size() == 0
}

// restoreOne restores one database from whichever of clients holds the
// newest state at the target (the first of those on a tie), or from
// another holding that same state if that one fails. It returns the TXID
// it restored, or 0 if it wrote nothing.
func restoreOne(ctx context.Context, logger *slog.Logger, stderr io.Writer, clients []replicate.ReplicaClient, output string, target replicate.Target, f restoreFlags) (ltx.TXID, error) {
	// The output's directory is checked before any download.
	dir := filepath.Dir(output)
	if st, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("output directory %s does not exist: create it first", dir)
	} else if err != nil {
		return 0, fmt.Errorf("output directory: %w", err)
	} else if !st.IsDir() {
		return 0, fmt.Errorf("output directory %s is not a directory", dir)
	}
	// Also where nothing is restored: a directory that a killed
	// restore-if-missing left in the data directory would stay there.
	replicate.SweepLeftovers(dir, logger)
	noReplace := false // there is no database at output to replace
	if st, err := os.Lstat(output); err == nil && emptyDB(output, st) {
		// Nothing to keep (an application or a script touched the file
		// before its data was restored): as if missing. Kept, it made
		// restore-if-missing skip the database, and the application's
		// first write start a near-empty history above the replica's.
		logger.Info("database file is empty; restoring over it", "path", output)
	} else if err == nil {
		switch {
		case f.ifDBNotExists:
			logger.Info("database exists; not restoring", "path", output)
			return 0, nil
		case !f.force:
			return 0, fmt.Errorf("%s exists: use -force to overwrite it, or -if-db-not-exists to keep it", output)
		case !st.Mode().IsRegular():
			return 0, fmt.Errorf("%s exists and is not a regular file (%s): give the path of a database file", output, fileKind(st.Mode()))
		}
	} else if errors.Is(err, os.ErrNotExist) {
		noReplace = true
	} else {
		return 0, err
	}
	if err := unix.Access(dir, unix.W_OK); err != nil {
		return 0, fmt.Errorf("output directory %s is not writable: %w", dir, err)
	}
	if err := inUse(output); err != nil {
		return 0, err
	}
	// Every replica is planned, and the one holding the newest state at
	// the target is restored from: one that was down or slow while the
	// mount ran holds an older state, and taking the first configured
	// replica that had a backup lost the commits only the others held.
	plans := make([]replicate.Plan, len(clients))
	perrs := make([]error, len(clients))
	var wg sync.WaitGroup
	for i, client := range clients {
		wg.Go(func() {
			for range replanAttempts {
				plans[i], perrs[i] = replicate.PlanRestore(ctx, client, target)
				// A file listed, then compacted or expired by a running
				// lfuse before its time was read: the next listing
				// shows what replaced it.
				if !errors.Is(perrs[i], backends.ErrNotFound) {
					break
				}
			}
		})
	}
	wg.Wait()
	var errs []error
	var order []int // replicas with a plan, newest state first, then in configured order
	var gaps []int  // replicas missing a file of their chain
	var skipped []int
	for i, err := range perrs {
		switch {
		case err == nil:
			order = append(order, i)
		case errors.Is(err, replicate.ErrGap) && len(clients) > 1:
			gaps = append(gaps, i) // settled below, by what the others hold
		case errors.Is(err, replicate.ErrNoBackup) || errors.Is(err, replicate.ErrBeforeOldest) ||
			errors.Is(err, replicate.ErrAfterNewest) || errors.Is(err, replicate.ErrNotExact):
			// Another replica may keep a longer history, or be further
			// along, or hold the TXID exactly.
			errs = append(errs, namedError(clients[i], err))
		case unreachable(ctx, err):
			// It may hold a newer state than the others: restoring
			// from them could lose commits without a word, unless asked.
			skipped = append(skipped, i)
		default:
			return 0, namedError(clients[i], err)
		}
	}
	if len(skipped) > 0 {
		first := namedError(clients[skipped[0]], perrs[skipped[0]])
		switch {
		case len(skipped) == len(clients):
			return 0, first // none left to restore from
		case !f.skipUnreachable:
			return 0, withSkipHint(first)
		case len(order) == 0 && len(gaps) == 0:
			// Left out, it must not turn into nothing restored, nor
			// into a target the others cannot reach: it may hold it.
			if targetError(joinLine(errs)) {
				return 0, fmt.Errorf("%w; the replicas that answered hold no backup at the target (%v)", first, joinLine(errs))
			}
			return 0, fmt.Errorf("%w; the replicas that answered hold no backup of it", first)
		}
	}
	// A replica with a gap can be passed over only if it lists nothing
	// newer than the state restored from another: it then holds no commit
	// the restore would lose.
	slices.SortStableFunc(order, func(a, b int) int { return cmp.Compare(plans[b].TXID, plans[a].TXID) })
	var best ltx.TXID
	if len(order) > 0 {
		best = plans[order[0]].TXID
	}
	for _, i := range gaps {
		if len(order) == 0 || plans[i].Newest > best {
			return 0, namedError(clients[i], perrs[i])
		}
		logger.Warn("replica has a gap in its history, but lists nothing newer than another replica holds; restoring from that one",
			"replica", clients[i].String(), "err", perrs[i])
	}
	for _, i := range skipped {
		logger.Warn(skippedUnreachable, "replica", clients[i].String(), "err", perrs[i])
	}
	if len(order) == 0 {
		if err := joinLine(errs); targetError(err) {
			return 0, err
		}
		if f.ifReplicaExists {
			fmt.Fprintf(stderr, "lfuse: no backup of %s in the replica; nothing to restore\n", filepath.Base(output))
			return 0, nil
		}
		return 0, fmt.Errorf("%w (use -if-replica-exists to make this not an error)", joinLine(errs))
	}
	for _, i := range order[1:] {
		if plans[i].TXID < best {
			logger.Warn("replica is behind another; restoring from the newer", "replica", clients[i].String(),
				"txid", plans[i].TXID.String(), "newer", clients[order[0]].String(), "newer_txid", best.String())
		}
	}
	order = slices.DeleteFunc(order, func(i int) bool { return plans[i].TXID != best })
	if f.skipDeleted {
		for _, i := range order {
			if del, hidden, err := replicate.DeletedBy(ctx, clients[i], plans[i], target); err != nil {
				// Restoring a database that may have been deleted loses
				// nothing; leaving out one that was not would.
				logger.Warn("cannot read whether the database was deleted; restoring it", "replica", clients[i].String(), "err", err)
			} else if hidden {
				logger.Info("not restored: the database was deleted (use -include-deleted, or restore -o, to restore it as it was last)",
					"deleted_at", del.At.Format(time.RFC3339), "last_txid", del.TXID.String())
				return 0, nil
			}
		}
	}
	// Decided before anything is written: restoring the replica's state
	// first and the log's over it lost the log's commits to a restore
	// killed in between (a review).
	if f.localLog != nil && target == (replicate.Target{}) {
		if txid, ok := f.localLog(ctx, best, clients, output, noReplace); ok {
			return txid, nil
		}
	}
	// A replica that fails (a corrupt or unreadable file) is not the end
	// while another holds the same state.
	var first error
	for n, i := range order {
		txid, err := restoreFrom(ctx, logger, stderr, clients[i], plans[i], output, target, f, noReplace)
		if err == nil {
			return txid, nil
		}
		if first == nil {
			first = err
		}
		// Only a fault of the replica's: an output that appeared, a full
		// disk or a rename that failed would fail the same way again (and a
		// retry's sweep would remove an old WAL a failed rename left aside).
		var fe *replicate.FileError
		if ctx.Err() != nil || n == len(order)-1 || !errors.As(err, &fe) && !errors.Is(err, backends.ErrNotFound) {
			break
		}
		logger.Warn("restore from this replica failed; trying another that holds the same state", "replica", clients[i].String(),
			"next", clients[order[n+1]].String(), "err", err)
	}
	return 0, first
}

// restoreFrom restores output from one replica. A running lfuse compacts
// and expires the replica while this restores from it: a planned file can
// be deleted before it is downloaded. Planning again then sees what
// replaced it, or says that the target has left the retention window.
func restoreFrom(ctx context.Context, logger *slog.Logger, stderr io.Writer, client replicate.ReplicaClient, plan replicate.Plan, output string, target replicate.Target, f restoreFlags, noReplace bool) (ltx.TXID, error) {
	var (
		avoid  []ltx.FileInfo // files this restore could not use
		failed error          // what the first of them did
		want   = plan.TXID
	)
	for attempt := 1; ; attempt++ {
		if attempt > 1 {
			p, err := replicate.PlanRestoreAvoiding(ctx, client, target, avoid)
			switch {
			case ctx.Err() != nil:
				return 0, fmt.Errorf("restore stopped: %w", context.Cause(ctx))
			case failed != nil && (err != nil || p.TXID < want):
				// No way around the file, or only to an older state:
				// that would lose commits without a word.
				return 0, failed
			case err != nil:
				return 0, namedError(client, err)
			case p.TXID < want:
				return 0, fmt.Errorf("%s: the replica changed during the restore: TXID %s was planned, and now only TXID %s can be reached; restore again", client, want, p.TXID)
			}
			plan = p
		}
		logger.Info("restore plan", "replica", client.String(), "target", target.String(), "txid", plan.TXID.String(),
			"committed", plan.Timestamp.Format(time.RFC3339Nano), "files", len(plan.Files), "bytes", plan.Bytes,
			"list_seconds", plan.ListTime.Seconds())
		opts := replicate.RestoreOptions{Parallelism: f.parallelism, Logger: logger, NoReplace: noReplace}
		if isTerminal(stderr) && !f.noProgress {
			opts.Progress = progressBar(stderr)
		}
		start := time.Now()
		st, err := replicate.Restore(ctx, client, plan, output, opts)
		if opts.Progress != nil {
			fmt.Fprintln(stderr)
		}
		var fe *replicate.FileError
		switch {
		case errors.Is(err, backends.ErrNotFound) && attempt < replanAttempts:
			logger.Warn("a planned file was deleted from the replica meanwhile (by the lfuse writing to it?); planning again", "err", err)
			continue
		case errors.As(err, &fe) && ctx.Err() == nil:
			if failed == nil {
				failed = err
			}
			if len(avoid) == avoidAttempts {
				return 0, failed
			}
			logger.Warn("a file of the replica cannot be used; planning the same state without it", "err", err)
			avoid = append(avoid, fe.File)
			continue
		case err != nil:
			return 0, err
		}
		if failed != nil {
			var names []string
			for _, a := range avoid {
				names = append(names, fmt.Sprintf("ltx/%d/%s", a.Level, ltx.FormatFilename(a.MinTXID, a.MaxTXID)))
			}
			logger.Warn("restored the same state without the files that could not be used; they stay in the replica until retention removes them (or remove them yourself)",
				"replica", client.String(), "files", strings.Join(names, ", "))
		}
		logger.Info("restored", "path", output, "txid", plan.TXID.String(), "db_bytes", st.DBBytes, "files", st.Files,
			"downloaded_bytes", st.Bytes, "seconds", time.Since(start).Seconds(), "download_wait_seconds", st.Download.Seconds(),
			"apply_seconds", st.Apply.Seconds(), "verify_seconds", st.Verify.Seconds(), "sync_seconds", st.Sync.Seconds())
		return plan.TXID, nil
	}
}

// namedError prefixes err with the replica's name unless the backend's
// message already names it.
func namedError(client replicate.ReplicaClient, err error) error {
	if strings.Contains(err.Error(), client.String()) {
		return err
	}
	return fmt.Errorf("%s: %w", client, err)
}

func fileKind(m os.FileMode) string {
	switch {
	case m.IsDir():
		return "a directory"
	case m&os.ModeSymlink != 0:
		return "a symbolic link"
	case m&os.ModeDevice != 0:
		return "a device"
	default:
		return "not a plain file"
	}
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

func progressBar(w io.Writer) func(done, total int64) {
	return func(done, total int64) {
		if total <= 0 {
			return
		}
		const width = 40
		n := int(done * width / total)
		fmt.Fprintf(w, "\r[%-*s] %3d%% %d/%d MB", width, strings.Repeat("#", n), done*100/total, done>>20, total>>20)
	}
}

// multiFlag collects a repeatable string flag.
type multiFlag []string

func (m *multiFlag) String() string     { return fmt.Sprint(*m) }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

// localDBPath reports whether a database name from a replica stays inside
// the data directory once joined to it: relative, no "..", no NUL. A
// backslash is an ordinary character here, as it is to the mount.
func localDBPath(rel string) bool {
	return rel != "" && !strings.ContainsRune(rel, 0) && filepath.IsLocal(filepath.FromSlash(rel))
}

// inUse refuses a restore over a database that a process has open: its
// application would go on writing to the replaced file (and to its WAL,
// which the restore removes) while every later reader sees the restored
// one. A connection in WAL mode holds a read lock on the -shm's DMS byte
// and a shared lock on the database file for as long as it is open; one in
// exclusive locking mode holds the database file's lock bytes. A
// rollback-mode connection between transactions holds nothing, and cannot
// be seen.
func inUse(path string) error {
	probe := func(name string, start, length int64) (int32, bool) {
		f, err := os.OpenFile(name, os.O_RDONLY|unix.O_NONBLOCK, 0) // a FIFO there must not hang the restore
		if err != nil {
			return 0, false
		}
		defer f.Close()
		lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart, Start: start, Len: length}
		if err := unix.FcntlFlock(f.Fd(), unix.F_GETLK, &lk); err != nil || lk.Type == unix.F_UNLCK {
			return 0, false
		}
		return lk.Pid, true
	}
	const (
		shmDMS      = 128        // the byte after the WAL index's eight locks
		pendingByte = 0x40000000 // the first of SQLite's lock bytes in a database file
		lockBytes   = 512
	)
	pid, open := probe(path+"-shm", shmDMS, 1)
	if !open {
		pid, open = probe(path, pendingByte, lockBytes)
	}
	if !open {
		return nil
	}
	who := "another process"
	if pid > 0 {
		who = fmt.Sprintf("process %d", pid)
		if comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); err == nil {
			who += " (" + strings.TrimSpace(string(comm)) + ")"
		}
	}
	return fmt.Errorf("%s is open by %s: stop the application before restoring over it", path, who)
}
