package integration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/storage"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/aws/aws-sdk-go-v2/aws"
	awss3 "github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/lfuse/lfuse/backends/backendtest"
	"golang.org/x/crypto/ssh"
	"google.golang.org/api/option"
)

// cloudReplica is one backend's replica settings for a test: the [[replicas]]
// body of a config file (url and keys), unique to the test.
type cloudReplica struct {
	name   string
	config func(t testing.TB, env map[string]string, root string) string
}

var cloudReplicas = []cloudReplica{
	{"s3", func(t testing.TB, env map[string]string, root string) string {
		createS3Bucket(t, env, "lfuse-e2e")
		return fmt.Sprintf("url = %q\nendpoint = %q\naccess-key-id = %q\nsecret-access-key = %q\n",
			"s3://lfuse-e2e/"+root, env["LFUSE_TEST_S3_ENDPOINT"], env["LFUSE_TEST_S3_ACCESS_KEY_ID"], env["LFUSE_TEST_S3_SECRET_ACCESS_KEY"])
	}},
	{"gs", func(t testing.TB, env map[string]string, root string) string {
		createGCSBucket(t, env, "lfuse-e2e")
		return fmt.Sprintf("url = %q\nendpoint = %q\n", "gs://lfuse-e2e/"+root, env["LFUSE_TEST_GCS_ENDPOINT"])
	}},
	{"abs", func(t testing.TB, env map[string]string, root string) string {
		createAzureContainer(t, env, "lfuse-e2e")
		return fmt.Sprintf("url = %q\nendpoint = %q\naccount-key = %q\n",
			"abs://"+env["LFUSE_TEST_AZURE_ACCOUNT"]+"@lfuse-e2e/"+root, env["LFUSE_TEST_AZURE_ENDPOINT"], env["LFUSE_TEST_AZURE_KEY"])
	}},
	{"sftp", func(t testing.TB, env map[string]string, root string) string {
		return fmt.Sprintf("url = %q\npassword = %q\nknown-hosts = %q\n",
			"sftp://"+env["LFUSE_TEST_SFTP_USER"]+"@"+env["LFUSE_TEST_SFTP_ADDR"]+"/~/"+root, env["LFUSE_TEST_SFTP_PASSWORD"], env["LFUSE_TEST_SFTP_KNOWN_HOSTS"])
	}},
}

func createS3Bucket(t testing.TB, env map[string]string, bucket string) {
	t.Helper()
	cli := awss3.New(awss3.Options{Region: "us-east-1", BaseEndpoint: aws.String(env["LFUSE_TEST_S3_ENDPOINT"]), UsePathStyle: true,
		Credentials: aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
			return aws.Credentials{AccessKeyID: env["LFUSE_TEST_S3_ACCESS_KEY_ID"], SecretAccessKey: env["LFUSE_TEST_S3_SECRET_ACCESS_KEY"]}, nil
		})})
	if _, err := cli.CreateBucket(context.Background(), &awss3.CreateBucketInput{Bucket: aws.String(bucket)}); err != nil &&
		!strings.Contains(err.Error(), "BucketAlreadyOwnedByYou") && !strings.Contains(err.Error(), "BucketAlreadyExists") {
		t.Fatalf("create bucket: %v", err)
	}
}

// cloudConfig writes a config shipping every database to one backend on
// short intervals, and returns its path.
func (e *env) cloudConfig(c cloudReplica, env map[string]string) string {
	root := fmt.Sprintf("e2e-%d-%d", os.Getpid(), time.Now().UnixNano())
	return e.cloudConfigAt(c, env, root, "lfuse.toml")
}

// cloudConfigAt writes a config named name for the replica under root.
func (e *env) cloudConfigAt(c cloudReplica, env map[string]string, root, name string) string {
	cfg := "[[replicas]]\n" + c.config(e.t, env, root) + `sync-interval = "100ms"
snapshot-interval = "3s"
compact-intervals = ["1s", "2s"]
`
	path := filepath.Join(e.root, name)
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		e.t.Fatal(err)
	}
	return path
}

