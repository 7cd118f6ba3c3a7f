// Package sftp stores replica files on an SSH server over SFTP, laid out as
// the file backend lays them out (and Litestream v0.5 reads them):
//
//	ROOT/ltx/<level>/<min %016x>-<max %016x>.ltx
//	ROOT/ltx/<level>/<min %016x>-<max %016x>.ltx.meta
//
// Each file's mtime is its LTX header timestamp, and "<name>.meta" holds the
// metadata lfuse records beside it. Clients made with Sub share one SSH
// connection, dialled on first use and again after it breaks.
package sftp

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/lfuse/lfuse/backends"
	pkgsftp "github.com/pkg/sftp"
	"github.com/superfly/ltx"
	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// Config says where the replica lives and how to log in.
type Config struct {
	Host        string        // host or host:port; port defaults to 22
	User        string        // login name
	Password    string        // password auth, if set
	KeyPath     string        // private key file (unencrypted OpenSSH/PEM), if set
	HostKey     string        // the server's public key, authorized_keys format; if empty, KnownHosts is used
	KnownHosts  string        // known_hosts file; default ~/.ssh/known_hosts
	Path        string        // root directory on the server (absolute, or relative to the login dir; "~/x" is x)
	DialTimeout time.Duration // default 10s
}

const (
	metaSuffix = ".meta"

	// 32 KiB is the packet size every server must accept; 64 of them in
	// flight per file keep a 2 MiB window busy, enough for a fast WAN link.
	maxPacket  = 32 << 10
	inFlight   = 64
	readBuffer = 1 << 20 // one refill is 32 pipelined reads

	// Sidecar reads and deletes are small requests: this many at once hide
	// the round trips without flooding the server.
	parallelOps = 32

	keepaliveEvery   = 30 * time.Second
	keepaliveTimeout = 15 * time.Second
)

// Client is a replica rooted at one directory of an SFTP server.
type Client struct {
	s    *shared
	root string // cleaned; "." is the login directory
}

// New checks cfg and returns a client. It does not connect: the first
// operation (or Check) does.
func New(cfg Config) (*Client, error) {
	if cfg.User == "" {
		return nil, errors.New("sftp: user is required")
	}
	if cfg.Host == "" {
		return nil, errors.New("sftp: host is required")
	}
	host, port, err := net.SplitHostPort(cfg.Host)
	if err != nil { // no port; a bare IPv6 address lands here too
		host, port = strings.Trim(cfg.Host, "[]"), "22"
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return nil, fmt.Errorf("sftp: host %q: bad port %q", cfg.Host, port)
	}
	s := &shared{
		addr:    net.JoinHostPort(host, port),
		user:    cfg.User,
		timeout: cfg.DialTimeout,
		times:   map[string]map[string]stamp{},
	}
	s.name = "sftp://" + cfg.User + "@" + s.addr
	if s.timeout <= 0 {
		s.timeout = 10 * time.Second
	}
	if cfg.Password == "" && cfg.KeyPath == "" {
		return nil, fmt.Errorf("%s: no credentials: set password or key-path", s.name)
	}
	if cfg.KeyPath != "" {
		b, err := os.ReadFile(cfg.KeyPath)
		if err != nil {
			return nil, fmt.Errorf("%s: key-path: %w", s.name, err)
		}
		signer, err := ssh.ParsePrivateKey(b)
		var pm *ssh.PassphraseMissingError
		if errors.As(err, &pm) {
			return nil, fmt.Errorf("%s: key-path %s is protected by a passphrase: use a key without one", s.name, cfg.KeyPath)
		} else if err != nil {
			return nil, fmt.Errorf("%s: key-path %s: %w", s.name, cfg.KeyPath, err)
		}
		s.auth = append(s.auth, ssh.PublicKeys(signer))
	}
	if pw := cfg.Password; pw != "" {
		// Servers that leave passwords to PAM ask through keyboard-interactive.
		s.auth = append(s.auth, ssh.Password(pw), ssh.KeyboardInteractive(
			func(_, _ string, questions []string, _ []bool) ([]string, error) {
				answers := make([]string, len(questions))
				for i := range answers {
					answers[i] = pw
				}
				return answers, nil
			}))
	}
	if cfg.HostKey != "" {
		key, _, _, _, err := ssh.ParseAuthorizedKey([]byte(cfg.HostKey))
		if err != nil {
			return nil, fmt.Errorf("%s: host-key %q is not a public key like \"ssh-ed25519 AAAA...\": %v", s.name, cfg.HostKey, err)
		}
		s.hostKey = key
	} else {
		s.knownHosts = cfg.KnownHosts
		if s.knownHosts == "" {
			home, err := os.UserHomeDir()
			if err != nil {
				return nil, fmt.Errorf("%s: no known-hosts file (and no home directory for ~/.ssh/known_hosts): set known-hosts or host-key", s.name)
			}
			s.knownHosts = filepath.Join(home, ".ssh", "known_hosts")
		}
	}
	// SFTP servers do not expand "~", and a relative path is relative to
	// the login directory already.
	root := cfg.Path
	if root == "~" || strings.HasPrefix(root, "~/") {
		root = strings.TrimLeft(root[1:], "/")
	}
	root = path.Clean(root) // "" is "."
	return &Client{s: s, root: root}, nil
}

