package integration

import (
	"bufio"
	"database/sql"
	"fmt"
	"math/rand"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The benchmarks compare the same SQLite workloads on a native directory and
// through the mount in each mode, against the same files. Each reports its
// rate and, through the mount, the FUSE requests lfuse served per operation
// (from its own counters), which are what an application can feel.
//
//	make bench      runs them three times and writes the table in docs/BENCHMARKS.md

var benchSetups = []string{"native", "passthrough", "cached"}

// benchDir holds the benchmark databases between runs (the 200 MB one takes a
// while to build).
func benchDir(b *testing.B) string {
	dir := os.Getenv("LFUSE_BENCH_DIR")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "lfuse-bench")
	}
	if err := os.MkdirAll(filepath.Join(dir, "data"), 0o755); err != nil {
		b.Fatal(err)
	}
	return dir
}

// target is where a benchmark runs its workload.
type target struct {
	dir     string // directory the application uses
	metrics string // lfuse metrics URL, "" for native
	stop    func()
}

func startTarget(b *testing.B, setup string) *target {
	b.Helper()
	base := benchDir(b)
	data := filepath.Join(base, "data")
	if setup == "native" {
		return &target{dir: data, stop: func() {}}
	}
	requireFUSE(b)
	mnt := filepath.Join(base, "mnt")
	os.MkdirAll(mnt, 0o755)
	mode := map[string]string{"passthrough": "on", "cached": "off"}[setup]
	port := 19000 + rand.Intn(1000)
	p := startLfuse(b, "mount", "-data", data, "-passthrough", mode, "-metrics-addr", fmt.Sprintf("127.0.0.1:%d", port), mnt)
	p.mnt = mnt
	if err := p.log.wait("mount ready", time.Minute, p.done); err != nil {
		b.Fatalf("%v\n%s", err, p.log)
	}
	return &target{dir: mnt, metrics: fmt.Sprintf("http://127.0.0.1:%d/metrics", port), stop: func() {
		p.stop()
		p.cleanup()
	}}
}

var reqRe = regexp.MustCompile(`^lfuse_fuse_requests_total\{op="(\w+)"\} (\S+)$`)

// cpuKey is where requests puts lfuse's CPU time (process_cpu_seconds_total).
const cpuKey = " cpu"

// requests reads lfuse's request counters and its CPU time.
func (tg *target) requests(b *testing.B) map[string]float64 {
	out := map[string]float64{}
	if tg.metrics == "" {
		return out
	}
	resp, err := http.Get(tg.metrics)
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if m := reqRe.FindStringSubmatch(sc.Text()); m != nil {
			v, _ := strconv.ParseFloat(m[2], 64)
			out[m[1]] = v
		} else if v, ok := strings.CutPrefix(sc.Text(), "process_cpu_seconds_total "); ok {
			out[cpuKey], _ = strconv.ParseFloat(v, 64)
		}
	}
	return out
}

// measure runs fn (which does n operations) and reports ops/s (over the
// time the benchmark timer ran) and the FUSE requests per operation, by kind
// and in total.
func measure(b *testing.B, tg *target, unit string, n int, fn func()) {
	before := tg.requests(b)
	b.ResetTimer()
	fn()
	b.StopTimer()
	b.ReportMetric(float64(n)/b.Elapsed().Seconds(), unit+"/s")
	if tg.metrics == "" {
		return
	}
	after := tg.requests(b)
	// All of lfuse's CPU over the run, capture included (and the resets
	// some workloads do between runs, with the timer stopped).
	b.ReportMetric((after[cpuKey]-before[cpuKey])*1e6/float64(n), "lfuse-cpu-us/"+unit)
	delete(after, cpuKey)
	total := 0.0
	for op, v := range after {
		if d := v - before[op]; d > 0 {
			b.ReportMetric(d/float64(n), "req-"+op+"/"+unit)
			total += d
		}
	}
	b.ReportMetric(total/float64(n), "req/"+unit)
}

func benchOpen(b *testing.B, path string, params ...string) *sql.DB {
	dsn := path + "?_journal_mode=WAL&_busy_timeout=10000&" + strings.Join(params, "&")
	db, err := sql.Open("sqlite3", dsn)
	if err != nil {
		b.Fatal(err)
	}
	db.SetMaxOpenConns(1)
	return db
}

