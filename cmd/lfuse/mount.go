package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/lfuse/lfuse/fs"
	"github.com/lfuse/lfuse/replicate"
	"golang.org/x/sys/unix"
)

// defaultStateName is lfuse's state directory inside the data directory when
// none is configured; the mount hides it from the application.
const defaultStateName = ".lfuse"

func runMount(args []string, stderr io.Writer) error {
	fl := flag.NewFlagSet("mount", flag.ContinueOnError)
	fl.SetOutput(stderr)
	cf := addConfigFlags(fl, "configuration file (TOML; see litefs.toml.example)")
	dataDir := fl.String("data", "", "backing directory that holds the databases (data-dir)")
	stateDir := fl.String("state", "", "lfuse's own state (state-dir; default DATA/.lfuse, hidden from the mount)")
	passthrough := fl.String("passthrough", "", "kernel passthrough: auto, on or off (passthrough; default auto)")
	xattrs := fl.Bool("xattrs", false, "serve extended attributes (xattrs; costs two round trips per write transaction)")
	metricsAddr := fl.String("metrics-addr", "", "serve Prometheus metrics on this address, e.g. 127.0.0.1:9090 (metrics.addr)")
	logLevel := fl.String("log-level", "", "debug, info, warn or error (log.level; default info)")
	logFormat := fl.String("log-format", "", "text or json (log.format; default text)")
	debugFUSE := fl.Bool("debug-fuse", false, "log every FUSE request (very verbose)")
	var replicas multiFlag
	fl.Var(&replicas, "replica", "replicate every database to this URL (file:///path or a path; repeatable; adds to the config's replicas)")
	restoreIfMissing := fl.Bool("restore-if-missing", false, "before mounting, restore every database a replica holds that the data directory lacks (restore-if-missing)")
	restoreSkip := fl.Bool("restore-skip-unreachable", false, "with -restore-if-missing and several replicas: restore without a replica that cannot be reached, rather than fail (restore-skip-unreachable)")
	shutdownTimeout := fl.Duration("shutdown-timeout", 0, "how long to keep trying to ship captured transactions when stopping (shutdown-timeout; default 30s)")
	execCmd := fl.String("exec", "", "once mounted, run this command (by /bin/sh) with lfuse's environment and stdio; when it exits, ship, unmount and exit with its code (exec)")
	fl.Usage = func() {
		fmt.Fprintf(stderr, "Usage: lfuse mount [flags] [MOUNTPOINT]\n\nServes the data directory at MOUNTPOINT and captures every committed transaction\nof the SQLite databases in it. MOUNTPOINT may come from the config (mount-dir).\n\nFlags:\n")
		fl.PrintDefaults()
	}
	if err := fl.Parse(args); err != nil {
		return err
	}

	cfg, err := cf.load()
	if err != nil {
		return err
	}
	switch fl.NArg() {
	case 0:
	case 1:
		cfg.MountDir = fl.Arg(0)
	default:
		fl.Usage()
		return fmt.Errorf("%w: one mount point expected, got %q (flags go before it)", errUsage, fl.Args())
	}
	set := map[string]bool{}
	fl.Visit(func(f *flag.Flag) { set[f.Name] = true })
	override := func(name string, dst *string, v string) {
		if set[name] {
			*dst = v
		}
	}
	override("data", &cfg.DataDir, *dataDir)
	override("state", &cfg.StateDir, *stateDir)
	override("passthrough", &cfg.Passthrough, *passthrough)
	override("metrics-addr", &cfg.Metrics.Addr, *metricsAddr)
	if set["xattrs"] {
		cfg.XAttrs = *xattrs
	}
	override("log-level", &cfg.Log.Level, *logLevel)
	for _, r := range replicas {
		cfg.Replicas = append(cfg.Replicas, ReplicaConfig{URL: r})
	}
	if set["restore-if-missing"] {
		cfg.RestoreIfMissing = *restoreIfMissing
	}
	if set["restore-skip-unreachable"] {
		cfg.RestoreSkipUnreachable = *restoreSkip
	}
	if set["shutdown-timeout"] {
		cfg.ShutdownTimeout = Duration{Duration: *shutdownTimeout, set: true}
	}
	override("log-format", &cfg.Log.Format, *logFormat)
	override("exec", &cfg.Exec, *execCmd)
	if cfg.MountDir == "" {
		return errors.New("no mount point: give MOUNTPOINT or mount-dir in the config")
	}
	if cfg.DataDir == "" {
		return errors.New("no data directory: give -data DIR or data-dir in the config")
	}
	if err := cfg.validate(); err != nil {
		return err
	}
	logger := newLogger(cfg.Log)
	return mount(cfg, logger, *debugFUSE)
}

