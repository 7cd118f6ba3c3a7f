package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/lfuse/lfuse/backends"
	"github.com/lfuse/lfuse/backends/abs"
	"github.com/lfuse/lfuse/backends/file"
	"github.com/lfuse/lfuse/backends/gs"
	"github.com/lfuse/lfuse/backends/s3"
	"github.com/lfuse/lfuse/backends/sftp"
	"github.com/lfuse/lfuse/replicate"
)

// replicaURL is a parsed replica location.
type replicaURL struct {
	scheme   string
	host     string // bucket, ACCOUNT@CONTAINER's container, or an SFTP host[:port]
	user     string // abs account, SFTP user
	password string // SFTP password given in the URL
	path     string // file: an absolute directory; others: the path under the host
	query    url.Values
}

const schemes = "file:// (or a plain path), s3://, gs://, abs://, sftp://"

// schemeLike is what a URL scheme looks like (RFC 3986).
var schemeLike = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9+.-]*$`)

// parseReplicaURL checks a replica URL's syntax. Query parameters stand for
// the config keys of the same names (endpoint, region, ...).
func parseReplicaURL(raw string) (replicaURL, error) {
	if raw == "" {
		return replicaURL{}, errors.New("empty replica URL")
	}
	if !strings.Contains(raw, "://") {
		if scheme, _, ok := strings.Cut(raw, ":"); ok && schemeLike.MatchString(scheme) {
			// s3:/bucket or s3:bucket backed up into a directory named
			// "s3:" under the working directory, and nothing said so.
			return replicaURL{}, fmt.Errorf("replica URL %s: %q then ':' without '//' is neither a URL nor a plain path: write %s://..., or ./%s for a directory of that name", redact(raw), scheme, strings.ToLower(scheme), redact(raw))
		}
		abs, err := filepath.Abs(raw)
		if err != nil {
			return replicaURL{}, err
		}
		return replicaURL{scheme: "file", path: abs}, nil
	}
	u, err := url.Parse(raw)
	if err != nil {
		// url's message repeats the URL, or a piece of it that can be a
		// piece of a password.
		if redact(raw) != raw {
			return replicaURL{}, fmt.Errorf("replica URL %s: cannot be parsed (a password holding '/', '?', '#' or '@' must be percent-encoded)", redact(raw))
		}
		return replicaURL{}, fmt.Errorf("replica URL %s: cannot be parsed (%s)", raw, oneLine(errors.Unwrap(err).Error()))
	}
	r := replicaURL{scheme: u.Scheme, host: u.Host, path: strings.TrimPrefix(u.Path, "/"), query: u.Query()}
	if u.User != nil {
		r.user = u.User.Username()
		r.password, _ = u.User.Password()
	}
	for k := range r.query {
		if !slices.Contains(queryKeys, k) {
			return r, fmt.Errorf("replica URL %s: unknown parameter %q (known: %s)", redact(raw), k, strings.Join(queryKeys, ", "))
		}
	}
	bad := func(format string, args ...any) (replicaURL, error) {
		return r, fmt.Errorf("replica URL %s: "+format, append([]any{redact(raw)}, args...)...)
	}
	switch u.Scheme {
	case "file":
		if u.Host != "" && u.Host != "localhost" {
			return bad("a file URL has no host; write file:///absolute/path")
		}
		if !filepath.IsAbs(u.Path) {
			return bad("the path must be absolute")
		}
		r.path = filepath.Clean(u.Path)
	case "s3", "gs":
		if u.Host == "" {
			return bad("no bucket; write %s://BUCKET/PATH", u.Scheme)
		}
		if u.User != nil {
			return bad("credentials do not belong in the URL; use the config keys or the environment")
		}
	case "abs":
		if r.user == "" || u.Host == "" {
			return bad("write abs://ACCOUNT@CONTAINER/PATH")
		}
		if r.password != "" {
			return bad("the account key does not belong in the URL; use account-key or LFUSE_AZURE_ACCOUNT_KEY")
		}
	case "sftp":
		if r.user == "" || u.Host == "" {
			return bad("write sftp://USER@HOST[:PORT]/PATH")
		}
	default:
		return bad("unknown scheme %q (supported: %s)", u.Scheme, schemes)
	}
	return r, nil
}

var queryKeys = []string{"endpoint", "region", "force-path-style", "skip-verify", "key-path", "host-key", "known-hosts"}

// redact hides what may be secret in a URL that a message repeats: the
// password of every user:password@ in it (the URL's own, an endpoint's in
// its query), which may hold '/' and '@', and the value of every query
// parameter that is not one lfuse knows (someone trying secret-access-key=
// or sig=).
func redact(raw string) string {
	// The password first, on the whole URL: it may hold a '?'.
	base, query, hasQuery := strings.Cut(redactUserinfo(raw), "?")
	if !hasQuery {
		return base
	}
	params := strings.Split(query, "&")
	for i, p := range params {
		k, v, ok := strings.Cut(p, "=")
		if !ok {
			continue
		}
		dec, derr := url.QueryUnescape(v)
		if name, err := url.QueryUnescape(k); err != nil || !slices.Contains(queryKeys, name) || derr != nil {
			v = "***"
		} else if strings.Contains(dec, "@") {
			v = redactUserinfo(dec)
		}
		params[i] = k + "=" + v
	}
	return base + "?" + strings.Join(params, "&")
}

// redactUserinfo hides the password between "scheme://user:" and the last
// '@' of s: a password can hold both, so where it ends cannot be told, and
// hiding too much is the safe side.
func redactUserinfo(s string) string {
	i := strings.Index(s, "://")
	if i < 0 {
		return s
	}
	auth := s[i+3:]
	colon, first, last := strings.Index(auth, ":"), strings.Index(auth, "@"), strings.LastIndex(auth, "@")
	if colon < 0 || first < 0 || colon > first {
		return s // no password: user@host:port
	}
	return s[:i+3] + auth[:colon] + ":***" + auth[last:]
}

// replicaRoot is an opened replica URL: a client at its root that can check
// the replica, find the databases under it, and give each its own client.
type replicaRoot struct {
	client    replicate.ReplicaClient
	check     func(context.Context) error
	databases func(context.Context) ([]string, error)
	sub       func(rel string) replicate.ReplicaClient
}

var (
	openMu sync.Mutex
	opened = map[string]*replicaRoot{}
)

// openReplica opens the replica r names, once per distinct configuration:
// the databases under a replica share its connections. It does no network
// I/O; check does.
func openReplica(ctx context.Context, r ReplicaConfig) (*replicaRoot, error) {
	u, err := parseReplicaURL(r.URL)
	if err != nil {
		return nil, err
	}
	key := fmt.Sprintf("%q", []any{r.URL, r.Region, r.Endpoint, fmtBool(r.ForcePathStyle), r.SkipVerify, r.AccessKeyID, r.SecretAccessKey,
		r.AccountName, r.AccountKey, r.SASToken, r.Password, r.KeyPath, r.HostKey, r.KnownHosts, r.CredentialsFile})
	openMu.Lock()
	defer openMu.Unlock()
	if root, ok := opened[key]; ok {
		return root, nil
	}
	opt := func(key, query string) string {
		if key != "" {
			return key
		}
		return u.query.Get(query)
	}
	flag := func(v bool, query string) (bool, error) {
		if v || u.query.Get(query) == "" {
			return v, nil
		}
		b, err := strconv.ParseBool(u.query.Get(query))
		if err != nil {
			return false, fmt.Errorf("replica URL %s: %s=%q: expected true or false", redact(r.URL), query, u.query.Get(query))
		}
		return b, nil
	}
	if strings.Contains(opt(r.Endpoint, "endpoint"), "@") {
		// It would be repeated in every message that names the replica.
		return nil, fmt.Errorf("replica URL %s: the endpoint holds credentials (user:password@); give them as the config keys or in the environment instead", redact(r.URL))
	}
	var root *replicaRoot
	switch u.scheme {
	case "file":
		c := file.New(u.path)
		root = &replicaRoot{c, c.Check, c.Databases, func(rel string) replicate.ReplicaClient { return c.Sub(rel) }}
	case "s3":
		cfg := s3.Config{Bucket: u.host, Path: u.path, Region: opt(r.Region, "region"), Endpoint: opt(r.Endpoint, "endpoint"),
			ForcePathStyle: r.ForcePathStyle, AccessKeyID: r.AccessKeyID, SecretAccessKey: r.SecretAccessKey}
		if cfg.SkipVerify, err = flag(r.SkipVerify, "skip-verify"); err != nil {
			return nil, err
		}
		if cfg.ForcePathStyle == nil && u.query.Get("force-path-style") != "" {
			b, err := flag(false, "force-path-style")
			if err != nil {
				return nil, err
			}
			cfg.ForcePathStyle = &b
		}
		if cfg.Endpoint == "" {
			cfg.Bucket, cfg.Endpoint, cfg.Region = s3Host(u.host, cfg.Region)
		}
		c, err := s3.New(ctx, cfg)
		if err != nil {
			return nil, err
		}
		root = &replicaRoot{c, c.Check, c.Databases, func(rel string) replicate.ReplicaClient { return c.Sub(rel) }}
	case "gs":
		c, err := gs.New(ctx, gs.Config{Bucket: u.host, Path: u.path, Endpoint: opt(r.Endpoint, "endpoint"), CredentialsFile: r.CredentialsFile})
		if err != nil {
			return nil, err
		}
		root = &replicaRoot{c, c.Check, c.Databases, func(rel string) replicate.ReplicaClient { return c.Sub(rel) }}
	case "abs":
		key := r.AccountKey
		if key == "" && r.SASToken == "" {
			key = os.Getenv("LFUSE_AZURE_ACCOUNT_KEY")
		}
		account := u.user
		if r.AccountName != "" {
			account = r.AccountName
		}
		c, err := abs.New(abs.Config{AccountName: account, AccountKey: key, SASToken: r.SASToken, Container: u.host,
			Path: u.path, Endpoint: opt(r.Endpoint, "endpoint")})
		if err != nil {
			return nil, err
		}
		root = &replicaRoot{c, c.Check, c.Databases, func(rel string) replicate.ReplicaClient { return c.Sub(rel) }}
	case "sftp":
		password := r.Password
		if password == "" {
			password = u.password
		}
		// sftp://host/~/dir is relative to the login directory; any
		// other path is absolute on the server.
		p := "/" + u.path
		if rest, ok := strings.CutPrefix(u.path, "~"); ok {
			p = strings.TrimPrefix(rest, "/")
		}
		c, err := sftp.New(sftp.Config{Host: u.host, User: u.user, Password: password, KeyPath: opt(r.KeyPath, "key-path"),
			HostKey: opt(r.HostKey, "host-key"), KnownHosts: opt(r.KnownHosts, "known-hosts"), Path: p})
		if err != nil {
			return nil, err
		}
		root = &replicaRoot{c, c.Check, c.Databases, func(rel string) replicate.ReplicaClient { return c.Sub(rel) }}
	}
	opened[key] = root
	return root, nil
}

func fmtBool(b *bool) string {
	if b == nil {
		return ""
	}
	return strconv.FormatBool(*b)
}

// s3Host maps the host forms of S3-compatible services to their endpoint:
// BUCKET.localhost:PORT and BUCKET.s3.REGION.backblazeb2.com,
// BUCKET.REGION.digitaloceanspaces.com, BUCKET.REGION.linodeobjects.com,
// BUCKET.s3.filebase.com, BUCKET.s3[.REGION].amazonaws.com. Anything else
// is a bucket name on AWS.
func s3Host(host, region string) (bucket, endpoint, reg string) {
	orRegion := func(r string) string {
		if region != "" {
			return region
		}
		return r
	}
	hostname, port, _ := strings.Cut(host, ":")
	if b, ok := strings.CutSuffix(hostname, ".localhost"); ok && port != "" {
		return b, "http://localhost:" + port, orRegion("us-east-1")
	}
	for _, m := range []struct {
		re     *regexp.Regexp
		region func([]string) string
	}{
		{regexp.MustCompile(`^(.+)\.(s3\.([a-z0-9-]+)\.backblazeb2\.com)$`), func(m []string) string { return m[3] }},
		{regexp.MustCompile(`^(.+)\.(([a-z0-9-]+)\.digitaloceanspaces\.com)$`), func([]string) string { return "us-east-1" }},
		{regexp.MustCompile(`^(.+)\.(([a-z0-9-]+)\.linodeobjects\.com)$`), func(m []string) string { return m[3] }},
		{regexp.MustCompile(`^(.+)\.(s3\.filebase\.com)$`), func([]string) string { return "us-east-1" }},
	} {
		if sm := m.re.FindStringSubmatch(hostname); sm != nil {
			return sm[1], "https://" + sm[2], orRegion(m.region(sm))
		}
	}
	if sm := regexp.MustCompile(`^(.+)\.s3(?:[.-]([a-z0-9-]+))?\.amazonaws\.com$`).FindStringSubmatch(hostname); sm != nil {
		return sm[1], "", orRegion(sm[2])
	}
	return host, "", region
}

// replicaSpecs maps each database to its replicas: its own, if the config
// lists it, otherwise the global ones.
func replicaSpecs(cfg Config) func(rel string) []replicate.ReplicaSpec {
	return func(rel string) []replicate.ReplicaSpec {
		var specs []replicate.ReplicaSpec
		for _, t := range replicaTargets(cfg, rel) {
			specs = append(specs, replicate.ReplicaSpec{Client: t.client, Options: t.cfg.options()})
		}
		return specs
	}
}

type replicaTarget struct {
	cfg    ReplicaConfig
	client replicate.ReplicaClient
}

// replicaTargets are the replicas of the database at rel. A database listed
// in the config has its own, whose URLs name its replica directly; every
// other database is under each global replica, at its path. The config was
// validated, which opened every replica.
func replicaTargets(cfg Config, rel string) []replicaTarget {
	var out []replicaTarget
	for _, d := range cfg.Databases {
		if filepath.Clean(d.Path) == filepath.Clean(rel) {
			for _, r := range d.Replicas {
				if root, err := openReplica(context.Background(), r); err == nil {
					out = append(out, replicaTarget{r, root.client})
				}
			}
			return out
		}
	}
	for _, r := range cfg.Replicas {
		if root, err := openReplica(context.Background(), r); err == nil {
			out = append(out, replicaTarget{r, root.sub(filepath.ToSlash(rel))})
		}
	}
	return out
}

// checkTimeout bounds the check of a replica before the mount opens: a
// backend that accepts connections and never answers held "mount ready",
// and the application behind it, for 30 s (an adversarial run). Ten seconds
// cover a cold start's DNS, TLS and credential lookups many times over.
const checkTimeout = 10 * time.Second

// checkReplicas tries every configured replica once, in parallel, before the
// mount opens. What only the user can fix (credentials, a missing bucket, an
// unknown host key) stops lfuse with one line; anything else (the backend is
// down) is logged once, and replication retries it.
func checkReplicas(ctx context.Context, logger *slog.Logger, cfg Config) error {
	all := slices.Clone(cfg.Replicas)
	for _, d := range cfg.Databases {
		all = append(all, d.Replicas...)
	}
	errs := make([]error, len(all))
	var wg sync.WaitGroup
	for i, r := range all {
		root, err := openReplica(ctx, r)
		if err != nil {
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, checkTimeout)
			defer cancel()
			errs[i] = root.check(cctx)
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if errors.Is(err, backends.ErrConfig) {
			return err
		}
		if err != nil {
			logger.Warn("replica unreachable at start; will retry", "err", err)
		}
	}
	return nil
}
