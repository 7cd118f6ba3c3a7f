package integration

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awss3 "github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/lfuse/lfuse/backends"
	"github.com/lfuse/lfuse/backends/backendtest"
	"github.com/lfuse/lfuse/backends/file"
	"github.com/lfuse/lfuse/backends/s3"
	"github.com/lfuse/lfuse/replicate"
	"github.com/superfly/ltx"
)

// Replication benchmarks (make bench-replica): restore time against a plain
// copy of the database, replication lag, requests per hour and memory.

// replicaBench is a mount with a file replica in the benchmark directory.
type replicaBench struct {
	b               *testing.B
	base, data, mnt string
	repl, cfg       string
}

func newReplicaBench(b *testing.B, name string) *replicaBench {
	requireFUSE(b)
	base := filepath.Join(benchDir(b), name)
	rb := &replicaBench{b: b, base: base, data: filepath.Join(base, "data"), mnt: filepath.Join(base, "mnt"),
		repl: filepath.Join(base, "replica"), cfg: filepath.Join(base, "lfuse.toml")}
	os.MkdirAll(rb.data, 0o755)
	os.MkdirAll(rb.mnt, 0o755)
	return rb
}

func (rb *replicaBench) mount(replicaKeys string) *lfuse {
	rb.b.Helper()
	os.WriteFile(rb.cfg, []byte(fmt.Sprintf("[[replicas]]\nurl = %q\n%s\n", "file://"+rb.repl, replicaKeys)), 0o644)
	p := startLfuse(rb.b, "mount", "-config", rb.cfg, "-data", rb.data, "-log-level", "debug", rb.mnt)
	p.mnt = rb.mnt
	if err := p.log.wait("mount ready", time.Minute, p.done); err != nil {
		rb.b.Fatalf("%v\n%s", err, p.log)
	}
	return p
}

// peakRSS is a running process's peak resident memory in MB.
func peakRSS(pid int) float64 { return procStatusMB(pid, "VmHWM:") }

func procStatusMB(pid int, field string) float64 {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, field) {
			kb, _ := strconv.ParseFloat(strings.Fields(line)[1], 64)
			return kb / 1024
		}
	}
	return 0
}

// anonSampler follows a process's anonymous resident memory (its heap and
// stacks, without the binary's pages, which are page cache) every 20 ms;
// stop returns the peak in MB. The kernel keeps no peak of it.
func anonSampler(pid int) (stop func() float64) {
	done := make(chan struct{})
	peak := make(chan float64)
	go func() {
		var p float64
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			p = max(p, procStatusMB(pid, "RssAnon:"))
			select {
			case <-done:
				peak <- p
				return
			case <-t.C:
			}
		}
	}()
	return func() float64 { close(done); return <-peak }
}

const restoreHistory = 100_000

// restoreDBMB is the size of the restore benchmark's database: 1024 MB, or
// LFUSE_BENCH_RESTORE_MB.
func restoreDBMB() int {
	if n, err := strconv.Atoi(os.Getenv("LFUSE_BENCH_RESTORE_MB")); err == nil && n > 0 {
		return n
	}
	return 1024
}

// restoreText says whether the restore benchmark's rows hold text
// (LFUSE_BENCH_RESTORE_DATA=text): words in the proportions of prose, which
// LZ4 compresses about as it does an application's text columns. By
// default they hold random bytes, which it cannot compress: the most a
// restore has to read for a database of that size.
func restoreText() bool { return os.Getenv("LFUSE_BENCH_RESTORE_DATA") == "text" }

// benchWords are the vocabulary of restoreText's rows, commonest first.
var benchWords = strings.Fields(`the of and to a in is that it for was on with as by at be this
	from or have an not are but which they all one their there been has
	when more will would who so out up into time only some could them
	than other new then its these two may first any like now over such our
	after most also made many before must through back years where much
	your way well down should because each just those people how too
	little state good very make world still own see men work long get here
	between both life being under never day same another know while last
	might great old year off come since against go came right used take
	three order payment account customer invoice status shipped pending
	address street city total amount balance item quantity price note
	created updated deleted user email message reply thread comment`)

