// Package s3 stores replica files in an S3 bucket or an S3-compatible store
// (MinIO, versitygw, Backblaze B2, DigitalOcean Spaces, ...), laid out as
// Litestream v0.5 reads them:
//
//	ROOT/<level %04x>/<min %016x>-<max %016x>.ltx
//
// The LTX header timestamp goes into the object metadata Litestream reads
// (litestream-timestamp) and the post-apply database checksum beside it, so
// neither costs a request of its own.
package s3

import (
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/ratelimit"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/feature/s3/manager"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"
	"github.com/aws/smithy-go/logging"
	"github.com/lfuse/lfuse/backends"
	"github.com/superfly/ltx"
)

const (
	metaTimestamp = "litestream-timestamp"
	metaChecksum  = "lfuse-post-apply-checksum"
)

// Config says where the bucket is and how to sign in.
type Config struct {
	Bucket string
	Path   string // key prefix of this client's root
	Region string // default us-east-1 (or the AWS chain's) when unset
	// Endpoint is an S3-compatible server's URL; it implies path-style
	// addressing unless ForcePathStyle says otherwise.
	Endpoint       string
	ForcePathStyle *bool
	SkipVerify     bool // accept a self-signed certificate
	// AccessKeyID/SecretAccessKey, else LFUSE_ACCESS_KEY_ID and
	// LFUSE_SECRET_ACCESS_KEY, else the AWS chain (env, shared config, IMDS).
	AccessKeyID     string
	SecretAccessKey string
	// Multipart uploads: part size (default 5 MiB, S3's smallest; larger
	// for objects that would need more than 9,000 parts) and parts in flight
	// (default 2). Memory is about (Concurrency+1) × PartSize.
	PartSize    int64
	Concurrency int
	// ResponseTimeout bounds the wait for a response's headers (default 2
	// minutes): a server that stops answering is a retried error, not a
	// hang.
	ResponseTimeout time.Duration
}

// Client is a replica under a key prefix of a bucket.
type Client struct {
	s3       *s3.Client
	up       *manager.Uploader
	bucket   string
	root     string // "" or "a/b", no slashes at either end
	endpoint string
}

// New returns a client; it does no network I/O (Check does).
func New(ctx context.Context, cfg Config) (*Client, error) {
	if cfg.Bucket == "" {
		return nil, errors.New("s3: no bucket: write s3://BUCKET/PATH")
	}
	var opts []func(*config.LoadOptions) error
	if cfg.Region != "" {
		opts = append(opts, config.WithRegion(cfg.Region))
	}
	id, secret := cfg.AccessKeyID, cfg.SecretAccessKey
	if id == "" && secret == "" {
		id, secret = os.Getenv("LFUSE_ACCESS_KEY_ID"), os.Getenv("LFUSE_SECRET_ACCESS_KEY")
	}
	if (id == "") != (secret == "") {
		return nil, errors.New("s3: give both access-key-id and secret-access-key, or neither")
	}
	if id != "" {
		opts = append(opts, config.WithCredentialsProvider(credentials.NewStaticCredentialsProvider(id, secret, "")))
	}
	// A buildable client, because the SDK adds AWS_CA_BUNDLE to it.
	httpClient := awshttp.NewBuildableClient().
		WithDialerOptions(func(d *net.Dialer) { d.Timeout = 10 * time.Second }).
		WithTransportOptions(func(tr *http.Transport) {
			tr.ResponseHeaderTimeout = cmp.Or(cfg.ResponseTimeout, 2*time.Minute)
			tr.MaxIdleConnsPerHost = 16
			if cfg.SkipVerify {
				if tr.TLSClientConfig == nil {
					tr.TLSClientConfig = &tls.Config{}
				}
				tr.TLSClientConfig.InsecureSkipVerify = true
			}
		})
	opts = append(opts, config.WithHTTPClient(httpClient), config.WithLogger(logging.Nop{})) // errors reach the caller; the SDK's own log lines would bypass lfuse's
	awsCfg, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("s3: load AWS configuration: %w", err)
	}
	if awsCfg.Region == "" {
		awsCfg.Region = "us-east-1"
	}
	pathStyle := cfg.Endpoint != ""
	if cfg.ForcePathStyle != nil {
		pathStyle = *cfg.ForcePathStyle
	}
	client := s3.NewFromConfig(awsCfg, func(o *s3.Options) {
		if cfg.Endpoint != "" {
			o.BaseEndpoint = aws.String(cfg.Endpoint)
		}
		o.UsePathStyle = pathStyle
		// Transient errors (5xx, throttling, resets) are retried here with
		// short jittered backoff and no retry quota; the replica's own
		// backoff covers longer outages.
		o.Retryer = retry.NewStandard(func(so *retry.StandardOptions) {
			so.MaxAttempts = 5
			so.MaxBackoff = 2 * time.Second
			so.RateLimiter = ratelimit.None
		})
		// S3-compatible stores often reject the SDK's default trailing
		// checksums; LTX files carry their own CRC-64.
		o.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
		o.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired
	})
	partSize, conc := cfg.PartSize, cfg.Concurrency
	if partSize <= 0 {
		partSize = manager.MinUploadPartSize
	}
	if conc <= 0 {
		conc = 2
	}
	up := manager.NewUploader(client, func(u *manager.Uploader) {
		u.PartSize = max(partSize, manager.MinUploadPartSize)
		u.Concurrency = conc
	})
	c := &Client{s3: client, up: up, bucket: cfg.Bucket, endpoint: cfg.Endpoint}
	return c.Sub(cfg.Path), nil
}

