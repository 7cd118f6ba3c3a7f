package fs

import (
	"errors"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// watcher learns from inotify which backing files were written. With kernel
// passthrough, writes never reach this process, but the kernel still reports
// them on the backing files.
//
// Each inotify event wakes the reader and costs the writer too, so the
// reader takes events in batches: after handling one batch it waits
// batchDelay before reading again. Meanwhile repeated writes to the same file
// collapse into one queued event, so a busy database costs at most one
// wake-up per batchDelay, at the price of that much capture latency.
type watcher struct {
	dataDir string
	obs     Observer
	logger  *slog.Logger
	f       *os.File

	mu   sync.Mutex
	dirs map[string]int // watched directory (relative) → watch descriptor
	byWD map[int]string
	done chan struct{}
}

const batchDelay = time.Millisecond

func newWatcher(dataDir string, obs Observer, logger *slog.Logger) (*watcher, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, os.NewSyscallError("inotify_init1", err)
	}
	w := &watcher{
		dataDir: dataDir,
		obs:     obs,
		logger:  logger,
		f:       os.NewFile(uintptr(fd), "inotify"),
		dirs:    make(map[string]int),
		byWD:    make(map[int]string),
		done:    make(chan struct{}),
	}
	go w.run()
	return w, nil
}

// watchDir makes sure writes to files in dir (relative to the data
// directory) are reported.
func (w *watcher) watchDir(dir string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, ok := w.dirs[dir]; ok {
		return
	}
	sc, err := w.f.SyscallConn()
	if err != nil {
		return
	}
	var wd int
	var werr error
	sc.Control(func(fd uintptr) {
		wd, werr = unix.InotifyAddWatch(int(fd), filepath.Join(w.dataDir, dir), unix.IN_MODIFY|unix.IN_ONLYDIR)
	})
	if werr != nil {
		w.logger.Error("cannot watch directory for writes: its databases are captured only at checkpoints", "dir", dir, "err", werr)
		return
	}
	w.dirs[dir] = wd
	w.byWD[wd] = dir
}

// renamed follows a rename of the directory oldRel (and so of the
// directories under it) to newRel, or with exchange an exchange of the two:
// inotify watches the directories themselves, and their events must be
// reported under the new names.
func (w *watcher) renamed(oldRel, newRel string, exchange bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	moved := map[string]int{}
	for dir, wd := range w.dirs {
		if rest, ok := cutDir(dir, oldRel); ok {
			moved[newRel+rest] = wd
			delete(w.dirs, dir)
		} else if rest, ok := cutDir(dir, newRel); ok && exchange {
			moved[oldRel+rest] = wd
			delete(w.dirs, dir)
		}
	}
	for dir, wd := range moved {
		w.dirs[dir] = wd
		w.byWD[wd] = dir
	}
}

// cutDir returns what follows dir in path, if path is dir or under it.
func cutDir(path, dir string) (rest string, ok bool) {
	rest, ok = strings.CutPrefix(path, dir)
	return rest, ok && (rest == "" || rest[0] == '/')
}

func (w *watcher) run() {
	defer close(w.done)
	buf := make([]byte, 64<<10)
	names := make(map[string]struct{})
	for {
		n, err := w.f.Read(buf)
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				w.logger.Error("inotify read failed: capture falls back to checkpoints", "err", err)
			}
			return
		}
		overflow := false
		w.mu.Lock()
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			nameBytes := buf[off+unix.SizeofInotifyEvent : off+unix.SizeofInotifyEvent+int(ev.Len)]
			off += unix.SizeofInotifyEvent + int(ev.Len)
			switch {
			case ev.Mask&unix.IN_Q_OVERFLOW != 0:
				overflow = true
			case ev.Mask&unix.IN_IGNORED != 0:
				if dir, ok := w.byWD[int(ev.Wd)]; ok {
					delete(w.byWD, int(ev.Wd))
					delete(w.dirs, dir)
				}
			default:
				if dir, ok := w.byWD[int(ev.Wd)]; ok {
					names[path.Join(dir, cString(nameBytes))] = struct{}{}
				}
			}
		}
		w.mu.Unlock()
		if overflow {
			w.obs.Modified("")
		}
		for name := range names {
			w.obs.Modified(name)
			delete(names, name)
		}
		time.Sleep(batchDelay)
	}
}

func cString(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

func (w *watcher) close() {
	w.f.Close()
	<-w.done
}
