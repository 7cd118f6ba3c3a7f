package integration

import (
	"bufio"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	mrand "math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends/backendtest"
)

// TestTorture runs randomized trials of a real workload through a real
// mount with real replicas, injects faults at random moments and checks,
// after each trial, that nothing the application saw committed was lost and
// that no restore is ever wrong. TORTURE_TRIALS trials from TORTURE_SEED
// (default 1); trial i uses seed SEED+i, and the same seed replays the same
// workload plan and fault schedule (TORTURE_FAULTS=a,b sets the faults).
// Without TORTURE_TRIALS it runs ciPlan, where every fault appears. A failed
// trial keeps its directory (TORTURE_DIR, default /tmp/lfuse-torture).
// TORTURE_REPORT names a file for the summary table. `make torture` runs it.
func TestTorture(t *testing.T) {
	requireFUSE(t)
	servers := backendtest.Servers(t)
	trials := envInt("TORTURE_TRIALS", len(ciPlan))
	planned := os.Getenv("TORTURE_TRIALS") == "" && os.Getenv("TORTURE_FAULTS") == ""
	seed := int64(envInt("TORTURE_SEED", 1))
	parallel := envInt("TORTURE_PARALLEL", 2)
	base := os.Getenv("TORTURE_DIR")
	if base == "" {
		base = "/tmp/lfuse-torture"
	}
	results := make([]trialResult, trials)
	sem := make(chan struct{}, parallel)
	start := time.Now()
	t.Run("trials", func(t *testing.T) {
		for i := 0; i < trials; i++ {
			i, s := i, seed+int64(i)
			t.Run(fmt.Sprintf("seed=%d", s), func(t *testing.T) {
				t.Parallel()
				sem <- struct{}{}
				defer func() { <-sem }()
				var faults []string
				if f := os.Getenv("TORTURE_FAULTS"); f != "" {
					faults = strings.Split(f, ",") // to work on one kind
				} else if planned {
					faults = ciPlan[i]
				}
				results[i] = trialResult{seed: s, faults: faults, failed: true} // if setup fails
				tr := newTrial(t, s, base, servers, faults)
				defer func() { results[i] = tr.result() }()
				tr.run()
			})
		}
	})
	report := tortureReport(results, time.Since(start), seed, parallel)
	t.Log("\n" + report)
	if path := os.Getenv("TORTURE_REPORT"); path != "" {
		if err := os.WriteFile(path, []byte(report), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// The faults a trial draws from. corrupt-object is applied after the
// trial's other checks, to the replica those checks have just validated.
var tortureFaults = []string{
	"kill-lfuse",         // kill -9 of lfuse under load, restart
	"kill-app",           // kill -9 of a writer, mostly mid-transaction
	"sigterm-lfuse",      // SIGTERM of lfuse under load, restart
	"s3-down",            // the S3 server stopped for a while
	"replica-unwritable", // the file replica read-only for a while
	"data-full",          // the backing directory's filesystem full for a while
	"state-full",         // lfuse's state directory's filesystem full for a while
	"rollback",           // lfuse restarted on an older copy of the databases
	"corrupt-object",     // a replica object truncated or with a flipped byte
}

var tortureDBs = []string{"app.db", "sub/dir/nested.db", "other.db"}

type trialResult struct {
	seed   int64
	faults []string
	dur    time.Duration
	failed bool
	counts tortureCounts // summed over the trial's lfuse runs
}

// freeze is a moment when every application process was stopped: the
// content of each database then, and the time a restore must give it for.
type freeze struct {
	readAt  time.Time // when the digests were read
	at      time.Time
	digests map[string]string
	copyDir string // the backing files then, if the trial rolls back
}

type trial struct {
	t       *testing.T
	seed    int64
	rng     *mrand.Rand
	start   time.Time
	root    string
	data    string
	state   string
	mnt     string
	repl    string
	records string
	cfg     string
	// restoreCfgs maps a replica's name to a config that restores from it
	// alone.
	restoreCfgs map[string]string
	dbs         []string
	faults      []string
	secret      string
	s3          *s3Server

	lf      *lfuse
	runs    []*lfuse
	workers []*tortureProc
	nextID  int
	epoch   int
	freezes []freeze
	final   map[string]string // each database's content at the end
	// tolerant is set while a fault lets the application see errors.
	tolerant bool
	kills    int
	// counted is what each lfuse run last reported of its holds: lfuse
	// counts from zero at each start.
	counted map[*lfuse]tortureCounts
}

// tortureCounts is what lfuse status reports of the operations lfuse held
// back: checkpoints, WAL restarts and unlinks, the seconds they waited in
// all, and the checkpoints that copied uncaptured frames aside.
type tortureCounts struct {
	holds  int64
	held   float64
	copies int64
}

func (c *tortureCounts) add(o tortureCounts) {
	c.holds += o.holds
	c.held += o.held
	c.copies += o.copies
}

type tortureProc struct {
	*workerProc
	db       string
	reader   bool
	tolerate bool // it was killed, or died while errors were expected
}

// ciPlan is what make test runs: few trials, every fault in one of them.
var ciPlan = [][]string{
	{"kill-lfuse", "corrupt-object"},
	{"kill-app", "data-full", "rollback"},
	{"sigterm-lfuse", "s3-down"},
	{"replica-unwritable", "state-full"},
}

// newTrial sets up a trial; faults, if given, replace the drawn ones.
func newTrial(t *testing.T, seed int64, base string, servers map[string]string, faults []string) *trial {
	tr := &trial{t: t, seed: seed, rng: mrand.New(mrand.NewSource(seed)), start: time.Now()}
	tr.root = filepath.Join(base, fmt.Sprintf("seed-%d", seed))
	os.RemoveAll(tr.root)
	tr.data, tr.state = filepath.Join(tr.root, "data"), filepath.Join(tr.root, "state")
	tr.mnt, tr.repl = filepath.Join(tr.root, "mnt"), filepath.Join(tr.root, "replica")
	tr.records = filepath.Join(tr.root, "records")
	for _, d := range []string{tr.data, tr.state, tr.mnt, tr.repl, tr.records} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// Small filesystems of their own, so a fault can fill them.
	t.Cleanup(func() {
		for _, d := range []string{tr.data, tr.state, tr.repl} {
			syscall.Unmount(d, syscall.MNT_DETACH)
		}
		if !t.Failed() {
			os.RemoveAll(tr.root)
		}
	})
	for _, d := range []string{tr.data, tr.state} {
		if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+map[string]string{tr.data: "256m", tr.state: "512m"}[d], "tmpfs", d).CombinedOutput(); err != nil {
			t.Fatalf("mount tmpfs: %v %s", err, out)
		}
	}
	t.Cleanup(func() {
		// After every process of the trial stopped (cleanups run last
		// first), before the filesystems go.
		if t.Failed() {
			tr.keepArtifacts()
		}
	})

	// The plan: 1-3 faults, each kind at most once.
	perm := tr.rng.Perm(len(tortureFaults))
	for _, i := range perm[:1+tr.rng.Intn(3)] {
		tr.faults = append(tr.faults, tortureFaults[i])
	}
	if faults != nil {
		tr.faults = faults
	}
	for _, f := range tr.faults {
		if !slices.Contains(tortureFaults, f) {
			t.Fatalf("unknown fault %q; the faults are %v", f, tortureFaults)
		}
	}
	tr.dbs = tortureDBs[:1+tr.rng.Intn(len(tortureDBs))]
	withS3 := tr.has("s3-down") || tr.rng.Intn(2) == 0

	repl := fmt.Sprintf("[[replicas]]\nurl = %q\nsync-interval = \"100ms\"\nsnapshot-interval = %q\ncompact-intervals = [\"1s\", \"3s\"]\n",
		"file://"+tr.repl, fmt.Sprintf("%ds", 2+tr.rng.Intn(10)))
	tr.restoreCfgs = map[string]string{"file": tr.writeFile("restore-file.toml", repl)}
	cfg := fmt.Sprintf("data-dir = %q\nstate-dir = %q\nmount-dir = %q\nshutdown-timeout = \"60s\"\n[log]\nlevel = \"debug\"\n", tr.data, tr.state, tr.mnt) + repl
	if withS3 {
		var b [16]byte
		rand.Read(b[:])
		tr.secret = "torture-secret-" + hex.EncodeToString(b[:])
		env := map[string]string{
			"LFUSE_TEST_VERSITYGW":            servers["LFUSE_TEST_VERSITYGW"],
			"LFUSE_TEST_S3_ACCESS_KEY_ID":     "torture-key",
			"LFUSE_TEST_S3_SECRET_ACCESS_KEY": tr.secret,
		}
		// The objects stay with the trial's artifacts, for a failed trial.
		s3dir := filepath.Join(tr.root, "s3")
		if err := os.MkdirAll(s3dir, 0o755); err != nil {
			t.Fatal(err)
		}
		tr.s3 = startS3ServerIn(t, env, s3dir)
		env["LFUSE_TEST_S3_ENDPOINT"] = "http://" + tr.s3.addr
		createS3Bucket(t, env, "torture")
		s3 := fmt.Sprintf("[[replicas]]\nurl = \"s3://torture/seed-%d\"\nendpoint = %q\naccess-key-id = \"torture-key\"\nsecret-access-key = %q\nsync-interval = \"100ms\"\ncompact-intervals = [\"1s\", \"3s\"]\n",
			seed, env["LFUSE_TEST_S3_ENDPOINT"], tr.secret)
		tr.restoreCfgs["s3"] = tr.writeFile("restore-s3.toml", s3)
		cfg += s3
	}
	tr.cfg = tr.writeFile("lfuse.toml", cfg)
	return tr
}

func (tr *trial) has(fault string) bool {
	for _, f := range tr.faults {
		if f == fault {
			return true
		}
	}
	return false
}

func (tr *trial) writeFile(name, content string) string {
	path := filepath.Join(tr.root, name)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		tr.t.Fatal(err)
	}
	return path
}

func (tr *trial) fatalf(format string, args ...any) {
	tr.t.Helper()
	tr.t.Fatalf("seed %d (replay: make torture TORTURE_SEED=%d TORTURE_TRIALS=1 TORTURE_FAULTS=%s; artifacts in %s): %s",
		tr.seed, tr.seed, strings.Join(tr.faults, ","), tr.root, fmt.Sprintf(format, args...))
}

func (tr *trial) result() trialResult {
	r := trialResult{seed: tr.seed, faults: tr.faults, dur: time.Since(tr.start), failed: tr.t.Failed()}
	for _, c := range tr.counted {
		r.counts.add(c)
	}
	return r
}

// run is one trial: workload, faults at random moments, then the checks.
func (tr *trial) run() {
	tr.mount()
	for _, db := range tr.dbs {
		os.MkdirAll(filepath.Dir(filepath.Join(tr.mnt, db)), 0o755)
		sqliteCLI(tr.t, filepath.Join(tr.mnt, db), tortureSchema)
		d := tr.digestLive(db, 10*time.Second)
		tr.appendRecord(db, fmt.Sprintf("I 0 0 %s %d\nK 0 0 %d\n", d, time.Now().UnixNano(), time.Now().UnixNano()))
	}
	tr.startWorkers()

	// Three moments to restore to, and the faults, in random order, with
	// the application running in between. The first freeze comes first so
	// a rollback has a copy to go back to.
	var events []string
	for _, f := range tr.faults {
		if f != "corrupt-object" {
			events = append(events, f)
		}
	}
	events = append(events, "freeze", "freeze")
	tr.rng.Shuffle(len(events), func(i, j int) { events[i], events[j] = events[j], events[i] })
	events = append([]string{"freeze"}, events...)
	for _, ev := range events {
		tr.pause(200 + tr.rng.Intn(600))
		tr.checkWorkers()
		tr.t.Logf("seed %d: %s at %.1fs", tr.seed, ev, time.Since(tr.start).Seconds())
		switch ev {
		case "freeze":
			tr.freeze()
		case "kill-lfuse":
			tr.killLfuse()
		case "kill-app":
			tr.killApp()
		case "sigterm-lfuse":
			tr.sigtermLfuse()
		case "s3-down":
			tr.s3Down()
		case "replica-unwritable":
			tr.replicaUnwritable()
		case "data-full":
			tr.diskFull(tr.data, false)
		case "state-full":
			tr.diskFull(tr.state, true)
		case "rollback":
			tr.rollback()
		}
	}
	tr.pause(200 + tr.rng.Intn(400))
	tr.finalChecks()
	if tr.has("corrupt-object") {
		tr.corruptObject()
	}
	tr.checkLogs()
}

func (tr *trial) pause(ms int) { time.Sleep(time.Duration(ms) * time.Millisecond) } // the workload runs meanwhile

// mount starts lfuse on the trial's config and waits until it is ready.
func (tr *trial) mount() {
	tr.t.Helper()
	p := startBin(tr.t, lfusePlainBin, "mount", "-config", tr.cfg)
	p.mnt = tr.mnt
	tr.t.Cleanup(p.cleanup)
	if err := p.log.wait("mount ready", time.Minute, p.done); err != nil {
		tr.fatalf("lfuse did not mount: %v\n%s", err, p.log)
	}
	tr.lf = p
	tr.runs = append(tr.runs, p)
}

func (tr *trial) startWorkers() {
	for _, db := range tr.dbs {
		for i := 0; i < 2; i++ {
			tr.startWorker(db, false)
		}
		tr.startWorker(db, true)
	}
}

func (tr *trial) startWorker(db string, reader bool) {
	tr.nextID++
	name := fmt.Sprintf("w%d", tr.nextID)
	mode := "torture-writer"
	if reader {
		mode = "torture-reader"
	}
	w := startWorker(tr.t, mode, "DB="+filepath.Join(tr.mnt, db), fmt.Sprintf("SEED=%d", tr.seed*1000+int64(tr.nextID)),
		fmt.Sprintf("EPOCH=%d", tr.epoch), "NAME="+name, "RECORD="+tr.recordPath(db))
	tr.workers = append(tr.workers, &tortureProc{workerProc: w, db: db, reader: reader})
}

func (tr *trial) recordPath(db string) string {
	return filepath.Join(tr.records, strings.ReplaceAll(db, "/", "_")+".log")
}

func (tr *trial) appendRecord(db, lines string) {
	f, err := os.OpenFile(tr.recordPath(db), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		tr.t.Fatal(err)
	}
	defer f.Close()
	f.WriteString(lines)
}

// checkWorkers fails the trial if an application process died of an error
// no fault explains, and replaces those that died of one.
func (tr *trial) checkWorkers() {
	tr.t.Helper()
	live := tr.workers[:0]
	var restart []*tortureProc
	for _, w := range tr.workers {
		select {
		case <-w.done:
			if w.exitCode() == 3 {
				tr.fatalf("an application process saw a corrupt database on %s:\n%s", w.db, w.out)
			}
			if !w.tolerate && !tr.tolerant {
				tr.fatalf("application process (%s on %s) failed: %v\n%s", map[bool]string{true: "reader", false: "writer"}[w.reader], w.db, w.err, w.out)
			}
			restart = append(restart, w)
		default:
			live = append(live, w)
		}
	}
	tr.workers = live
	for _, w := range restart {
		tr.startWorker(w.db, w.reader)
	}
}

// stopWorkers ends every application process: gracefully (they finish the
// transaction in hand) or with kill -9.
func (tr *trial) stopWorkers(kill bool) {
	tr.t.Helper()
	for _, w := range tr.workers {
		if kill {
			w.tolerate = true
			w.cmd.Process.Kill()
		} else {
			// A process started a moment ago may not handle the
			// signal yet, and would die of it: two trials in 120
			// failed so after a restart.
			w.out.wait(tortureReady, time.Minute, w.done)
			w.cmd.Process.Signal(syscall.SIGTERM)
		}
	}
	for _, w := range tr.workers {
		if err := w.wait(tr.t, 2*time.Minute); err != nil && !kill && !tr.tolerant {
			tr.fatalf("application process on %s failed: %v\n%s", w.db, err, w.out)
		}
	}
	tr.workers = nil
}

func (tr *trial) signalWorkers(sig syscall.Signal) {
	for _, w := range tr.workers {
		w.cmd.Process.Signal(sig)
	}
}

// digestLive reads a database's content through the mount.
func (tr *trial) digestLive(db string, busy time.Duration) string {
	tr.t.Helper()
	d, err := digestFile(filepath.Join(tr.mnt, db), fmt.Sprintf("_busy_timeout=%d", busy.Milliseconds()))
	if err != nil {
		tr.fatalf("read %s through the mount: %v", db, err)
	}
	return d
}

// digestFile returns the content digest of a database after checking its
// integrity.
func digestFile(path string, params ...string) (string, error) {
	dsn := path + "?" + strings.Join(params, "&")
	conn, err := sql.Open("sqlite3", dsn)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetMaxOpenConns(1)
	ctx := context.Background()
	tx, err := conn.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return "", err
	}
	defer tx.Rollback()
	var res string
	if err := tx.QueryRow("PRAGMA integrity_check").Scan(&res); err != nil {
		return "", err
	}
	if res != "ok" {
		return "", fmt.Errorf("integrity_check: %s", res)
	}
	return contentDigest(ctx, tx)
}