// Sub is a client for ROOT/rel sharing this one's connections.
func (c *Client) Sub(rel string) *Client {
	sub := *c
	sub.root = strings.Trim(path.Join(c.root, path.Clean("/"+rel)), "/")
	return &sub
}

func (c *Client) Type() string { return "s3" }

func (c *Client) String() string {
	s := "s3://" + c.bucket + "/" + c.root
	if c.endpoint != "" {
		s += " at " + c.endpoint
	}
	return s
}

func (c *Client) levelPrefix(level int) string {
	return c.key(fmt.Sprintf("%04x/", level))
}

func (c *Client) key(rel string) string {
	if c.root == "" {
		return rel
	}
	return c.root + "/" + rel
}

func (c *Client) fileKey(level int, min, max ltx.TXID) string {
	return c.levelPrefix(level) + ltx.FormatFilename(min, max)
}

// LTXFiles lists one level. CreatedAt is the object's upload time (a LIST
// returns no metadata); FileMeta has the LTX header time.
func (c *Client) LTXFiles(ctx context.Context, level int) ([]ltx.FileInfo, error) {
	var infos []ltx.FileInfo
	p := s3.NewListObjectsV2Paginator(c.s3, &s3.ListObjectsV2Input{Bucket: &c.bucket, Prefix: aws.String(c.levelPrefix(level))})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return nil, c.wrap(err, "list level %d", level)
		}
		for _, o := range page.Contents {
			name := strings.TrimPrefix(aws.ToString(o.Key), c.levelPrefix(level))
			min, max, err := ltx.ParseFilename(name)
			if err != nil {
				continue // not ours
			}
			infos = append(infos, ltx.FileInfo{Level: level, MinTXID: min, MaxTXID: max,
				Size: aws.ToInt64(o.Size), CreatedAt: aws.ToTime(o.LastModified).UTC()})
		}
	}
	slices.SortFunc(infos, func(a, b ltx.FileInfo) int { return cmp.Compare(a.MinTXID, b.MinTXID) })
	return infos, nil
}

func (c *Client) OpenLTXFile(ctx context.Context, level int, min, max ltx.TXID, offset, size int64) (io.ReadCloser, error) {
	in := &s3.GetObjectInput{Bucket: &c.bucket, Key: aws.String(c.fileKey(level, min, max))}
	switch {
	case size > 0:
		in.Range = aws.String(fmt.Sprintf("bytes=%d-%d", offset, offset+size-1))
	case offset > 0:
		in.Range = aws.String(fmt.Sprintf("bytes=%d-", offset))
	}
	out, err := c.s3.GetObject(ctx, in)
	if err != nil {
		return nil, c.wrap(err, "read %s", c.fileKey(level, min, max))
	}
	return out.Body, nil
}