// Each cloud backend end to end: a real mount, several processes, lfuse
// ships to the real server, stops after flushing; a restore from that
// server gives the live database byte for byte, and points in time by TXID
// and timestamp give exactly the state of the time.
func TestCloudReplicateAndRestore(t *testing.T) {
	env := backendtest.Servers(t)
	for _, c := range cloudReplicas {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t)
			cfgPath := e.cloudConfig(c, env)
			lf := e.mount("-config", cfgPath)
			dbPath := e.path("app.db")
			sqliteCLI(t, dbPath, "PRAGMA journal_mode=WAL;\n"+bankSchema+seqSchema)
			workers := []*workerProc{
				startWorker(t, "bank-writer", "DB="+dbPath, "N=150", "SEED=1", "NAME=go1", "CKPT=50"),
				startCLI(t, dbPath, cliTransfers("cli", 150, 7)),
				startWorker(t, "bank-reader", "DB="+dbPath, "N=200", "SEED=9"),
			}
			for i, w := range workers {
				if err := w.wait(t, 5*time.Minute); err != nil {
					t.Fatalf("worker %d: %v\n%s", i, err, w.out.String())
				}
			}
			const rows = 150
			w := startWorker(t, "seq-writer", "DB="+dbPath, "FROM=1", fmt.Sprint("TO=", rows), "PAUSE=10ms")
			if err := w.wait(t, 5*time.Minute); err != nil {
				t.Fatalf("seq-writer: %v\n%s", err, w.out.String())
			}
			before := seqLog(t, w.out.String())
			checkpointTruncate(t, dbPath)
			lf.stop()
			if lf.log.count("every captured transaction is in every replica") != 1 {
				t.Fatalf("no flush reported at stop:\n%s", lf.log)
			}
			for _, secret := range []string{env["LFUSE_TEST_S3_SECRET_ACCESS_KEY"], env["LFUSE_TEST_AZURE_KEY"], env["LFUSE_TEST_SFTP_PASSWORD"]} {
				if strings.Contains(lf.log.String(), secret) {
					t.Fatal("lfuse logged a credential")
				}
			}

			// Latest, through the config's keys: byte for byte.
			outDir := filepath.Join(e.root, "restored")
			if code, log := runLfuse(t, "restore", "-config", cfgPath, "-data", outDir); code != 0 {
				t.Fatalf("restore exited %d:\n%s", code, log)
			}
			live, _ := os.ReadFile(filepath.Join(e.data, "app.db"))
			got, _ := os.ReadFile(filepath.Join(outDir, "app.db"))
			if !bytes.Equal(got, live) {
				t.Fatalf("restored %d bytes differ from the live %d bytes at %s", len(got), len(live), firstDiff(got, live))
			}
			if k := seqRows(t, filepath.Join(outDir, "app.db")); k != rows {
				t.Fatalf("latest restore holds %d seq rows, want %d", k, rows)
			}

			// Points in time, by timestamp: the newest restorable state
			// committed at or before each.
			for _, frac := range []float64{0.2, 0.5, 0.8} {
				ts := before[1].Add(time.Duration(frac * float64(before[rows].Sub(before[1]))))
				os.RemoveAll(outDir)
				code, log := runLfuse(t, "restore", "-config", cfgPath, "-data", outDir, "-timestamp", ts.UTC().Format(time.RFC3339Nano))
				if code != 0 {
					t.Fatalf("restore -timestamp exited %d:\n%s", code, log)
				}
				k := seqRows(t, filepath.Join(outDir, "app.db"))
				if before[k].After(ts.Add(time.Millisecond)) {
					t.Fatalf("restore -timestamp %s holds rows 1..%d, committed after it", ts.Format(time.RFC3339Nano), k)
				}
				// The TXID of that state restores to the same rows.
				txid := strings.TrimSpace(regexpFind(log, `txid=([0-9a-f]{16})`))
				os.RemoveAll(outDir)
				if code, log := runLfuse(t, "restore", "-config", cfgPath, "-data", outDir, "-txid", txid); code != 0 {
					t.Fatalf("restore -txid %s exited %d:\n%s", txid, code, log)
				}
				if k2 := seqRows(t, filepath.Join(outDir, "app.db")); k2 != k {
					t.Fatalf("restore -txid %s holds %d rows, the timestamp restore that named it %d", txid, k2, k)
				}
			}
		})
	}
}

