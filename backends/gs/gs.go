// Package gs stores replica files in a Google Cloud Storage bucket, laid out
// as Litestream v0.5 reads them:
//
//	ROOT/ltx/<level>/<min %016x>-<max %016x>.ltx
//
// The LTX header timestamp goes into the object metadata Litestream reads
// (litestream-timestamp), and the post-apply database checksum beside it.
// GCS returns metadata in listings, so neither costs a request of its own.
package gs

import (
	"cmp"
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"golang.org/x/sync/errgroup"
	"io"
	"net/http"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"

	"cloud.google.com/go/storage"
	"github.com/googleapis/gax-go/v2"
	"github.com/lfuse/lfuse/backends"
	"github.com/superfly/ltx"
	"google.golang.org/api/googleapi"
	"google.golang.org/api/iterator"
	"google.golang.org/api/option"
)

const (
	metaTimestamp = "litestream-timestamp"
	metaChecksum  = "lfuse-post-apply-checksum"

	// maxChunkSize bounds the buffer each upload holds (the SDK allocates a
	// whole chunk up front and keeps it to resend on a retry).
	maxChunkSize = 8 << 20

	// maxAttempts and retryBackoff bound the SDK's retries, which are
	// otherwise unlimited until the context ends (an outage must not hang
	// a caller without a deadline forever), and back off up to 30 s apart:
	// eight tries of a store that was down took 20–90 s to fail one
	// listing, which a restore waited for. As on S3: five tries, at most
	// 2 s apart; the replica's own backoff covers longer outages.
	maxAttempts = 5

	deleteConcurrency = 8
)

var retryBackoff = gax.Backoff{Initial: 250 * time.Millisecond, Max: 2 * time.Second, Multiplier: 2}

// Config says which bucket and how to sign in.
type Config struct {
	Bucket string
	Path   string // object prefix of this client's root
	// Endpoint is an emulator's URL, e.g. "http://127.0.0.1:4443"; empty
	// means Google. With an endpoint the client signs nothing, unless
	// CredentialsFile is given.
	Endpoint string
	// CredentialsFile is a JSON credentials file (service account,
	// authorized user, external account); default GOOGLE_APPLICATION_CREDENTIALS
	// or the application default credentials.
	CredentialsFile string
}

// Client is a replica under an object prefix of a bucket.
type Client struct {
	sdk      *storage.Client
	bucket   *storage.BucketHandle
	name     string // the bucket's
	root     string // "" or "a/b", no slashes at either end
	endpoint string
	err      error // a Sub path that leaves the root: every call fails with it
}

// New returns a client. It does no network I/O beyond what the SDK does to
// find credentials; Check proves the bucket is there.
func New(ctx context.Context, cfg Config) (*Client, error) {
	if cfg.Bucket == "" {
		return nil, errors.New("gs: no bucket: write gs://BUCKET/PATH")
	}
	root, err := cleanRoot(cfg.Path)
	if err != nil {
		return nil, fmt.Errorf("gs://%s: %w", cfg.Bucket, err)
	}
	// JSON reads go through the same endpoint as everything else; XML reads
	// need the emulator's public host to match the one dialled.
	opts := []option.ClientOption{storage.WithJSONReads()}
	endpoint := strings.TrimSuffix(strings.TrimRight(cfg.Endpoint, "/"), "/storage/v1")
	if endpoint != "" {
		opts = append(opts, option.WithEndpoint(endpoint+"/storage/v1/"))
		if cfg.CredentialsFile == "" {
			opts = append(opts, option.WithoutAuthentication())
		}
	}
	if cfg.CredentialsFile != "" {
		o, err := credentialsFile(cfg.CredentialsFile)
		if err != nil {
			return nil, fmt.Errorf("gs://%s: %w", cfg.Bucket, err)
		}
		opts = append(opts, o)
	}
	sdk, err := storage.NewClient(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("gs://%s: cannot set up the client (credentials: set credentials-file or GOOGLE_APPLICATION_CREDENTIALS, or run where application default credentials exist): %w", cfg.Bucket, err)
	}
	sdk.SetRetry(storage.WithMaxAttempts(maxAttempts), storage.WithBackoff(retryBackoff))
	return &Client{sdk: sdk, bucket: sdk.Bucket(cfg.Bucket), name: cfg.Bucket, root: root, endpoint: endpoint}, nil
}

