package main

import (
	"net/http"
	"net/http/pprof"
	"strconv"
	"unicode/utf8"

	"github.com/lfuse/lfuse/replicate"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// collector exposes lfuse's counters, read when Prometheus scrapes.
type collector struct {
	m   requestCounter
	mgr *replicate.Manager

	requests, txid, captured, capturedBytes, snapshots, needSnapshot, size, walSize, captureErrs, holds, held, copies *prometheus.Desc

	replicaTXID, replicaBehind, replicaLag, replicaSyncs, replicaErrs, replicaFailing, ops, opBytes *prometheus.Desc
}

var replicaLabels = []string{"db", "replica", "replica_type"}

// requestCounter counts the FUSE requests served (fs.Mount).
type requestCounter interface{ Requests() map[string]uint64 }

func newCollector(m requestCounter, mgr *replicate.Manager) *collector {
	return &collector{
		m: m, mgr: mgr,
		requests:      prometheus.NewDesc("lfuse_fuse_requests_total", "FUSE requests served by lfuse, by operation.", []string{"op"}, nil),
		txid:          prometheus.NewDesc("lfuse_db_txid", "Last captured transaction ID.", []string{"db"}, nil),
		captured:      prometheus.NewDesc("lfuse_db_captured_transactions_total", "Transactions captured since start.", []string{"db"}, nil),
		capturedBytes: prometheus.NewDesc("lfuse_db_captured_wal_bytes_total", "WAL bytes captured since start.", []string{"db"}, nil),
		snapshots:     prometheus.NewDesc("lfuse_db_snapshots_total", "Snapshots taken since start.", []string{"db"}, nil),
		needSnapshot:  prometheus.NewDesc("lfuse_db_needs_snapshot", "1 while a database's capture is waiting for a new snapshot.", []string{"db"}, nil),
		size:          prometheus.NewDesc("lfuse_db_size_bytes", "Size of the database file.", []string{"db"}, nil),
		walSize:       prometheus.NewDesc("lfuse_db_wal_size_bytes", "Size of the database's -wal file.", []string{"db"}, nil),
		captureErrs:   prometheus.NewDesc("lfuse_db_capture_errors_total", "Failed capture attempts (state directory full, ...).", []string{"db"}, nil),
		holds:         prometheus.NewDesc("lfuse_db_holds_total", "Operations of the application (checkpoint truncations, WAL restarts, unlinks) held back until capture was done.", []string{"db"}, nil),
		held:          prometheus.NewDesc("lfuse_db_held_seconds_total", "Seconds the application's held operations waited for lfuse, in all.", []string{"db"}, nil),
		copies:        prometheus.NewDesc("lfuse_db_wal_copies_total", "Checkpoints that copied uncaptured WAL frames aside instead of waiting for their capture.", []string{"db"}, nil),

		replicaTXID:    prometheus.NewDesc("lfuse_replica_txid", "Newest TXID the replica holds.", replicaLabels, nil),
		replicaBehind:  prometheus.NewDesc("lfuse_replica_lag_txids", "Captured transactions the replica does not hold yet.", replicaLabels, nil),
		replicaLag:     prometheus.NewDesc("lfuse_replica_lag_seconds", "Seconds since the replica last held every captured transaction (0 when it does).", replicaLabels, nil),
		replicaSyncs:   prometheus.NewDesc("lfuse_replica_syncs_total", "Successful syncs.", replicaLabels, nil),
		replicaErrs:    prometheus.NewDesc("lfuse_replica_sync_errors_total", "Failed sync, compaction, snapshot or retention passes.", replicaLabels, nil),
		replicaFailing: prometheus.NewDesc("lfuse_replica_failing", "1 while syncs to the replica, or its compactions, snapshots or retention, keep failing.", replicaLabels, nil),
		ops:            prometheus.NewDesc("lfuse_replica_operation_total", "Storage operations by kind (a delete counts per file).", []string{"replica_type", "operation"}, nil),
		opBytes:        prometheus.NewDesc("lfuse_replica_operation_bytes", "Bytes read (GET) and written (PUT).", []string{"replica_type", "operation"}, nil),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) { prometheus.DescribeByCollect(c, ch) }

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	for op, n := range c.m.Requests() {
		ch <- prometheus.MustNewConstMetric(c.requests, prometheus.CounterValue, float64(n), op)
	}
	ops, opBytes := map[[2]string]int64{}, map[[2]string]int64{}
	dbs := c.mgr.DBs()
	stats := dbStats(dbs)
	seen := map[[2]string]bool{}
	for i, d := range dbs {
		st := stats[i]
		st.Path = labelValue(st.Path)
		ch <- prometheus.MustNewConstMetric(c.txid, prometheus.GaugeValue, float64(st.TXID), st.Path)
		ch <- prometheus.MustNewConstMetric(c.captured, prometheus.CounterValue, float64(st.Captured), st.Path)
		ch <- prometheus.MustNewConstMetric(c.capturedBytes, prometheus.CounterValue, float64(st.Bytes), st.Path)
		ch <- prometheus.MustNewConstMetric(c.snapshots, prometheus.CounterValue, float64(st.Snapshots), st.Path)
		need := 0.0
		if st.Status == "needs snapshot" {
			need = 1
		}
		ch <- prometheus.MustNewConstMetric(c.needSnapshot, prometheus.GaugeValue, need, st.Path)
		ch <- prometheus.MustNewConstMetric(c.size, prometheus.GaugeValue, float64(st.Size), st.Path)
		ch <- prometheus.MustNewConstMetric(c.walSize, prometheus.GaugeValue, float64(st.WALSize), st.Path)
		ch <- prometheus.MustNewConstMetric(c.captureErrs, prometheus.CounterValue, float64(st.Errors), st.Path)
		ch <- prometheus.MustNewConstMetric(c.holds, prometheus.CounterValue, float64(st.Holds), st.Path)
		ch <- prometheus.MustNewConstMetric(c.held, prometheus.CounterValue, st.Held.Seconds(), st.Path)
		ch <- prometheus.MustNewConstMetric(c.copies, prometheus.CounterValue, float64(st.Copies), st.Path)
		for _, r := range d.Replicas() {
			rs := r.Stats()
			l := []string{st.Path, labelValue(rs.Name), rs.Type}
			if seen[[2]string{l[0], l[1]}] {
				// Two replicas that print alike (config refuses those it
				// can tell are one place): a second series with the same
				// labels failed the whole scrape.
				continue
			}
			seen[[2]string{l[0], l[1]}] = true
			ch <- prometheus.MustNewConstMetric(c.replicaTXID, prometheus.GaugeValue, float64(rs.TXID), l...)
			behind, lag := replicaLag(st.TXID, rs)
			ch <- prometheus.MustNewConstMetric(c.replicaBehind, prometheus.GaugeValue, float64(behind), l...)
			ch <- prometheus.MustNewConstMetric(c.replicaLag, prometheus.GaugeValue, lag, l...)
			ch <- prometheus.MustNewConstMetric(c.replicaSyncs, prometheus.CounterValue, float64(rs.Syncs), l...)
			ch <- prometheus.MustNewConstMetric(c.replicaErrs, prometheus.CounterValue, float64(rs.Errs), l...)
			failing := 0.0
			if rs.Failing {
				failing = 1
			}
			ch <- prometheus.MustNewConstMetric(c.replicaFailing, prometheus.GaugeValue, failing, l...)
			for i, name := range replicate.OpNames {
				ops[[2]string{rs.Type, name}] += rs.Ops[i]
				opBytes[[2]string{rs.Type, name}] += rs.Bytes[i]
			}
		}
	}
	for k, n := range ops {
		ch <- prometheus.MustNewConstMetric(c.ops, prometheus.CounterValue, float64(n), k[0], k[1])
		if k[1] == "GET" || k[1] == "PUT" {
			ch <- prometheus.MustNewConstMetric(c.opBytes, prometheus.CounterValue, float64(opBytes[k]), k[0], k[1])
		}
	}
}

func metricsHandler(m requestCounter, mgr *replicate.Manager) http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(newCollector(m, mgr), collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	// What can be gathered is served: one bad series failed the whole
	// scrape with a 500, and monitoring went dark.
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}))
	mux.Handle("/status", statusHandler(mgr))
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

// labelValue makes s a valid label value: Prometheus takes only UTF-8, and
// a database named with other bytes (a file name may hold any) made every
// scrape fail. Such a name is shown escaped, as Go quotes it.
func labelValue(s string) string {
	if utf8.ValidString(s) {
		return s
	}
	q := strconv.Quote(s)
	return q[1 : len(q)-1]
}
