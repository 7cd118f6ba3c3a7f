package sftp

import (
	"bytes"
	"cmp"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends"
	"github.com/lfuse/lfuse/backends/backendtest"
	pkgsftp "github.com/pkg/sftp"
	"github.com/superfly/ltx"
	"golang.org/x/crypto/ssh"
)

// config is a login to the test sshd by password or key, under a fresh
// directory of the login directory that the test removes when done.
func config(t *testing.T, env map[string]string, auth string) Config {
	t.Helper()
	cfg := Config{
		Host:       env["LFUSE_TEST_SFTP_ADDR"],
		User:       env["LFUSE_TEST_SFTP_USER"],
		KnownHosts: env["LFUSE_TEST_SFTP_KNOWN_HOSTS"],
		Path:       "lfuse-conformance/" + strings.ToLower(rand.Text()),
	}
	switch auth {
	case "password":
		cfg.Password = env["LFUSE_TEST_SFTP_PASSWORD"]
	case "key":
		cfg.KeyPath = env["LFUSE_TEST_SFTP_KEY"]
	default:
		t.Fatalf("auth %q", auth)
	}
	return cfg
}

// open returns a client for cfg whose root is removed after the test.
func open(t *testing.T, cfg Config) *Client {
	t.Helper()
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		err := c.do(context.Background(), true, func(cl *pkgsftp.Client) error {
			if err := cl.RemoveAll(c.root); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
			return nil
		})
		if err != nil {
			t.Errorf("remove %s: %v", c, err)
		}
		c.Close()
	})
	return c
}

func TestConformance(t *testing.T) {
	env := backendtest.Servers(t)
	for _, auth := range []string{"password", "key"} {
		t.Run(auth, func(t *testing.T) {
			base := open(t, config(t, env, auth))
			backendtest.Run(t, backendtest.Options{
				New:     func(t *testing.T, root string) backendtest.Client { return base.Sub(root) },
				Secrets: []string{env["LFUSE_TEST_SFTP_PASSWORD"]},
			})
		})
	}
}

func serverKey(t *testing.T, env map[string]string) ssh.PublicKey {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(env["LFUSE_TEST_SERVERS_DIR"], "ssh", "host_key.pub"))
	if err != nil {
		t.Fatal(err)
	}
	key, _, _, _, err := ssh.ParseAuthorizedKey(b)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func TestHostKey(t *testing.T) {
	env := backendtest.Servers(t)
	key := serverKey(t, env)
	fp := ssh.FingerprintSHA256(key)
	password := env["LFUSE_TEST_SFTP_PASSWORD"]
	other, err := os.ReadFile(env["LFUSE_TEST_SFTP_KEY"] + ".pub") // any key but the server's
	if err != nil {
		t.Fatal(err)
	}
	otherKey := strings.Join(strings.Fields(string(other))[:2], " ")
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct {
		name   string
		mod    func(*Config)
		expect string // in the error; "" is success
	}{
		{"unknown", func(c *Config) { c.KnownHosts = write("unknown", "otherhost "+otherKey+"\n") }, "unknown host key " + key.Type() + " " + fp},
		{"no known_hosts file", func(c *Config) { c.KnownHosts = filepath.Join(dir, "missing") }, "unknown host key " + key.Type() + " " + fp},
		{"mismatch", func(c *Config) { c.KnownHosts = write("mismatch", "[127.0.0.1]:2222 "+otherKey+"\n") }, "HOST KEY MISMATCH: the server offered " + key.Type() + " " + fp},
		{"host-key mismatch", func(c *Config) { c.HostKey = otherKey }, "host key mismatch: the server offered " + key.Type() + " " + fp},
		{"host-key", func(c *Config) { c.HostKey = authorizedKey(key) }, ""},
		{"known_hosts", func(c *Config) {}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := config(t, env, "password")
			tc.mod(&cfg)
			c, err := New(cfg) // Check makes nothing: no cleanup
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			err = c.Check(context.Background())
			if tc.expect == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.expect) || !errors.Is(err, backends.ErrConfig) {
				t.Fatalf("got %v, want a config error with %q", err, tc.expect)
			}
			if strings.Contains(err.Error(), password) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("the error shows the password or spans lines: %q", err)
			}
			// Every operation refuses the server, not just Check.
			if _, err := c.LTXFiles(context.Background(), 0); err == nil || !strings.Contains(err.Error(), fp) {
				t.Fatalf("a listing after a refused host key: %v", err)
			}
		})
	}
}