func createGCSBucket(t testing.TB, env map[string]string, bucket string) {
	t.Helper()
	ctx := context.Background()
	cli, err := storage.NewClient(ctx, option.WithEndpoint(env["LFUSE_TEST_GCS_ENDPOINT"]+"/storage/v1/"), option.WithoutAuthentication())
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	if err := cli.Bucket(bucket).Create(ctx, "lfuse-test", nil); err != nil && !strings.Contains(err.Error(), "409") {
		t.Fatalf("create bucket: %v", err)
	}
}

func createAzureContainer(t testing.TB, env map[string]string, container string) {
	t.Helper()
	cred, err := azblob.NewSharedKeyCredential(env["LFUSE_TEST_AZURE_ACCOUNT"], env["LFUSE_TEST_AZURE_KEY"])
	if err != nil {
		t.Fatal(err)
	}
	cli, err := azblob.NewClientWithSharedKeyCredential(env["LFUSE_TEST_AZURE_ENDPOINT"], cred, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.CreateContainer(context.Background(), container, nil); err != nil && !bloberror.HasCode(err, bloberror.ContainerAlreadyExists) {
		t.Fatalf("create container: %v", err)
	}
}

// regexpFind is the first submatch of re in s, or "".
func regexpFind(s, re string) string {
	if m := regexp.MustCompile(re).FindStringSubmatch(s); m != nil {
		return m[1]
	}
	return ""
}

// s3Server is a versitygw of the test's own, which it may stop and start.
type s3Server struct {
	t    *testing.T
	bin  string
	dir  string
	addr string
	env  map[string]string
	cmd  *exec.Cmd
}

func startS3Server(t *testing.T, env map[string]string) *s3Server {
	return startS3ServerIn(t, env, t.TempDir())
}

// startS3ServerIn keeps the server's objects in dir.
func startS3ServerIn(t *testing.T, env map[string]string, dir string) *s3Server {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	s := &s3Server{t: t, bin: env["LFUSE_TEST_VERSITYGW"], dir: dir, addr: addr, env: env}
	s.start()
	t.Cleanup(s.stop)
	return s
}

func (s *s3Server) start() {
	s.t.Helper()
	s.cmd = exec.Command(s.bin, "--port", s.addr, "--quiet", "posix", s.dir)
	s.cmd.Env = append(os.Environ(), "ROOT_ACCESS_KEY="+s.env["LFUSE_TEST_S3_ACCESS_KEY_ID"], "ROOT_SECRET_KEY="+s.env["LFUSE_TEST_S3_SECRET_ACCESS_KEY"])
	if err := s.cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	for i := 0; ; i++ {
		c, err := net.Dial("tcp", s.addr)
		if err == nil {
			c.Close()
			return
		}
		if i == 300 {
			s.t.Fatalf("versitygw did not listen on %s", s.addr)
		}
		time.Sleep(10 * time.Millisecond) // polling a port: there is no event to wait for
	}
}

func (s *s3Server) stop() {
	if s.cmd != nil && s.cmd.Process != nil {
		s.cmd.Process.Kill()
		s.cmd.Wait()
		s.cmd = nil
	}
}

// The S3 server down for a while, then back: the app never notices, lfuse
// logs the outage once and its end once, replication resumes where it
// stopped, and a restore from the server gives the live database.
func TestS3Outage(t *testing.T) {
	env := backendtest.Servers(t)
	srv := startS3Server(t, env)
	endpoint := "http://" + srv.addr
	env2 := map[string]string{}
	for k, v := range env {
		env2[k] = v
	}
	env2["LFUSE_TEST_S3_ENDPOINT"] = endpoint
	e := newEnv(t)
	cfgPath := e.cloudConfig(cloudReplicas[0], env2)
	dbPath := e.path("app.db")
	metricsAddr := freeAddr(t)
	lf := e.mount("-config", cfgPath, "-metrics-addr", metricsAddr)
	createSeq(t, dbPath)
	seqWrite(t, dbPath, 1, 50)
	if err := lf.log.wait("snapshot uploaded", time.Minute, lf.done); err != nil {
		t.Fatal(err)
	}
	// The steady state lists nothing: syncs keep their own listing.
	lists := scrape(t, metricsAddr, `lfuse_replica_operation_total{operation="LIST",replica_type="s3"}`)
	seqWrite(t, dbPath, 51, 100)
	if err := lf.log.wait(" level=1 min=", time.Minute, lf.done); err != nil {
		t.Fatal(err)
	}
	if n := scrape(t, metricsAddr, `lfuse_replica_operation_total{operation="LIST",replica_type="s3"}`); n != lists {
		t.Fatalf("%v LISTs in the steady state", n-lists)
	}
	srv.stop()
	start := time.Now()
	seqWrite(t, dbPath, 101, 300)
	if d := time.Since(start); d > time.Minute {
		t.Fatalf("250 commits took %s with the replica down", d)
	}
	if err := lf.log.wait("replica sync failed", time.Minute, lf.done); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second) // an outage of some seconds: retries must not flood the log
	seqWrite(t, dbPath, 301, 350)
	if v := scrape(t, metricsAddr, `lfuse_replica_failing{db="app.db"`); v != 1 {
		t.Fatalf("lfuse_replica_failing %v during the outage", v)
	}
	if v := scrape(t, metricsAddr, `lfuse_db_size_bytes{db="app.db"}`); v < 4096 {
		t.Fatalf("lfuse_db_size_bytes %v", v)
	}
	if v := scrape(t, metricsAddr, `lfuse_db_txid{db="app.db"}`); v < 350 {
		t.Fatalf("lfuse_db_txid %v after 350 commits", v)
	}
	if v := scrape(t, metricsAddr, `lfuse_replica_lag_txids{db="app.db"`); v < 250 {
		t.Fatalf("lfuse_replica_lag_txids %v during the outage, after 250 commits", v)
	}
	if v := scrape(t, metricsAddr, `lfuse_replica_lag_seconds{db="app.db"`); v < 3 {
		t.Fatalf("lfuse_replica_lag_seconds %v after a 3 s outage", v)
	}
	srv.start()
	if err := lf.log.wait("replica recovered", 2*time.Minute, lf.done); err != nil {
		t.Fatal(err)
	}
	if v := scrape(t, metricsAddr, `lfuse_replica_failing{db="app.db"`); v != 0 {
		t.Fatalf("lfuse_replica_failing %v after recovery", v)
	}
	checkpointTruncate(t, dbPath)
	lf.stop()
	if a, b := lf.log.count("replica sync failed"), lf.log.count("replica recovered"); a != 1 || b != 1 {
		t.Fatalf("outage logged %d times and its end %d times, want once each:\n%s", a, b, lf.log)
	}
	e.restoreByConfig(cfgPath, 350)
}

