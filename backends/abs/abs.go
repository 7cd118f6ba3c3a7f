// Package abs stores replica files in an Azure Blob Storage container, laid
// out as Litestream v0.5 reads them:
//
//	ROOT/ltx/<level>/<min %016x>-<max %016x>.ltx
//
// The LTX header timestamp goes into the blob metadata Litestream reads
// (litestreamtimestamp: Azure metadata names are C# identifiers, without
// '-'), and the post-apply database checksum beside it. Listings include
// metadata, so neither costs a request per blob.
package abs

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"golang.org/x/sync/errgroup"
	"io"
	"net/http"
	"net/url"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/blockblob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/container"
	"github.com/lfuse/lfuse/backends"
	"github.com/superfly/ltx"
)

const (
	metaTimestamp = "litestreamtimestamp"
	metaChecksum  = "lfusepostapplychecksum"

	// Uploads hold at most concurrency blocks of blockSize in memory.
	blockSize   = 4 << 20
	concurrency = 4

	deleteConcurrency = 8
)

// Config says which container and how to sign in: a shared key, a SAS
// token, or neither (a public container, readable only).
type Config struct {
	AccountName string
	AccountKey  string // shared key; or
	SASToken    string // a SAS token, with or without the leading '?'
	Container   string
	Path        string // blob name prefix of this client's root
	// Endpoint is the blob service URL; default
	// https://<account>.blob.core.windows.net/ (Azurite:
	// http://127.0.0.1:10000/devstoreaccount1/).
	Endpoint string
}

// Client is a replica under a name prefix of a container.
type Client struct {
	cc        *container.Client
	account   string
	container string
	root      string // "" or "a/b", no slashes at either end
	endpoint  string // shown only when configured
	secrets   []string
	err       error // a Sub path that leaves the root: every call fails with it
}

// New returns a client; it does no network I/O (Check does).
func New(cfg Config) (*Client, error) {
	if cfg.AccountName == "" {
		return nil, errors.New("abs: no account name: write abs://ACCOUNT@CONTAINER/PATH")
	}
	if cfg.Container == "" {
		return nil, errors.New("abs: no container: write abs://ACCOUNT@CONTAINER/PATH")
	}
	if cfg.AccountKey != "" && cfg.SASToken != "" {
		return nil, errors.New("abs: give an account key or a SAS token, not both")
	}
	root, err := cleanRoot(cfg.Path)
	if err != nil {
		return nil, fmt.Errorf("abs://%s@%s: %w", cfg.AccountName, cfg.Container, err)
	}
	endpoint := cfg.Endpoint
	if endpoint == "" {
		endpoint = "https://" + cfg.AccountName + ".blob.core.windows.net/"
	}
	if u, err := url.Parse(endpoint); err != nil || u.Scheme == "" || u.Host == "" {
		return nil, fmt.Errorf("abs: endpoint %q is not a URL", redact(cfg.Endpoint, nil))
	} else if u.RawQuery != "" {
		return nil, errors.New("abs: the endpoint has a query: give a SAS token as the SAS token, not in the endpoint")
	}
	if !strings.HasSuffix(endpoint, "/") {
		endpoint += "/"
	}
	sas := strings.TrimPrefix(cfg.SASToken, "?")
	var client *azblob.Client
	switch {
	case cfg.AccountKey != "":
		cred, err := azblob.NewSharedKeyCredential(cfg.AccountName, cfg.AccountKey)
		if err != nil {
			return nil, fmt.Errorf("abs://%s@%s: the account key: %w", cfg.AccountName, cfg.Container, err)
		}
		client, err = azblob.NewClientWithSharedKeyCredential(endpoint, cred, clientOptions())
		if err != nil {
			return nil, fmt.Errorf("abs://%s@%s: %w", cfg.AccountName, cfg.Container, err)
		}
	default:
		u := endpoint
		if sas != "" {
			u += "?" + sas
		}
		client, err = azblob.NewClientWithNoCredential(u, clientOptions())
		if err != nil {
			return nil, fmt.Errorf("abs://%s@%s: %s", cfg.AccountName, cfg.Container, redact(err.Error(), []string{sas}))
		}
	}
	c := &Client{
		cc:        client.ServiceClient().NewContainerClient(cfg.Container),
		account:   cfg.AccountName,
		container: cfg.Container,
		root:      root,
		endpoint:  cfg.Endpoint,
		secrets:   []string{cfg.AccountKey, sas},
	}
	return c, nil
}