// WriteLTXFile uploads in parts of PartSize (a single PUT for a small file);
// a body that ends early or fails aborts the upload, so a file appears whole
// or not at all.
func (c *Client) WriteLTXFile(ctx context.Context, level int, min, max ltx.TXID, r io.Reader, size int64, meta backends.FileMeta) error {
	key := c.fileKey(level, min, max)
	// S3 allows 10,000 parts: a 100 GB snapshot needs parts over 10 MiB.
	partSize := c.up.PartSize
	if n := (size + 8999) / 9000; n > partSize {
		partSize = n
	}
	_, err := c.up.Upload(ctx, &s3.PutObjectInput{
		Bucket: &c.bucket,
		Key:    &key,
		Body:   backends.ExactReader(r, size),
		Metadata: map[string]string{
			metaTimestamp: meta.Timestamp.UTC().Format(time.RFC3339Nano),
			metaChecksum:  meta.PostApplyChecksum.String(),
		},
	}, func(u *manager.Uploader) { u.PartSize = partSize })
	if err != nil {
		c.abortUpload(ctx, key, err)
		return c.wrap(err, "write %s", key)
	}
	if size > partSize {
		// A multipart upload is acknowledged by CompleteMultipartUpload, and
		// a store can acknowledge a retried one that never finished: versitygw
		// v1.8.0, killed while assembling the parts, answers the retry with
		// success and no object (the torture test lost a snapshot that way).
		// One HEAD per large file proves it is there.
		out, err := c.s3.HeadObject(ctx, &s3.HeadObjectInput{Bucket: &c.bucket, Key: &key})
		if err != nil {
			err = c.wrap(err, "check %s after its multipart upload", key)
			if errors.Is(err, backends.ErrNotFound) {
				return fmt.Errorf("%s: the store acknowledged the multipart upload of %s but does not hold it; it will be written again", c, key)
			}
			return err
		}
		if n := aws.ToInt64(out.ContentLength); n != size {
			return fmt.Errorf("%s: %s holds %d bytes after its multipart upload of %d: the store lost the upload; it will be written again", c, key, n, size)
		}
	}
	return nil
}

func (c *Client) FileMeta(ctx context.Context, level int, min, max ltx.TXID) (backends.FileMeta, error) {
	key := c.fileKey(level, min, max)
	out, err := c.s3.HeadObject(ctx, &s3.HeadObjectInput{Bucket: &c.bucket, Key: &key})
	if err != nil {
		return backends.FileMeta{}, c.wrap(err, "read the metadata of %s", key)
	}
	var meta backends.FileMeta
	ts, ok := out.Metadata[metaTimestamp]
	if !ok {
		return meta, fmt.Errorf("%s: %s has no %s metadata: not written by lfuse or Litestream", c, key, metaTimestamp)
	}
	if meta.Timestamp, err = time.Parse(time.RFC3339Nano, ts); err != nil {
		return meta, fmt.Errorf("%s: %s: bad %s metadata %q", c, key, metaTimestamp, ts)
	}
	if s, ok := out.Metadata[metaChecksum]; ok {
		if meta.PostApplyChecksum, err = ltx.ParseChecksum(s); err != nil {
			return meta, fmt.Errorf("%s: %s: bad %s metadata %q", c, key, metaChecksum, s)
		}
	}
	return meta, nil
}

// WriteMarker stores a small object at ROOT/name, beside the level
// prefixes: Litestream lists only those.
func (c *Client) WriteMarker(ctx context.Context, name string, data []byte) error {
	key := c.key(name)
	if _, err := c.s3.PutObject(ctx, &s3.PutObjectInput{Bucket: &c.bucket, Key: &key, Body: bytes.NewReader(data),
		ContentLength: aws.Int64(int64(len(data)))}); err != nil {
		return c.wrap(err, "write %s", key)
	}
	return nil
}

// ReadMarker reads what WriteMarker stored.
func (c *Client) ReadMarker(ctx context.Context, name string) ([]byte, error) {
	key := c.key(name)
	out, err := c.s3.GetObject(ctx, &s3.GetObjectInput{Bucket: &c.bucket, Key: &key})
	if err != nil {
		return nil, c.wrap(err, "read %s", key)
	}
	defer out.Body.Close()
	b, err := io.ReadAll(io.LimitReader(out.Body, backends.MaxMarker))
	if err != nil {
		return nil, c.wrap(err, "read %s", key)
	}
	return b, nil
}

