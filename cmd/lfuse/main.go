// Command lfuse makes a SQLite application's databases durable without
// changing the application: "lfuse mount" puts a FUSE mount where the
// application keeps its databases and captures every committed transaction.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
)

// Set by the release build.
var (
	version = ""
	commit  = ""
	date    = ""
)

const usage = `lfuse keeps every committed SQLite transaction of an application, without changing it.

Usage:
  lfuse mount [flags] MOUNTPOINT   serve the data directory at MOUNTPOINT and capture its databases
  lfuse restore [flags] ...        restore databases from a replica (before mounting)
  lfuse ltx REPLICA_URL            list the LTX files of one database's replica
  lfuse databases [flags]          list the databases the replicas hold
  lfuse log [flags] [DATABASE...]  list the transactions captured so far
  lfuse status [flags]             each database of a running lfuse and where its replicas stand
  lfuse version                    print the version

Run 'lfuse COMMAND -h' for a command's flags.
`

// errUsage marks an error whose message is already printed with usage.
var errUsage = errors.New("usage")

// memoryLimit is lfuse's default soft memory limit. lfuse's live heap is a
// few tens of megabytes whatever the database size; without a limit the
// garbage collector let the resident size reach 100 MB while a 2 GB database
// was loaded and shipped, and 63 MB with it. GOMEMLIMIT overrides it.
const memoryLimit = 40 << 20

func main() {
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(memoryLimit)
	}
	// A reader of lfuse's output that goes away (a pipe to grep -m1, a
	// log shipper restarting) killed lfuse at its next log line, leaving
	// a dead mount and nothing shipped; a failed log write is harmless.
	// Notify, not Ignore: an ignored signal stays ignored in the
	// application lfuse starts, whose pipelines then see EPIPE.
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "mount":
		err = runMount(args[1:], stderr)
	case reaperCommand:
		return runReaper(args[1:])
	case "restore":
		err = runRestore(args[1:], stdout, stderr)
	case "ltx":
		err = runLTX(args[1:], stdout, stderr)
	case "databases":
		err = runDatabases(args[1:], stdout, stderr)
	case "log":
		err = runLog(args[1:], stdout, stderr)
	case "status":
		err = runStatus(args[1:], stdout, stderr)
	case "version", "-version", "--version":
		fmt.Fprintln(stdout, versionString())
		return 0
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "lfuse: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		// After the usage text, the last line says what was wrong.
		fmt.Fprintf(stderr, "lfuse: %s\n", strings.TrimPrefix(err.Error(), errUsage.Error()+": "))
		return 2
	case errors.As(err, new(exitCode)):
		var c exitCode
		errors.As(err, &c)
		return int(c)
	default:
		// One line, whatever the error: errors.Join puts each of several
		// (databases that could not be shipped at a stop, replicas that
		// hold no backup) on a line of its own, and the lines after the
		// first lost the "lfuse: " that scripts look for.
		fmt.Fprintf(stderr, "lfuse: %s\n", strings.ReplaceAll(err.Error(), "\n", "; "))
		return 1
	}
}

func versionString() string {
	v, c, d := version, commit, date
	if bi, ok := debug.ReadBuildInfo(); ok {
		if v == "" {
			v = bi.Main.Version
		}
		for _, s := range bi.Settings {
			switch {
			case s.Key == "vcs.revision" && c == "":
				c = s.Value
			case s.Key == "vcs.time" && d == "":
				d = s.Value
			}
		}
	}
	if v == "" || v == "(devel)" {
		v = "dev"
	}
	s := "lfuse " + v
	if c != "" {
		s += " commit " + c
	}
	if d != "" {
		s += " built " + d
	}
	return s
}