// clientOptions keep the SDK's retry policy (a few tries, backing off),
// adding only the recorder Check reads its diagnosis from.
func clientOptions() *azblob.ClientOptions {
	o := &azblob.ClientOptions{}
	o.PerRetryPolicies = []policy.Policy{recordPolicy{}}
	return o
}

// recordPolicy keeps each try's transport error in the recorder the
// request's context carries, if any: when the context ends between tries,
// the SDK returns only the context's error, not what the tries met.
type recordPolicy struct{}

type recorderKey struct{}

type recorder struct {
	mu  sync.Mutex
	err error
}

func (recordPolicy) Do(req *policy.Request) (*http.Response, error) {
	resp, err := req.Next()
	if rec, ok := req.Raw().Context().Value(recorderKey{}).(*recorder); ok && err != nil {
		rec.mu.Lock()
		rec.err = err
		rec.mu.Unlock()
	}
	return resp, err
}

// cleanRoot turns a configured path into a prefix without slashes at either
// end; a path that climbs out of the container ("..") is refused.
func cleanRoot(p string) (string, error) {
	if slices.Contains(strings.Split(p, "/"), "..") {
		return "", fmt.Errorf("path %q: must not contain \"..\"", p)
	}
	return strings.Trim(path.Clean("/"+p), "/"), nil
}

// Sub is a client for ROOT/rel sharing this one's SDK client. A rel that
// climbs above the root gives a client whose every call fails.
func (c *Client) Sub(rel string) *Client {
	sub := *c
	clean := path.Clean(rel)
	if clean == ".." || strings.HasPrefix(clean, "../") {
		sub.err = backends.ConfigError(fmt.Errorf("%s: path %q leaves the replica root", c, rel))
		return &sub
	}
	sub.root = strings.Trim(path.Join(c.root, clean), "/")
	if sub.root == "." {
		sub.root = ""
	}
	return &sub
}

func (c *Client) Type() string { return "abs" }

// String names the replica; it never shows the key or the SAS token.
func (c *Client) String() string {
	s := "abs://" + c.account + "@" + c.container
	if c.root != "" {
		s += "/" + c.root
	}
	if c.endpoint != "" {
		s += " at " + c.endpoint
	}
	return s
}

func (c *Client) key(rel string) string {
	if c.root == "" {
		return rel
	}
	return c.root + "/" + rel
}

func (c *Client) levelPrefix(level int) string {
	return c.key("ltx/" + strconv.Itoa(level) + "/")
}

// rel is a file's name under the root, for messages (String has the root).
func rel(level int, min, max ltx.TXID) string {
	return "ltx/" + strconv.Itoa(level) + "/" + ltx.FormatFilename(min, max)
}

func (c *Client) blobName(level int, min, max ltx.TXID) string {
	return c.key(rel(level, min, max))
}

// LTXFiles lists one level, taking each file's time from the metadata the
// listing carries.
func (c *Client) LTXFiles(ctx context.Context, level int) ([]ltx.FileInfo, error) {
	if c.err != nil {
		return nil, c.err
	}
	prefix := c.levelPrefix(level)
	pager := c.cc.NewListBlobsHierarchyPager("/", &container.ListBlobsHierarchyOptions{
		Prefix:  &prefix,
		Include: container.ListBlobsInclude{Metadata: true},
	})
	var infos []ltx.FileInfo
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			return nil, c.wrap(err, "list level %d", level)
		}
		for _, b := range page.Segment.BlobItems {
			if b.Name == nil || b.Properties == nil {
				continue
			}
			min, max, err := ltx.ParseFilename(strings.TrimPrefix(*b.Name, prefix))
			if err != nil {
				continue // not ours
			}
			var size int64
			if b.Properties.ContentLength != nil {
				size = *b.Properties.ContentLength
			}
			var modified time.Time
			if b.Properties.LastModified != nil {
				modified = *b.Properties.LastModified
			}
			infos = append(infos, ltx.FileInfo{Level: level, MinTXID: min, MaxTXID: max, Size: size,
				CreatedAt: createdAt(b.Metadata, modified)})
		}
	}
	slices.SortFunc(infos, func(a, b ltx.FileInfo) int { return cmp.Compare(a.MinTXID, b.MinTXID) })
	return infos, nil
}

