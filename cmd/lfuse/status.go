package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	neturl "net/url"
	"os"
	"path/filepath"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/lfuse/lfuse/replicate"
	"github.com/superfly/ltx"
)

// statusReport is what lfuse status prints, and what /status serves.
type statusReport struct {
	Databases []statusDB `json:"databases"`
}

type statusDB struct {
	Path     string          `json:"path"`
	Status   string          `json:"status"`
	TXID     string          `json:"txid"`
	Size     int64           `json:"size_bytes"`
	WALSize  int64           `json:"wal_size_bytes"`
	Captured int64           `json:"captured_transactions"`
	Holds    int64           `json:"holds"`
	Held     float64         `json:"held_seconds"`
	Copies   int64           `json:"wal_copies"`
	Replicas []statusReplica `json:"replicas"`
}

type statusReplica struct {
	Replica    string  `json:"replica"`
	Type       string  `json:"type"`
	TXID       string  `json:"txid"`
	LagTXIDs   uint64  `json:"lag_txids"`
	LagSeconds float64 `json:"lag_seconds"`
	Failing    bool    `json:"failing"`
	// TakenOverBy is set once another lfuse claimed the replica: this
	// one writes nothing more to it.
	TakenOverBy string `json:"taken_over_by,omitempty"`
	Syncs       int64  `json:"syncs"`
	Errors      int64  `json:"errors"`
}

func statusOf(mgr *replicate.Manager) statusReport {
	rep := statusReport{Databases: []statusDB{}}
	dbs := mgr.DBs()
	stats := dbStats(dbs)
	for i, d := range dbs {
		st := stats[i]
		sd := statusDB{Path: st.Path, Status: st.Status, TXID: st.TXID.String(), Size: st.Size, WALSize: st.WALSize,
			Captured: st.Captured, Holds: st.Holds, Held: st.Held.Seconds(), Copies: st.Copies, Replicas: []statusReplica{}}
		for _, r := range d.Replicas() {
			rs := r.Stats()
			sr := statusReplica{Replica: rs.Name, Type: rs.Type, TXID: rs.TXID.String(), Failing: rs.Failing, TakenOverBy: rs.TakenOverBy, Syncs: rs.Syncs, Errors: rs.Errs}
			sr.LagTXIDs, sr.LagSeconds = replicaLag(st.TXID, rs)
			sd.Replicas = append(sd.Replicas, sr)
		}
		rep.Databases = append(rep.Databases, sd)
	}
	return rep
}

// dbStats reads every database's stats at once: a busy database makes its
// reader wait a moment (DB.Stats), and a thousand of them one after
// another would add up.
func dbStats(dbs []*replicate.DB) []replicate.Stats {
	stats := make([]replicate.Stats, len(dbs))
	var wg sync.WaitGroup
	for i, d := range dbs {
		wg.Add(1)
		go func() { defer wg.Done(); stats[i] = d.Stats() }()
	}
	wg.Wait()
	return stats
}

func statusHandler(mgr *replicate.Manager) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(statusOf(mgr))
	}
}

const socketName = "lfuse.sock"

// serveStatus answers lfuse status on a unix socket in the state directory,
// which only the users who may read that directory can reach.
func serveStatus(logger *slog.Logger, stateDir string, mgr *replicate.Manager) (stop func()) {
	path := filepath.Join(stateDir, socketName)
	os.Remove(path) // left by an lfuse that was killed; the state lock says none runs
	var ln net.Listener
	err := viaShortPath(stateDir, func(dir string) (err error) {
		ln, err = net.Listen("unix", filepath.Join(dir, socketName))
		return err
	})
	if err != nil {
		logger.Warn("lfuse status will not answer on the state directory's socket", "err", err)
		return func() {}
	}
	mux := http.NewServeMux()
	mux.Handle("/status", statusHandler(mgr))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	return func() { srv.Close(); os.Remove(path) }
}