// freeze stops every application process, notes each database's content
// and a moment after lfuse captured the last commit, then lets them go on.
func (tr *trial) freeze() {
	tr.t.Helper()
	for attempt := 1; !tr.freezeOnce(); attempt++ {
		if attempt == 5 {
			tr.fatalf("could not read the databases with the application stopped, 5 times")
		}
		tr.pause(100)
	}
}

// freezeOnce is one try; false if a database could not be read.
func (tr *trial) freezeOnce() bool {
	tr.t.Helper()
	tr.signalWorkers(syscall.SIGSTOP)
	defer tr.signalWorkers(syscall.SIGCONT)
	for _, w := range tr.workers {
		waitStopped(tr.t, w.cmd.Process.Pid)
	}
	f := freeze{digests: map[string]string{}, readAt: time.Now()}
	for _, db := range tr.dbs {
		d, err := digestFile(filepath.Join(tr.mnt, db), "_busy_timeout=2000")
		if err != nil {
			// A process stopped in the middle of restarting the WAL can
			// keep readers out: take the next moment instead.
			tr.t.Logf("seed %d: freeze retried: %v", tr.seed, err)
			return false
		}
		f.digests[db] = d
	}
	// Commits are captured (and timestamped) asynchronously, and a restore
	// can stop only at the end of a replica file. So a moment counts once
	// lfuse's captured position has stood still for 100 ms and every
	// replica holds it: the file that ends there is dated before the
	// moment, and the next one holds only later commits.
	deadline := time.Now().Add(2 * time.Minute)
	var prev string
	var still time.Time
	for {
		st := tr.status()
		pos := fmt.Sprint(st.positions())
		if pos != prev {
			prev, still = pos, time.Now()
		}
		if time.Since(still) >= 100*time.Millisecond && st.caughtUp() {
			break
		}
		if time.Now().After(deadline) {
			tr.fatalf("the replicas did not catch up with a stopped application in 2 minutes: %+v", st)
		}
		time.Sleep(20 * time.Millisecond) // lfuse's position has no event to wait on
	}
	// LTX files date commits to the millisecond, and a restore target
	// counts at that precision: a commit later in the moment's millisecond
	// would count as at the moment. Let that millisecond pass first.
	f.at = time.Now().Truncate(time.Millisecond)
	time.Sleep(2 * time.Millisecond)
	if tr.has("rollback") {
		f.copyDir = filepath.Join(tr.root, fmt.Sprintf("copy-%d", len(tr.freezes)))
		for _, db := range tr.dbs {
			for _, suffix := range []string{"", "-wal"} {
				copyIfExists(tr.t, filepath.Join(tr.data, db+suffix), filepath.Join(f.copyDir, db+suffix))
			}
		}
	}
	tr.freezes = append(tr.freezes, f)
	return true
}

