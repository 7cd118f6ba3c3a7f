package replicate

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// restoreTempPattern names the directory a restore builds its database in,
// beside the output. It is made as startingPrefix+suffix, locked, and only
// then renamed to restorePrefix+suffix: a directory by this name that no
// process holds the lock of is a leftover, however young. (It once had to
// be a minute old, which covered the moment before the lock: a restore
// killed and run again at once found no room beside its leftover.)
const (
	restoreTempPattern = restorePrefix + "*"
	restorePrefix      = ".lfuse-restore-"
	startingPrefix     = ".lfuse-restoring-"
)

// leftoverMinAge: an empty starting directory older than this was left by
// a restore killed before it locked it.
const leftoverMinAge = time.Minute

// makeRestoreDir makes and locks a restore's directory in dir. The lock is
// nil on a filesystem without flock.
func makeRestoreDir(dir string) (path string, lock *os.File, err error) {
	start, err := os.MkdirTemp(dir, startingPrefix+"*")
	if err != nil {
		return "", nil, err
	}
	lock = lockRestoreDir(start)
	path = filepath.Join(dir, restorePrefix+strings.TrimPrefix(filepath.Base(start), startingPrefix))
	if lock == nil {
		return start, nil, nil // never swept: without a lock it cannot be told from a running one
	}
	if err := os.Rename(start, path); err != nil {
		lock.Close()
		os.Remove(start)
		return "", nil, err
	}
	return path, lock, nil
}

// lockRestoreDir holds an exclusive flock on a restore's directory for as
// long as the returned file stays open (a killed restore's lock goes with
// its process). A filesystem without flock gets no lock: its leftovers are
// then never swept, which loses nothing.
func lockRestoreDir(dir string) *os.File {
	f, err := os.Open(dir)
	if err != nil {
		return nil
	}
	if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil {
		f.Close()
		return nil
	}
	return f
}

// SweepLeftovers removes what restores into dir left behind when they were
// killed (SIGKILL, a power cut): each holds up to a whole database. A
// directory is a leftover only if no process holds its lock and it is old
// enough; anything else is a restore still running, and stays.
func SweepLeftovers(dir string, logger *slog.Logger) {
	starting, _ := filepath.Glob(filepath.Join(dir, startingPrefix+"*"))
	for _, path := range starting {
		if fi, err := os.Lstat(path); err == nil && fi.IsDir() && time.Since(fi.ModTime()) > leftoverMinAge {
			os.Remove(path) // only if empty
		}
	}
	matches, _ := filepath.Glob(filepath.Join(dir, restoreTempPattern))
	for _, path := range matches {
		fi, err := os.Lstat(path)
		if err != nil || !fi.IsDir() {
			continue
		}
		lock := lockRestoreDir(path) // nil: a restore holds it, or it cannot be told
		if lock == nil {
			continue
		}
		size := treeSize(path)
		err = os.RemoveAll(path)
		lock.Close()
		if err != nil {
			logger.Warn("cannot remove what an interrupted restore left behind", "path", path, "err", err)
			continue
		}
		logger.Info("removed what an interrupted restore left behind", "path", path, "bytes", size)
	}
}

func treeSize(dir string) int64 {
	var n int64
	filepath.WalkDir(dir, func(_ string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}