func mount(cfg Config, logger *slog.Logger, debugFUSE bool) error {
	dataDir, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return err
	}
	mountDir, err := filepath.Abs(cfg.MountDir)
	if err != nil {
		return err
	}
	if cleared, err := fs.ClearDeadMount(mountDir); err != nil {
		return err
	} else if cleared {
		logger.Warn("detached the dead mount of an lfuse that was killed", "mount", mountDir)
	}
	if err := fs.CheckDirs(dataDir, mountDir); err != nil {
		return err
	}
	hidden, err := checkHidden(mountDir, dataDir)
	if err != nil {
		return err
	}
	stateDir, hide, err := resolveStateDir(cfg.StateDir, dataDir, mountDir)
	if err != nil {
		return err
	}
	if err := checkReplicaPlaces(cfg, dataDir, mountDir); err != nil {
		return err
	}
	if hide != "" {
		if err := checkStateDir(stateDir); err != nil {
			return err
		}
	}
	// Mounted over another lfuse's data directory, this mount would hide
	// that lfuse's files, its state among them, from it.
	if unlock, err := flockDir(mountDir, syscall.LOCK_SH); errors.Is(err, syscall.EWOULDBLOCK) {
		return fmt.Errorf("mount point %s is the data directory of a running lfuse: mounting over it would hide its files from it; mount elsewhere", mountDir)
	} else if err == nil {
		unlock()
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return fmt.Errorf("state directory %s: %w", stateDir, err)
	}
	unlock, err := lockState(stateDir)
	if err != nil {
		return err
	}
	defer unlock()
	unlockData, err := lockData(dataDir)
	if err != nil {
		return err
	}
	defer unlockData()

	ctx, stop := signal.NotifyContext(context.Background(), stopSignals...)
	defer stop()

	if err := checkReplicas(ctx, logger, cfg); err != nil {
		return err
	}
	if ctx.Err() != nil {
		return errStoppedEarly
	}
	if cfg.RestoreIfMissing && (len(cfg.Replicas) > 0 || len(cfg.Databases) > 0) {
		var said strings.Builder
		n, err := restoreAll(ctx, logger, &said, cfg, replicate.Target{}, restoreFlags{ifReplicaExists: true, ifDBNotExists: true, parallelism: 8,
			skipUnreachable: cfg.RestoreSkipUnreachable})
		if err != nil && ctx.Err() != nil {
			return fmt.Errorf("%w (during the restore; nothing was replaced)", errStoppedEarly)
		}
		if err != nil {
			return fmt.Errorf("restore before mount: %w", err)
		}
		if n > 0 {
			logger.Info("restored databases before mounting", "databases", n)
		}
		if strings.Contains(said.String(), noDatabases) {
			// Right at a first start; after a lost disk, a wrong URL or
			// an unmounted backup disk, and the application starts empty.
			logger.Warn("restore-if-missing: the replicas hold no database; starting without any (a first start, or a wrong replica URL?)")
		}
	}

	mgr := replicate.NewManager(dataDir, stateDir, logger)
	mgr.Replicas = replicaSpecs(cfg)
	mgr.ShutdownTimeout = cfg.ShutdownTimeout.Duration
	if err := mgr.Open(ctx); err != nil {
		if ctx.Err() != nil {
			return errStoppedEarly
		}
		return fmt.Errorf("state directory %s: %w", stateDir, err)
	}
	if ctx.Err() != nil {
		mgr.Close()
		return errStoppedEarly
	}

	m, err := fs.New(fs.Options{
		DataDir:     dataDir,
		MountDir:    mountDir,
		Hide:        hide,
		Passthrough: cfg.Passthrough,
		XAttrs:      cfg.XAttrs,
		Observer:    mgr,
		Logger:      logger,
		Debug:       debugFUSE,
	})
	if err != nil {
		mgr.Close()
		return err
	}

	stopStatus := serveStatus(logger, stateDir, mgr)
	defer stopStatus()
	var srv *http.Server
	if cfg.Metrics.Addr != "" {
		ln, err := net.Listen("tcp", cfg.Metrics.Addr)
		if err != nil {
			m.Unmount()
			m.Wait()
			mgr.Close()
			return fmt.Errorf("metrics address %s: %w", cfg.Metrics.Addr, err)
		}
		srv = &http.Server{Handler: metricsHandler(m, mgr), ReadHeaderTimeout: 10 * time.Second}
		go srv.Serve(ln)
		logger.Info("serving metrics", "addr", ln.Addr().String())
	}

	mode := "cached"
	if m.Passthrough() {
		mode = "passthrough"
	}
	var urls []string
	for _, r := range cfg.Replicas {
		if root, err := openReplica(ctx, r); err == nil {
			urls = append(urls, root.client.String())
		}
	}
	logger.Info("mount ready", "mount", mountDir, "data", dataDir, "state", stateDir, "mode", mode, "replicas", strings.Join(urls, ","))
	var lim unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &lim) == nil && lim.Cur < lowFileLimit {
		// Go raised the soft limit to the hard one; this is all there is.
		logger.Warn("the open-file limit is low: lfuse holds about 7 descriptors per busy database, and the application gets EMFILE when they run out; raise it (ulimit -n, LimitNOFILE=)", "limit", lim.Cur)
	}
	if hidden > 0 {
		logger.Warn("the mount point was not empty: what it holds is hidden while lfuse is mounted", "mount", mountDir, "entries", hidden)
	}
	discovered := make(chan struct{})
	// Not under ctx: with exec, a SIGHUP is the application's (a reload)
	// and must not end the walk. It ends when lfuse stops.
	discoverCtx, stopDiscover := context.WithCancel(context.Background())
	go func() {
		defer close(discovered)
		if n := mgr.Discover(discoverCtx); n > 0 {
			logger.Info("took up databases that no application has opened yet", "databases", n)
		}
	}()

	unmounted := make(chan struct{})
	go func() { m.Wait(); close(unmounted) }()
	childCode := -1
	if cfg.Exec != "" && ctx.Err() == nil {
		// From here signals are the application's to act on.
		childCode = runApp(ctx, logger, cfg.Exec, unmounted)
		select {
		case <-unmounted:
		default:
			unmountAndWait(logger, m, unmounted, true)
		}
	} else {
		select {
		case <-unmounted:
			logger.Info("unmounted from outside; stopping")
		case <-ctx.Done():
			unmountAndWait(logger, m, unmounted, false)
		}
	}
	if srv != nil {
		srv.Close()
	}
	stopDiscover()
	<-discovered
	// A second signal cuts the wait for replicas short.
	closeCtx, cancel := signal.NotifyContext(context.Background(), stopSignals...)
	defer cancel()
	if err := mgr.CloseContext(closeCtx); err != nil {
		return fmt.Errorf("stopping: %w", err)
	}
	logger.Info("stopped")
	if childCode > 0 {
		return exitCode(childCode)
	}
	return nil
}