// waitStopped waits until every thread of a process has taken SIGSTOP:
// kill returns before a thread busy on another CPU stops, and a commit
// that lands after the freeze was read would make the moment wrong. The
// kernel offers no event for it; /proc shows the state.
func waitStopped(t testing.TB, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
		stopped := true
		for _, task := range tasks {
			b, err := os.ReadFile(task)
			if err != nil {
				continue // the thread or process is gone
			}
			i := strings.LastIndexByte(string(b), ')')
			if i < 0 || i+2 >= len(b) {
				continue
			}
			switch b[i+2] {
			case 'T', 't', 'Z', 'X':
			default:
				stopped = false
			}
		}
		if stopped {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d did not stop on SIGSTOP", pid)
		}
		time.Sleep(time.Millisecond)
	}
}

func copyIfExists(t testing.TB, from, to string) {
	t.Helper()
	src, err := os.Open(from)
	if os.IsNotExist(err) {
		return
	} else if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	os.MkdirAll(filepath.Dir(to), 0o755)
	dst, err := os.Create(to)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
}

// tortureStatus is lfuse status -json.
type tortureStatus struct {
	Databases []struct {
		Path     string  `json:"path"`
		TXID     string  `json:"txid"`
		Holds    int64   `json:"holds"`
		Held     float64 `json:"held_seconds"`
		Copies   int64   `json:"wal_copies"`
		Replicas []struct {
			Type string `json:"type"`
			TXID string `json:"txid"`
		} `json:"replicas"`
	} `json:"databases"`
}