func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// scrape reads the first sample from lfuse's /metrics whose line starts
// with prefix.
func scrape(t testing.TB, addr, prefix string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, prefix) {
			f := strings.Fields(line)
			v, err := strconv.ParseFloat(f[len(f)-1], 64)
			if err != nil {
				t.Fatalf("metric line %q: %v", line, err)
			}
			return v
		}
	}
	t.Fatalf("no metric %s in:\n%s", prefix, b)
	return 0
}

// What only the user can fix stops lfuse mount before it mounts, with one
// line that names the replica and what to do, and no credential in it.
func TestReplicaMisconfigured(t *testing.T) {
	env := backendtest.Servers(t)
	createS3Bucket(t, env, "lfuse-e2e")
	e := newEnv(t)
	const wrong = "wrong-secret-0123456789"
	emptyKnownHosts := filepath.Join(e.root, "known_hosts")
	os.WriteFile(emptyKnownHosts, nil, 0o600)
	hostKey, err := os.ReadFile(filepath.Join(env["LFUSE_TEST_SERVERS_DIR"], "ssh", "host_key.pub"))
	if err != nil {
		t.Fatal(err)
	}
	fp := hostKeyFingerprint(t, hostKey)
	for _, c := range []struct {
		name, replica, want string
	}{
		{"s3 wrong secret", fmt.Sprintf("url = %q\nendpoint = %q\naccess-key-id = %q\nsecret-access-key = %q\n", "s3://lfuse-e2e/x",
			env["LFUSE_TEST_S3_ENDPOINT"], env["LFUSE_TEST_S3_ACCESS_KEY_ID"], wrong), "access denied"},
		{"s3 missing bucket", fmt.Sprintf("url = %q\nendpoint = %q\naccess-key-id = %q\nsecret-access-key = %q\n", "s3://no-such-bucket/x",
			env["LFUSE_TEST_S3_ENDPOINT"], env["LFUSE_TEST_S3_ACCESS_KEY_ID"], env["LFUSE_TEST_S3_SECRET_ACCESS_KEY"]), "does not exist"},
		{"azure wrong key", fmt.Sprintf("url = %q\nendpoint = %q\naccount-key = %q\n", "abs://"+env["LFUSE_TEST_AZURE_ACCOUNT"]+"@lfuse-e2e/x",
			env["LFUSE_TEST_AZURE_ENDPOINT"], "d3Jvbmcta2V5LXdyb25nLWtleQ=="), "denied"},
		{"sftp wrong password", fmt.Sprintf("url = %q\npassword = %q\nknown-hosts = %q\n", "sftp://"+env["LFUSE_TEST_SFTP_USER"]+"@"+env["LFUSE_TEST_SFTP_ADDR"]+"/~/x",
			wrong, env["LFUSE_TEST_SFTP_KNOWN_HOSTS"]), "authentication failed"},
		{"sftp unknown host key", fmt.Sprintf("url = %q\npassword = %q\nknown-hosts = %q\n", "sftp://"+env["LFUSE_TEST_SFTP_USER"]+"@"+env["LFUSE_TEST_SFTP_ADDR"]+"/~/x",
			env["LFUSE_TEST_SFTP_PASSWORD"], emptyKnownHosts), fp},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := filepath.Join(e.root, "bad.toml")
			os.WriteFile(cfg, []byte("[[replicas]]\n"+c.replica), 0o600)
			code, log := runLfuse(t, "mount", "-config", cfg, "-data", e.data, e.mnt)
			if code == 0 {
				t.Fatalf("mount with a misconfigured replica exited 0:\n%s", log)
			}
			if strings.Contains(log, "mount ready") {
				t.Fatalf("mounted anyway:\n%s", log)
			}
			last := strings.TrimSpace(log)
			if i := strings.LastIndex(last, "\n"); i >= 0 {
				last = last[i+1:]
			}
			if !strings.Contains(last, c.want) || strings.Contains(log, wrong) || strings.Contains(log, env["LFUSE_TEST_SFTP_PASSWORD"]) {
				t.Fatalf("want one line saying %q, without credentials; got:\n%s", c.want, log)
			}
		})
	}
}

