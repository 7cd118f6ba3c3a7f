package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"time"

	"github.com/lfuse/lfuse/replicate"
)

// runLog prints what lfuse has captured: for each database, the newest
// records of its local log. It only reads, so it is safe while lfuse runs.
func runLog(args []string, stdout, stderr io.Writer) error {
	fl := flag.NewFlagSet("log", flag.ContinueOnError)
	fl.SetOutput(stderr)
	cf := addConfigFlags(fl, "configuration file (for data-dir and state-dir)")
	dataDir := fl.String("data", "", "data directory (the state is DATA/.lfuse unless -state is given)")
	stateDir := fl.String("state", "", "state directory")
	n := fl.Int("n", 10, "records to show per database (0: all)")
	fl.Usage = func() {
		fmt.Fprintf(stderr, "Usage: lfuse log [flags] [DATABASE...]\n\nLists the transactions lfuse captured, newest last. DATABASE is a path relative\nto the mount, e.g. app.db; without one, every database is listed.\n\nFlags:\n")
		fl.PrintDefaults()
	}
	if err := fl.Parse(args); err != nil {
		return err
	}
	state, err := stateFromFlags(fl, cf, *dataDir, *stateDir)
	if err != nil {
		return err
	}
	if _, err := os.Stat(state); err != nil {
		return fmt.Errorf("state directory %s: %w", state, errors.Unwrap(err))
	}
	dbs, err := replicate.Databases(state)
	if err != nil {
		return err
	}
	if fl.NArg() > 0 {
		for _, want := range fl.Args() {
			if !slices.Contains(dbs, want) {
				return fmt.Errorf("no captured database %q in %s (captured: %v)", want, state, dbs)
			}
		}
		dbs = fl.Args()
	}
	if len(dbs) == 0 {
		fmt.Fprintf(stdout, "no databases captured yet in %s\n", state)
		return nil
	}
	for _, rel := range dbs {
		if err := printLog(stdout, state, rel, *n); err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
	}
	return nil
}

func printLog(w io.Writer, state, rel string, n int) error {
	l, err := replicate.ReadLog(replicate.LogDir(state, rel))
	if err != nil {
		return err
	}
	last, ok := l.Last()
	if !ok {
		fmt.Fprintf(w, "%s: no snapshot yet\n\n", rel)
		return nil
	}
	var recs []replicate.Record
	var bytes int64
	if err := l.Each(0, func(rec replicate.Record, r io.Reader) error {
		size, _ := io.Copy(io.Discard, r)
		bytes += size
		recs = append(recs, rec)
		if n > 0 && len(recs) > n {
			recs = recs[1:]
		}
		return nil
	}); err != nil {
		return err
	}
	fmt.Fprintf(w, "%s: TXID %s, snapshot at %s, %d bytes of log, post-apply checksum %s\n",
		rel, last.TXID(), l.SnapshotTXID(), bytes, last.Trailer.PostApplyChecksum)
	fmt.Fprintf(w, "  %-33s  %-8s  %-30s  %8s\n", "TXIDs", "kind", "time", "db pages")
	for _, rec := range recs {
		kind := "commits"
		if rec.Header.IsSnapshot() {
			kind = "snapshot"
		} else if rec.Header.MinTXID == rec.Header.MaxTXID {
			kind = "commit"
		}
		fmt.Fprintf(w, "  %s-%s  %-8s  %-30s  %8d\n", rec.Header.MinTXID, rec.Header.MaxTXID, kind,
			time.UnixMilli(rec.Header.Timestamp).UTC().Format(time.RFC3339Nano), rec.Header.Commit)
	}
	fmt.Fprintln(w)
	return nil
}