func (s tortureStatus) positions() map[string]string {
	m := map[string]string{}
	for _, d := range s.Databases {
		m[d.Path] = d.TXID
	}
	return m
}

// caughtUp reports whether every replica holds everything captured.
func (s tortureStatus) caughtUp() bool {
	for _, d := range s.Databases {
		for _, r := range d.Replicas {
			if r.TXID != d.TXID {
				return false
			}
		}
	}
	return true
}

// replicated returns each database's position on each replica type.
func (s tortureStatus) replicated() map[string]uint64 {
	m := map[string]uint64{}
	for _, d := range s.Databases {
		for _, r := range d.Replicas {
			m[r.Type+":"+d.Path] = parseTXID(r.TXID)
		}
	}
	return m
}

func parseTXID(s string) uint64 {
	v, _ := strconv.ParseUint(s, 16, 64)
	return v
}

func (tr *trial) status() tortureStatus {
	tr.t.Helper()
	code, out := runLfuse(tr.t, "status", "-state", tr.state, "-json")
	var st tortureStatus
	if code != 0 || json.Unmarshal([]byte(out), &st) != nil {
		tr.fatalf("lfuse status: exit %d: %s", code, out)
	}
	var c tortureCounts
	for _, d := range st.Databases {
		c.add(tortureCounts{d.Holds, d.Held, d.Copies})
	}
	if tr.counted == nil {
		tr.counted = map[*lfuse]tortureCounts{}
	}
	tr.counted[tr.lf] = c
	return st
}

// killLfuse: kill -9 of lfuse under load. A restore from each replica must
// then give a state the application committed, at or after the position
// lfuse last reported; a new lfuse takes over the dead mount.
func (tr *trial) killLfuse() {
	tr.t.Helper()
	pos := tr.status().replicated()
	tr.lf.kill()
	tr.kills++
	tr.stopWorkers(true)
	tr.checkRestoreAfter(pos)
	tr.mount()
	if tr.lf.log.count("detached the dead mount") != 1 {
		tr.fatalf("the restarted lfuse did not report the dead mount it replaced:\n%s", tr.lf.log)
	}
	tr.startWorkers()
}