func hostKeyFingerprint(t *testing.T, pub []byte) string {
	t.Helper()
	k, _, _, _, err := ssh.ParseAuthorizedKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return ssh.FingerprintSHA256(k)
}

// A self-signed S3 endpoint is refused, and trusted through SSL_CERT_FILE
// (or skip-verify).
func TestS3TLS(t *testing.T) {
	env := backendtest.Servers(t)
	// AWS_CA_BUNDLE, if set, replaces the system roots for the SDK.
	keys := []string{"LFUSE_ACCESS_KEY_ID=" + env["LFUSE_TEST_S3_ACCESS_KEY_ID"], "LFUSE_SECRET_ACCESS_KEY=" + env["LFUSE_TEST_S3_SECRET_ACCESS_KEY"], "AWS_CA_BUNDLE="}
	url := "s3://no-bucket-there/app.db?endpoint=" + env["LFUSE_TEST_S3_TLS_ENDPOINT"]
	// The TLS server holds no bucket: "does not exist" means the
	// handshake and the signature passed.
	for _, c := range []struct {
		name string
		env  []string
		url  string
		want string
	}{
		{"untrusted", keys, url, "certificate"},
		{"SSL_CERT_FILE", append(keys, "SSL_CERT_FILE="+env["LFUSE_TEST_TLS_CA"]), url, "does not exist"},
		{"skip-verify", keys, url + "&skip-verify=true", "does not exist"},
	} {
		code, log := runLfuseEnv(t, c.env, "ltx", c.url)
		if code == 0 || !strings.Contains(log, c.want) {
			t.Errorf("%s: exit %d, want an error saying %q:\n%s", c.name, code, c.want, log)
		}
	}
}

