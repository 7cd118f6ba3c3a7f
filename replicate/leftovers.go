package replicate

import (
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// restoreTempPattern names the directory a restore builds its database in,
// beside the output.
const restoreTempPattern = ".lfuse-restore-*"

// leftoverMinAge: a restore's directory younger than this is never taken
// for a leftover, which covers the moment between its creation and its lock.
const leftoverMinAge = time.Minute

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
	matches, _ := filepath.Glob(filepath.Join(dir, restoreTempPattern))
	for _, path := range matches {
		fi, err := os.Lstat(path)
		if err != nil || !fi.IsDir() || time.Since(fi.ModTime()) < leftoverMinAge {
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