// sigtermLfuse: SIGTERM while the application writes. lfuse detaches the
// busy mount and ships every commit once the application has closed its
// files; the replicas then hold exactly the local state.
func (tr *trial) sigtermLfuse() {
	tr.t.Helper()
	tr.status() // its counters, before it stops
	tr.lf.cmd.Process.Signal(syscall.SIGTERM)
	if err := tr.lf.log.wait("stopping", time.Minute, tr.lf.done); err != nil {
		tr.fatalf("lfuse did not start stopping: %v", err)
	}
	tr.pause(tr.rng.Intn(300))
	tr.stopWorkers(false)
	select {
	case <-tr.lf.done:
	case <-time.After(2 * time.Minute):
		tr.fatalf("lfuse did not exit after SIGTERM once the application stopped:\n%s", tr.lf.log)
	}
	if tr.lf.err != nil {
		tr.fatalf("lfuse exited with %v after SIGTERM:\n%s", tr.lf.err, tr.lf.log)
	}
	if ents, _ := os.ReadDir(tr.mnt); len(ents) > 0 {
		tr.fatalf("files appeared under the mount point after lfuse stopped: %v", ents)
	}
	restored := tr.restoreAll("", "sigterm")
	tr.mount()
	for _, db := range tr.dbs {
		live := tr.digestLive(db, 10*time.Second)
		for name, got := range restored {
			if got[db] != live {
				tr.fatalf("after SIGTERM, %s restored from the %s replica is %s, the local database is %s", db, name, got[db], live)
			}
		}
	}
	tr.startWorkers()
}

func (tr *trial) killApp() {
	tr.t.Helper()
	var writers []*tortureProc
	for _, w := range tr.workers {
		if !w.reader {
			writers = append(writers, w)
		}
	}
	w := writers[tr.rng.Intn(len(writers))]
	w.tolerate = true
	w.cmd.Process.Kill()
	<-w.done
	tr.checkWorkers()
}

func (tr *trial) outageMs() time.Duration {
	return time.Duration(500+tr.rng.Intn(1500)) * time.Millisecond
}

func (tr *trial) s3Down() {
	tr.t.Helper()
	failed := tr.lf.log.count("replica sync failed")
	tr.s3.stop()
	// The S3 client retries for a few seconds before a sync fails, so a
	// short outage may go unreported (only the lag shows it).
	time.Sleep(time.Duration(1000+tr.rng.Intn(4000)) * time.Millisecond)
	tr.s3.start()
	tr.awaitRecovery(failed, "replica sync failed", "replica recovered", false)
}