func benchExec(b *testing.B, db *sql.DB, q string, args ...any) {
	if _, err := db.Exec(q, args...); err != nil {
		b.Fatalf("%s: %v", q, err)
	}
}

// Single-row write transactions, one connection, autocommit.
func BenchmarkSmallWrites(b *testing.B) {
	for _, sync := range []string{"NORMAL", "FULL"} {
		for _, setup := range benchSetups {
			b.Run(sync+"/"+setup, func(b *testing.B) {
				tg := startTarget(b, setup)
				defer tg.stop()
				path := filepath.Join(tg.dir, "writes.db")
				db := benchOpen(b, path, "_synchronous="+sync)
				defer db.Close()
				benchExec(b, db, "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)")
				stmt, err := db.Prepare("INSERT INTO t(v) VALUES(?)")
				if err != nil {
					b.Fatal(err)
				}
				defer stmt.Close()
				measure(b, tg, "tx", b.N, func() {
					for i := 0; i < b.N; i++ {
						if _, err := stmt.Exec("a small row of text"); err != nil {
							b.Fatal(err)
						}
					}
				})
			})
		}
	}
}

const readRows = 200_000

// Point-read transactions on a table larger than SQLite's page cache, with
// the file in the OS cache, with and without memory-mapped I/O.
func BenchmarkPointReads(b *testing.B) {
	for _, mmap := range []string{"nommap", "mmap"} {
		for _, setup := range benchSetups {
			b.Run(mmap+"/"+setup, func(b *testing.B) {
				tg := startTarget(b, setup)
				defer tg.stop()
				db := benchOpen(b, filepath.Join(tg.dir, "reads.db"))
				defer db.Close()
				var n int
				db.QueryRow("SELECT count(*) FROM t").Scan(&n)
				if n != readRows {
					benchExec(b, db, "DROP TABLE IF EXISTS t")
					benchExec(b, db, "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
					benchExec(b, db, fmt.Sprintf("WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < %d) INSERT INTO t(v) SELECT randomblob(100) FROM s", readRows))
					benchExec(b, db, "PRAGMA wal_checkpoint(TRUNCATE)")
				}
				if mmap == "mmap" {
					benchExec(b, db, "PRAGMA mmap_size=268435456")
				}
				stmt, err := db.Prepare("SELECT v FROM t WHERE id = ?")
				if err != nil {
					b.Fatal(err)
				}
				defer stmt.Close()
				rng := rand.New(rand.NewSource(1))
				var v []byte
				for i := 0; i < readRows; i += 50 { // warm the OS cache
					stmt.QueryRow(i + 1).Scan(&v)
				}
				measure(b, tg, "tx", b.N, func() {
					for i := 0; i < b.N; i++ {
						if err := stmt.QueryRow(rng.Intn(readRows) + 1).Scan(&v); err != nil {
							b.Fatal(err)
						}
					}
				})
			})
		}
	}
}

// pairs holds, for disk-bound workloads, the ratio of each measured run
// through the mount to a native run of the same work right before it: the
// disk of a shared machine changes speed from one second to the next, and
// only adjacent runs see the same disk.
type pairs []float64

func (p *pairs) add(native, mount time.Duration) {
	*p = append(*p, float64(native)/float64(mount))
}

func (p pairs) report(b *testing.B) {
	if len(p) == 0 {
		return
	}
	s := append([]float64(nil), p...)
	slices.Sort(s)
	b.ReportMetric(s[len(s)/2], "x-native")
}

// One transaction inserting 200,000 rows, then a checkpoint.
func BenchmarkBulkInsert(b *testing.B) {
	for _, setup := range benchSetups {
		b.Run(setup, func(b *testing.B) {
			tg := startTarget(b, setup)
			defer tg.stop()
			db := benchOpen(b, filepath.Join(tg.dir, "bulk.db"))
			defer db.Close()
			var twin *sql.DB
			if tg.metrics != "" {
				twin = benchOpen(b, filepath.Join(benchDir(b), "data", "bulk-native.db"))
				defer twin.Close()
			}
			var ratios pairs
			measure(b, tg, "row", b.N*bulkRows, func() {
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					var native time.Duration
					if twin != nil {
						bulkReset(b, twin)
						native = bulkInsert(b, twin)
					}
					bulkReset(b, db)
					b.StartTimer()
					d := bulkInsert(b, db)
					if twin != nil {
						ratios.add(native, d)
					}
				}
			})
			ratios.report(b)
		})
	}
}