// benchText is n bytes of words drawn from benchWords with a Zipf
// distribution, and a number now and then.
func benchText(rng *rand.Rand, n int) string {
	zipf := rand.NewZipf(rng, 1.2, 2, uint64(len(benchWords)-1))
	var sb strings.Builder
	for sb.Len() < n {
		if rng.Intn(12) == 0 {
			sb.WriteString(strconv.Itoa(rng.Intn(100000)))
		} else {
			sb.WriteString(benchWords[zipf.Uint64()])
		}
		sb.WriteByte(' ')
	}
	return sb.String()[:n]
}

// Restore of a ~1 GB database with ~100,000 transactions of history from a
// file replica, against cp of the database file, page cache dropped before
// each. Built once and kept in the benchmark directory; LFUSE_BENCH_RESTORE_MB
// sets the size (1024 by default), LFUSE_BENCH_RESTORE_DATA what the rows
// hold (restoreText).
func BenchmarkReplicaRestore(b *testing.B) {
	mb := restoreDBMB()
	name := fmt.Sprintf("restore-%d", mb)
	if restoreText() {
		name = fmt.Sprintf("restore-text-%d", mb)
	}
	rb := newReplicaBench(b, name)
	db := filepath.Join(rb.mnt, "app.db")
	rows := mb << 20 / 4096
	if _, err := os.Stat(filepath.Join(rb.base, "built")); err != nil {
		os.RemoveAll(rb.data)
		os.RemoveAll(rb.repl)
		os.MkdirAll(rb.data, 0o755)
		// The peak memory of lfuse while it captures and ships the
		// bulk load, the full snapshot and the history: in all, and its
		// heap and stacks (the rest is the binary's pages and the page
		// checksums file it maps: page cache).
		var mountRSS, mountAnon float64
		var stopAnon func() float64
		mount := func(extra string) *lfuse {
			p := rb.mount(extra)
			stopAnon = anonSampler(p.cmd.Process.Pid)
			return p
		}
		stop := func(phase string, p *lfuse) {
			rss, anon := peakRSS(p.cmd.Process.Pid), stopAnon()
			b.Logf("lfuse mount during the %s: peak RSS %.1f MB, anonymous %.1f MB", phase, rss, anon)
			mountRSS, mountAnon = max(mountRSS, rss), max(mountAnon, anon)
			p.stop()
		}
		p := mount("")
		script := "PRAGMA journal_mode=WAL;\nCREATE TABLE t(id INTEGER PRIMARY KEY, n INTEGER, v BLOB);\n"
		if restoreText() {
			sqliteCLI(b, db, script)
			conn := benchOpen(b, db)
			rng := rand.New(rand.NewSource(1))
			for i := 0; i < 10; i++ {
				tx, err := conn.Begin()
				if err != nil {
					b.Fatal(err)
				}
				for j := 0; j < rows/10; j++ {
					if _, err := tx.Exec("INSERT INTO t(n, v) VALUES(0, ?)", benchText(rng, 3900)); err != nil {
						b.Fatal(err)
					}
				}
				if err := tx.Commit(); err != nil {
					b.Fatal(err)
				}
				benchExec(b, conn, "PRAGMA wal_checkpoint(TRUNCATE)")
			}
			conn.Close()
		} else {
			for i := 0; i < 10; i++ {
				script += fmt.Sprintf("WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < %d) INSERT INTO t(n, v) SELECT 0, randomblob(3900) FROM s;\nPRAGMA wal_checkpoint(TRUNCATE);\n", rows/10)
			}
			sqliteCLI(b, db, script)
		}
		stop("load", p)
		// A snapshot of the full database, as the daily one would be.
		p = mount(`snapshot-interval = "1s"`)
		if err := p.log.wait("snapshot uploaded", 10*time.Minute, p.done); err != nil {
			b.Fatalf("%v\n%s", err, p.log)
		}
		stop("snapshot", p)
		// Then the history: single-row updates, one per transaction.
		p = mount("")
		var sb strings.Builder
		for i := 0; i < restoreHistory; i++ {
			fmt.Fprintf(&sb, "UPDATE t SET n = n + 1 WHERE id = %d;\n", (i*7919)%rows+1)
		}
		sb.WriteString("PRAGMA wal_checkpoint(TRUNCATE);\n")
		sqliteCLI(b, db, sb.String())
		stop("history", p)
		os.WriteFile(filepath.Join(rb.base, "built"), []byte(fmt.Sprint(mountRSS, " ", mountAnon)), 0o644)
	}
	built, _ := os.ReadFile(filepath.Join(rb.base, "built"))
	for i, unit := range []string{"mount-peak-RSS-MB", "mount-peak-anon-MB"} {
		if f := strings.Fields(string(built)); i < len(f) {
			if v, err := strconv.ParseFloat(f[i], 64); err == nil {
				b.ReportMetric(v, unit)
			}
		}
	}
	src := filepath.Join(rb.data, "app.db")
	out := filepath.Join(rb.base, "out.db")
	fi, err := os.Stat(src)
	if err != nil {
		b.Fatal(err)
	}
	var cpSecs, cpSyncSecs, restoreSecs, rss, anon []float64
	var planLine string
	for i := 0; i < b.N; i++ {
		os.Remove(out)
		dropCaches(b)
		start := time.Now()
		if o, err := exec.Command("cp", src, out).CombinedOutput(); err != nil {
			b.Fatalf("cp: %v %s", err, o)
		}
		cpSecs = append(cpSecs, time.Since(start).Seconds())
		// A restore makes its output durable before it renames it; cp
		// does not. The copy made durable is the floor a restore can
		// be held to on this disk.
		if o, err := exec.Command("sync", out).CombinedOutput(); err != nil {
			b.Fatalf("sync: %v %s", err, o)
		}
		cpSyncSecs = append(cpSyncSecs, time.Since(start).Seconds())
		os.Remove(out)
		dropCaches(b)
		start = time.Now()
		cmd := exec.Command("/usr/bin/time", "-f", "maxrss_kb=%M", lfuseBin, "restore", "-o", out, "file://"+rb.repl+"/app.db")
		var ob bytes.Buffer
		cmd.Stdout, cmd.Stderr = &ob, &ob
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		stopAnon := func() float64 { return 0 }
		// /usr/bin/time's child is lfuse.
		for i := 0; i < 100; i++ {
			if kids, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", cmd.Process.Pid, cmd.Process.Pid)); len(kids) > 0 {
				if pid, err := strconv.Atoi(strings.Fields(string(kids))[0]); err == nil {
					stopAnon = anonSampler(pid)
					break
				}
			}
			time.Sleep(time.Millisecond) // polling /proc: no event to wait for
		}
		err := cmd.Wait()
		anonPeak := stopAnon()
		o := ob.Bytes()
		if err != nil {
			b.Fatalf("restore: %v\n%s", err, o)
		}
		restoreSecs = append(restoreSecs, time.Since(start).Seconds())
		anon = append(anon, anonPeak)
		if m := regexp.MustCompile(`maxrss_kb=(\d+)`).FindSubmatch(o); m != nil {
			kb, _ := strconv.ParseFloat(string(m[1]), 64)
			rss = append(rss, kb/1024)
		}
		if m := regexp.MustCompile(`msg="restore plan".*`).Find(o); m != nil {
			planLine = string(m)
		}
	}
	b.ReportMetric(float64(fi.Size())/(1<<20), "db-MB")
	b.ReportMetric(median(cpSecs), "cp-s")
	b.ReportMetric(median(restoreSecs), "restore-s")
	b.ReportMetric(median(restoreSecs)/median(cpSecs), "x-cp")
	b.ReportMetric(median(cpSyncSecs), "cp-sync-s")
	b.ReportMetric(median(restoreSecs)/median(cpSyncSecs), "x-cp-sync")
	b.ReportMetric(median(rss), "restore-peak-RSS-MB")
	b.ReportMetric(median(anon), "restore-peak-anon-MB")
	b.Logf("%s", planLine)
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