// credentialsFile loads a credentials file as the type it declares: the
// SDK has deprecated loading one without naming its type.
func credentialsFile(name string) (option.ClientOption, error) {
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, fmt.Errorf("credentials file: %w", err)
	}
	var f struct {
		Type       string `json:"type"`
		PrivateKey string `json:"private_key"`
	}
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("credentials file %s: not JSON: %w", name, err)
	}
	if f.Type == "service_account" {
		// The SDK parses the key only at the first request, and its error
		// then looks like an outage; a broken key is the user's to fix now.
		block, _ := pem.Decode([]byte(f.PrivateKey))
		if block == nil {
			return nil, backends.ConfigError(fmt.Errorf("credentials file %s: private_key holds no PEM private key: download the key file again", name))
		}
		if _, err := x509.ParsePKCS8PrivateKey(block.Bytes); err != nil {
			if _, err1 := x509.ParsePKCS1PrivateKey(block.Bytes); err1 != nil {
				return nil, backends.ConfigError(fmt.Errorf("credentials file %s: private_key cannot be read (%v): download the key file again", name, err))
			}
		}
	}
	types := map[string]option.CredentialsType{
		"service_account":              option.ServiceAccount,
		"authorized_user":              option.AuthorizedUser,
		"impersonated_service_account": option.ImpersonatedServiceAccount,
		"external_account":             option.ExternalAccount,
	}
	t, ok := types[f.Type]
	if !ok {
		return nil, fmt.Errorf("credentials file %s: unsupported type %q", name, f.Type)
	}
	return option.WithAuthCredentialsJSON(t, b), nil
}

// cleanRoot turns a configured path into a prefix without slashes at either
// end; a path that climbs out of the bucket ("..") is refused.
func cleanRoot(p string) (string, error) {
	if slices.Contains(strings.Split(p, "/"), "..") {
		return "", fmt.Errorf("path %q: must not contain \"..\"", p)
	}
	return strings.Trim(path.Clean("/"+p), "/"), nil
}

// Close releases the SDK client; its Subs share it.
func (c *Client) Close() error { return c.sdk.Close() }

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

func (c *Client) Type() string { return "gs" }

func (c *Client) String() string {
	s := "gs://" + c.name
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

func (c *Client) fileKey(level int, min, max ltx.TXID) string {
	return c.key(rel(level, min, max))
}

// rel is a file's name under the root, for messages (String has the root).
func rel(level int, min, max ltx.TXID) string {
	return "ltx/" + strconv.Itoa(level) + "/" + ltx.FormatFilename(min, max)
}

// LTXFiles lists one level, taking each file's time from the metadata the
// listing carries.
func (c *Client) LTXFiles(ctx context.Context, level int) ([]ltx.FileInfo, error) {
	if c.err != nil {
		return nil, c.err
	}
	prefix := c.levelPrefix(level)
	q := &storage.Query{Prefix: prefix, Delimiter: "/"}
	if err := q.SetAttrSelection([]string{"Name", "Size", "Metadata", "Updated"}); err != nil {
		return nil, err
	}
	var infos []ltx.FileInfo
	it := c.bucket.Objects(ctx, q)
	for {
		o, err := it.Next()
		if errors.Is(err, iterator.Done) {
			break
		} else if err != nil {
			return nil, c.wrap(err, "list level %d", level)
		}
		min, max, err := ltx.ParseFilename(strings.TrimPrefix(o.Name, prefix))
		if o.Name == "" || err != nil {
			continue // a "subdirectory", or not ours
		}
		infos = append(infos, ltx.FileInfo{Level: level, MinTXID: min, MaxTXID: max, Size: o.Size,
			CreatedAt: createdAt(o)})
	}
	slices.SortFunc(infos, func(a, b ltx.FileInfo) int { return cmp.Compare(a.MinTXID, b.MinTXID) })
	return infos, nil
}

// createdAt is the LTX header time recorded on upload, or for an object
// another tool wrote, its last modification.
func createdAt(o *storage.ObjectAttrs) time.Time {
	if s, ok := o.Metadata[metaTimestamp]; ok {
		if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
			return t.UTC()
		}
	}
	return o.Updated.UTC()
}

func (c *Client) OpenLTXFile(ctx context.Context, level int, min, max ltx.TXID, offset, size int64) (io.ReadCloser, error) {
	if c.err != nil {
		return nil, c.err
	}
	length := int64(-1) // to the end
	if size > 0 {
		length = size
	}
	key := c.fileKey(level, min, max)
	r, err := c.bucket.Object(key).NewRangeReader(ctx, offset, length)
	if err != nil {
		return nil, c.wrap(err, "read %s", rel(level, min, max))
	}
	return r, nil
}