// DeleteMarker removes what WriteMarker stored.
func (c *Client) DeleteMarker(ctx context.Context, name string) error {
	key := c.key(name)
	if _, err := c.s3.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: &c.bucket, Key: &key}); err != nil {
		if err = c.wrap(err, "delete %s", key); !errors.Is(err, backends.ErrNotFound) {
			return err
		}
	}
	return nil
}

// DeleteLTXFiles deletes in batches of 1,000 keys, the most one request
// takes. Keys already gone are not an error.
func (c *Client) DeleteLTXFiles(ctx context.Context, files []ltx.FileInfo) error {
	for len(files) > 0 {
		n := min(len(files), 1000)
		objs := make([]types.ObjectIdentifier, n)
		for i, f := range files[:n] {
			objs[i] = types.ObjectIdentifier{Key: aws.String(c.fileKey(f.Level, f.MinTXID, f.MaxTXID))}
		}
		out, err := c.s3.DeleteObjects(ctx, &s3.DeleteObjectsInput{Bucket: &c.bucket,
			Delete: &types.Delete{Objects: objs, Quiet: aws.Bool(true)}})
		if err != nil {
			return c.wrap(err, "delete %d files", n)
		}
		for _, e := range out.Errors {
			if aws.ToString(e.Code) != "NoSuchKey" {
				return fmt.Errorf("%s: delete %s: %s: %s", c, aws.ToString(e.Key), aws.ToString(e.Code), aws.ToString(e.Message))
			}
		}
		files = files[n:]
	}
	return nil
}

// abortUpload aborts the multipart upload a failed Upload leaves, whose
// parts the store keeps (and bills) until then, listed by nothing lfuse
// reads. The SDK's own abort runs with the upload's context, which a
// timeout or a stop has already cancelled when that is why it failed.
func (c *Client) abortUpload(ctx context.Context, key string, err error) {
	var mf manager.MultiUploadFailure
	if !errors.As(err, &mf) || mf.UploadID() == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), abortTimeout)
	defer cancel()
	_, _ = c.s3.AbortMultipartUpload(ctx, &s3.AbortMultipartUploadInput{Bucket: &c.bucket, Key: &key, UploadId: aws.String(mf.UploadID())})
}

// abortTimeout bounds the abort of a failed upload, which a stop waits for.
const abortTimeout = 5 * time.Second

// staleUpload is how old an unfinished multipart upload under the replica
// must be for Check to abort it: no upload of lfuse's lasts that long.
const staleUpload = 24 * time.Hour

// Check proves with one LIST that the bucket exists and the credentials
// may read it. It makes one attempt: the check holds a mount's start, and
// the SDK's retries of a store that is down held it about 7 s; a replica
// retries on its own. It then aborts the multipart uploads under the replica that
// a killed lfuse, or an abort that could not reach the store, left behind
// more than a day ago; a store or account that does not allow listing
// them is left alone.
func (c *Client) Check(ctx context.Context) error {
	prefix := aws.String(c.key(""))
	_, err := c.s3.ListObjectsV2(ctx, &s3.ListObjectsV2Input{Bucket: &c.bucket, Prefix: prefix, MaxKeys: aws.Int32(1)},
		func(o *s3.Options) { o.RetryMaxAttempts = 1 })
	if err != nil {
		return c.wrap(err, "check")
	}
	out, err := c.s3.ListMultipartUploads(ctx, &s3.ListMultipartUploadsInput{Bucket: &c.bucket, Prefix: prefix})
	if err != nil {
		return nil
	}
	for _, u := range out.Uploads {
		if u.Initiated != nil && time.Since(*u.Initiated) > staleUpload {
			_, _ = c.s3.AbortMultipartUpload(ctx, &s3.AbortMultipartUploadInput{Bucket: &c.bucket, Key: u.Key, UploadId: u.UploadId})
		}
	}
	return nil
}

// levelDir is a level's "directory" in the S3 layout: 0000/ to 0009/.
var levelDir = regexp.MustCompile(`^000[0-9]/$`)