var lagRe = regexp.MustCompile(`msg=synced .*lag_seconds=(\S+)`)

// syncLags are the lags lfuse logged for its syncs, in milliseconds, sorted.
func syncLags(log string) []float64 {
	var lags []float64
	for _, m := range lagRe.FindAllStringSubmatch(log, -1) {
		v, _ := strconv.ParseFloat(m[1], 64)
		lags = append(lags, v*1000)
	}
	slices.Sort(lags)
	return lags
}

// A database doing 10 transactions a second with the default intervals:
// lag from commit to durable in the replica, files written per hour, and
// lfuse's memory.
func BenchmarkReplicaLag(b *testing.B) {
	rb := newReplicaBench(b, "lag")
	os.RemoveAll(rb.data)
	os.RemoveAll(rb.repl)
	os.MkdirAll(rb.data, 0o755)
	p := rb.mount("")
	defer p.cleanup()
	stopAnon := anonSampler(p.cmd.Process.Pid)
	db := benchOpen(b, filepath.Join(rb.mnt, "app.db"))
	defer db.Close()
	benchExec(b, db, "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
	const seconds = 60
	start := time.Now()
	tick := time.NewTicker(100 * time.Millisecond)
	for i := 0; i < seconds*10; i++ {
		<-tick.C
		benchExec(b, db, "INSERT INTO t(v) VALUES(randomblob(200))")
	}
	tick.Stop()
	elapsed := time.Since(start)
	rss := peakRSS(p.cmd.Process.Pid)
	anonPeak := stopAnon()
	db.Close()
	p.stop()
	lags := syncLags(p.log.String())
	if len(lags) < seconds/2 {
		b.Fatalf("only %d syncs logged", len(lags))
	}
	files := 0
	filepath.WalkDir(rb.repl, func(path string, d os.DirEntry, err error) error {
		if err == nil && strings.HasSuffix(path, ".ltx") {
			files++
		}
		return nil
	})
	b.ReportMetric(lags[len(lags)/2], "lag-p50-ms")
	b.ReportMetric(lags[len(lags)*99/100], "lag-p99-ms")
	b.ReportMetric(float64(files)*3600/elapsed.Seconds(), "files-per-hour")
	b.ReportMetric(rss, "lfuse-peak-RSS-MB")
	b.ReportMetric(anonPeak, "lfuse-peak-anon-MB")
}

// Lag while scheduled snapshots of a ~1 GB database (LFUSE_BENCH_RESTORE_MB)
// are built and uploaded, one every 15 s, at 10 tx/s for a minute: a
// snapshot must not hold back the commits made while it uploads.
func BenchmarkReplicaLagDuringSnapshot(b *testing.B) {
	mb := restoreDBMB()
	rb := newReplicaBench(b, fmt.Sprintf("lag-snapshot-%d", mb))
	src := filepath.Join(rb.base, "seed.db")
	if _, err := os.Stat(src); err != nil {
		rows := mb << 20 / 4096
		sqliteCLI(b, src+".tmp", fmt.Sprintf("PRAGMA journal_mode=WAL;\nCREATE TABLE t(id INTEGER PRIMARY KEY, n INTEGER, v BLOB);\n"+
			"WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < %d) INSERT INTO t(n, v) SELECT 0, randomblob(3900) FROM s;\n"+
			"PRAGMA wal_checkpoint(TRUNCATE);\n", rows))
		if err := os.Rename(src+".tmp", src); err != nil {
			b.Fatal(err)
		}
	}
	os.RemoveAll(rb.data)
	os.RemoveAll(rb.repl)
	os.MkdirAll(rb.data, 0o755)
	if o, err := exec.Command("cp", src, filepath.Join(rb.data, "app.db")).CombinedOutput(); err != nil {
		b.Fatalf("cp: %v %s", err, o)
	}
	p := rb.mount(`snapshot-interval = "15s"`)
	defer p.cleanup()
	db := benchOpen(b, filepath.Join(rb.mnt, "app.db"))
	defer db.Close()
	benchExec(b, db, "CREATE TABLE lag(id INTEGER PRIMARY KEY, v BLOB)")
	if err := p.log.wait("snapshot uploaded", 10*time.Minute, p.done); err != nil {
		b.Fatalf("%v\n%s", err, p.log)
	}
	first := strings.Count(p.log.String(), "snapshot uploaded")
	const seconds = 60
	tick := time.NewTicker(100 * time.Millisecond)
	for i := 0; i < seconds*10; i++ {
		<-tick.C
		benchExec(b, db, "INSERT INTO lag(v) VALUES(randomblob(200))")
	}
	tick.Stop()
	db.Close()
	p.stop()
	log := p.log.String()
	lags := syncLags(log)
	snaps := strings.Count(log, "snapshot uploaded") - first
	if snaps < 2 || len(lags) < seconds/2 {
		b.Fatalf("%d snapshots and %d syncs in %d s", snaps, len(lags), seconds)
	}
	b.ReportMetric(float64(snaps), "snapshots")
	b.ReportMetric(float64(len(lags)), "syncs")
	b.ReportMetric(lags[len(lags)/2], "lag-p50-ms")
	b.ReportMetric(lags[len(lags)*99/100], "lag-p99-ms")
	b.ReportMetric(lags[len(lags)-1], "lag-max-ms")
}

// Restore of the ~1 GB database of BenchmarkReplicaRestore from S3
// (versitygw on loopback), against a plain parallel download of the same
// objects, the page cache dropped before each.
func BenchmarkReplicaRestoreS3(b *testing.B) {
	env := backendtest.Servers(b)
	src := file.New(filepath.Join(benchDir(b), fmt.Sprintf("restore-%d", restoreDBMB()), "replica", "app.db"))
	ctx := context.Background()
	plan, err := replicate.PlanRestore(ctx, src, replicate.Target{})
	if err != nil {
		b.Skipf("run BenchmarkReplicaRestore first, which builds the replica: %v", err)
	}
	createS3Bucket(b, env, "lfuse-bench")
	dst, err := s3.New(ctx, s3.Config{Bucket: "lfuse-bench", Path: fmt.Sprintf("restore-%d/app.db", restoreDBMB()), Endpoint: env["LFUSE_TEST_S3_ENDPOINT"],
		AccessKeyID: env["LFUSE_TEST_S3_ACCESS_KEY_ID"], SecretAccessKey: env["LFUSE_TEST_S3_SECRET_ACCESS_KEY"]})
	if err != nil {
		b.Fatal(err)
	}
	// Copy the files the latest restore needs, once. If the replica was
	// built again since (same names, other content), the copy would mix
	// the two builds: clear it and copy again.
	var metas []backends.FileMeta
	stale := false
	for _, f := range plan.Files {
		meta, err := src.FileMeta(ctx, f.Level, f.MinTXID, f.MaxTXID)
		if err != nil {
			b.Fatal(err)
		}
		metas = append(metas, meta)
		if got, err := dst.FileMeta(ctx, f.Level, f.MinTXID, f.MaxTXID); err == nil && !got.Timestamp.Equal(meta.Timestamp) {
			stale = true
		}
	}
	if stale {
		for level := 0; level <= replicate.SnapshotLevel; level++ {
			old, err := dst.LTXFiles(ctx, level)
			if err == nil && len(old) > 0 {
				err = dst.DeleteLTXFiles(ctx, old)
			}
			if err != nil {
				b.Fatal(err)
			}
		}
	}
	for i, f := range plan.Files {
		if _, err := dst.FileMeta(ctx, f.Level, f.MinTXID, f.MaxTXID); err == nil {
			continue
		}
		meta := metas[i]
		rc, err := src.OpenLTXFile(ctx, f.Level, f.MinTXID, f.MaxTXID, 0, 0)
		if err != nil {
			b.Fatal(err)
		}
		err = dst.WriteLTXFile(ctx, f.Level, f.MinTXID, f.MaxTXID, rc, f.Size, meta)
		rc.Close()
		if err != nil {
			b.Fatal(err)
		}
	}
	cli := awss3.New(awss3.Options{Region: "us-east-1", BaseEndpoint: aws.String(env["LFUSE_TEST_S3_ENDPOINT"]), UsePathStyle: true,
		Credentials: aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
			return aws.Credentials{AccessKeyID: env["LFUSE_TEST_S3_ACCESS_KEY_ID"], SecretAccessKey: env["LFUSE_TEST_S3_SECRET_ACCESS_KEY"]}, nil
		})})
	dir := b.TempDir()
	out := filepath.Join(dir, "out.db")
	url := fmt.Sprintf("s3://lfuse-bench/restore-%d/app.db?endpoint=%s", restoreDBMB(), env["LFUSE_TEST_S3_ENDPOINT"])
	keys := []string{"LFUSE_ACCESS_KEY_ID=" + env["LFUSE_TEST_S3_ACCESS_KEY_ID"], "LFUSE_SECRET_ACCESS_KEY=" + env["LFUSE_TEST_S3_SECRET_ACCESS_KEY"]}
	var restoreSecs, downloadSecs []float64
	for i := 0; i < b.N; i++ {
		os.Remove(out)
		dropCaches(b)
		start := time.Now()
		if code, log := runLfuseEnv(b, keys, "restore", "-o", out, url); code != 0 {
			b.Fatalf("restore exited %d:\n%s", code, log)
		}
		restoreSecs = append(restoreSecs, time.Since(start).Seconds())
		os.Remove(out)

		dropCaches(b)
		start = time.Now()
		var wg sync.WaitGroup
		errs := make(chan error, len(plan.Files))
		for j, f := range plan.Files {
			wg.Add(1)
			go func() {
				defer wg.Done()
				key := fmt.Sprintf("restore-%d/app.db/%04x/%s", restoreDBMB(), f.Level, ltx.FormatFilename(f.MinTXID, f.MaxTXID))
				o, err := cli.GetObject(ctx, &awss3.GetObjectInput{Bucket: aws.String("lfuse-bench"), Key: aws.String(key)})
				if err != nil {
					errs <- err
					return
				}
				defer o.Body.Close()
				w, err := os.Create(filepath.Join(dir, strconv.Itoa(j)))
				if err != nil {
					errs <- err
					return
				}
				defer w.Close()
				if _, err := w.ReadFrom(o.Body); err != nil {
					errs <- err
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			b.Fatal(err)
		}
		downloadSecs = append(downloadSecs, time.Since(start).Seconds())
		for j := range plan.Files {
			os.Remove(filepath.Join(dir, strconv.Itoa(j)))
		}
	}
	mb := float64(plan.Bytes) / (1 << 20)
	b.ReportMetric(mb, "objects-MB")
	b.ReportMetric(median(restoreSecs), "restore-s")
	b.ReportMetric(median(downloadSecs), "download-s")
	b.ReportMetric(median(restoreSecs)/median(downloadSecs), "x-download")
	b.ReportMetric(mb/median(restoreSecs), "restore-MB/s")
}