func TestWrongCredentials(t *testing.T) {
	env := backendtest.Servers(t)
	// A key the server does not know.
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	block, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		t.Fatal(err)
	}
	keyPath := filepath.Join(t.TempDir(), "id_ed25519")
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(block), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, auth := range []string{"password", "key"} {
		t.Run(auth, func(t *testing.T) {
			cfg := config(t, env, auth)
			cfg.Password, cfg.KeyPath = "", ""
			if auth == "password" {
				cfg.Password = "wrong-" + rand.Text()
			} else {
				cfg.KeyPath = keyPath
			}
			c, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			err = c.Check(context.Background())
			want := "sftp://" + cfg.User + "@" + cfg.Host + ": authentication failed: check the password or key-path"
			if err == nil || err.Error() != want || !errors.Is(err, backends.ErrConfig) {
				t.Fatalf("got %v, want a config error %q", err, want)
			}
			if cfg.Password != "" && strings.Contains(c.String(), cfg.Password) {
				t.Fatalf("String() shows the password: %s", c)
			}
		})
	}
}

func TestCheck(t *testing.T) {
	env := backendtest.Servers(t)
	ctx := context.Background()
	cfg := config(t, env, "key")
	c := open(t, cfg)
	// The root does not exist yet: its nearest parent, the login directory, is checked.
	if err := c.Check(ctx); err != nil {
		t.Fatal(err)
	}
	write(t, c.Sub("a.db"), 0, 1, 1, time.Now())
	// A root under a file cannot be made.
	under := c.Sub("a.db/ltx/0/" + ltx.FormatFilename(1, 1) + "/x")
	if err := under.Check(ctx); err == nil || !strings.Contains(err.Error(), "is not a directory") || !errors.Is(err, backends.ErrConfig) {
		t.Fatalf("a root under a file: %v", err)
	}
	cfg.Path = "/"
	root, err := New(cfg) // not open: its cleanup would remove the root
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	if err := root.Check(ctx); err == nil || !strings.Contains(err.Error(), "cannot write in /") || !errors.Is(err, backends.ErrConfig) {
		t.Fatalf("a root the user cannot write to: %v", err)
	}
}

