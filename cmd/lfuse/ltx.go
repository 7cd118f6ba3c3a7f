package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/superfly/ltx"
	"golang.org/x/sync/errgroup"

	"github.com/lfuse/lfuse/replicate"
)

// runLTX lists the files of one database's replica.
func runLTX(args []string, stdout, stderr io.Writer) error {
	fl := flag.NewFlagSet("ltx", flag.ContinueOnError)
	fl.SetOutput(stderr)
	fl.Usage = func() {
		fmt.Fprintf(stderr, "Usage: lfuse ltx REPLICA_URL\n\nLists the LTX files of one database's replica: level, TXID range, size and\ncommit time. The newest TXID of each file is a point restore -txid accepts.\n")
	}
	if err := fl.Parse(args); err != nil {
		return err
	}
	if fl.NArg() != 1 {
		fl.Usage()
		return fmt.Errorf("%w: one REPLICA_URL expected", errUsage)
	}
	ctx := context.Background()
	root, err := openReplica(ctx, ReplicaConfig{URL: fl.Arg(0)})
	if err != nil {
		return err
	}
	client := root.client
	tw := tabwriter.NewWriter(stdout, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "LEVEL\tMIN_TXID\tMAX_TXID\tSIZE\tCOMMITTED")
	var all []ltx.FileInfo
	for level := 0; level <= replicate.SnapshotLevel; level++ {
		files, err := client.LTXFiles(ctx, level)
		if err != nil {
			return err // the backends' errors name the replica and the level
		}
		all = append(all, files...)
	}
	if len(all) == 0 {
		return fmt.Errorf("%s holds no LTX files", client)
	}
	// S3 lists upload times, later than the commits by up to a sync: the
	// times a -timestamp restore goes by are read from each file, sixteen
	// at a time.
	if a, ok := client.(interface{ ListTimesApprox() bool }); ok && a.ListTimesApprox() {
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(16)
		for i := range all {
			g.Go(func() error {
				f := &all[i]
				meta, err := client.FileMeta(gctx, f.Level, f.MinTXID, f.MaxTXID)
				if err != nil {
					return fmt.Errorf("%s: read the commit time of level %d file %s: %w", client, f.Level, ltx.FormatFilename(f.MinTXID, f.MaxTXID), err)
				}
				f.CreatedAt = meta.Timestamp
				return nil
			})
		}
		if err := g.Wait(); err != nil {
			return err
		}
	}
	for _, f := range all {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%s\n", f.Level, f.MinTXID, f.MaxTXID, f.Size, f.CreatedAt.UTC().Format(time.RFC3339Nano))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	// Beside the table, not in it: which lfuse writes here, for telling
	// two that share a replica apart.
	if w, ok, err := replicate.ReadWriter(ctx, client); err == nil && ok {
		fmt.Fprintf(stderr, "written by the lfuse that claimed it last: %s\n", w)
	}
	return nil
}

// runDatabases lists the databases of the configured replicas, or of one
// replica, with the newest TXID each holds.
func runDatabases(args []string, stdout, stderr io.Writer) error {
	fl := flag.NewFlagSet("databases", flag.ContinueOnError)
	fl.SetOutput(stderr)
	cf := addConfigFlags(fl, "configuration file: list the databases of its replicas")
	var replicas multiFlag
	fl.Var(&replicas, "replica", "replica URL (repeatable)")
	fl.Usage = func() {
		fmt.Fprintf(stderr, "Usage: lfuse databases [-config FILE] [-replica URL ...]\n\nLists the databases the replicas hold and the newest TXID of each.\n\nFlags:\n")
		fl.PrintDefaults()
	}
	if err := fl.Parse(args); err != nil {
		return err
	}
	if fl.NArg() != 0 {
		fl.Usage()
		return fmt.Errorf("%w: unexpected argument %q; give replicas with -replica URL", errUsage, fl.Arg(0))
	}
	cfg, err := cf.load()
	if err != nil {
		return err
	}
	for _, r := range replicas {
		cfg.Replicas = append(cfg.Replicas, ReplicaConfig{URL: r})
		// A mistyped path would list nothing, as an empty replica does.
		if u, err := parseReplicaURL(r); err == nil && u.scheme == "file" {
			if _, err := os.Stat(u.path); err != nil {
				return fmt.Errorf("replica %s: %w", u.path, err)
			}
		}
	}
	if len(cfg.Replicas) == 0 && len(cfg.Databases) == 0 {
		fl.Usage()
		return fmt.Errorf("%w: give -config FILE or -replica URL", errUsage)
	}
	if err := cfg.validate(); err != nil {
		return err
	}
	ctx := context.Background()
	tw := tabwriter.NewWriter(stdout, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "DATABASE\tREPLICA\tTXID\tCOMMITTED")
	// Each database's newest TXID is a plan of its own, a few round trips
	// to the store: planned eight at a time, printed in order.
	var rows []*string
	g := new(errgroup.Group)
	g.SetLimit(8)
	show := func(rel string, client replicate.ReplicaClient) {
		row := new(string)
		rows = append(rows, row)
		g.Go(func() error {
			plan, err := replicate.PlanRestore(ctx, client, replicate.Target{})
			switch {
			case errors.Is(err, replicate.ErrNoBackup):
				*row = fmt.Sprintf("%s\t%s\t-\tno backup\n", rel, client)
			case err != nil:
				*row = fmt.Sprintf("%s\t%s\t-\terror: %v\n", rel, client, err)
			default:
				*row = fmt.Sprintf("%s\t%s\t%s\t%s\n", rel, client, plan.TXID, plan.Timestamp.Format(time.RFC3339))
				if del, hidden, err := replicate.DeletedBy(ctx, client, plan, replicate.Target{}); err == nil && hidden {
					*row = fmt.Sprintf("%s\t%s\t%s\t%s, deleted %s\n", rel, client, plan.TXID, plan.Timestamp.Format(time.RFC3339), del.At.Format(time.RFC3339))
				}
			}
			return nil
		})
	}
	for _, d := range cfg.Databases {
		for _, t := range replicaTargets(cfg, d.Path) {
			show(d.Path, t.client)
		}
	}
	for _, r := range cfg.Replicas {
		root, err := openReplica(ctx, r)
		if err != nil {
			return err
		}
		rels, err := root.databases(ctx)
		if err != nil {
			return err
		}
		for _, rel := range rels {
			show(rel, root.sub(rel))
		}
	}
	g.Wait()
	for _, row := range rows {
		fmt.Fprint(tw, *row)
	}
	return tw.Flush()
}