// createdAt is the LTX header time recorded on upload, or for a blob
// another tool wrote, its last modification.
func createdAt(meta map[string]*string, modified time.Time) time.Time {
	if s, ok := metaValue(meta, metaTimestamp); ok {
		if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
			return t.UTC()
		}
	}
	return modified.UTC()
}

// metaValue looks a name up regardless of case: Azure keeps names
// case-insensitively, and the SDK takes them from canonicalized HTTP
// headers ("Litestreamtimestamp") on a HEAD.
func metaValue(meta map[string]*string, name string) (string, bool) {
	for k, v := range meta {
		if strings.EqualFold(k, name) && v != nil {
			return *v, true
		}
	}
	return "", false
}

// OpenLTXFile's body re-requests the rest of the range if the connection
// breaks mid-read, pinned to the blob's ETag so that it never splices two
// versions of a blob.
func (c *Client) OpenLTXFile(ctx context.Context, level int, min, max ltx.TXID, offset, size int64) (io.ReadCloser, error) {
	if c.err != nil {
		return nil, c.err
	}
	resp, err := c.cc.NewBlobClient(c.blobName(level, min, max)).DownloadStream(ctx, &blob.DownloadStreamOptions{
		Range: blob.HTTPRange{Offset: offset, Count: size}, // Count 0: to the end
	})
	if err != nil {
		return nil, c.wrap(err, "read %s", rel(level, min, max))
	}
	return resp.NewRetryReader(ctx, &blob.RetryReaderOptions{EarlyCloseAsError: true}), nil
}

// WriteLTXFile stages blocks and commits the block list only once the body
// has given exactly size bytes: on any failure nothing is committed, so no
// blob appears and a blob being replaced stays as it was. (Staged blocks
// left uncommitted are discarded by the service after a week.)
func (c *Client) WriteLTXFile(ctx context.Context, level int, min, max ltx.TXID, r io.Reader, size int64, meta backends.FileMeta) error {
	if c.err != nil {
		return c.err
	}
	ts := meta.Timestamp.UTC().Format(time.RFC3339Nano)
	sum := meta.PostApplyChecksum.String()
	name := rel(level, min, max)
	blob := c.cc.NewBlockBlobClient(c.blobName(level, min, max))
	_, err := blob.UploadStream(ctx, backends.ExactReader(r, size), &blockblob.UploadStreamOptions{
		BlockSize:   blockSizeFor(size),
		Concurrency: concurrency,
		Metadata:    map[string]*string{metaTimestamp: &ts, metaChecksum: &sum},
	})
	if err != nil {
		return c.wrap(err, "write %s", name)
	}
	if size >= blockSize {
		// Staged blocks become the blob with the block list's commit. A
		// store that acknowledges a commit it did not finish (S3 stores
		// have been seen doing it after a crash) would leave the replica
		// counting a file that is not there; one request per large file
		// proves it is.
		props, err := blob.GetProperties(ctx, nil)
		if err != nil {
			err = c.wrap(err, "check %s after its upload", name)
			if errors.Is(err, backends.ErrNotFound) {
				return fmt.Errorf("%s: the store acknowledged the upload of %s but does not hold it; it will be written again", c, name)
			}
			return err
		}
		if n := props.ContentLength; n == nil || *n != size {
			return fmt.Errorf("%s: %s holds %s bytes after its upload of %d: the store lost the upload; it will be written again", c, name, sizeString(n), size)
		}
	}
	return nil
}

func sizeString(n *int64) string {
	if n == nil {
		return "an unknown number of"
	}
	return strconv.FormatInt(*n, 10)
}

// blockSizeFor is one byte over the size, so that a small file goes up in
// one request with a small buffer (the SDK stages blocks only for a body
// longer than one block), within the SDK's minimum of 1 MiB and blockSize.
func blockSizeFor(size int64) int64 {
	return min(max(size+1, 1<<20), blockSize)
}