// checkHidden refuses a mount point that holds a SQLite database: the
// mount would hide it, and the application would start a new, empty one
// in its place (moving an application onto lfuse by mounting over its
// directory). It returns how many other entries the mount hides.
func checkHidden(mountDir, dataDir string) (int, error) {
	ents, err := os.ReadDir(mountDir)
	if err != nil || len(ents) == 0 {
		return 0, nil
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		// Not blocking on a FIFO swapped in since the listing.
		f, err := os.OpenFile(filepath.Join(mountDir, e.Name()), os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_NOFOLLOW, 0)
		if err != nil {
			continue
		}
		head := make([]byte, 16)
		n, _ := io.ReadFull(f, head)
		f.Close()
		if string(head[:n]) == "SQLite format 3\x00" {
			return 0, fmt.Errorf("mount point %s holds the database %s, which the mount would hide: move it (with its -wal) into the data directory %s, or mount elsewhere", mountDir, e.Name(), dataDir)
		}
	}
	return len(ents), nil
}

// unmountAndWait unmounts, and waits for a detached mount's last open file
// to close. A signal meanwhile once ended lfuse there: the mount was left
// dead (the processes still in it got I/O errors) and nothing was shipped.
// Now it says what lfuse waits for.
//
// With leftovers, the application lfuse ran (exec) has exited, and the
// processes still in the mount are what it left behind: as a container's
// init would, lfuse passes them SIGTERM, and every stop signal after it.
// Before, they were never told, and lfuse waited for them until the
// container runtime killed everything (a review: a daemonised worker held
// the stop 23 s).
func unmountAndWait(logger *slog.Logger, m *fs.Mount, unmounted <-chan struct{}, leftovers bool) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, stopSignals...) // before the unmount says it waits
	defer signal.Stop(sigs)
	logger.Info("stopping: unmounting")
	if err := m.Unmount(); err != nil {
		logger.Error("unmount failed", "err", err)
	}
	pass := func(s syscall.Signal) {
		if pids := m.BusyWith(); leftovers && len(pids) > 0 {
			logger.Warn("passing the signal to the processes the application left behind in the mount", "signal", s.String(), "pids", pids)
			for _, pid := range pids {
				syscall.Kill(pid, s)
			}
		}
	}
	select {
	case <-unmounted:
		return
	default:
		pass(syscall.SIGTERM)
	}
	for {
		select {
		case <-unmounted:
			return
		case s := <-sigs:
			logger.Warn("still waiting for the processes that hold files open through the mount to close them; lfuse ships and exits then (SIGKILL ends it now, leaving them a dead mount)")
			if sig, ok := s.(syscall.Signal); ok {
				pass(sig)
			}
		}
	}
}