// Sub returns a client for ROOT/rel on the same connection. rel cannot
// climb out of the root: leading ".." elements are dropped.
func (c *Client) Sub(rel string) *Client {
	rel = path.Clean("/" + rel)[1:]
	return &Client{s: c.s, root: path.Join(c.root, rel)}
}

// Close ends the connection shared with the Sub clients. A later call on
// any of them dials a new one.
func (c *Client) Close() error {
	c.s.mu.Lock()
	cur := c.s.cur
	c.s.cur = nil
	c.s.mu.Unlock()
	if cur == nil {
		return nil
	}
	return cur.close()
}

func (c *Client) Type() string { return "sftp" }

// String is the location without credentials. A path relative to the
// login directory shows as "/~/path", as curl writes it.
func (c *Client) String() string { return c.s.name + "/" + strings.TrimPrefix(c.display(c.root), "/") }

func (c *Client) display(p string) string {
	switch {
	case path.IsAbs(p):
		return p
	case p == ".":
		return "~"
	}
	return "~/" + p
}

func (c *Client) levelDir(level int) string { return path.Join(c.root, "ltx", strconv.Itoa(level)) }

func (c *Client) path(level int, min, max ltx.TXID) string {
	return path.Join(c.levelDir(level), ltx.FormatFilename(min, max))
}

func rel(level int, min, max ltx.TXID) string {
	return fmt.Sprintf("ltx/%d/%s", level, ltx.FormatFilename(min, max))
}

// Check connects and checks that the root, or the nearest parent of it that
// exists, is a directory the user can write in.
func (c *Client) Check(ctx context.Context) error {
	return c.do(ctx, true, func(cl *pkgsftp.Client) error {
		dir := c.root
		fi, err := cl.Stat(dir)
		for errors.Is(err, os.ErrNotExist) && path.Dir(dir) != dir {
			dir = path.Dir(dir)
			fi, err = cl.Stat(dir)
		}
		if errors.Is(err, os.ErrPermission) {
			return backends.ConfigError(fmt.Errorf("%s: %s: %w: check the path and the user's permissions", c, c.display(dir), err))
		} else if err != nil {
			return fmt.Errorf("%s: %s: %w", c, c.display(dir), err)
		}
		if !fi.IsDir() {
			return backends.ConfigError(fmt.Errorf("%s: %s is not a directory: check the path", c, c.display(dir)))
		}
		probe := path.Join(dir, ".lfuse-check-"+rand.Text())
		f, err := cl.OpenFile(probe, os.O_WRONLY|os.O_CREATE|os.O_EXCL)
		if err != nil && !isConnErr(err) {
			return backends.ConfigError(fmt.Errorf("%s: cannot write in %s: %w: check the path and the user's permissions", c, c.display(dir), err))
		} else if err != nil {
			return err
		}
		f.Close()
		return cl.Remove(probe)
	})
}