// tcpProxy forwards a local port to a server, and can cut it: down closes
// the listener and every connection (the backend is unreachable), up
// listens again on the same port.
type tcpProxy struct {
	t      *testing.T
	target string
	addr   string
	// Until cuts reaches maxCuts, new connections break once the server
	// has sent cut bytes through them.
	cut, maxCuts, cuts atomic.Int64
	mu                 sync.Mutex
	ln                 net.Listener
	conns              map[net.Conn]bool
}

func newTCPProxy(t *testing.T, target string) *tcpProxy {
	p := &tcpProxy{t: t, target: target, addr: freeAddr(t), conns: map[net.Conn]bool{}}
	p.up()
	t.Cleanup(p.down)
	return p
}

func (p *tcpProxy) up() {
	ln, err := net.Listen("tcp", p.addr)
	if err != nil {
		p.t.Fatal(err)
	}
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", p.target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns[c], p.conns[s] = true, true
			p.mu.Unlock()
			go func() { io.Copy(s, c); s.Close() }()
			go func() {
				if n := p.cut.Load(); n > 0 && p.cuts.Load() < p.maxCuts.Load() {
					if _, err := io.CopyN(c, s, n); err == nil {
						p.cuts.Add(1)
					}
					s.Close()
				} else {
					io.Copy(c, s)
				}
				c.Close()
			}()
		}
	}()
}

func (p *tcpProxy) down() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		p.ln.Close()
		p.ln = nil
	}
	for c := range p.conns {
		c.Close()
	}
	clear(p.conns)
}

// Every other backend cut off for some seconds, through a proxy in front of
// its server: the app never waits, lfuse logs the outage once and its end
// once, and nothing is lost.
func TestBackendOutage(t *testing.T) {
	env := backendtest.Servers(t)
	for _, c := range cloudReplicas[1:] {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t)
			env2, cut := e.proxied(c.name, env)
			cfgPath := e.cloudConfig(c, env2)
			dbPath := e.path("app.db")
			lf := e.mount("-config", cfgPath)
			createSeq(t, dbPath)
			seqWrite(t, dbPath, 1, 50)
			if err := lf.log.wait("snapshot uploaded", time.Minute, lf.done); err != nil {
				t.Fatal(err)
			}
			cut.down()
			start := time.Now()
			seqWrite(t, dbPath, 51, 200)
			if d := time.Since(start); d > time.Minute {
				t.Fatalf("150 commits took %s with the replica cut off", d)
			}
			if err := lf.log.wait("replica sync failed", time.Minute, lf.done); err != nil {
				t.Fatal(err)
			}
			time.Sleep(2 * time.Second) // an outage of some seconds: retries must not flood the log
			cut.up()
			if err := lf.log.wait("replica recovered", 2*time.Minute, lf.done); err != nil {
				t.Fatal(err)
			}
			checkpointTruncate(t, dbPath)
			lf.stop()
			if a, b := lf.log.count("replica sync failed"), lf.log.count("replica recovered"); a != 1 || b != 1 {
				t.Fatalf("outage logged %d times and its end %d times, want once each:\n%s", a, b, lf.log)
			}
			e.restoreByConfig(cfgPath, 200)
		})
	}
}