// FileMeta reads the blob's metadata. A file another tool wrote has no
// checksum (zero) and may have no timestamp (its modification time).
func (c *Client) FileMeta(ctx context.Context, level int, min, max ltx.TXID) (backends.FileMeta, error) {
	if c.err != nil {
		return backends.FileMeta{}, c.err
	}
	name := rel(level, min, max)
	props, err := c.cc.NewBlobClient(c.blobName(level, min, max)).GetProperties(ctx, nil)
	if err != nil {
		return backends.FileMeta{}, c.wrap(err, "read the metadata of %s", name)
	}
	var meta backends.FileMeta
	if props.LastModified != nil {
		meta.Timestamp = props.LastModified.UTC()
	}
	if s, ok := metaValue(props.Metadata, metaTimestamp); ok {
		if meta.Timestamp, err = time.Parse(time.RFC3339Nano, s); err != nil {
			return meta, fmt.Errorf("%s: %s: bad %s metadata %q", c, name, metaTimestamp, s)
		}
		meta.Timestamp = meta.Timestamp.UTC()
	}
	if s, ok := metaValue(props.Metadata, metaChecksum); ok {
		if meta.PostApplyChecksum, err = ltx.ParseChecksum(s); err != nil {
			return meta, fmt.Errorf("%s: %s: bad %s metadata %q", c, name, metaChecksum, s)
		}
	}
	return meta, nil
}

// WriteMarker stores a small blob at ROOT/name, beside "ltx/", which is
// all Litestream lists.
func (c *Client) WriteMarker(ctx context.Context, name string, data []byte) error {
	if c.err != nil {
		return c.err
	}
	if _, err := c.cc.NewBlockBlobClient(c.key(name)).UploadBuffer(ctx, data, nil); err != nil {
		return c.wrap(err, "write %s", name)
	}
	return nil
}

// ReadMarker reads what WriteMarker stored.
func (c *Client) ReadMarker(ctx context.Context, name string) ([]byte, error) {
	if c.err != nil {
		return nil, c.err
	}
	resp, err := c.cc.NewBlobClient(c.key(name)).DownloadStream(ctx, nil)
	if err != nil {
		return nil, c.wrap(err, "read %s", name)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, backends.MaxMarker))
	if err != nil {
		return nil, c.wrap(err, "read %s", name)
	}
	return b, nil
}

// DeleteMarker removes what WriteMarker stored.
func (c *Client) DeleteMarker(ctx context.Context, name string) error {
	if c.err != nil {
		return c.err
	}
	_, err := c.cc.NewBlobClient(c.key(name)).Delete(ctx, nil)
	if err != nil && !bloberror.HasCode(err, bloberror.BlobNotFound) {
		return c.wrap(err, "delete %s", name)
	}
	return nil
}

// DeleteLTXFiles deletes a few blobs at a time, one request each. Blobs
// already gone are not an error.
func (c *Client) DeleteLTXFiles(ctx context.Context, files []ltx.FileInfo) error {
	if c.err != nil {
		return c.err
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(deleteConcurrency)
	for _, f := range files {
		g.Go(func() error {
			_, err := c.cc.NewBlobClient(c.blobName(f.Level, f.MinTXID, f.MaxTXID)).Delete(gctx, nil)
			if err != nil && !bloberror.HasCode(err, bloberror.BlobNotFound) {
				return c.wrap(err, "delete %s", rel(f.Level, f.MinTXID, f.MaxTXID))
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return c.wrap(err, "delete")
	}
	return nil
}

// Check proves with one listing that the container exists and the
// credentials may list it.
func (c *Client) Check(ctx context.Context) error {
	if c.err != nil {
		return c.err
	}
	rec := &recorder{}
	prefix := c.key("")
	pager := c.cc.NewListBlobsFlatPager(&container.ListBlobsFlatOptions{Prefix: &prefix, MaxResults: ptr(int32(1))})
	// One attempt: the check holds a mount's start, and the SDK's retries
	// of a store that is down held it about 9 s.
	once := policy.WithRetryOptions(context.WithValue(ctx, recorderKey{}, rec), policy.RetryOptions{MaxRetries: -1})
	if _, err := pager.NextPage(once); err != nil {
		rec.mu.Lock()
		if ctx.Err() != nil && rec.err != nil {
			err = fmt.Errorf("%w after %w", ctx.Err(), rec.err)
		}
		rec.mu.Unlock()
		return c.wrap(err, "check")
	}
	return nil
}

func ptr[T any](v T) *T { return &v }

// Databases lists the database replicas under the root, as slash paths
// relative to it: every prefix with an ltx/<level>/ that holds an LTX file.
// It walks the prefixes with a delimiter, and reads a level's files only
// until the first LTX file.
func (c *Client) Databases(ctx context.Context) ([]string, error) {
	if c.err != nil {
		return nil, c.err
	}
	return backends.FindDatabases(ctx, c.key(""), c.prefixes, backends.HasLTXLevels(c.prefixes, c.holdsLTX))
}

// holdsLTX says whether an LTX file lies directly under prefix.
func (c *Client) holdsLTX(ctx context.Context, prefix string) (bool, error) {
	pager := c.cc.NewListBlobsHierarchyPager("/", &container.ListBlobsHierarchyOptions{Prefix: &prefix})
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			return false, c.wrap(err, "list %s", prefix)
		}
		for _, b := range page.Segment.BlobItems {
			if b.Name != nil && backends.IsLTXName(strings.TrimPrefix(*b.Name, prefix)) {
				return true, nil
			}
		}
	}
	return false, nil
}

// prefixes lists the "subdirectories" directly under prefix.
func (c *Client) prefixes(ctx context.Context, prefix string) ([]string, error) {
	pager := c.cc.NewListBlobsHierarchyPager("/", &container.ListBlobsHierarchyOptions{Prefix: &prefix})
	var out []string
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			return nil, c.wrap(err, "list %s", prefix)
		}
		for _, p := range page.Segment.BlobPrefixes {
			if p.Name != nil {
				out = append(out, *p.Name)
			}
		}
	}
	return out, nil
}