// checkStateDir refuses a state directory in the data directory (which
// the mount hides) that holds files lfuse did not put there: given as the
// application's own directory, that directory vanished from the mount,
// database and all, and lfuse wrote into it. Elsewhere (a volume of its
// own, with its lost+found) lfuse only adds its files.
func checkStateDir(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil || len(ents) == 0 {
		return nil
	}
	for _, e := range ents {
		if e.Name() == "lock" || e.Name() == "dbs" {
			return nil // lfuse's
		}
	}
	return fmt.Errorf("state directory %s holds files that are not lfuse's (%s): give a new or empty directory", dir, ents[0].Name())
}

// lowFileLimit is the open-file limit below which lfuse warns at start.
const lowFileLimit = 8192

// stopSignals stop lfuse (without exec): HUP too, which otherwise ended
// lfuse without unmounting or shipping anything.
var stopSignals = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP}

// appSignals are passed on to the application (exec), which decides what
// they mean, as a container's init would: HUP often asks it to reload.
var appSignals = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH}

// errStoppedEarly: a signal came while lfuse was starting. Once it was
// only seen by the replica check, which took it for an unreachable
// replica, and lfuse mounted and started the application anyway.
var errStoppedEarly = errors.New("stopped by a signal before the mount was ready")

// exitCode is the application's exit status, which lfuse -exec passes on.
type exitCode int

func (c exitCode) Error() string { return fmt.Sprintf("the application exited with status %d", int(c)) }

// runApp runs the application until it exits and returns its exit status.
// appSignals are forwarded to it. lfuse's own stop handling (ctx) stays
// registered, so a stop signal that came before forwarding was in place
// is seen in ctx, and the application is not started. An unmount from
// outside stops it with SIGTERM.
func runApp(ctx context.Context, logger *slog.Logger, command string, unmounted <-chan struct{}) int {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, appSignals...)
	defer signal.Stop(sigs)
	if ctx.Err() != nil { // a stop signal came before forwarding was in place
		logger.Info("stopping before starting the application: a signal came")
		return -1
	}
	// exec: the shell replaces itself with the application, so signals
	// reach the application itself.
	cmd := appCommand(command)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		logger.Error("cannot start the application", "exec", command, "err", err)
		return 1
	}
	logger.Info("application started", "pid", cmd.Process.Pid)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	for {
		select {
		case s := <-sigs:
			logger.Info("passing the signal to the application", "signal", s.String())
			cmd.Process.Signal(s)
		case <-unmounted:
			logger.Info("unmounted from outside; stopping the application")
			cmd.Process.Signal(syscall.SIGTERM)
			unmounted = nil
		case err := <-done:
			code := cmd.ProcessState.ExitCode()
			if code < 0 { // killed by a signal: report it as a shell would
				if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
					code = 128 + int(ws.Signal())
				}
			}
			logger.Info("application exited", "code", code, "err", err)
			return code
		}
	}
}