// WriteLTXFile streams the file up in chunks of at most maxChunkSize. GCS
// commits an upload only when the writer is closed, so on any failure the
// writer's context is cancelled instead: nothing appears, and an object
// being replaced stays as it was.
func (c *Client) WriteLTXFile(ctx context.Context, level int, min, max ltx.TXID, r io.Reader, size int64, meta backends.FileMeta) error {
	if c.err != nil {
		return c.err
	}
	key := c.fileKey(level, min, max)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w := c.bucket.Object(key).NewWriter(wctx)
	w.ChunkSize = chunkSize(size)
	w.ContentType = "application/octet-stream"
	w.Metadata = map[string]string{
		metaTimestamp: meta.Timestamp.UTC().Format(time.RFC3339Nano),
		metaChecksum:  meta.PostApplyChecksum.String(),
	}
	n, err := io.Copy(w, io.LimitReader(r, size+1))
	if err == nil && n != size {
		err = fmt.Errorf("the body has %d bytes, expected %d", n, size)
	}
	if err == nil {
		err = ctx.Err()
	}
	if err != nil {
		cancel() // abandons the upload; Close would commit what was written
		return c.wrap(uploadErr(err), "write %s", rel(level, min, max))
	}
	if err := w.Close(); err != nil {
		return c.wrap(uploadErr(err), "write %s", rel(level, min, max))
	}
	// The upload's last response describes the object it made: a store
	// that acknowledged an upload it did not finish would leave the replica
	// counting a file that is not there (S3 stores have been seen doing it
	// after a crash). Checking costs nothing.
	if a := w.Attrs(); a == nil || a.Size != size {
		got := "no object"
		if a != nil {
			got = fmt.Sprintf("an object of %d bytes", a.Size)
		}
		return fmt.Errorf("%s: the store acknowledged the upload of %s with %s, expected %d bytes; it will be written again", c, rel(level, min, max), got, size)
	}
	return nil
}

// uploadErr says what a 404 means for an upload, which needs no object to
// exist: the bucket is missing.
func uploadErr(err error) error {
	var ge *googleapi.Error
	if errors.As(err, &ge) && ge.Code == http.StatusNotFound {
		return fmt.Errorf("%w: %w", storage.ErrBucketNotExist, err)
	}
	return err
}

// chunkSize is one byte over the size, so that a small file goes up in one
// request (the SDK knows a chunk is the last only when it sees the end of
// the data), and at most maxChunkSize.
func chunkSize(size int64) int {
	return int(min(size+1, maxChunkSize))
}

// FileMeta reads the object's metadata. A file another tool wrote has no
// checksum (zero) and may have no timestamp (its modification time).
func (c *Client) FileMeta(ctx context.Context, level int, min, max ltx.TXID) (backends.FileMeta, error) {
	if c.err != nil {
		return backends.FileMeta{}, c.err
	}
	key := c.fileKey(level, min, max)
	o, err := c.bucket.Object(key).Attrs(ctx)
	if err != nil {
		return backends.FileMeta{}, c.wrap(err, "read the metadata of %s", rel(level, min, max))
	}
	meta := backends.FileMeta{Timestamp: o.Updated.UTC()}
	if s, ok := o.Metadata[metaTimestamp]; ok {
		if meta.Timestamp, err = time.Parse(time.RFC3339Nano, s); err != nil {
			return meta, fmt.Errorf("%s: %s: bad %s metadata %q", c, rel(level, min, max), metaTimestamp, s)
		}
		meta.Timestamp = meta.Timestamp.UTC()
	}
	if s, ok := o.Metadata[metaChecksum]; ok {
		if meta.PostApplyChecksum, err = ltx.ParseChecksum(s); err != nil {
			return meta, fmt.Errorf("%s: %s: bad %s metadata %q", c, rel(level, min, max), metaChecksum, s)
		}
	}
	return meta, nil
}

