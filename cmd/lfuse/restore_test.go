package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends"
	"github.com/lfuse/lfuse/backends/file"
	"github.com/lfuse/lfuse/replicate"
	"github.com/superfly/ltx"
)

// writeState writes an LTX file holding a one-page database filled with
// fill as level's file min-max, with its post-apply checksum beside it.
func writeState(t *testing.T, c *file.Client, level int, min, max ltx.TXID, fill byte) {
	t.Helper()
	const pageSize = 512
	page := bytes.Repeat([]byte{fill}, pageSize)
	var buf bytes.Buffer
	enc, err := ltx.NewEncoder(&buf)
	if err != nil {
		t.Fatal(err)
	}
	at := time.Unix(int64(max), 0)
	hdr := ltx.Header{Version: ltx.Version, Flags: ltx.HeaderFlagNoChecksum, PageSize: pageSize, Commit: 1,
		MinTXID: min, MaxTXID: max, Timestamp: at.UnixMilli()}
	if err := enc.EncodeHeader(hdr); err != nil {
		t.Fatal(err)
	}
	if err := enc.EncodePage(ltx.PageHeader{Pgno: 1}, page); err != nil {
		t.Fatal(err)
	}
	if err := enc.Close(); err != nil {
		t.Fatal(err)
	}
	post, err := ltx.ChecksumReader(bytes.NewReader(page), pageSize)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.WriteLTXFile(context.Background(), level, min, max, bytes.NewReader(buf.Bytes()), int64(buf.Len()),
		backends.FileMeta{Timestamp: at, PostApplyChecksum: post}); err != nil {
		t.Fatal(err)
	}
}

// writeStates writes each of files (level, min, max) as writeState does,
// the page filled with max.
func writeStates(t *testing.T, c *file.Client, files [][3]int) {
	t.Helper()
	for _, f := range files {
		writeState(t, c, f[0], ltx.TXID(f[1]), ltx.TXID(f[2]), byte(f[2]))
	}
}

// expiring is a replica whose writer snapshots and expires the files a
// restore planned, just before the restore downloads them.
type expiring struct {
	*file.Client
	t    *testing.T
	once sync.Once
}

func (e *expiring) OpenLTXFile(ctx context.Context, level int, min, max ltx.TXID, offset, size int64) (io.ReadCloser, error) {
	if level == 0 {
		e.once.Do(func() {
			writeState(e.t, e.Client, 9, 1, 2, 2)
			if err := e.DeleteLTXFiles(ctx, []ltx.FileInfo{{Level: 9, MinTXID: 1, MaxTXID: 1}, {Level: 0, MinTXID: 2, MaxTXID: 2}}); err != nil {
				e.t.Error(err)
			}
		})
	}
	return e.Client.OpenLTXFile(ctx, level, min, max, offset, size)
}

// A restore from a replica that a running lfuse is writing to can find a
// planned file deleted (compacted, past retention) when it comes to read
// it: it plans again rather than fail.
func TestRestorePlansAgainWhenAFileGoes(t *testing.T) {
	c := &expiring{Client: file.New(filepath.Join(t.TempDir(), "replica")), t: t}
	writeState(t, c.Client, 9, 1, 1, 1)
	writeState(t, c.Client, 0, 2, 2, 2)
	var log bytes.Buffer
	out := filepath.Join(t.TempDir(), "r.db")
	if _, err := restoreOne(context.Background(), slog.New(slog.NewTextHandler(&log, nil)), io.Discard, []replicate.ReplicaClient{c}, out, replicate.Target{}, restoreFlags{}); err != nil {
		t.Fatalf("%v\n%s", err, log.String())
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, bytes.Repeat([]byte{2}, 512)) {
		t.Fatalf("restored %d bytes starting %x, want the state at TXID 2", len(got), got[:min(8, len(got))])
	}
	if !strings.Contains(log.String(), "planning again") {
		t.Fatalf("no word of planning again:\n%s", log.String())
	}
}