// A restore with one of two replicas down: by default it fails, saying how
// to go on, since the replica down may hold commits the other lacks; with
// restore-skip-unreachable, restore-if-missing takes the database from the
// other and the mount starts. Here the replica down is ahead (a mount
// shipped to it alone): when it is back, the new mount's history, by then
// past its TXIDs, must supersede what it held, never mix with it.
func TestRestoreWithAReplicaDown(t *testing.T) {
	env := backendtest.Servers(t)
	e := newEnv(t)
	env2, cut := e.proxied("s3", env)
	s3Only := e.cloudConfig(cloudReplicas[0], env2)
	s3Body, err := os.ReadFile(s3Only)
	if err != nil {
		t.Fatal(err)
	}
	both := filepath.Join(e.root, "both.toml")
	cfg := fmt.Sprintf("[[replicas]]\nurl = %q\nsync-interval = \"100ms\"\n\n%s", "file://"+filepath.Join(e.root, "replica"), s3Body)
	if err := os.WriteFile(both, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	dbPath := e.path("app.db")

	e.replicateSeq(both, 50)
	lf := e.mount("-config", s3Only) // commits the file replica misses
	sqliteCLI(t, dbPath, "CREATE TABLE other(x);"+strings.Repeat("INSERT INTO other VALUES (randomblob(100));", 20))
	checkpointTruncate(t, dbPath)
	lf.stop()

	// The machine is lost, and the replica ahead is down.
	if err := os.RemoveAll(e.data); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(e.data, 0o755); err != nil {
		t.Fatal(err)
	}
	cut.down()
	code, log := runLfuse(t, "restore", "-config", both, "-data", e.data)
	if code == 0 || !strings.Contains(log, "-skip-unreachable") || !strings.Contains(log, cut.addr) {
		t.Fatalf("restore with the replica ahead down: exit %d, want a failure naming it and how to go on:\n%s", code, log)
	}
	if _, err := os.Stat(filepath.Join(e.data, "app.db")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a failed restore left app.db: %v", err)
	}

	lf = e.mount("-config", both, "-restore-if-missing", "-restore-skip-unreachable")
	if !strings.Contains(lf.log.String(), "replica cannot be reached; restoring without it") {
		t.Fatalf("no warning of the replica left out:\n%s", lf.log)
	}
	if n := seqRows(t, filepath.Join(e.data, "app.db")); n != 50 {
		t.Fatalf("restored %d rows from the file replica, want 50", n)
	}
	// Past the TXIDs the replica down holds, under which it has another
	// history.
	seqWrite(t, dbPath, 51, 90)
	cut.up()
	checkpointTruncate(t, dbPath)
	lf.stop() // ships everything to both replicas, or fails
	if !strings.Contains(lf.log.String(), "database needs a new snapshot") {
		t.Fatalf("no new snapshot above what the replica that was down held:\n%s", lf.log)
	}
	// The replica that was ahead now gives the new history, byte for byte.
	e.restoreByConfig(s3Only, 90)
}

// proxied returns the servers' environment with backend name's server
// reached through a new proxy.
func (e *env) proxied(name string, env map[string]string) (map[string]string, *tcpProxy) {
	t := e.t
	env2 := maps.Clone(env)
	var p *tcpProxy
	switch name {
	case "s3":
		p = newTCPProxy(t, strings.TrimPrefix(env["LFUSE_TEST_S3_ENDPOINT"], "http://"))
		env2["LFUSE_TEST_S3_ENDPOINT"] = "http://" + p.addr
	case "gs":
		p = newTCPProxy(t, strings.TrimPrefix(env["LFUSE_TEST_GCS_ENDPOINT"], "http://"))
		env2["LFUSE_TEST_GCS_ENDPOINT"] = "http://" + p.addr
	case "abs":
		u := strings.TrimPrefix(env["LFUSE_TEST_AZURE_ENDPOINT"], "http://")
		host, rest, _ := strings.Cut(u, "/")
		p = newTCPProxy(t, host)
		env2["LFUSE_TEST_AZURE_ENDPOINT"] = "http://" + p.addr + "/" + rest
	case "sftp":
		p = newTCPProxy(t, env["LFUSE_TEST_SFTP_ADDR"])
		env2["LFUSE_TEST_SFTP_ADDR"] = p.addr
		// known_hosts names host and port: the proxy's port needs its own line.
		b, err := os.ReadFile(env["LFUSE_TEST_SFTP_KNOWN_HOSTS"])
		if err != nil {
			t.Fatal(err)
		}
		kh := filepath.Join(e.root, "known_hosts")
		_, key, _ := strings.Cut(strings.TrimSpace(string(b)), " ")
		host, port, _ := net.SplitHostPort(p.addr)
		os.WriteFile(kh, []byte(fmt.Sprintf("[%s]:%s %s\n", host, port, key)), 0o600)
		env2["LFUSE_TEST_SFTP_KNOWN_HOSTS"] = kh
	default:
		t.Fatalf("no proxy for %s", name)
	}
	return env2, p
}

// A restore over connections that break (each after 256 KiB, until three
// have) completes, byte for byte: each file is read on from where its
// connection broke. A restore used to stop at the first break, calling the
// file corrupt (S3, SFTP; the GCS and Azure SDKs resume a body themselves).
func TestRestoreOverBrokenConnections(t *testing.T) {
	env := backendtest.Servers(t)
	for _, c := range cloudReplicas {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t)
			root := fmt.Sprintf("e2e-%d-%d", os.Getpid(), time.Now().UnixNano())
			lf := e.mount("-config", e.cloudConfigAt(c, env, root, "lfuse.toml"))
			dbPath := e.path("app.db")
			// Random blobs: about 3 MB of snapshot that compression
			// cannot shrink below the cut.
			sqliteCLI(t, dbPath, `PRAGMA journal_mode=WAL; CREATE TABLE b(x);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 700) INSERT INTO b SELECT randomblob(4000) FROM n;`)
			for i := 0; i < 20; i++ {
				sqliteCLI(t, dbPath, "UPDATE b SET x = randomblob(4000) WHERE rowid % 20 = "+fmt.Sprint(i)+";")
			}
			checkpointTruncate(t, dbPath)
			lf.stop()
			env2, p := e.proxied(c.name, env)
			p.cut.Store(256 << 10)
			p.maxCuts.Store(3)
			outDir := filepath.Join(e.root, "restored")
			code, log := runLfuse(t, "restore", "-config", e.cloudConfigAt(c, env2, root, "proxied.toml"), "-data", outDir)
			if code != 0 {
				t.Fatalf("restore exited %d:\n%s", code, log)
			}
			if p.cuts.Load() == 0 {
				t.Fatalf("no connection was cut; the test tests nothing:\n%s", log)
			}
			got, _ := os.ReadFile(filepath.Join(outDir, "app.db"))
			if live := liveBytes(t, e); !bytes.Equal(got, live) {
				t.Fatalf("restored %d bytes differ from the live %d bytes at %s", len(got), len(live), firstDiff(got, live))
			}
		})
	}
}

// restoreByConfig restores every database of the config into a new directory
// and checks that app.db is the live database, byte for byte, with seq rows
// 1..rows.
func (e *env) restoreByConfig(cfgPath string, rows int) {
	t := e.t
	t.Helper()
	outDir := filepath.Join(e.root, "restored")
	if code, log := runLfuse(t, "restore", "-config", cfgPath, "-data", outDir); code != 0 {
		t.Fatalf("restore exited %d:\n%s", code, log)
	}
	got, _ := os.ReadFile(filepath.Join(outDir, "app.db"))
	if live := liveBytes(t, e); !bytes.Equal(got, live) {
		t.Fatalf("restored %d bytes differ from the live %d bytes at %s", len(got), len(live), firstDiff(got, live))
	}
	if k := seqRows(t, filepath.Join(outDir, "app.db")); k != rows {
		t.Fatalf("restored %d rows, want %d", k, rows)
	}
}