// WriteMarker stores a small object at ROOT/name, beside the level
// prefixes, which are all Litestream lists.
func (c *Client) WriteMarker(ctx context.Context, name string, data []byte) error {
	if c.err != nil {
		return c.err
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w := c.bucket.Object(c.key(name)).NewWriter(wctx)
	w.ContentType = "application/json"
	if _, err := w.Write(data); err != nil {
		cancel() // Close would commit what was written
		return c.wrap(uploadErr(err), "write %s", name)
	}
	if err := w.Close(); err != nil {
		return c.wrap(uploadErr(err), "write %s", name)
	}
	return nil
}

// ReadMarker reads what WriteMarker stored.
func (c *Client) ReadMarker(ctx context.Context, name string) ([]byte, error) {
	if c.err != nil {
		return nil, c.err
	}
	r, err := c.bucket.Object(c.key(name)).NewReader(ctx)
	if err != nil {
		return nil, c.wrap(err, "read %s", name)
	}
	defer r.Close()
	b, err := io.ReadAll(io.LimitReader(r, backends.MaxMarker))
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
	if err := c.bucket.Object(c.key(name)).Delete(ctx); err != nil && !errors.Is(err, storage.ErrObjectNotExist) {
		return c.wrap(err, "delete %s", name)
	}
	return nil
}

// DeleteLTXFiles deletes a few objects at a time, one request each (the
// SDK has no batch delete). Objects already gone are not an error.
func (c *Client) DeleteLTXFiles(ctx context.Context, files []ltx.FileInfo) error {
	if c.err != nil {
		return c.err
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(deleteConcurrency)
	for _, f := range files {
		g.Go(func() error {
			err := c.bucket.Object(c.fileKey(f.Level, f.MinTXID, f.MaxTXID)).Delete(gctx)
			if err != nil && !errors.Is(err, storage.ErrObjectNotExist) {
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

// Check proves with one listing that the bucket exists and the credentials
// may read it.
func (c *Client) Check(ctx context.Context) error {
	if c.err != nil {
		return c.err
	}
	// One attempt: the check holds a mount's start, and the SDK's retries
	// of a store that is down held it the whole 10 s the check is given.
	it := c.bucket.Retryer(storage.WithMaxAttempts(1)).Objects(ctx, &storage.Query{Prefix: c.key(""), Delimiter: "/"})
	it.PageInfo().MaxSize = 1
	if _, err := it.Next(); err != nil && !errors.Is(err, iterator.Done) {
		return c.wrap(err, "check")
	}
	return nil
}

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
	found := false
	err := c.children(ctx, prefix, func(o *storage.ObjectAttrs) bool {
		found = o.Prefix == "" && backends.IsLTXName(strings.TrimPrefix(o.Name, prefix))
		return !found
	})
	return found, err
}

// prefixes lists the "subdirectories" directly under prefix.
func (c *Client) prefixes(ctx context.Context, prefix string) ([]string, error) {
	var out []string
	err := c.children(ctx, prefix, func(o *storage.ObjectAttrs) bool {
		if o.Prefix != "" {
			out = append(out, o.Prefix)
		}
		return true
	})
	return out, err
}

// children calls each for the objects and prefixes directly under prefix
// until it returns false.
func (c *Client) children(ctx context.Context, prefix string, each func(*storage.ObjectAttrs) bool) error {
	q := &storage.Query{Prefix: prefix, Delimiter: "/"}
	if err := q.SetAttrSelection([]string{"Name"}); err != nil {
		return err
	}
	it := c.bucket.Objects(ctx, q)
	for {
		o, err := it.Next()
		if errors.Is(err, iterator.Done) {
			return nil
		} else if err != nil {
			return c.wrap(err, "list %s", prefix)
		}
		if !each(o) {
			return nil
		}
	}
}

// wrap turns an SDK error into one line that names the replica and, for
// the errors a user can fix, says how (and marks them ErrConfig: retrying
// does not cure them). A missing object is ErrNotFound.
func (c *Client) wrap(err error, format string, args ...any) error {
	what := fmt.Sprintf(format, args...)
	switch {
	case errors.Is(err, storage.ErrBucketNotExist):
		return backends.ConfigError(backends.Errorf(err, "%s: bucket %q does not exist: create it or fix the replica URL", c, c.name))
	case errors.Is(err, storage.ErrObjectNotExist):
		return fmt.Errorf("%s: %s: %w", c, what, backends.ErrNotFound)
	}
	var ge *googleapi.Error
	if errors.As(err, &ge) {
		switch ge.Code {
		case http.StatusUnauthorized, http.StatusForbidden:
			return backends.ConfigError(backends.Errorf(err, "%s: %s: access denied (HTTP %d): check the credentials (credentials-file, GOOGLE_APPLICATION_CREDENTIALS or the application default credentials) and that they may read and write objects in bucket %q", c, what, ge.Code, c.name))
		}
		msg := firstLine(ge.Message)
		if msg == "" {
			msg = http.StatusText(ge.Code)
		}
		if backends.UnavailableStatus(ge.Code) {
			return backends.UnavailableError(backends.Errorf(err, "%s: %s: HTTP %d: %s", c, what, ge.Code, msg))
		}
		return backends.Errorf(err, "%s: %s: HTTP %d: %s", c, what, ge.Code, msg)
	}
	if cause := backends.Unreachable(err); cause != nil {
		where := c.endpoint
		if where == "" {
			where = "storage.googleapis.com"
		}
		return backends.Errorf(err, "%s: %s: cannot reach %s: %s", c, what, where, firstLine(cause.Error()))
	}
	return fmt.Errorf("%s: %s: %w", c, what, err)
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return s
}