// restore -data puts back the directory as it was at the target: a
// database made after it is left out with a warning, not a failure of the
// whole restore, and leaves no directory behind; of a deleted x.db and the
// x.db/y.db made later (the replica keeps both), the one that existed at
// the target is restored.
func TestRestoreDataAtATime(t *testing.T) {
	repl := filepath.Join(t.TempDir(), "replica")
	root := file.New(repl)
	writeState(t, root.Sub("a.db"), 9, 1, 1, 1)
	writeState(t, root.Sub("a.db"), 0, 2, 2, 2)
	writeState(t, root.Sub("x.db"), 9, 1, 1, 3)
	writeState(t, root.Sub("x.db/y.db"), 9, 1, 2, 4)
	writeState(t, root.Sub("n/new.db"), 9, 1, 3, 5)
	// Listed, but its first file is still uploading: skipped, not a failure.
	if err := os.MkdirAll(filepath.Join(repl, "up.db", "ltx", "9"), 0o755); err != nil {
		t.Fatal(err)
	}
	restore := func(target replicate.Target) (string, string) {
		t.Helper()
		data := filepath.Join(t.TempDir(), "data")
		var log bytes.Buffer
		cfg := Config{DataDir: data, Replicas: []ReplicaConfig{{URL: "file://" + repl}}}
		if _, err := restoreAll(context.Background(), slog.New(slog.NewTextHandler(&log, nil)), io.Discard, cfg, target, restoreFlags{}); err != nil {
			t.Fatalf("restore to %s: %v\n%s", target, err, log.String())
		}
		return data, log.String()
	}
	fill := func(path string) byte {
		t.Helper()
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return b[0]
	}

	data, log := restore(replicate.Target{Time: time.Unix(1, 5e8)})
	if fill(filepath.Join(data, "a.db")) != 1 || fill(filepath.Join(data, "x.db")) != 3 {
		t.Fatalf("wrong states at 1.5 s:\n%s", log)
	}
	if _, err := os.Stat(filepath.Join(data, "n")); !os.IsNotExist(err) {
		t.Fatalf("a database made after the target left %v", err)
	}
	if !strings.Contains(log, "not restored") || !strings.Contains(log, "n/new.db") {
		t.Fatalf("no warning names the database made later:\n%s", log)
	}

	// A database the config names is not left out so quietly.
	cfg := Config{DataDir: filepath.Join(t.TempDir(), "data"), Replicas: []ReplicaConfig{{URL: "file://" + repl}}, Databases: []DatabaseConfig{{Path: "n/new.db"}}}
	if _, err := restoreAll(context.Background(), slog.New(slog.DiscardHandler), io.Discard, cfg, replicate.Target{Time: time.Unix(1, 5e8)}, restoreFlags{}); err == nil || !strings.Contains(err.Error(), "n/new.db") {
		t.Fatalf("a configured database with no backup at the target: %v", err)
	}

	data, log = restore(replicate.Target{})
	if fill(filepath.Join(data, "x.db", "y.db")) != 4 || fill(filepath.Join(data, "a.db")) != 2 || fill(filepath.Join(data, "n", "new.db")) != 5 {
		t.Fatalf("wrong latest states:\n%s", log)
	}
	if !strings.Contains(log, `db=x.db`) {
		t.Fatalf("no warning names the shadowed x.db:\n%s", log)
	}
}

// restore -state notes restored positions where a mount given the same
// -state looks for them, not in the default state directory.
func TestRestoreStateFlag(t *testing.T) {
	repl := filepath.Join(t.TempDir(), "replica")
	writeState(t, file.New(repl).Sub("a.db"), 9, 1, 1, 1)
	data, state := filepath.Join(t.TempDir(), "data"), filepath.Join(t.TempDir(), "state")
	var stderr bytes.Buffer
	if err := runRestore([]string{"-data", data, "-state", state, "-replica", "file://" + repl}, io.Discard, &stderr); err != nil {
		t.Fatalf("%v\n%s", err, stderr.String())
	}
	if notes, _ := filepath.Glob(filepath.Join(state, "dbs", "*", "restored")); len(notes) != 1 {
		t.Fatalf("restored positions in -state: %v, want one", notes)
	}
	if _, err := os.Stat(filepath.Join(data, ".lfuse")); !os.IsNotExist(err) {
		t.Fatalf("the default state directory was written too: %v", err)
	}
}

