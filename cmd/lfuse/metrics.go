package main

import (
	"net/http"
	"net/http/pprof"

	"github.com/lfuse/lfuse/fs"
	"github.com/lfuse/lfuse/replicate"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// collector exposes lfuse's counters, read when Prometheus scrapes.
type collector struct {
	m   *fs.Mount
	mgr *replicate.Manager

	requests, txid, captured, capturedBytes, snapshots, needSnapshot *prometheus.Desc
}

func newCollector(m *fs.Mount, mgr *replicate.Manager) *collector {
	return &collector{
		m: m, mgr: mgr,
		requests:      prometheus.NewDesc("lfuse_fuse_requests_total", "FUSE requests served by lfuse, by operation.", []string{"op"}, nil),
		txid:          prometheus.NewDesc("lfuse_db_txid", "Last captured transaction ID.", []string{"db"}, nil),
		captured:      prometheus.NewDesc("lfuse_db_captured_transactions_total", "Transactions captured since start.", []string{"db"}, nil),
		capturedBytes: prometheus.NewDesc("lfuse_db_captured_wal_bytes_total", "WAL bytes captured since start.", []string{"db"}, nil),
		snapshots:     prometheus.NewDesc("lfuse_db_snapshots_total", "Snapshots taken since start.", []string{"db"}, nil),
		needSnapshot:  prometheus.NewDesc("lfuse_db_needs_snapshot", "1 while a database's capture is waiting for a new snapshot.", []string{"db"}, nil),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) { prometheus.DescribeByCollect(c, ch) }

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	for op, n := range c.m.Requests() {
		ch <- prometheus.MustNewConstMetric(c.requests, prometheus.CounterValue, float64(n), op)
	}
	for _, d := range c.mgr.DBs() {
		st := d.Stats()
		ch <- prometheus.MustNewConstMetric(c.txid, prometheus.GaugeValue, float64(st.TXID), st.Path)
		ch <- prometheus.MustNewConstMetric(c.captured, prometheus.CounterValue, float64(st.Captured), st.Path)
		ch <- prometheus.MustNewConstMetric(c.capturedBytes, prometheus.CounterValue, float64(st.Bytes), st.Path)
		ch <- prometheus.MustNewConstMetric(c.snapshots, prometheus.CounterValue, float64(st.Snapshots), st.Path)
		need := 0.0
		if st.Status == "needs snapshot" {
			need = 1
		}
		ch <- prometheus.MustNewConstMetric(c.needSnapshot, prometheus.GaugeValue, need, st.Path)
	}
}

func metricsHandler(m *fs.Mount, mgr *replicate.Manager) http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(newCollector(m, mgr), collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}