// Databases lists, relative to the root, every directory under it whose
// "ltx" directory holds a level: the databases replicated there. A root that
// does not exist holds none.
func (c *Client) Databases(ctx context.Context) ([]string, error) {
	var rels []string
	err := c.do(ctx, true, func(cl *pkgsftp.Client) error {
		rels = nil
		var walk func(rel string) error
		walk = func(rel string) error {
			ents, err := cl.ReadDirContext(ctx, path.Join(c.root, rel))
			if err != nil {
				if rel == "" || isConnErr(err) || ctx.Err() != nil {
					return err
				}
				return nil // an unreadable corner of the tree is not fatal
			}
			for _, e := range ents {
				if !e.IsDir() { // symlinks included: they could loop
					continue
				}
				if e.Name() == "ltx" {
					// Its own replica's, if it holds a level; else a
					// directory like any other (ltx/app.db, a database
					// called ltx). The rest of a database's directory is
					// walked too: x.db/y.db can follow a deleted x.db.
					levels, err := cl.ReadDirContext(ctx, path.Join(c.root, rel, "ltx"))
					if err != nil && (isConnErr(err) || ctx.Err() != nil) {
						return err
					}
					holds := false
					// Snapshots first: a replica always holds one, and
					// level 0 can hold thousands of files.
					slices.SortFunc(levels, func(a, b os.FileInfo) int { return strings.Compare(b.Name(), a.Name()) })
					for _, l := range levels {
						if !l.IsDir() || !backends.IsLevelName(l.Name()) {
							continue
						}
						files, err := cl.ReadDirContext(ctx, path.Join(c.root, rel, "ltx", l.Name()))
						if err != nil && (isConnErr(err) || ctx.Err() != nil) {
							return err
						}
						if holds = slices.ContainsFunc(files, func(f os.FileInfo) bool { return f.Mode().IsRegular() && backends.IsLTXName(f.Name()) }); holds {
							break
						}
					}
					if holds {
						if rel != "" {
							rels = append(rels, rel)
						}
						continue
					}
				}
				if err := walk(path.Join(rel, e.Name())); err != nil {
					return err
				}
			}
			return nil
		}
		return walk("")
	})
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, fmt.Errorf("list databases: %w", err)
	}
	slices.Sort(rels)
	return rels, nil
}