// A database the mount saw deleted, whose deletion may not have reached the
// replica yet, is not brought back by a restore into its data directory
// (restore-if-missing at the next start), unless -include-deleted.
func TestRestoreSkipsSeenDeleted(t *testing.T) {
	repl := filepath.Join(t.TempDir(), "replica")
	writeState(t, file.New(repl).Sub("a.db"), 9, 1, 1, 1)
	writeState(t, file.New(repl).Sub("b.db"), 9, 1, 1, 2)
	data := filepath.Join(t.TempDir(), "data")
	note := filepath.Join(data, ".lfuse", "dbs", "b.db", "gone")
	if err := os.MkdirAll(filepath.Dir(note), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(note, []byte(time.Now().UTC().Format(time.RFC3339Nano)), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := Config{DataDir: data, Replicas: []ReplicaConfig{{URL: "file://" + repl}}}
	var log bytes.Buffer
	n, err := restoreAll(context.Background(), slog.New(slog.NewTextHandler(&log, nil)), io.Discard, cfg, replicate.Target{},
		restoreFlags{ifReplicaExists: true, ifDBNotExists: true, parallelism: 8})
	if err != nil || n != 1 {
		t.Fatalf("restored %d, %v\n%s", n, err, log.String())
	}
	if _, err := os.Stat(filepath.Join(data, "b.db")); !os.IsNotExist(err) || !strings.Contains(log.String(), "the mount saw the database deleted") {
		t.Fatalf("b.db, seen deleted, restored or not said so (%v):\n%s", err, log.String())
	}
	n, err = restoreAll(context.Background(), slog.New(slog.DiscardHandler), io.Discard, cfg, replicate.Target{},
		restoreFlags{ifReplicaExists: true, ifDBNotExists: true, parallelism: 8, withDeleted: true})
	if err != nil || n != 1 {
		t.Fatalf("with -include-deleted: restored %d, %v", n, err)
	}
	if _, err := os.Stat(filepath.Join(data, "b.db")); err != nil {
		t.Fatalf("-include-deleted did not restore b.db: %v", err)
	}
}

// restoreLog restores target from clients to a new file and returns what
// the restore logged.
func restoreLog(t *testing.T, target replicate.Target, clients ...*file.Client) (out, log string, err error) {
	t.Helper()
	var cs []replicate.ReplicaClient
	for _, c := range clients {
		cs = append(cs, c)
	}
	return restoreLogFlags(t, target, restoreFlags{}, cs...)
}

// restoreLogFlags is restoreLog with flags, from any clients.
func restoreLogFlags(t *testing.T, target replicate.Target, f restoreFlags, clients ...replicate.ReplicaClient) (out, log string, err error) {
	t.Helper()
	var buf bytes.Buffer
	out = filepath.Join(t.TempDir(), "r.db")
	_, err = restoreOne(context.Background(), slog.New(slog.NewTextHandler(&buf, nil)), io.Discard, clients, out, target, f)
	return out, buf.String(), err
}

// corrupt flips a byte inside the page data of one of the files of the
// file replica at root.
func corrupt(t *testing.T, root string, level int, min, max ltx.TXID) {
	t.Helper()
	path := filepath.Join(root, "ltx", strconv.Itoa(level), ltx.FormatFilename(min, max))
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b[ltx.HeaderSize+ltx.PageHeaderSize+10] ^= 0xff
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// A replica that was down while the mount ran holds an older state than
// the others. Whichever comes first in the configuration, a restore takes
// the newest: taking the first lost the commits only the other held.
func TestRestoreTakesTheNewestReplica(t *testing.T) {
	behind, ahead := file.New(filepath.Join(t.TempDir(), "a")), file.New(filepath.Join(t.TempDir(), "b"))
	writeState(t, behind, 9, 1, 1, 1)
	writeState(t, ahead, 9, 1, 1, 1)
	writeState(t, ahead, 0, 2, 2, 2)
	out, log, err := restoreLog(t, replicate.Target{}, behind, ahead)
	if err != nil {
		t.Fatalf("%v\n%s", err, log)
	}
	if got, _ := os.ReadFile(out); !bytes.Equal(got, bytes.Repeat([]byte{2}, 512)) {
		t.Fatalf("restored %x…, want the state at TXID 2 from the replica ahead\n%s", got[:min(8, len(got))], log)
	}
	if !strings.Contains(log, "replica is behind another") {
		t.Fatalf("no word of the replica behind:\n%s", log)
	}
}

// A corrupt file in one replica does not fail a restore that another
// replica can make to the same state; it never falls back to an older one.
func TestRestoreFallsBackToAnotherReplica(t *testing.T) {
	badDir := filepath.Join(t.TempDir(), "a")
	bad, good := file.New(badDir), file.New(filepath.Join(t.TempDir(), "b"))
	for _, c := range []*file.Client{bad, good} {
		writeState(t, c, 9, 1, 1, 1)
		writeState(t, c, 0, 2, 2, 2)
	}
	corrupt(t, badDir, 0, 2, 2)
	out, log, err := restoreLog(t, replicate.Target{}, bad, good)
	if err != nil {
		t.Fatalf("%v\n%s", err, log)
	}
	if got, _ := os.ReadFile(out); !bytes.Equal(got, bytes.Repeat([]byte{2}, 512)) {
		t.Fatalf("restored %x…, want the state at TXID 2\n%s", got[:min(8, len(got))], log)
	}
	if !strings.Contains(log, "trying another that holds the same state") || !strings.Contains(log, "corrupt") {
		t.Fatalf("no word of the corrupt file and the other replica:\n%s", log)
	}

	older := file.New(filepath.Join(t.TempDir(), "c"))
	writeState(t, older, 9, 1, 1, 1)
	out, log, err = restoreLog(t, replicate.Target{}, bad, older)
	if err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Fatalf("restore with only an older state elsewhere: err %v, want the corrupt file named\n%s", err, log)
	}
	if _, serr := os.Stat(out); !os.IsNotExist(serr) {
		t.Fatalf("a failed restore left %s: %v", out, serr)
	}
}

// A replica that is down may hold the newest state: the restore fails,
// naming it and saying how to go on, rather than restore an older state
// from the others. One that answered with something unusable (here a file
// where a level's directory belongs) fails it too, with no such advice.
func TestRestoreRefusesWithAReplicaUnreadable(t *testing.T) {
	good := file.New(filepath.Join(t.TempDir(), "b"))
	writeState(t, good, 9, 1, 1, 1)
	dir := t.TempDir()
	unreadable := file.New(filepath.Join(dir, "a"))
	writeState(t, unreadable, 9, 1, 1, 1)
	_, log, err := restoreLogFlags(t, replicate.Target{}, restoreFlags{}, good, down{unreadable})
	if err == nil || !strings.Contains(err.Error(), unreadable.String()) || !strings.Contains(err.Error(), "-skip-unreachable") {
		t.Fatalf("err %v, want the replica down named, and the way to restore without it\n%s", err, log)
	}
	if strings.Contains(err.Error(), "\n") {
		t.Fatalf("error of more than one line: %q", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "a", "ltx", "0"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	_, log, err = restoreLog(t, replicate.Target{}, good, unreadable)
	if err == nil || !strings.Contains(err.Error(), unreadable.String()) || strings.Contains(err.Error(), "-skip-unreachable") {
		t.Fatalf("err %v, want the unreadable replica named, with no word of skipping it\n%s", err, log)
	}
}

// down is a replica whose server refuses connections.
type down struct{ *file.Client }

func (down) LTXFiles(context.Context, int) ([]ltx.FileInfo, error) {
	return nil, &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}
}

// refusing is a replica whose listing fails as wrong credentials do.
type refusing struct{ *file.Client }

func (refusing) LTXFiles(context.Context, int) ([]ltx.FileInfo, error) {
	return nil, backends.ConfigError(errors.New("access denied"))
}

// compacting is a replica with approximate listing times whose files are
// all compacted away by the time their commit times are read.
type compacting struct{ *file.Client }

func (compacting) ListTimesApprox() bool { return true }

func (compacting) FileMeta(context.Context, int, ltx.TXID, ltx.TXID) (backends.FileMeta, error) {
	return backends.FileMeta{}, fmt.Errorf("read the meta: %w", backends.ErrNotFound)
}

// With -skip-unreachable, a replica that is down is left out, with a
// warning, as if it were not configured: the newest state the others hold
// is restored. A replica that answers is never left out: one misconfigured
// (waiting will not mend it), one that answers with something unusable, one
// whose files went while the restore planned (it may well hold the newest
// state). Replicas none of which can be read fail the restore too.
func TestRestoreSkipsAnUnreachableReplica(t *testing.T) {
	good := file.New(filepath.Join(t.TempDir(), "b"))
	writeStates(t, good, [][3]int{{9, 1, 1}, {0, 2, 2}})
	dir := t.TempDir()
	ahead := file.New(filepath.Join(dir, "a"))
	writeStates(t, ahead, [][3]int{{9, 1, 1}, {0, 2, 2}, {0, 3, 3}}) // what leaving it out gives up
	skip := restoreFlags{skipUnreachable: true}
	out, log, err := restoreLogFlags(t, replicate.Target{}, skip, down{ahead}, good)
	if err != nil {
		t.Fatalf("%v\n%s", err, log)
	}
	if got, _ := os.ReadFile(out); !bytes.Equal(got, bytes.Repeat([]byte{2}, 512)) {
		t.Fatalf("restored %x…, want the state at TXID 2 of the replica that can be read\n%s", got[:min(8, len(got))], log)
	}
	if !strings.Contains(log, skippedUnreachable) || !strings.Contains(log, ahead.String()) {
		t.Fatalf("no warning naming the replica left out:\n%s", log)
	}

	for name, c := range map[string]replicate.ReplicaClient{"misconfigured": refusing{ahead}, "compacted meanwhile": compacting{ahead}} {
		out, log, err = restoreLogFlags(t, replicate.Target{}, skip, c, good)
		if err == nil || strings.Contains(err.Error(), "-skip-unreachable") {
			t.Fatalf("%s replica: err %v, want its error alone\n%s", name, err, log)
		}
		if _, serr := os.Stat(out); !os.IsNotExist(serr) {
			t.Fatalf("%s replica: the older state was restored (%v)\n%s", name, serr, log)
		}
	}
	for _, f := range []restoreFlags{skip, {}} {
		out, log, err = restoreLogFlags(t, replicate.Target{}, f, down{ahead}, down{good})
		if err == nil || !strings.Contains(err.Error(), ahead.String()) || strings.Contains(err.Error(), "-skip-unreachable") {
			t.Fatalf("no replica readable: err %v, want the failure named, with no word of leaving one out\n%s", err, log)
		}
		if _, serr := os.Stat(out); !os.IsNotExist(serr) {
			t.Fatalf("a failed restore left %s: %v", out, serr)
		}
	}
	// Leaving the replica out must not turn into nothing restored: the
	// other holds no backup of the database yet.
	empty := file.New(filepath.Join(t.TempDir(), "empty"))
	_, log, err = restoreLogFlags(t, replicate.Target{}, restoreFlags{skipUnreachable: true, ifReplicaExists: true}, down{ahead}, empty)
	if err == nil || !strings.Contains(err.Error(), "hold no backup") {
		t.Fatalf("the only replica with a backup down: err %v, want a failure saying the others hold none\n%s", err, log)
	}
	// Nor into a time the others cannot reach: the one down may hold it.
	_, log, err = restoreLogFlags(t, replicate.Target{Time: time.Unix(0, 5e8)}, skip, down{ahead}, good)
	if err == nil || !strings.Contains(err.Error(), "at the target") || errors.Is(err, replicate.ErrBeforeOldest) || strings.Contains(log, skippedUnreachable) {
		t.Fatalf("a time before the backups of the replica that answers: err %v, want a failure naming the replica down\n%s", err, log)
	}
}

// restore -data with a global replica that is down (an SFTP server on a
// port where nothing listens): without -skip-unreachable nothing is
// restored and the error says how to go on; with it, every database comes
// from the other replica. If the only global replica is down, the restore
// fails even with replicas of [[databases]] reachable: those are not the
// other databases' replicas.
func TestRestoreDataSkipsAnUnreachableReplica(t *testing.T) {
	repl := filepath.Join(t.TempDir(), "replica")
	writeStates(t, file.New(repl).Sub("a.db"), [][3]int{{9, 1, 1}, {0, 2, 2}})
	writeStates(t, file.New(repl).Sub("s/b.db"), [][3]int{{9, 1, 3}})
	knownHosts := filepath.Join(t.TempDir(), "known_hosts")
	if err := os.WriteFile(knownHosts, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	downURL := "sftp://u:p@" + ln.Addr().String() + "/replica"
	ln.Close() // nothing listens there now
	downReplica := ReplicaConfig{URL: downURL, KnownHosts: knownHosts}
	cfg := Config{Replicas: []ReplicaConfig{downReplica, {URL: "file://" + repl}}}
	restoreAt := func(target replicate.Target, f restoreFlags) (string, string, error) {
		cfg.DataDir = filepath.Join(t.TempDir(), "data")
		var log bytes.Buffer
		_, err := restoreAll(context.Background(), slog.New(slog.NewTextHandler(&log, nil)), io.Discard, cfg, target, f)
		return cfg.DataDir, log.String(), err
	}
	restore := func(f restoreFlags) (string, string, error) { return restoreAt(replicate.Target{}, f) }
	data, log, err := restore(restoreFlags{})
	if err == nil || !strings.Contains(err.Error(), ln.Addr().String()) || !strings.Contains(err.Error(), "-skip-unreachable") {
		t.Fatalf("err %v, want the replica named and the way on\n%s", err, log)
	}
	if ents, _ := os.ReadDir(data); len(ents) != 0 {
		t.Fatalf("a failed restore left %d entries in the data directory", len(ents))
	}
	data, log, err = restore(restoreFlags{skipUnreachable: true})
	if err != nil {
		t.Fatalf("%v\n%s", err, log)
	}
	for rel, fill := range map[string]byte{"a.db": 2, "s/b.db": 3} {
		if got, _ := os.ReadFile(filepath.Join(data, rel)); !bytes.Equal(got, bytes.Repeat([]byte{fill}, 512)) {
			t.Errorf("%s: restored %d bytes, want the replica's state\n%s", rel, len(got), log)
		}
	}
	if strings.Count(log, skippedUnreachable) != 1 {
		t.Fatalf("want one warning for the replica left out:\n%s", log)
	}
	// The replica that answers holds nothing (added since): the one down
	// may hold every database.
	cfg.Replicas = []ReplicaConfig{downReplica, {URL: "file://" + t.TempDir()}}
	if _, log, err = restore(restoreFlags{skipUnreachable: true, ifReplicaExists: true}); err == nil || !strings.Contains(err.Error(), "hold no database") {
		t.Fatalf("the only replica with databases down: err %v, want a failure saying the others hold none\n%s", err, log)
	} else if strings.Contains(log, skippedUnreachable) {
		t.Fatalf("warned of restoring without the replica, then did not restore:\n%s", log)
	}
	// Nor into nothing restored at a time before the others' backups
	// begin (a replica added since): the one down may hold that time.
	cfg.Replicas = []ReplicaConfig{downReplica, {URL: "file://" + repl}}
	if _, log, err = restore(restoreFlags{skipUnreachable: true}); err != nil {
		t.Fatalf("%v\n%s", err, log)
	}
	before := replicate.Target{Time: time.Unix(0, 5e8)}
	_, log, err = restoreAt(before, restoreFlags{skipUnreachable: true})
	if err == nil || !strings.Contains(err.Error(), "at the target") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("a time before every backup the others hold: err %v, want one line saying so\n%s", err, log)
	}
	// The same for a database deleted and another made under its name
	// (x.db, then x.db/y.db), which are settled before the others.
	clash := filepath.Join(t.TempDir(), "clash")
	writeStates(t, file.New(clash).Sub("x.db"), [][3]int{{9, 1, 1}})
	writeStates(t, file.New(clash).Sub("x.db/y.db"), [][3]int{{9, 1, 2}})
	cfg.Replicas = []ReplicaConfig{downReplica, {URL: "file://" + clash}}
	_, log, err = restoreAt(before, restoreFlags{skipUnreachable: true})
	if err == nil || !strings.Contains(err.Error(), "at the target") || strings.Contains(log, notAtTarget) || strings.Contains(log, skippedUnreachable) {
		t.Fatalf("a time before every backup the others hold, x.db and x.db/y.db: err %v, want a failure saying so\n%s", err, log)
	}
	cfg.Replicas = []ReplicaConfig{downReplica}
	cfg.Databases = []DatabaseConfig{{Path: "a.db", Replicas: []ReplicaConfig{{URL: "file://" + repl + "/a.db"}}}}
	if _, log, err = restore(restoreFlags{skipUnreachable: true}); err == nil || !strings.Contains(err.Error(), ln.Addr().String()) || strings.Contains(err.Error(), "-skip-unreachable") {
		t.Fatalf("the only global replica down: err %v, want its failure alone\n%s", err, log)
	}
}

// A corrupt file need not fail a restore: the replica usually holds
// another way to the same state (the level-0 files under a compaction, an
// older snapshot with the history after it), and the restore takes it. It
// never settles for an older state.
func TestRestorePlansAroundACorruptFile(t *testing.T) {
	for _, c := range []struct {
		name  string
		files [][3]int // level, min, max; the state's fill is max
		bad   [3]int
		ok    bool
	}{
		{"compaction", [][3]int{{9, 1, 1}, {0, 2, 2}, {0, 3, 3}, {1, 2, 3}}, [3]int{1, 2, 3}, true},
		{"snapshot", [][3]int{{9, 1, 1}, {0, 2, 2}, {0, 3, 3}, {9, 1, 3}}, [3]int{9, 1, 3}, true},
		{"newest", [][3]int{{9, 1, 1}, {0, 2, 2}, {0, 3, 3}}, [3]int{0, 3, 3}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "r")
			r := file.New(dir)
			writeStates(t, r, c.files)
			corrupt(t, dir, c.bad[0], ltx.TXID(c.bad[1]), ltx.TXID(c.bad[2]))
			out, log, err := restoreLog(t, replicate.Target{}, r)
			if !c.ok {
				if err == nil || !strings.Contains(err.Error(), "corrupt") {
					t.Fatalf("err %v, want the corrupt file named\n%s", err, log)
				}
				if _, serr := os.Stat(out); !os.IsNotExist(serr) {
					t.Fatalf("a failed restore left %s: %v", out, serr)
				}
				return
			}
			if err != nil {
				t.Fatalf("%v\n%s", err, log)
			}
			if got, _ := os.ReadFile(out); !bytes.Equal(got, bytes.Repeat([]byte{3}, 512)) {
				t.Fatalf("restored %x…, want the state at TXID 3\n%s", got[:min(8, len(got))], log)
			}
			if !strings.Contains(log, "planning the same state without it") || !strings.Contains(log, ltx.FormatFilename(ltx.TXID(c.bad[1]), ltx.TXID(c.bad[2]))) {
				t.Fatalf("no word of the corrupt file:\n%s", log)
			}
		})
	}
}

// A TXID one replica cannot give (it is behind, or holds the TXID only
// inside a compacted file) is restored from another that can.
func TestRestoreTXIDFromAnyReplica(t *testing.T) {
	for _, c := range []struct {
		name        string
		first, then [][3]int // level, min, max; the state's fill is max
		txid        ltx.TXID
	}{
		{"behind", [][3]int{{9, 1, 1}, {0, 2, 2}}, [][3]int{{9, 1, 1}, {0, 2, 2}, {0, 3, 3}}, 3},
		{"compacted", [][3]int{{9, 1, 1}, {1, 2, 3}}, [][3]int{{9, 1, 1}, {0, 2, 2}, {0, 3, 3}}, 2},
	} {
		t.Run(c.name, func(t *testing.T) {
			first, then := file.New(filepath.Join(t.TempDir(), "a")), file.New(filepath.Join(t.TempDir(), "b"))
			writeStates(t, first, c.first)
			writeStates(t, then, c.then)
			out, log, err := restoreLog(t, replicate.Target{TXID: c.txid}, first, then)
			if err != nil {
				t.Fatalf("%v\n%s", err, log)
			}
			if got, _ := os.ReadFile(out); !bytes.Equal(got, bytes.Repeat([]byte{byte(c.txid)}, 512)) {
				t.Fatalf("restored %x…, want the state at TXID %d\n%s", got[:min(8, len(got))], c.txid, log)
			}
			// Neither replica holding it: the error says why, for each.
			_, _, err = restoreLog(t, replicate.Target{TXID: 9}, first, then)
			if err == nil || !errors.Is(err, replicate.ErrAfterNewest) {
				t.Fatalf("TXID 9 from neither replica: err %v", err)
			}
		})
	}
}

// A replica with a gap in its chain is passed over when it lists nothing
// newer than another replica restores; if it does, the restore fails,
// naming the gap, rather than lose what lies beyond it.
func TestRestorePassesOverAReplicaWithAGap(t *testing.T) {
	for _, c := range []struct {
		name   string
		gapped [][3]int // level, min, max; the state's fill is max
		ok     bool
	}{
		{"nothing newer", [][3]int{{9, 1, 1}, {0, 3, 3}}, true},
		{"newer beyond the gap", [][3]int{{9, 1, 1}, {0, 3, 3}, {0, 4, 4}}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			gapped, good := file.New(filepath.Join(t.TempDir(), "a")), file.New(filepath.Join(t.TempDir(), "b"))
			writeStates(t, gapped, c.gapped)
			writeStates(t, good, [][3]int{{9, 1, 1}, {0, 2, 2}, {0, 3, 3}})
			out, log, err := restoreLog(t, replicate.Target{}, gapped, good)
			if !c.ok {
				if !errors.Is(err, replicate.ErrGap) {
					t.Fatalf("err %v, want the gap named\n%s", err, log)
				}
				return
			}
			if err != nil {
				t.Fatalf("%v\n%s", err, log)
			}
			if got, _ := os.ReadFile(out); !bytes.Equal(got, bytes.Repeat([]byte{3}, 512)) {
				t.Fatalf("restored %x…, want the state at TXID 3\n%s", got[:min(8, len(got))], log)
			}
			if !strings.Contains(log, "gap in its history") {
				t.Fatalf("no word of the gap:\n%s", log)
			}
		})
	}
}

