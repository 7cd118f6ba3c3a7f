package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"

	"golang.org/x/sys/unix"
)

// reaperCommand is the hidden subcommand that runs the application for
// `lfuse mount -exec` when lfuse is PID 1 (see appCommand).
const reaperCommand = "__reap-orphans"

// appCommand is the command that runs the application. As a container's
// PID 1 (`lfuse mount -exec` as the entrypoint) lfuse would inherit every
// process the application leaves behind (a worker a shell script started
// in the background, a daemonised helper), and each would stay a zombie
// holding a PID until the container stopped. lfuse cannot reap them
// itself: its libraries start children of their own (an AWS
// credential_process, a GCS executable credential) and would lose their
// exit status to it. So the application runs under a copy of lfuse made a
// subreaper, to which its orphans go instead.
func appCommand(command string) *exec.Cmd {
	args := []string{"/bin/sh", "-c", "exec " + command}
	if os.Getpid() == 1 {
		if self, err := os.Executable(); err == nil {
			return exec.Command(self, append([]string{reaperCommand}, args...)...)
		}
	}
	return exec.Command(args[0], args[1:]...)
}

// runReaper runs args as the application, passes it the signals lfuse
// passes on, waits for every orphan that comes to it, and returns the
// application's exit status (128 + the signal, if a signal ended it, as a
// shell reports it). It returns once the application has exited: orphans
// still running then go on to PID 1.
func runReaper(args []string) int {
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "lfuse: "+reaperCommand+" needs a command")
		return 2
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		fmt.Fprintf(os.Stderr, "lfuse: cannot collect the application's orphans (they may stay zombies): %v\n", err)
	}
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, appSignals...)
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "lfuse: cannot start the application: %v\n", err)
		return 127
	}
	go func() {
		for s := range sigs {
			cmd.Process.Signal(s)
		}
	}()
	// Every child is waited for here, the application's too: cmd.Wait
	// would race this loop for its status.
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "lfuse: waiting for the application: %v\n", err)
			return 1
		}
		if pid != cmd.Process.Pid {
			continue // an orphan, now gone
		}
		switch {
		case ws.Exited():
			return ws.ExitStatus()
		case ws.Signaled():
			return 128 + int(ws.Signal())
		}
	}
}