// LTXFiles lists one level. A level that does not exist yet is empty.
//
// SFTP times are whole seconds, but CreatedAt must be the header timestamp
// to the millisecond (restores to a point in time compare against it), and
// only the .meta sidecar has that. Reading a sidecar per file would cost
// three round trips each on every listing, so the exact times are cached
// per file, keyed by mtime and size (an overwrite changes one of them, or
// the write that did it updated the cache). Files this process wrote are
// cached as written; others have their sidecars read once, parallelOps at a
// time. In steady state a listing is one READDIR; a new process pays about
// 3×files/parallelOps round trips for its first listing of a level.
// Temporary files that a writer cut off or killed left there are removed.
func (c *Client) LTXFiles(ctx context.Context, level int) ([]ltx.FileInfo, error) {
	dir := c.levelDir(level)
	var infos []ltx.FileInfo
	err := c.do(ctx, true, func(cl *pkgsftp.Client) error {
		ents, err := cl.ReadDirContext(ctx, dir)
		if err != nil {
			return err
		}
		metaSize := map[string]int64{} // by the name of the file it describes
		now := time.Now()
		for _, e := range ents {
			if e.Mode().IsRegular() && strings.HasSuffix(e.Name(), metaSuffix) {
				metaSize[strings.TrimSuffix(e.Name(), metaSuffix)] = e.Size()
			}
			if e.Mode().IsRegular() && backends.StaleTemp(e.Name(), e.ModTime(), now) {
				// Left by a writer that was cut off or killed. A
				// read-only account keeps it.
				if err := cl.Remove(path.Join(dir, e.Name())); isConnErr(err) {
					return err
				}
			}
		}
		known := c.s.cached(dir)
		fresh := map[string]stamp{}
		infos = infos[:0]
		var unknown []int
		for _, e := range ents {
			if !e.Mode().IsRegular() {
				continue // not ours; a symlink could point anywhere
			}
			min, max, err := ltx.ParseFilename(e.Name())
			if err != nil {
				continue
			}
			info := ltx.FileInfo{Level: level, MinTXID: min, MaxTXID: max, Size: e.Size(), CreatedAt: e.ModTime().UTC()}
			st := stamp{mtime: e.ModTime().Unix(), size: e.Size()}
			if k, ok := known[e.Name()]; ok && k.mtime == st.mtime && k.size == st.size {
				info.CreatedAt = k.ts
			} else if _, ok := metaSize[e.Name()]; ok {
				unknown = append(unknown, len(infos))
			}
			infos = append(infos, info)
			st.ts = info.CreatedAt
			fresh[e.Name()] = st
		}
		err = parallel(ctx, len(unknown), func(i int) error {
			info := &infos[unknown[i]]
			name := ltx.FormatFilename(info.MinTXID, info.MaxTXID)
			meta, err := readMeta(cl, path.Join(dir, name)+metaSuffix, metaSize[name])
			if isConnErr(err) {
				return err
			} else if err != nil {
				return nil // gone since, or not ours: the mtime will do
			}
			// A sidecar left by a failed overwrite describes other data.
			if meta.Timestamp.Unix() == info.CreatedAt.Unix() {
				info.CreatedAt = meta.Timestamp
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, i := range unknown {
			name := ltx.FormatFilename(infos[i].MinTXID, infos[i].MaxTXID)
			st := fresh[name]
			st.ts = infos[i].CreatedAt
			fresh[name] = st
		}
		c.s.setCached(dir, fresh) // drops what is gone
		return nil
	})
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, fmt.Errorf("list ltx/%d: %w", level, err)
	}
	slices.SortFunc(infos, func(a, b ltx.FileInfo) int { return cmp.Compare(a.MinTXID, b.MinTXID) })
	return infos, nil
}

// OpenLTXFile streams a file, reading ahead in pipelined chunks.
func (c *Client) OpenLTXFile(ctx context.Context, level int, min, max ltx.TXID, offset, size int64) (io.ReadCloser, error) {
	var f *pkgsftp.File
	err := c.do(ctx, true, func(cl *pkgsftp.Client) (err error) {
		f, err = cl.Open(c.path(level, min, max))
		return err
	})
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", rel(level, min, max), backends.ErrNotFound)
	} else if err != nil {
		return nil, fmt.Errorf("open %s: %w", rel(level, min, max), err)
	}
	if _, err := f.Seek(offset, io.SeekStart); err != nil {
		f.Close()
		return nil, fmt.Errorf("open %s: %w", rel(level, min, max), err)
	}
	var r io.Reader = f
	if size > 0 {
		r = io.LimitReader(f, size)
	}
	// Callers read in small pieces (io.Copy's 32 KiB), one round trip
	// each; the buffer turns them into large pipelined reads.
	r = bufio.NewReaderSize(r, readBuffer)
	return &body{Reader: backends.ContextReader(ctx, r), f: f}, nil
}

type body struct {
	io.Reader
	f *pkgsftp.File
}

func (b *body) Close() error { return b.f.Close() }

type metaFile struct {
	Timestamp         string `json:"timestamp"`
	PostApplyChecksum string `json:"post_apply_checksum"`
}

// WriteLTXFile writes the metadata, then the file, each to a temporary name
// that is renamed into place, so a failure leaves either no file or a whole
// one with its metadata.
func (c *Client) WriteLTXFile(ctx context.Context, level int, min, max ltx.TXID, r io.Reader, size int64, meta backends.FileMeta) error {
	dir, p := c.levelDir(level), c.path(level, min, max)
	mb, _ := json.Marshal(metaFile{Timestamp: ltx.FormatTimestamp(meta.Timestamp), PostApplyChecksum: meta.PostApplyChecksum.String()})
	// Not retried on a broken connection: r is spent.
	err := c.do(ctx, false, func(cl *pkgsftp.Client) error {
		if err := writeAtomic(cl, p+metaSuffix, bytes.NewReader(mb), int64(len(mb)), time.Time{}); err != nil {
			return err
		}
		return writeAtomic(cl, p, srcReader{backends.ContextReader(ctx, r)}, size, meta.Timestamp)
	})
	if err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return fmt.Errorf("write %s: %w", rel(level, min, max), err)
	}
	if !meta.Timestamp.IsZero() {
		// As a reader of the sidecar will see it: to the millisecond.
		ts, _ := ltx.ParseTimestamp(ltx.FormatTimestamp(meta.Timestamp))
		c.s.putCached(dir, path.Base(p), stamp{mtime: meta.Timestamp.Unix(), size: size, ts: ts.UTC()})
	}
	return nil
}