func (tr *trial) replicaUnwritable() {
	tr.t.Helper()
	failed := tr.lf.log.count("replica sync failed")
	if out, err := exec.Command("mount", "--bind", tr.repl, tr.repl).CombinedOutput(); err != nil {
		tr.t.Fatalf("bind mount the replica: %v %s", err, out)
	}
	// A remount to read-only is refused while lfuse has a file open for
	// writing on it; there is no event for "none open", so try again.
	for i := 0; ; i++ {
		out, err := exec.Command("mount", "-o", "remount,bind,ro", tr.repl).CombinedOutput()
		if err == nil {
			break
		}
		if i == 1000 {
			tr.t.Fatalf("remount the replica read-only: %v %s", err, out)
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(tr.outageMs())
	// A replica busy with a long step (a snapshot built after a restart)
	// may not write during a short outage: keep it read-only until it has
	// tried, so the report can be checked.
	if err := tr.lf.log.waitCount("replica sync failed", failed+1, time.Minute, tr.lf.done); err != nil {
		tr.fatalf("the read-only replica was not reported within a minute: %v\n%s", err, tr.lf.log)
	}
	if err := syscall.Unmount(tr.repl, syscall.MNT_DETACH); err != nil {
		tr.t.Fatalf("unmount read-only replica: %v", err)
	}
	tr.awaitRecovery(failed, "replica sync failed", "replica recovered", true)
}

// awaitRecovery checks that an outage was reported (each database once
// per replica at most) and waits for each report's "recovered" line.
//
// A bound rather than exactly one: while a filesystem is "full", lfuse's
// own clean-up can free a little space, so capture may recover and fail
// again within one fault.
func (tr *trial) awaitRecovery(before int, failLine, okLine string, mustReport bool) {
	tr.t.Helper()
	failed := tr.lf.log.count(failLine) - before
	limit := 3 * len(tr.dbs) * len(tr.restoreCfgs)
	if mustReport && failed < 1 || failed > limit {
		tr.fatalf("an outage was reported %d times, want 1 to %d:\n%s", failed, limit, tr.lf.log)
	}
	if err := tr.lf.log.waitCount(okLine, tr.lf.log.count(failLine), 2*time.Minute, tr.lf.done); err != nil {
		tr.fatalf("not one %q for each %q: %v\n%s", okLine, failLine, err, tr.lf.log)
	}
}

// diskFull fills a filesystem for a while. A full backing directory is the
// application's to see (SQLITE_FULL); a full state directory must not be.
func (tr *trial) diskFull(dir string, state bool) {
	tr.t.Helper()
	failed := tr.lf.log.count("capture failed; will retry")
	syncFailed := tr.lf.log.count("replica sync failed")
	filler := filepath.Join(dir, "filler")
	f, err := os.Create(filler)
	if err != nil {
		tr.t.Fatal(err)
	}
	if !state {
		tr.tolerant = true
	}
	// Keep it full: lfuse and SQLite free space now and then (a deleted
	// upload file, a truncated WAL), which the filler takes back.
	var off int64
	fill := func() {
		for chunk := int64(1 << 20); chunk >= 4096; chunk /= 16 {
			for syscall.Fallocate(int(f.Fd()), 0, off, chunk) == nil {
				off += chunk
			}
		}
	}
	// lfuse may free space between a fill and the check (an upload file
	// removed after it failed): fill again until the check sees it full.
	var free int64
	for range 50 {
		fill()
		var st syscall.Statfs_t
		if err := syscall.Statfs(dir, &st); err != nil {
			tr.t.Fatal(err)
		}
		if free = int64(st.Bavail) * st.Bsize; free <= 64<<10 {
			break
		}
	}
	if free > 64<<10 {
		tr.t.Fatalf("%s still has %d bytes free after filling it", dir, free)
	}
	end := time.Now().Add(tr.outageMs())
	for time.Now().Before(end) {
		time.Sleep(20 * time.Millisecond) // the outage itself
		fill()
	}
	f.Close()
	os.Remove(filler)
	if state {
		// Every commit goes to the local log, and the application commits
		// all the time: capture must have failed, and must recover.
		tr.awaitRecovery(failed, "capture failed; will retry", "capture recovered", true)
		// Files for the replicas are built in the state directory too.
		tr.awaitRecovery(syncFailed, "replica sync failed", "replica recovered", false)
	} else {
		// Let the writers get going again before errors count.
		tr.pause(100)
		tr.checkWorkers()
		tr.tolerant = false
	}
}

// rollback stops lfuse and the application, puts back the databases as
// they were at an earlier freeze, and starts again: lfuse must notice it is
// behind its replicas and start a new history above theirs.
func (tr *trial) rollback() {
	tr.t.Helper()
	var f *freeze
	for i := len(tr.freezes) - 1; i >= 0; i-- {
		if tr.freezes[i].copyDir != "" {
			f = &tr.freezes[i]
			break
		}
	}
	if f == nil {
		return
	}
	tr.stopWorkers(false)
	tr.status()
	tr.lf.stop()
	tr.epoch++
	for _, db := range tr.dbs {
		for _, suffix := range []string{"", "-wal", "-shm"} {
			os.Remove(filepath.Join(tr.data, db+suffix))
		}
		for _, suffix := range []string{"", "-wal"} {
			copyIfExists(tr.t, filepath.Join(f.copyDir, db+suffix), filepath.Join(tr.data, db+suffix))
		}
	}
	tr.mount()
	// Each database put back is noticed: either it does not match the
	// local log (a new snapshot follows), or its copied WAL, taken for a
	// newer generation, carries it to a state the log can prove page for
	// page ("verified"). Both are fine; the restores below check content.
	for _, db := range tr.dbs {
		tag := "db=" + db + " "
		if tr.lf.log.count("database needs a new snapshot\" "+tag)+tr.lf.log.count("verified database against the local log\" "+tag) != 1 {
			tr.fatalf("%s, put back from a copy, was not reported once:\n%s", db, tr.lf.log)
		}
	}
	for _, db := range tr.dbs {
		d := tr.digestLive(db, 10*time.Second)
		// The copy's WAL may end with a commit its writer had written but
		// not yet published when it was stopped: SQLite's recovery of the
		// copy keeps it.
		if d != f.digests[db] && !tr.inFlightAt(db, *f, d) {
			tr.fatalf("%s put back from a copy reads %s through the mount, the copy was %s", db, d, f.digests[db])
		}
		var seq int64
		conn := openDB(tr.t, filepath.Join(tr.mnt, db))
		if err := conn.QueryRow("SELECT max(seq) FROM commits").Scan(&seq); err != nil {
			tr.fatalf("read %s: %v", db, err)
		}
		conn.Close()
		now := time.Now().UnixNano()
		tr.appendRecord(db, fmt.Sprintf("I %d %d %s %d\nK %d %d %d\n", tr.epoch, seq, d, now, tr.epoch, seq, now))
	}
	tr.startWorkers()
}

// inFlightAt reports whether got is the commit right after a moment's
// state, begun before the moment was read. A writer stopped between
// writing its commit frame and publishing it in the WAL index leaves a
// commit that readers do not see yet but that SQLite's own recovery would
// keep after a crash at that instant; lfuse counts it, rightly.
func (tr *trial) inFlightAt(db string, f freeze, got string) bool {
	r := tr.readRecords(db)
	for _, was := range r.intents[f.digests[db]] {
		for _, next := range r.intents[got] {
			if next.key[0] == was.key[0] && next.key[1] == was.key[1]+1 && next.at.Before(f.readAt) {
				return true
			}
		}
	}
	return false
}

// intent is one attempt to commit a digest: its (epoch, seq) and the time
// its COMMIT began.
type intent struct {
	key [2]int64
	at  time.Time
}

// records reads what the application recorded for a database: the digests
// each (epoch, seq) may have, the newest acknowledged seq of each epoch,
// and every digest ever committed or attempted.
type records struct {
	digests map[[2]int64][]string
	acked   map[int64]int64
	// committed holds, per epoch, every digest a commit may have left
	// (acknowledged or in flight when its writer died), not the failed.
	committed map[int64]map[string]bool
	// lost names an acknowledged commit whose seq a later commit reused:
	// it was gone from the database when that one began.
	lost string
	// intents gives every attempt to commit each digest. One digest can
	// have several: after a rollback the application redoes the same seqs
	// with the same content in a new epoch (seed 100088).
	intents map[string][]intent
}

func (tr *trial) readRecords(db string) records {
	r := records{digests: map[[2]int64][]string{}, acked: map[int64]int64{}, committed: map[int64]map[string]bool{},
		intents: map[string][]intent{}}
	ackedSeqs := map[[2]int64]bool{}
	f, err := os.Open(tr.recordPath(db))
	if err != nil {
		tr.t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 3 {
			continue // a line cut short by kill -9
		}
		epoch, _ := strconv.ParseInt(fs[1], 10, 64)
		seq, _ := strconv.ParseInt(fs[2], 10, 64)
		k := [2]int64{epoch, seq}
		switch fs[0] {
		case "I":
			if len(fs) == 5 {
				if ackedSeqs[k] && r.lost == "" {
					r.lost = fmt.Sprintf("epoch %d seq %d", epoch, seq)
				}
				r.digests[k] = append(r.digests[k], fs[3])
				ns, _ := strconv.ParseInt(fs[4], 10, 64)
				r.intents[fs[3]] = append(r.intents[fs[3]], intent{k, time.Unix(0, ns)})
			}
		case "F":
			// The intent just before, from the same writer, failed.
			if n := len(r.digests[k]); n > 0 {
				r.digests[k] = r.digests[k][:n-1]
			}
		case "K":
			ackedSeqs[k] = true
			if seq > r.acked[epoch] {
				r.acked[epoch] = seq
			}
		}
	}
	for k, ds := range r.digests {
		if r.committed[k[0]] == nil {
			r.committed[k[0]] = map[string]bool{}
		}
		for _, d := range ds {
			r.committed[k[0]][d] = true
		}
	}
	return r
}

// finalChecks stops the application, checks each local database against
// the records, stops lfuse, and restores from every replica: the latest
// state and each frozen moment.
func (tr *trial) finalChecks() {
	tr.t.Helper()
	tr.stopWorkers(false)
	final := map[string]string{}
	for _, db := range tr.dbs {
		live := tr.digestLive(db, 10*time.Second)
		var seq int64
		conn := openDB(tr.t, filepath.Join(tr.mnt, db))
		if err := conn.QueryRow("SELECT max(seq) FROM commits").Scan(&seq); err != nil {
			tr.fatalf("read %s: %v", db, err)
		}
		conn.Close()
		rec := tr.readRecords(db)
		if rec.lost != "" {
			tr.fatalf("%s lost an acknowledged commit (%s): a later commit took its place", db, rec.lost)
		}
		if acked := rec.acked[int64(tr.epoch)]; seq < acked {
			tr.fatalf("%s lost acknowledged commits: it ends at seq %d, the application saw seq %d commit", db, seq, acked)
		}
		if !contains(rec.digests[[2]int64{int64(tr.epoch), seq}], live) {
			tr.fatalf("%s at seq %d has content %s, which no transaction with that seq committed (recorded: %v)",
				db, seq, live, rec.digests[[2]int64{int64(tr.epoch), seq}])
		}
		final[db] = live
	}
	tr.final = final
	tr.status()
	tr.lf.stop()
	for name, got := range tr.restoreAll("", "final") {
		for _, db := range tr.dbs {
			if got[db] != final[db] {
				tr.fatalf("%s restored (latest) from the %s replica is %s, the local database is %s", db, name, got[db], final[db])
			}
		}
	}
	for i, f := range tr.freezes {
		for name, got := range tr.restoreAll(f.at.Format(time.RFC3339Nano), fmt.Sprintf("pit-%d", i)) {
			for _, db := range tr.dbs {
				if got[db] != f.digests[db] && !tr.inFlightAt(db, f, got[db]) {
					tr.fatalf("%s restored to %s (moment %d, read at %s) from the %s replica is %s, it was %s then",
						db, f.at.Format(time.RFC3339Nano), i, f.readAt.Format(time.RFC3339Nano), name, got[db], f.digests[db])
				}
			}
		}
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

var restoredLine = regexp.MustCompile(`msg=restored (?:db=\S+ )?path=(\S+) txid=([0-9a-f]+)`)

// restoreAll restores every database from each replica (latest, or at a
// time) into a fresh directory and returns the content digests by replica.
func (tr *trial) restoreAll(ts, label string) map[string]map[string]string {
	tr.t.Helper()
	out := map[string]map[string]string{}
	for name, cfg := range tr.restoreCfgs {
		got, _, log, err := tr.restore(name, cfg, ts, label)
		if err != nil {
			tr.fatalf("restore %s from the %s replica: %v\n%s", label, name, err, log)
		}
		out[name] = got
	}
	return out
}

// restore runs lfuse restore -config and returns each database's digest
// and restored TXID, the output, and an error if it failed.
func (tr *trial) restore(name, cfg, ts, label string) (map[string]string, map[string]uint64, string, error) {
	dir := filepath.Join(tr.root, "restored", label+"-"+name)
	os.RemoveAll(dir)
	args := []string{"restore", "-config", cfg, "-data", dir}
	if ts != "" {
		args = append(args, "-timestamp", ts)
	}
	code, log := runLfuse(tr.t, args...)
	tr.appendLog("restore-"+label+"-"+name, log)
	if code != 0 {
		return nil, nil, log, fmt.Errorf("exit %d", code)
	}
	digests, txids := map[string]string{}, map[string]uint64{}
	for _, m := range restoredLine.FindAllStringSubmatch(log, -1) {
		rel, _ := filepath.Rel(dir, m[1])
		txids[rel] = parseTXID(m[2])
	}
	for _, db := range tr.dbs {
		if _, err := os.Stat(filepath.Join(dir, db)); err != nil {
			return nil, nil, log, fmt.Errorf("%s was not restored: %w", db, err)
		}
		d, err := digestFile(filepath.Join(dir, db))
		if err != nil {
			return nil, nil, log, fmt.Errorf("%s: %w", db, err)
		}
		digests[db] = d
	}
	os.RemoveAll(dir)
	return digests, txids, log, nil
}

func (tr *trial) appendLog(name, text string) {
	f, err := os.OpenFile(filepath.Join(tr.root, "restore.log"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "== %s\n%s\n", name, text)
}

// checkRestoreAfter: with lfuse dead, each replica's latest state must be
// one the application committed, at or after the reported position.
func (tr *trial) checkRestoreAfter(pos map[string]uint64) {
	tr.t.Helper()
	for name, cfg := range tr.restoreCfgs {
		got, txids, log, err := tr.restore(name, cfg, "", fmt.Sprintf("kill-%d", tr.kills))
		if err != nil {
			tr.fatalf("restore from the %s replica after kill -9: %v\n%s", name, err, log)
		}
		for _, db := range tr.dbs {
			if !tr.readRecords(db).committed[int64(tr.epoch)][got[db]] {
				tr.fatalf("%s restored from the %s replica after kill -9 has content %s, which the application never committed", db, name, got[db])
			}
			if p := pos[name+":"+db]; txids[db] < p {
				tr.fatalf("%s restored from the %s replica after kill -9 is at TXID %x, behind the %x lfuse reported replicated", db, name, txids[db], p)
			}
		}
	}
}

// corruptObject damages one replica object and restores again, latest and
// at every frozen moment: each must give the right state or fail naming
// the object.
func (tr *trial) corruptObject() {
	tr.t.Helper()
	var files []string
	filepath.Walk(tr.repl, func(path string, info os.FileInfo, err error) error {
		if err == nil && info.Mode().IsRegular() && strings.HasSuffix(path, ".ltx") {
			files = append(files, path)
		}
		return nil
	})
	sort.Strings(files)
	if len(files) == 0 {
		tr.fatalf("the file replica holds no LTX file")
	}
	victim := files[tr.rng.Intn(len(files))]
	b, err := os.ReadFile(victim)
	if err != nil {
		tr.t.Fatal(err)
	}
	how := "truncated"
	if tr.rng.Intn(2) == 0 {
		b = b[:tr.rng.Intn(len(b))]
	} else {
		i := tr.rng.Intn(len(b))
		b[i] ^= byte(1 + tr.rng.Intn(255))
		how = fmt.Sprintf("byte %d flipped", i)
	}
	fi, err := os.Stat(victim)
	if err != nil {
		tr.t.Fatal(err)
	}
	// Damage the bytes only: a file replica's times are its commit times,
	// and rot does not change them.
	if err := os.WriteFile(victim, b, 0o644); err != nil {
		tr.t.Fatal(err)
	}
	if err := os.Chtimes(victim, fi.ModTime(), fi.ModTime()); err != nil {
		tr.t.Fatal(err)
	}
	tr.t.Logf("seed %d: %s: %s", tr.seed, filepath.Base(victim), how)
	// The latest state, then every frozen moment (where, as in the
	// point-in-time checks, the commit in flight at the moment may count).
	type target struct {
		ts      string
		digests map[string]string
		moment  *freeze
	}
	want := []target{{"", tr.final, nil}}
	for i := range tr.freezes {
		f := &tr.freezes[i]
		want = append(want, target{f.at.Format(time.RFC3339Nano), f.digests, f})
	}
	for i, w := range want {
		got, _, log, err := tr.restore("file", tr.restoreCfgs["file"], w.ts, fmt.Sprintf("corrupt-%d", i))
		if err != nil {
			if !strings.Contains(log, filepath.Base(victim)) {
				tr.fatalf("restore to %s with %s %s failed without naming it: %v\n%s", w.ts, victim, how, err, log)
			}
			continue
		}
		for _, db := range tr.dbs {
			if got[db] != w.digests[db] && (w.moment == nil || !tr.inFlightAt(db, *w.moment, got[db])) {
				tr.fatalf("restore to %s with %s %s gave a wrong %s: %s, want %s", w.ts, victim, how, db, got[db], w.digests[db])
			}
		}
	}
}

// checkLogs: no secret of the trial in any output of lfuse, and no
// warning that does not belong to a fault.
func (tr *trial) checkLogs() {
	tr.t.Helper()
	texts := []string{}
	for _, p := range tr.runs {
		texts = append(texts, p.log.String())
		// Every database here is in WAL mode from its first table.
		if n := p.log.count("rollback journal"); n > 0 {
			tr.fatalf("lfuse warned of a rollback journal:\n%s", p.log)
		}
	}
	if tr.secret == "" {
		return
	}
	if b, err := os.ReadFile(filepath.Join(tr.root, "restore.log")); err == nil {
		texts = append(texts, string(b))
	}
	for _, s := range texts {
		if strings.Contains(s, tr.secret) {
			tr.fatalf("a log of lfuse holds the S3 secret")
		}
	}
}

// keepArtifacts saves what a failed trial leaves: every lfuse log, the
// application's output, and the contents of the small filesystems.
func (tr *trial) keepArtifacts() {
	for i, p := range tr.runs {
		os.WriteFile(filepath.Join(tr.root, fmt.Sprintf("lfuse-%d.log", i)), []byte(p.log.String()), 0o644)
	}
	for _, pair := range [][2]string{{tr.data, "data.saved"}, {tr.state, "state.saved"}} {
		os.Remove(filepath.Join(pair[0], "filler"))
		exec.Command("cp", "-a", pair[0], filepath.Join(tr.root, pair[1])).Run()
	}
	tr.t.Logf("seed %d failed: artifacts kept in %s; replay with make torture TORTURE_SEED=%d TORTURE_TRIALS=1 TORTURE_FAULTS=%s",
		tr.seed, tr.root, tr.seed, strings.Join(tr.faults, ","))
}

// tortureReport is the summary table docs/TORTURE.md carries.
func tortureReport(results []trialResult, dur time.Duration, seed int64, parallel int) string {
	byFault := map[string][2]int{}
	failed := 0
	var counts tortureCounts
	withCopies := 0
	var failedSeeds []string
	var total time.Duration
	for _, r := range results {
		if r.seed == 0 {
			continue
		}
		total += r.dur
		counts.add(r.counts)
		if r.counts.copies > 0 {
			withCopies++
		}
		if r.failed {
			failed++
			failedSeeds = append(failedSeeds, strconv.FormatInt(r.seed, 10))
		}
		for _, f := range r.faults {
			c := byFault[f]
			c[0]++
			if r.failed {
				c[1]++
			}
			byFault[f] = c
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "| trials | seeds | failures | wall time | mean trial |\n|---:|---|---:|---:|---:|\n")
	fmt.Fprintf(&b, "| %d | %d–%d | %d | %s | %.1f s |\n\n", len(results), seed, seed+int64(len(results))-1, failed,
		dur.Round(time.Second), total.Seconds()/float64(max(len(results), 1)))
	fmt.Fprintf(&b, "| fault | trials with it | failures |\n|---|---:|---:|\n")
	for _, f := range tortureFaults {
		fmt.Fprintf(&b, "| %s | %d | %d |\n", f, byFault[f][0], byFault[f][1])
	}
	fmt.Fprintf(&b, "\nlfuse held back %d operations of the application until capture was done (%.2f s in all); "+
		"%d checkpoints, in %d trials, copied uncaptured frames aside instead. These count what each lfuse reported last, "+
		"so what a killed lfuse did after that is missing.\n", counts.holds, counts.held, counts.copies, withCopies)
	if len(failedSeeds) > 0 {
		fmt.Fprintf(&b, "\nfailed seeds: %s\n", strings.Join(failedSeeds, " "))
	}
	return b.String()
}