// wrap turns an SDK error into one line that names the replica and, for
// the errors a user can fix, says how (and marks them ErrConfig: retrying
// does not cure them). A missing blob is ErrNotFound. The
// SDK's text can hold a request URL with the SAS token in it: every message
// is redacted.
func (c *Client) wrap(err error, format string, args ...any) error {
	what := fmt.Sprintf(format, args...)
	var re *azcore.ResponseError
	if errors.As(err, &re) {
		switch {
		case re.ErrorCode == string(bloberror.ContainerNotFound):
			return backends.ConfigError(c.line(err, "container %q does not exist: create it or fix the replica URL", c.container))
		case re.ErrorCode == string(bloberror.BlobNotFound) || re.StatusCode == http.StatusNotFound:
			return backends.Errorf(backends.ErrNotFound, "%s", c.redact(fmt.Sprintf("%s: %s: %s", c, what, backends.ErrNotFound)))
		case re.StatusCode == http.StatusUnauthorized || re.StatusCode == http.StatusForbidden:
			code := re.ErrorCode
			if code == "" {
				code = "HTTP " + strconv.Itoa(re.StatusCode)
			}
			return backends.ConfigError(c.line(err, "%s: access denied (%s): check the account name and key or the SAS token (its permissions need read, write, delete and list on the container, and it must not have expired)", what, code))
		}
		code := re.ErrorCode
		if code == "" {
			code = http.StatusText(re.StatusCode)
		}
		if backends.UnavailableStatus(re.StatusCode) {
			return backends.UnavailableError(c.line(err, "%s: HTTP %d %s", what, re.StatusCode, code))
		}
		return c.line(err, "%s: HTTP %d %s", what, re.StatusCode, code)
	}
	if cause := backends.Unreachable(err); cause != nil {
		where := c.endpoint
		if where == "" {
			where = c.account + ".blob.core.windows.net"
		}
		return c.line(err, "%s: cannot reach %s: %s", what, where, firstLine(cause.Error()))
	}
	return c.line(err, "%s: %s", what, firstLine(err.Error()))
}

// line is one line naming the replica, redacted, that unwraps to err.
func (c *Client) line(err error, format string, args ...any) error {
	return backends.Errorf(err, "%s", c.redact(c.String()+": "+fmt.Sprintf(format, args...)))
}

func (c *Client) redact(s string) string { return redact(s, c.secrets) }

var sigParam = regexp.MustCompile(`(?i)([?&]sig=)[^&\s"]*`)

// redact removes the secrets and any SAS signature from s.
func redact(s string, secrets []string) string {
	for _, secret := range secrets {
		if secret != "" {
			s = strings.ReplaceAll(s, secret, "REDACTED")
		}
	}
	return sigParam.ReplaceAllString(s, "${1}REDACTED")
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return s
}