// viaShortPath calls f with a name for dir short enough for a unix socket's
// path (108 bytes): dir itself if it fits, else /proc/self/fd/N of an open
// descriptor of it. A state directory deeper than about 100 bytes made
// lfuse status fail with "invalid argument" while lfuse ran.
func viaShortPath(dir string, f func(dir string) error) error {
	if len(filepath.Join(dir, socketName)) < 100 {
		return f(dir)
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return f(fmt.Sprintf("/proc/self/fd/%d", d.Fd()))
}

// runStatus asks a running lfuse for its databases and replicas.
func runStatus(args []string, stdout, stderr io.Writer) error {
	fl := flag.NewFlagSet("status", flag.ContinueOnError)
	fl.SetOutput(stderr)
	cf := addConfigFlags(fl, "configuration file, to find the state directory")
	dataDir := fl.String("data", "", "the data directory of the running lfuse (its state is DATA/.lfuse unless -state)")
	stateDir := fl.String("state", "", "the state directory of the running lfuse")
	addr := fl.String("addr", "", "ask over HTTP at this metrics address instead (metrics.addr)")
	asJSON := fl.Bool("json", false, "print JSON")
	fl.Usage = func() {
		fmt.Fprintf(stderr, "Usage: lfuse status [-data DIR | -state DIR | -config FILE | -addr HOST:PORT] [-json]\n\nShows each database a running lfuse captures, its TXID, and where each replica stands.\n\nFlags:\n")
		fl.PrintDefaults()
	}
	if err := fl.Parse(args); err != nil {
		return err
	}
	if fl.NArg() > 0 {
		// Flags after it were taken as arguments too, and -json ignored.
		fl.Usage()
		return fmt.Errorf("%w: unexpected argument %q (flags go before any argument; status takes none)", errUsage, fl.Arg(0))
	}
	client := http.DefaultClient
	host := *addr
	if u, err := neturl.Parse(host); err == nil && u.Scheme != "" && u.Host != "" {
		host = u.Host // given as a URL, as Prometheus scrapes it
	}
	url := "http://" + host + "/status"
	if *addr == "" {
		dir, err := stateFromFlags(fl, cf, *dataDir, *stateDir)
		if err != nil {
			return err
		}
		client = &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (c net.Conn, err error) {
			err = viaShortPath(dir, func(dir string) (err error) {
				c, err = (&net.Dialer{}).DialContext(ctx, "unix", filepath.Join(dir, socketName))
				return err
			})
			return c, err
		}}}
		url = "http://lfuse/status"
	}
	client.Timeout = 10 * time.Second
	resp, err := client.Get(url)
	if err != nil {
		var op *net.OpError
		var dns *net.DNSError
		switch {
		case *addr != "" && (errors.As(err, &op) || errors.As(err, &dns)):
			return fmt.Errorf("no lfuse answers at %s (%v): is lfuse running with metrics.addr (or -metrics-addr) set to it?", host, oneLine(err.Error()))
		case errors.As(err, &op):
			return fmt.Errorf("no lfuse answers there (%v): is it running with that data or state directory?", op.Err)
		}
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s answered %s: is it lfuse's metrics address?", host, resp.Status)
	}
	var rep statusReport
	if err := json.NewDecoder(resp.Body).Decode(&rep); err != nil {
		return fmt.Errorf("the answer is not lfuse's status: %w", err)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	tw := tabwriter.NewWriter(stdout, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "DATABASE\tSTATUS\tTXID\tSIZE\tREPLICA\tREPLICA TXID\tLAG")
	for _, d := range rep.Databases {
		if len(d.Replicas) == 0 {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t-\t-\t-\n", d.Path, d.Status, d.TXID, d.Size)
		}
		for i, r := range d.Replicas {
			path, status, txid, size := d.Path, d.Status, d.TXID, fmt.Sprint(d.Size)
			if i > 0 {
				path, status, txid, size = "", "", "", ""
			}
			lag := "in sync"
			if r.LagTXIDs > 0 {
				lag = fmt.Sprintf("%d txns, %.1fs", r.LagTXIDs, r.LagSeconds)
			}
			switch {
			case r.TakenOverBy != "":
				lag += " (taken over by another lfuse: " + r.TakenOverBy + ")"
			case r.Failing:
				lag += " (failing)"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", path, status, txid, size, r.Replica, r.TXID, lag)
		}
	}
	if len(rep.Databases) == 0 {
		fmt.Fprintln(tw, "(no database captured yet)")
	}
	return tw.Flush()
}

// replicaLag is how far a replica is behind its database: transactions,
// and seconds since it last held them all (0, 0 when in sync).
func replicaLag(dbTXID ltx.TXID, rs replicate.ReplicaStats) (txids uint64, seconds float64) {
	if dbTXID <= rs.TXID {
		return 0, 0
	}
	// Before its first good sync, a replica has lacked commits since
	// lfuse began shipping to it (a replica unwritable from the start
	// showed 0 s, and an alert on the lag never fired).
	since := rs.SyncedAt
	if since == 0 {
		since = rs.StartedAt
	}
	if since > 0 {
		seconds = time.Since(time.Unix(0, since)).Seconds()
	}
	return uint64(dbTXID - rs.TXID), seconds
}
