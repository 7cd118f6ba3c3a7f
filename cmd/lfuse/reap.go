package main

import (
	"os"
	"os/signal"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// reapOrphans collects the exit status of every child but the application
// while the application runs. As a container's PID 1 (`lfuse mount -exec`
// as the entrypoint) lfuse inherits every process the application leaves
// behind (a worker a shell script started in the background, a daemonised
// helper); nothing else would wait for them, and each would stay a zombie
// holding a PID until the container stopped. The application's own status
// is left for its exec.Cmd; lfuse starts no other child meanwhile (the
// mount is made before it, and unmounted after: go-fuse's fusermount
// would otherwise lose its status here). stop ends the reaping and
// returns once it has.
func reapOrphans(app int) (stop func()) {
	chld := make(chan os.Signal, 1)
	signal.Notify(chld, syscall.SIGCHLD)
	quit, finished := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(finished)
		for {
			reapExcept(app)
			select {
			case <-chld: // signals merge: each pass reaps all that have exited
			case <-quit:
				return
			}
		}
	}()
	return func() {
		signal.Stop(chld)
		close(quit)
		<-finished
	}
}

// reapExcept waits for every exited child but app. waitid with WNOWAIT
// looks at an exited child without collecting it, so the application's
// status is never taken from its exec.Cmd.
func reapExcept(app int) {
	for {
		var info unix.Siginfo
		if err := unix.Waitid(unix.P_ALL, 0, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil); err != nil {
			return // ECHILD: no children at all
		}
		pid := siginfoPid(&info)
		if pid <= 0 || pid == app {
			return // none has exited, or the application has: lfuse is stopping
		}
		var ws unix.WaitStatus
		if _, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil); err != nil {
			return
		}
	}
}

// siginfoPid reads si_pid, which x/sys/unix leaves in Siginfo's unnamed
// bytes: the first field of the union after three ints, aligned to a
// pointer (offset 16 on 64-bit Linux, 12 on 32-bit).
func siginfoPid(info *unix.Siginfo) int {
	ptr := unsafe.Sizeof(uintptr(0))
	off := (12 + ptr - 1) / ptr * ptr
	return int(*(*int32)(unsafe.Add(unsafe.Pointer(info), off)))
}