func write(t *testing.T, c *Client, level int, min, max ltx.TXID, ts time.Time) []byte {
	t.Helper()
	b := backendtest.EncodeFile(t, min, max, 1, int64(max), ts)
	if err := c.WriteLTXFile(context.Background(), level, min, max, bytes.NewReader(b), int64(len(b)), backends.FileMeta{Timestamp: ts}); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestDatabases(t *testing.T) {
	env := backendtest.Servers(t)
	ctx := context.Background()
	c := open(t, config(t, env, "key"))
	if dbs, err := c.Databases(ctx); err != nil || dbs != nil {
		t.Fatalf("a root that does not exist: %v, %v", dbs, err)
	}
	ts := time.Now()
	for i, rel := range backendtest.DatabaseNames {
		write(t, c.Sub(rel), i%10, 1, 1, ts)
		// A deletion marker beside it is no database of its own.
		if err := c.Sub(rel).WriteMarker(ctx, "lfuse-deleted.json", []byte("{}")); err != nil {
			t.Fatal(err)
		}
	}
	// Not databases: an empty directory, and an ltx without levels.
	err := c.do(ctx, true, func(cl *pkgsftp.Client) error {
		if err := cl.MkdirAll(path.Join(c.root, "empty/dir")); err != nil {
			return err
		}
		return cl.MkdirAll(path.Join(c.root, "c.db/ltx/notalevel"))
	})
	if err != nil {
		t.Fatal(err)
	}
	dbs, err := c.Databases(ctx)
	if err != nil || !slices.Equal(dbs, backendtest.DatabaseNames) {
		t.Fatalf("databases %q, %v", dbs, err)
	}
	if dbs, err := c.Sub("sub").Databases(ctx); err != nil || !slices.Equal(dbs, []string{"b.db"}) {
		t.Fatalf("databases under sub: %q, %v", dbs, err)
	}
}

// A process that did not write the files takes their exact times from the
// sidecars, and a sidecar that does not match its file is ignored.
func TestListTimes(t *testing.T) {
	env := backendtest.Servers(t)
	ctx := context.Background()
	cfg := config(t, env, "key")
	w := open(t, cfg)
	base := time.Date(2026, 5, 6, 7, 8, 9, 0, time.UTC)
	for i := 1; i <= 50; i++ {
		write(t, w, 0, ltx.TXID(i), ltx.TXID(i), base.Add(time.Duration(i)*1001*time.Millisecond))
	}
	// No sidecar: the mtime, to the second (unless cached).
	rm := func(name string) {
		err := w.do(ctx, true, func(cl *pkgsftp.Client) error { return cl.Remove(path.Join(w.levelDir(0), name)) })
		if err != nil {
			t.Fatal(err)
		}
	}
	rm(ltx.FormatFilename(3, 3) + metaSuffix)
	// A sidecar for another time (a failed overwrite leaves one): the mtime.
	if err := w.WriteLTXFile(ctx, 0, 4, 4, &failing{}, 100, backends.FileMeta{Timestamp: base.Add(time.Hour)}); err == nil {
		t.Fatal("a failed write succeeded")
	}

	r, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for _, c := range []*Client{r, w} {
		files, err := c.LTXFiles(ctx, 0)
		if err != nil {
			t.Fatal(err)
		}
		if len(files) != 50 {
			t.Fatalf("listed %d files", len(files))
		}
		for i, f := range files {
			want := base.Add(time.Duration(i+1) * 1001 * time.Millisecond)
			if (i+1 == 3 || i+1 == 4) && c == r {
				want = want.Truncate(time.Second)
			}
			if !f.CreatedAt.Equal(want) {
				t.Fatalf("file %d listed at %s, want %s", i+1, f.CreatedAt, want)
			}
		}
	}
	// Cached now: a second listing reads no sidecar, and agrees.
	if files, err := r.LTXFiles(ctx, 0); err != nil || !files[9].CreatedAt.Equal(base.Add(10*1001*time.Millisecond)) {
		t.Fatalf("second listing: %v", err)
	}
}

type failing struct{}

func (failing) Read([]byte) (int, error) { return 0, errors.New("failing reader") }

// A broken connection is replaced on the next call.
func TestReconnect(t *testing.T) {
	env := backendtest.Servers(t)
	ctx := context.Background()
	c := open(t, config(t, env, "password"))
	write(t, c, 0, 1, 1, time.Now())
	for i := 0; i < 3; i++ {
		c.s.mu.Lock()
		cur := c.s.cur
		c.s.mu.Unlock()
		cur.ssh.Close()
		if files, err := c.LTXFiles(ctx, 0); err != nil || len(files) != 1 {
			t.Fatalf("listing after the connection broke: %v %v", files, err)
		}
	}
}

func TestConfig(t *testing.T) {
	for _, tc := range []struct {
		cfg    Config
		expect string
	}{
		{Config{Host: "h", Password: "p"}, "user is required"},
		{Config{User: "u", Password: "p"}, "host is required"},
		{Config{User: "u", Host: "h"}, "sftp://u@h:22: no credentials: set password or key-path"},
		{Config{User: "u", Host: "h:x", Password: "p"}, `bad port "x"`},
		{Config{User: "u", Host: "h", KeyPath: "/nonexistent"}, "key-path"},
		{Config{User: "u", Host: "h", Password: "p", HostKey: "nonsense"}, "host-key"},
	} {
		if _, err := New(tc.cfg); err == nil || !strings.Contains(err.Error(), tc.expect) {
			t.Errorf("%+v: %v, want %q", tc.cfg, err, tc.expect)
		}
	}
	for _, tc := range []struct{ host, path, sub, want string }{
		{"h", "", "", "sftp://u@h:22/~"},
		{"h:2222", "backups", "a.db", "sftp://u@h:2222/~/backups/a.db"},
		{"[::1]:22", "/srv/x", "../../etc", "sftp://u@[::1]:22/srv/x/etc"},
		{"::1", "/", "a/../../b", "sftp://u@[::1]:22/b"},
		{"h", "~/backups/", "", "sftp://u@h:22/~/backups"},
		{"h", "~", "x", "sftp://u@h:22/~/x"},
	} {
		c, err := New(Config{User: "u", Host: tc.host, Password: "secret", HostKey: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBc+jkNUoeaCN9l6lsO09+Z3bjT5vbpAa9HFaAit2dM7", Path: tc.path})
		if err != nil {
			t.Fatal(err)
		}
		if got := c.Sub(tc.sub).String(); got != tc.want {
			t.Errorf("%s %s + %s: %s, want %s", tc.host, tc.path, tc.sub, got, tc.want)
		}
	}
}

// testServer is an SSH server in the process, serving SFTP from a
// directory with pkg/sftp: for the tests that restart a server.
type testServer struct {
	ln    net.Listener
	mu    sync.Mutex
	conns []net.Conn
	wg    sync.WaitGroup
}

func startServer(t *testing.T, addr, dir, password string, key ssh.Signer) *testServer {
	t.Helper()
	cfg := &ssh.ServerConfig{PasswordCallback: func(_ ssh.ConnMetadata, pw []byte) (*ssh.Permissions, error) {
		if string(pw) == password {
			return nil, nil
		}
		return nil, errors.New("wrong password")
	}}
	cfg.AddHostKey(key)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &testServer{ln: ln}
	s.wg.Go(func() {
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns = append(s.conns, nc)
			s.mu.Unlock()
			s.wg.Go(func() { serveSSH(nc, cfg, dir) })
		}
	})
	t.Cleanup(s.stop)
	return s
}

func serveSSH(nc net.Conn, cfg *ssh.ServerConfig, dir string) {
	defer nc.Close()
	_, chans, reqs, err := ssh.NewServerConn(nc, cfg)
	if err != nil {
		return
	}
	go ssh.DiscardRequests(reqs)
	for nch := range chans {
		if nch.ChannelType() != "session" {
			nch.Reject(ssh.UnknownChannelType, "session only")
			continue
		}
		ch, reqs, err := nch.Accept()
		if err != nil {
			return
		}
		go func() {
			defer ch.Close()
			for req := range reqs {
				ok := req.Type == "subsystem" && len(req.Payload) > 4 && string(req.Payload[4:]) == "sftp"
				req.Reply(ok, nil)
				if ok {
					srv, err := pkgsftp.NewServer(ch, pkgsftp.WithServerWorkingDirectory(dir))
					if err == nil {
						srv.Serve()
					}
					return
				}
			}
		}()
	}
}

func (s *testServer) stop() {
	s.ln.Close()
	s.mu.Lock()
	for _, c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// A server restarted under a running client serves it again, without the
// client being restarted; while it is down, calls fail quickly and clearly.
func TestServerRestart(t *testing.T) {
	ctx := context.Background()
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	key, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	const password = "in-process-password"
	s := startServer(t, "127.0.0.1:0", dir, password, key)
	addr := s.ln.Addr().String()
	c, err := New(Config{Host: addr, User: "u", Password: password, HostKey: authorizedKey(key.PublicKey()), Path: "replica", DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	want := write(t, c, 0, 1, 1, time.Now())
	if _, err := os.Stat(filepath.Join(dir, "replica", "ltx", "0", ltx.FormatFilename(1, 1)+metaSuffix)); err != nil {
		t.Fatalf("the sidecar is not in the file backend's place: %v", err)
	}

	s.stop()
	if _, err := c.LTXFiles(ctx, 0); err == nil || !strings.Contains(err.Error(), "sftp://u@"+addr) || strings.Contains(err.Error(), password) {
		t.Fatalf("a listing while the server is down: %v", err)
	}
	if err := c.Check(ctx); err == nil || errors.Is(err, backends.ErrConfig) {
		t.Fatalf("a server that is down is worth retrying: %v", err)
	}
	startServer(t, addr, dir, password, key)
	files, err := c.LTXFiles(ctx, 0)
	if err != nil || len(files) != 1 {
		t.Fatalf("a listing after the restart: %v %v", files, err)
	}
	rc, err := c.OpenLTXFile(ctx, 0, 1, 1, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read back after the restart: %d bytes, %v", len(got), err)
	}
}

// The suite against the in-process server, for when the real servers are
// not running (it takes as long as the real thing).
func TestConformanceInProcess(t *testing.T) {
	dir := cmp.Or(os.Getenv("LFUSE_SERVERS_DIR"), "/tmp/lfuse-servers")
	if _, err := os.Stat(filepath.Join(dir, "env")); err == nil {
		t.Skip("TestConformance runs the suite against the real sshd")
	}
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	key, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	const password = "in-process-password"
	s := startServer(t, "127.0.0.1:0", t.TempDir(), password, key)
	c, err := New(Config{Host: s.ln.Addr().String(), User: "u", Password: password, HostKey: authorizedKey(key.PublicKey())})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	backendtest.Run(t, backendtest.Options{
		New:     func(t *testing.T, root string) backendtest.Client { return c.Sub(root) },
		Secrets: []string{password},
		Many:    300,
	})
}

// A temporary file nothing has written for over a day was left by a
// writer that was cut off, and a listing removes it; a fresh one may be an
// upload in progress and stays.
func TestStaleTempsRemoved(t *testing.T) {
	env := backendtest.Servers(t)
	ctx := context.Background()
	c := open(t, config(t, env, "key"))
	write(t, c, 9, 1, 1, time.Now())
	dir := c.levelDir(9)
	old, fresh := path.Join(dir, backends.TempPrefix+"old"), path.Join(dir, backends.TempPrefix+"fresh")
	ago := time.Now().Add(-25 * time.Hour)
	err := c.do(ctx, true, func(cl *pkgsftp.Client) error {
		for _, p := range []string{old, fresh} {
			f, err := cl.Create(p)
			if err != nil {
				return err
			}
			f.Write([]byte("partial"))
			f.Close()
		}
		return cl.Chtimes(old, ago, ago)
	})
	if err != nil {
		t.Fatal(err)
	}
	if files, err := c.LTXFiles(ctx, 9); err != nil || len(files) != 1 {
		t.Fatalf("listing: %v, %v", files, err)
	}
	err = c.do(ctx, true, func(cl *pkgsftp.Client) error {
		if _, err := cl.Stat(old); !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("stale temporary file: %v", err)
		}
		_, err := cl.Stat(fresh)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// A server that stops answering does not hold a call past its context: the
// connection is closed under it. (Found by an adversarial run: a write to
// a stopped sshd held a stop for 35 s against a 20 s shutdown timeout, and
// a second signal changed nothing, until the keepalive gave up.)
func TestHungServerReleasesAtDeadline(t *testing.T) {
	env := backendtest.Servers(t)
	cfg := config(t, env, "password")
	p := newHangingProxy(t, cfg.Host)
	cfg.Host = p.addr
	// known_hosts names the server by its own port: give its key instead.
	hosts, err := os.ReadFile(cfg.KnownHosts)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, key, _, _, err := ssh.ParseKnownHosts(hosts); err == nil {
		cfg.HostKey, cfg.KnownHosts = strings.TrimSpace(string(ssh.MarshalAuthorizedKey(key))), ""
	} else {
		t.Fatal(err)
	}
	c := open(t, cfg)
	write(t, c, 0, 1, 1, time.Now())
	p.hang()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	body := bytes.Repeat([]byte("x"), 1<<20)
	done := make(chan error, 1)
	go func() {
		done <- c.WriteLTXFile(ctx, 0, 2, 2, bytes.NewReader(body), int64(len(body)), backends.FileMeta{Timestamp: time.Now(), PostApplyChecksum: ltx.ChecksumFlag | 1})
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("a write to a hung server: %v, want the context's deadline", err)
		}
	case <-time.After(keepaliveEvery - 5*time.Second): // before the keepalive could end it
		p.release()
		t.Fatal("a write to a hung server was still waiting 24 s after its deadline")
	}
	p.release()
	if _, err := c.LTXFiles(context.Background(), 0); err != nil {
		t.Fatalf("a listing once the server answers again: %v", err)
	}
}

// hangingProxy forwards TCP to a server until hang, after which it holds
// every byte until release.
type hangingProxy struct {
	addr    string
	hung    chan struct{}
	freed   chan struct{}
	hangOne sync.Once
	freeOne sync.Once
}

func newHangingProxy(t *testing.T, target string) *hangingProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &hangingProxy{addr: ln.Addr().String(), hung: make(chan struct{}), freed: make(chan struct{})}
	t.Cleanup(func() { ln.Close(); p.release() })
	go func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			out, err := net.Dial("tcp", target)
			if err != nil {
				in.Close()
				continue
			}
			go p.pipe(out, in)
			go p.pipe(in, out)
		}
	}()
	return p
}

func (p *hangingProxy) pipe(dst, src net.Conn) {
	defer dst.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		select {
		case <-p.hung:
			<-p.freed
		default:
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *hangingProxy) hang()    { p.hangOne.Do(func() { close(p.hung) }) }
func (p *hangingProxy) release() { p.freeOne.Do(func() { close(p.freed) }) }