// A replica whose server takes the connection and never answers is down
// too: listing its databases held the restore (and a mount's
// restore-if-missing) for good.
func TestRestoreDataSkipsASilentReplica(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c) // held open, never answered
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	old := listDatabasesTimeout
	listDatabasesTimeout = time.Second
	t.Cleanup(func() { listDatabasesTimeout = old })
	repl := filepath.Join(t.TempDir(), "replica")
	writeStates(t, file.New(repl).Sub("a.db"), [][3]int{{9, 1, 1}, {0, 2, 2}})
	cfg := Config{DataDir: filepath.Join(t.TempDir(), "data"), Replicas: []ReplicaConfig{
		{URL: "gs://bucket/x", Endpoint: "http://" + ln.Addr().String()}, {URL: "file://" + repl}}}
	var log bytes.Buffer
	if _, err := restoreAll(context.Background(), slog.New(slog.NewTextHandler(&log, nil)), io.Discard, cfg, replicate.Target{}, restoreFlags{skipUnreachable: true}); err != nil {
		t.Fatalf("%v\n%s", err, log.String())
	}
	if got, _ := os.ReadFile(filepath.Join(cfg.DataDir, "a.db")); !bytes.Equal(got, bytes.Repeat([]byte{2}, 512)) {
		t.Fatalf("restored %d bytes, want the file replica's state\n%s", len(got), log.String())
	}
	if !strings.Contains(log.String(), skippedUnreachable) {
		t.Fatalf("no warning of the replica left out:\n%s", log.String())
	}
}