// Databases lists the database replicas under the root, as slash paths
// relative to it: every prefix with level "directories" in it. A child
// named like a level counts only if it holds LTX files: a directory of
// databases can be called 0001/ too.
func (c *Client) Databases(ctx context.Context) ([]string, error) {
	return backends.FindDatabases(ctx, c.key(""), c.prefixes, func(ctx context.Context, prefix string, children []string) ([]string, error) {
		var levels []string
		for _, child := range children {
			if levelDir.MatchString(strings.TrimPrefix(child, prefix)) {
				levels = append(levels, child)
			}
		}
		for _, l := range levels {
			ok, err := c.holdsLTX(ctx, l)
			if err != nil || ok {
				return levels, err
			}
		}
		return nil, nil
	})
}

// holdsLTX says whether an LTX file lies directly under prefix.
func (c *Client) holdsLTX(ctx context.Context, prefix string) (bool, error) {
	out, err := c.s3.ListObjectsV2(ctx, &s3.ListObjectsV2Input{Bucket: &c.bucket, Prefix: &prefix, Delimiter: aws.String("/")})
	if err != nil {
		return false, c.wrap(err, "list %s", prefix)
	}
	return slices.ContainsFunc(out.Contents, func(o types.Object) bool {
		return backends.IsLTXName(strings.TrimPrefix(aws.ToString(o.Key), prefix))
	}), nil
}

// prefixes lists the "subdirectories" directly under prefix.
func (c *Client) prefixes(ctx context.Context, prefix string) ([]string, error) {
	var out []string
	p := s3.NewListObjectsV2Paginator(c.s3, &s3.ListObjectsV2Input{Bucket: &c.bucket, Prefix: &prefix, Delimiter: aws.String("/")})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return nil, c.wrap(err, "list %s", prefix)
		}
		for _, cp := range page.CommonPrefixes {
			out = append(out, aws.ToString(cp.Prefix))
		}
	}
	return out, nil
}

// wrap turns an SDK error into one line that names the replica and, for
// the errors a user can fix, says how. A missing object is ErrNotFound.
func (c *Client) wrap(err error, format string, args ...any) error {
	what := fmt.Sprintf(format, args...)
	var nsk *types.NoSuchKey
	var nf *types.NotFound
	if errors.As(err, &nsk) || errors.As(err, &nf) {
		return fmt.Errorf("%s: %s: %w", c, what, backends.ErrNotFound)
	}
	if msg := err.Error(); strings.Contains(msg, "retrieve credentials") || strings.Contains(msg, "refresh cached credentials") {
		return backends.ConfigError(fmt.Errorf("%s: %s: no credentials: set access-key-id and secret-access-key, or LFUSE_ACCESS_KEY_ID and LFUSE_SECRET_ACCESS_KEY, or the AWS_* variables (the AWS chain found none)", c, what))
	}
	var api smithy.APIError
	if errors.As(err, &api) {
		switch api.ErrorCode() {
		case "NoSuchBucket":
			return backends.ConfigError(fmt.Errorf("%s: bucket %q does not exist: create it or fix the replica URL", c, c.bucket))
		case "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken", "Forbidden":
			return backends.ConfigError(fmt.Errorf("%s: %s: access denied (%s): check access-key-id/secret-access-key (or LFUSE_ACCESS_KEY_ID/LFUSE_SECRET_ACCESS_KEY) and the bucket's permissions", c, what, api.ErrorCode()))
		}
	}
	var status interface{ HTTPStatusCode() int }
	if errors.As(err, &status) && backends.UnavailableStatus(status.HTTPStatusCode()) {
		return backends.UnavailableError(backends.Errorf(err, "%s: %s: %s", c, what, rootCause(err)))
	}
	if cause := backends.Unreachable(err); cause != nil {
		// Worded as gs and abs word it, with what could not be reached.
		return backends.Errorf(err, "%s: %s: cannot reach the store: %s", c, what, cause)
	}
	return backends.Errorf(err, "%s: %s: %s", c, what, rootCause(err))
}

func rootCause(err error) string {
	var api smithy.APIError
	if errors.As(err, &api) {
		return api.ErrorCode() + ": " + api.ErrorMessage()
	}
	for {
		next := errors.Unwrap(err)
		if next == nil {
			return err.Error()
		}
		err = next
	}
}

// ListTimesApprox: LTXFiles gives upload times, FileMeta the commit times.
func (c *Client) ListTimesApprox() bool { return true }