// writeAtomic writes size bytes of r to a temporary file beside p, syncs
// it, sets its mtime (unless zero) and renames it onto p. On failure it removes the
// temporary file.
func writeAtomic(cl *pkgsftp.Client, p string, r io.Reader, size int64, mtime time.Time) (err error) {
	tmp := path.Join(path.Dir(p), backends.TempPrefix+rand.Text())
	const flags = os.O_WRONLY | os.O_CREATE | os.O_EXCL
	f, err := cl.OpenFile(tmp, flags)
	if errors.Is(err, os.ErrNotExist) {
		// The level directory is made on the first write that needs it,
		// which spares every other write a round trip.
		if err := cl.MkdirAll(path.Dir(p)); err != nil {
			return err
		}
		f, err = cl.OpenFile(tmp, flags)
	}
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			cl.Remove(tmp)
		}
	}()
	// One byte over size is enough to tell that r is too long.
	n, err := f.ReadFromWithConcurrency(io.LimitReader(r, size+1), inFlight)
	if err != nil {
		return err
	}
	if n != size {
		return fmt.Errorf("got %d bytes, expected %d", n, size)
	}
	// As the file backend does, so a server that crashes after the rename
	// does not keep the name with lost data. Servers without fsync@openssh.com
	// get what their close gives.
	if _, ok := cl.HasExtension("fsync@openssh.com"); ok {
		if err := f.Sync(); err != nil {
			return err
		}
	}
	if err := f.Close(); err != nil {
		return err
	}
	if !mtime.IsZero() {
		if err := cl.Chtimes(tmp, mtime, mtime); err != nil {
			return err
		}
	}
	return rename(cl, tmp, p)
}

// rename replaces newname. SFTP's own rename refuses an existing target;
// OpenSSH's posix-rename replaces it atomically. Without it, the target is
// removed first, and is briefly missing.
func rename(cl *pkgsftp.Client, oldname, newname string) error {
	if _, ok := cl.HasExtension("posix-rename@openssh.com"); ok {
		return cl.PosixRename(oldname, newname)
	}
	err := cl.Rename(oldname, newname)
	if err != nil && !isConnErr(err) {
		if rerr := cl.Remove(newname); rerr == nil || errors.Is(rerr, os.ErrNotExist) {
			err = cl.Rename(oldname, newname)
		}
	}
	return err
}

// FileMeta reads the metadata written beside a file.
func (c *Client) FileMeta(ctx context.Context, level int, min, max ltx.TXID) (backends.FileMeta, error) {
	var meta backends.FileMeta
	err := c.do(ctx, true, func(cl *pkgsftp.Client) (err error) {
		meta, err = readMeta(cl, c.path(level, min, max)+metaSuffix, -1)
		return err
	})
	if errors.Is(err, os.ErrNotExist) {
		return meta, fmt.Errorf("%s%s: %w", rel(level, min, max), metaSuffix, backends.ErrNotFound)
	} else if err != nil {
		return meta, fmt.Errorf("%s%s: %w", rel(level, min, max), metaSuffix, err)
	}
	return meta, nil
}

// readMeta reads a sidecar. Given its size (from a listing), one read
// request gets it; otherwise a second one finds its end.
func readMeta(cl *pkgsftp.Client, p string, size int64) (backends.FileMeta, error) {
	var meta backends.FileMeta
	f, err := cl.Open(p)
	if err != nil {
		return meta, err
	}
	buf := make([]byte, 4096)
	if size >= 0 && size < int64(len(buf)) {
		buf = buf[:size]
	}
	n, err := f.ReadAt(buf, 0)
	f.Close()
	if err != nil && err != io.EOF {
		return meta, err
	}
	var m metaFile
	if err := json.Unmarshal(buf[:n], &m); err != nil {
		return meta, err
	}
	if meta.Timestamp, err = ltx.ParseTimestamp(m.Timestamp); err != nil {
		return meta, fmt.Errorf("timestamp: %w", err)
	}
	meta.Timestamp = meta.Timestamp.UTC()
	if meta.PostApplyChecksum, err = ltx.ParseChecksum(m.PostApplyChecksum); err != nil {
		return meta, fmt.Errorf("checksum: %w", err)
	}
	return meta, nil
}

// WriteMarker writes a small file at the replica's root, beside its "ltx"
// directory, where Litestream does not look.
func (c *Client) WriteMarker(ctx context.Context, name string, data []byte) error {
	err := c.do(ctx, true, func(cl *pkgsftp.Client) error {
		return writeAtomic(cl, path.Join(c.root, name), bytes.NewReader(data), int64(len(data)), time.Time{})
	})
	if err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	return nil
}

// ReadMarker reads what WriteMarker wrote.
func (c *Client) ReadMarker(ctx context.Context, name string) ([]byte, error) {
	var b []byte
	err := c.do(ctx, true, func(cl *pkgsftp.Client) error {
		f, err := cl.Open(path.Join(c.root, name))
		if err != nil {
			return err
		}
		defer f.Close()
		b, err = io.ReadAll(io.LimitReader(f, backends.MaxMarker))
		return err
	})
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", name, backends.ErrNotFound)
	} else if err != nil {
		return nil, fmt.Errorf("read %s: %w", name, err)
	}
	return b, nil
}