const bulkRows = 200_000

func bulkReset(b *testing.B, db *sql.DB) {
	benchExec(b, db, "DROP TABLE IF EXISTS t")
	benchExec(b, db, "PRAGMA wal_checkpoint(TRUNCATE)")
	syscall.Sync() // no writeback left over from the last run
}

func bulkInsert(b *testing.B, db *sql.DB) time.Duration {
	start := time.Now()
	tx, err := db.Begin()
	if err != nil {
		b.Fatal(err)
	}
	tx.Exec("CREATE TABLE t(id INTEGER PRIMARY KEY, a INTEGER, v TEXT)")
	stmt, _ := tx.Prepare("INSERT INTO t(a, v) VALUES(?, ?)")
	for r := 0; r < bulkRows; r++ {
		if _, err := stmt.Exec(r, "bulk row payload"); err != nil {
			b.Fatal(err)
		}
	}
	stmt.Close()
	if err := tx.Commit(); err != nil {
		b.Fatal(err)
	}
	benchExec(b, db, "PRAGMA wal_checkpoint(PASSIVE)")
	return time.Since(start)
}

const scanBytes = 200 << 20

// A full scan of a ~200 MB database with cold caches. Through the mount,
// each scan is paired with a native scan of the same file just before it.
func BenchmarkColdScan(b *testing.B) {
	for _, setup := range benchSetups {
		b.Run(setup, func(b *testing.B) {
			tg := startTarget(b, setup)
			defer tg.stop()
			path := filepath.Join(tg.dir, "scan.db")
			db := benchOpen(b, path)
			var n int
			db.QueryRow("SELECT count(*) FROM t").Scan(&n)
			const rowSize = 1000
			if n != scanBytes/rowSize {
				benchExec(b, db, "DROP TABLE IF EXISTS t")
				benchExec(b, db, "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
				benchExec(b, db, fmt.Sprintf("WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < %d) INSERT INTO t(v) SELECT randomblob(%d) FROM s", scanBytes/rowSize, rowSize))
				benchExec(b, db, "PRAGMA wal_checkpoint(TRUNCATE)")
			}
			db.Close()
			st, err := os.Stat(path)
			if err != nil {
				b.Fatal(err)
			}
			mb := int(st.Size() >> 20)
			// The native runs read a copy: a native process must not use
			// the mount's files behind its back.
			twin := filepath.Join(benchDir(b), "data", "scan-native.db")
			if tst, err := os.Stat(twin); tg.metrics != "" && (err != nil || tst.Size() != st.Size()) {
				copyFile(b, filepath.Join(benchDir(b), "data", "scan.db"), twin)
			}
			var ratios pairs
			measure(b, tg, "MB", b.N*mb, func() {
				b.StopTimer()
				for i := 0; i < b.N; i++ {
					var native time.Duration
					if tg.metrics != "" {
						native = coldScan(b, twin, false)
					}
					d := coldScan(b, path, true)
					if tg.metrics != "" {
						ratios.add(native, d)
					}
				}
			})
			ratios.report(b)
		})
	}
}

// coldScan reads every row of the scan database with nothing cached and
// returns how long the query took; with timed, the benchmark timer runs
// during the query (and only then).
func coldScan(b *testing.B, path string, timed bool) time.Duration {
	b.StopTimer()
	dropCaches(b)
	db := benchOpen(b, path)
	defer db.Close()
	if timed {
		b.StartTimer()
	}
	start := time.Now()
	var total int64
	if err := db.QueryRow("SELECT sum(length(v)) FROM t").Scan(&total); err != nil {
		b.Fatal(err)
	}
	d := time.Since(start)
	b.StopTimer()
	return d
}

func copyFile(b *testing.B, from, to string) {
	data, err := os.ReadFile(from)
	if err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(to, data, 0o644); err != nil {
		b.Fatal(err)
	}
}

// dropCaches empties the page cache, after writing back dirty pages so that
// earlier workloads' writeback does not compete with the next one's reads.
func dropCaches(b *testing.B) {
	syscall.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
		b.Skipf("cannot drop caches for a cold scan: %v", err)
	}
}