// resolveStateDir picks lfuse's state directory and, if it lives directly in
// the data directory, the name the mount must hide. It must not be visible
// or writable through the mount any other way.
func resolveStateDir(stateDir, dataDir, mountDir string) (dir, hide string, err error) {
	if stateDir == "" {
		return filepath.Join(dataDir, defaultStateName), defaultStateName, nil
	}
	dir, err = filepath.Abs(stateDir)
	if err != nil {
		return "", "", err
	}
	// Compared as resolved: a symlink into the mount put lfuse's log in
	// the application's view, written through lfuse's own mount, and the
	// stop then waited on itself for good.
	real := realPath(dir)
	rel, err := filepath.Rel(realPath(dataDir), real)
	if err == nil && rel != ".." && !strings.HasPrefix(rel, "../") {
		if rel == "." || strings.Contains(rel, "/") {
			return "", "", fmt.Errorf("state directory %s is inside the data directory %s: put it outside, or directly in it (e.g. %s)", dir, dataDir, filepath.Join(dataDir, defaultStateName))
		}
		return dir, rel, nil
	}
	if rel, err := filepath.Rel(realPath(mountDir), real); err == nil && rel != ".." && !strings.HasPrefix(rel, "../") {
		return "", "", fmt.Errorf("state directory %s is inside the mount point %s: put it outside", dir, mountDir)
	}
	return dir, "", nil
}

// checkReplicaPlaces refuses a file replica inside the data directory or
// the mount point: its backups would land beside the databases, on the same
// disk and in the application's view, and (through the mount) not where
// the URL says.
func checkReplicaPlaces(cfg Config, dataDir, mountDir string) error {
	all := slices.Clone(cfg.Replicas)
	for _, d := range cfg.Databases {
		all = append(all, d.Replicas...)
	}
	for _, r := range all {
		u, err := parseReplicaURL(r.URL)
		if err != nil || u.scheme != "file" {
			continue
		}
		for _, place := range []struct{ dir, what string }{{dataDir, "data directory"}, {mountDir, "mount point"}} {
			if inside(realPath(place.dir), realPath(u.path)) {
				return fmt.Errorf("file replica %s is inside the %s %s: put it outside, on another disk if you can", u.path, place.what, place.dir)
			}
		}
	}
	return nil
}

// inside reports whether p is dir or under it.
func inside(dir, p string) bool {
	rel, err := filepath.Rel(dir, p)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

// realPath resolves the symbolic links in p, as far as p exists.
func realPath(p string) string {
	if r, err := filepath.EvalSymlinks(p); err == nil {
		return r
	}
	if parent := filepath.Dir(p); parent != p {
		return filepath.Join(realPath(parent), filepath.Base(p))
	}
	return p
}

// lockData makes sure one lfuse at a time serves a data directory, whatever
// state directory each is given: two mounts of one directory let two
// applications write one database with locks that neither mount sees, and
// corrupt it. A filesystem without flock (some network filesystems) cannot
// be checked.
func lockData(dir string) (func(), error) {
	unlock, err := flockDir(dir, syscall.LOCK_EX)
	if errors.Is(err, syscall.EWOULDBLOCK) {
		return nil, fmt.Errorf("another lfuse is serving the data directory %s (with its own state directory): stop it first", dir)
	} else if err != nil {
		return nil, fmt.Errorf("data directory %s: %w", dir, err)
	}
	return unlock, nil
}

// flockDir takes a flock of kind how on directory dir without waiting;
// EWOULDBLOCK means another holds a conflicting one. A filesystem without
// flock (some network filesystems) cannot be checked, and is not refused.
func flockDir(dir string, how int) (func(), error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	switch err := syscall.Flock(int(f.Fd()), how|syscall.LOCK_NB); {
	case errors.Is(err, syscall.EWOULDBLOCK):
		f.Close()
		return nil, err
	case err != nil:
		slog.Debug("cannot lock a directory", "dir", dir, "err", err)
	}
	return func() { f.Close() }, nil
}

// lockState makes sure one lfuse at a time uses a state directory.
func lockState(dir string) (func(), error) {
	path := filepath.Join(dir, "lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state directory %s: %w", dir, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		b, _ := os.ReadFile(path)
		f.Close()
		pid := strings.TrimSpace(string(b))
		if pid == "" {
			pid = "unknown"
		}
		return nil, fmt.Errorf("another lfuse (pid %s) is using the state directory %s: stop it first", pid, dir)
	}
	f.Truncate(0)
	f.WriteString(strconv.Itoa(os.Getpid()) + "\n")
	return func() { f.Close() }, nil
}