// DeleteMarker removes what WriteMarker wrote.
func (c *Client) DeleteMarker(ctx context.Context, name string) error {
	err := c.do(ctx, true, func(cl *pkgsftp.Client) error {
		if err := cl.Remove(path.Join(c.root, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}

// DeleteLTXFiles removes files and their metadata; what is gone already is
// not an error.
func (c *Client) DeleteLTXFiles(ctx context.Context, files []ltx.FileInfo) error {
	err := c.do(ctx, true, func(cl *pkgsftp.Client) error {
		return parallel(ctx, len(files), func(i int) error {
			p := c.path(files[i].Level, files[i].MinTXID, files[i].MaxTXID)
			for _, p := range []string{p, p + metaSuffix} {
				if err := cl.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
					return err
				}
			}
			c.s.uncache(path.Dir(p), path.Base(p))
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("delete: %w", err)
	}
	return nil
}

// parallel calls fn(0..n-1), parallelOps at a time, until one fails or ctx
// is done.
func parallel(ctx context.Context, n int, fn func(i int) error) error {
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error
	)
	failed := make(chan struct{})
	fail := func(err error) { once.Do(func() { first = err; close(failed) }) }
	sem := make(chan struct{}, parallelOps)
loop:
	for i := range n {
		if err := ctx.Err(); err != nil {
			fail(err)
		}
		select {
		case sem <- struct{}{}:
		case <-failed:
		}
		select {
		case <-failed:
			break loop
		default:
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := fn(i); err != nil {
				fail(err)
			}
		}()
	}
	wg.Wait()
	return first
}

// shared is the connection the clients of one server share, and what they
// remember about its files.
type shared struct {
	name       string // sftp://user@host:port, for messages
	addr, user string
	auth       []ssh.AuthMethod
	hostKey    ssh.PublicKey // or, if nil:
	knownHosts string
	timeout    time.Duration

	mu  sync.Mutex // held while dialling: one connection, not one per caller
	cur *conn

	timesMu sync.Mutex
	times   map[string]map[string]stamp // level directory → file name → time
}

// stamp is the exact time of a file with this mtime and size.
type stamp struct {
	mtime, size int64
	ts          time.Time
}

func (s *shared) cached(dir string) map[string]stamp {
	s.timesMu.Lock()
	defer s.timesMu.Unlock()
	return maps.Clone(s.times[dir])
}

func (s *shared) setCached(dir string, m map[string]stamp) {
	s.timesMu.Lock()
	defer s.timesMu.Unlock()
	s.times[dir] = m
}

func (s *shared) putCached(dir, name string, st stamp) {
	s.timesMu.Lock()
	defer s.timesMu.Unlock()
	if s.times[dir] == nil {
		s.times[dir] = map[string]stamp{}
	}
	s.times[dir][name] = st
}

// uncache forgets deleted files, for a process that writes and deletes but
// never lists.
func (s *shared) uncache(dir, name string) {
	s.timesMu.Lock()
	defer s.timesMu.Unlock()
	delete(s.times[dir], name)
}

type conn struct {
	ssh  *ssh.Client
	sftp *pkgsftp.Client
}

// close ends the transport first: closing the SFTP session waits for the
// server's answer, which a dead server never sends.
func (c *conn) close() error {
	err := c.ssh.Close()
	c.sftp.Close()
	return err
}

// do runs op on the shared connection. A broken connection is dropped, so
// the next call dials again; an idempotent op is retried once on a new
// connection if the one it got had broken before it was used.
func (c *Client) do(ctx context.Context, idempotent bool, op func(*pkgsftp.Client) error) error {
	for attempt := 0; ; attempt++ {
		cn, fresh, err := c.s.get(ctx)
		if err != nil {
			return err
		}
		// Most of pkg/sftp's calls take no context: a server that stops
		// answering held them until the keepalive gave up, up to 45 s,
		// whatever the caller's deadline (a stop overran its shutdown
		// timeout that way, and a second signal changed nothing). Closing
		// the connection when ctx ends fails them at once; the next call
		// dials again.
		stop := context.AfterFunc(ctx, func() { c.s.drop(cn) })
		err = op(cn.sftp)
		if !stop() && err != nil {
			return fmt.Errorf("%s: %w", c.s.name, context.Cause(ctx))
		}
		if err == nil || !isConnErr(err) {
			return err
		}
		c.s.drop(cn)
		if !idempotent || fresh || attempt > 0 || ctx.Err() != nil {
			return backends.UnavailableError(fmt.Errorf("%s: connection lost: %w", c.s.name, err))
		}
	}
}

// get returns the connection, dialling if there is none; fresh says it was
// dialled for this call.
func (s *shared) get(ctx context.Context) (cn *conn, fresh bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur != nil {
		return s.cur, false, nil
	}
	if err := ctx.Err(); err != nil {
		return nil, false, err
	}
	cn, err = s.dial(ctx)
	if err != nil {
		return nil, false, err
	}
	s.cur = cn
	done := make(chan struct{})
	go func() {
		cn.sftp.Wait()
		close(done)
		s.drop(cn)
	}()
	go keepalive(cn, done)
	return cn, true, nil
}

// drop closes cn and forgets it, unless it was replaced already.
func (s *shared) drop(cn *conn) {
	s.mu.Lock()
	if s.cur == cn {
		s.cur = nil
	}
	s.mu.Unlock()
	cn.close()
}

// keepalive closes a connection whose server stopped answering (a network
// that drops packets rather than the connection), which fails the calls
// waiting on it instead of leaving them hanging.
func keepalive(cn *conn, done <-chan struct{}) {
	tick := time.NewTicker(keepaliveEvery)
	defer tick.Stop()
	for {
		select {
		case <-done:
			return
		case <-tick.C:
		}
		replied := make(chan struct{})
		go func() {
			cn.ssh.SendRequest("keepalive@openssh.com", true, nil)
			close(replied)
		}()
		select {
		case <-replied:
		case <-done:
			return
		case <-time.After(keepaliveTimeout):
			cn.ssh.Close()
			return
		}
	}
}

func (s *shared) dial(ctx context.Context) (*conn, error) {
	check, algos, err := s.hostKeyCheck()
	if err != nil {
		return nil, err
	}
	var hostErr error
	hostChecked := false // and so what fails next is authentication
	cfg := &ssh.ClientConfig{
		User: s.user,
		Auth: s.auth,
		HostKeyCallback: func(host string, remote net.Addr, key ssh.PublicKey) error {
			hostErr = check(host, remote, key)
			hostChecked = hostErr == nil
			return hostErr
		},
		HostKeyAlgorithms: algos,
	}
	d := net.Dialer{Timeout: s.timeout}
	nc, err := d.DialContext(ctx, "tcp", s.addr)
	if err != nil {
		return nil, fmt.Errorf("%s: cannot connect: %w", s.name, err)
	}
	// The handshake does not watch ctx: the deadline and a close do.
	nc.SetDeadline(time.Now().Add(s.timeout))
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	fail := func(err error) (*conn, error) {
		stop()
		nc.Close()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	cc, chans, reqs, err := ssh.NewClientConn(nc, s.addr, cfg)
	if err != nil {
		var ne net.Error
		switch {
		case hostErr != nil:
			return fail(backends.ConfigError(fmt.Errorf("%s: %w", s.name, hostErr)))
		case errors.As(err, &ne) && ne.Timeout():
			return fail(fmt.Errorf("%s: no SSH handshake within %s: is it an SSH server?", s.name, s.timeout))
		case hostChecked && errors.Is(err, io.EOF):
			return fail(backends.ConfigError(fmt.Errorf("%s: the server closed the connection while authenticating: check the password or key-path, and the server's log", s.name)))
		case hostChecked:
			// Rejected credentials, or a keyboard-interactive method the
			// server offers but cannot run (x/crypto reports "unexpected
			// message" for that).
			return fail(backends.ConfigError(fmt.Errorf("%s: authentication failed: check the password or key-path", s.name)))
		}
		return fail(fmt.Errorf("%s: %w", s.name, err))
	}
	sc := ssh.NewClient(cc, chans, reqs)
	fc, err := pkgsftp.NewClient(sc, pkgsftp.MaxPacket(maxPacket), pkgsftp.MaxConcurrentRequestsPerFile(inFlight), pkgsftp.UseConcurrentWrites(true))
	if err != nil {
		sc.Close()
		return fail(fmt.Errorf("%s: cannot start SFTP (is the sftp subsystem enabled on the server?): %w", s.name, err))
	}
	if !stop() {
		fc.Close()
		sc.Close()
		return nil, ctx.Err()
	}
	nc.SetDeadline(time.Time{})
	return &conn{ssh: sc, sftp: fc}, nil
}

// hostKeyCheck returns the host key callback and the host key algorithms
// to offer: those of the keys known for the host, since Go's default order
// could have the server show a key of a kind known_hosts does not hold.
// known_hosts is read at each dial, so a key added to it is used without a
// restart.
func (s *shared) hostKeyCheck() (ssh.HostKeyCallback, []string, error) {
	if s.hostKey != nil {
		want := s.hostKey
		check := func(_ string, _ net.Addr, key ssh.PublicKey) error {
			if bytes.Equal(key.Marshal(), want.Marshal()) {
				return nil
			}
			return fmt.Errorf("host key mismatch: the server offered %s %s, host-key is %s %s: if the server's key really changed, set host-key to %q",
				key.Type(), ssh.FingerprintSHA256(key), want.Type(), ssh.FingerprintSHA256(want), authorizedKey(key))
		}
		return check, algorithms(want.Type()), nil
	}
	var files []string
	if _, err := os.Stat(s.knownHosts); err == nil {
		files = append(files, s.knownHosts)
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, nil, backends.ConfigError(fmt.Errorf("%s: known-hosts: %w", s.name, err))
	}
	db, err := knownhosts.New(files...)
	if err != nil {
		return nil, nil, backends.ConfigError(fmt.Errorf("%s: known-hosts: %w", s.name, err))
	}
	check := func(host string, remote net.Addr, key ssh.PublicKey) error {
		err := db(host, remote, key)
		var ke *knownhosts.KeyError
		var re *knownhosts.RevokedError
		switch {
		case errors.As(err, &ke) && len(ke.Want) == 0:
			return fmt.Errorf("unknown host key %s %s: if that is the server's key, add %q to %s, or set host-key to %q",
				key.Type(), ssh.FingerprintSHA256(key), knownhosts.Line([]string{s.addr}, key), s.knownHosts, authorizedKey(key))
		case errors.As(err, &ke):
			return fmt.Errorf("HOST KEY MISMATCH: the server offered %s %s, but %s:%d has %s %s: the connection may be intercepted; if the server's key really changed, replace that line with %q",
				key.Type(), ssh.FingerprintSHA256(key), ke.Want[0].Filename, ke.Want[0].Line, ke.Want[0].Key.Type(), ssh.FingerprintSHA256(ke.Want[0].Key),
				knownhosts.Line([]string{s.addr}, key))
		case errors.As(err, &re):
			return fmt.Errorf("the server's host key %s is marked revoked in %s:%d", ssh.FingerprintSHA256(key), re.Revoked.Filename, re.Revoked.Line)
		}
		return err
	}
	// A key no server has brings back the keys known for the address.
	probe, _ := ssh.NewPublicKey(ed25519.PublicKey(make([]byte, ed25519.PublicKeySize)))
	var algos []string
	var ke *knownhosts.KeyError
	if err := db(s.addr, &net.TCPAddr{}, probe); errors.As(err, &ke) {
		for _, k := range ke.Want {
			for _, a := range algorithms(k.Key.Type()) {
				if !slices.Contains(algos, a) {
					algos = append(algos, a)
				}
			}
		}
	}
	return check, algos, nil
}

// algorithms are the host key algorithms that use a key of this type.
func algorithms(keyType string) []string {
	if keyType == ssh.KeyAlgoRSA {
		return []string{ssh.KeyAlgoRSASHA512, ssh.KeyAlgoRSASHA256, ssh.KeyAlgoRSA}
	}
	return []string{keyType}
}

func authorizedKey(key ssh.PublicKey) string {
	return strings.TrimSpace(string(ssh.MarshalAuthorizedKey(key)))
}

// srcReader marks the errors of the reader being uploaded, which say
// nothing about the connection.
type srcReader struct{ r io.Reader }

type srcErr struct{ error }

func (e srcErr) Unwrap() error { return e.error }

func (s srcReader) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	if err != nil && err != io.EOF {
		err = srcErr{err}
	}
	return n, err
}

// isConnErr tells a broken connection from an error about one file.
func isConnErr(err error) bool {
	if errors.As(err, new(srcErr)) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false // (DeadlineExceeded passes for a net.Error)
	}
	var ne net.Error
	return errors.Is(err, pkgsftp.ErrSSHFxConnectionLost) || errors.Is(err, pkgsftp.ErrSSHFxNoConnection) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
		errors.As(err, &ne)
}
