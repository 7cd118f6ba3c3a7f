package s3_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	neturl "net/url"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awss3 "github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/lfuse/lfuse/backends"
	"github.com/lfuse/lfuse/backends/backendtest"
	"github.com/lfuse/lfuse/backends/s3"
	"github.com/superfly/ltx"
)

const bucket = "lfuse-test"

var (
	testTime    = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	meta        = backends.FileMeta{Timestamp: testTime, PostApplyChecksum: ltx.ChecksumFlag | 1}
	errNotFound = backends.ErrNotFound
)

func newClient(t testing.TB, env map[string]string, cfg s3.Config) *s3.Client {
	t.Helper()
	if cfg.Bucket == "" {
		cfg.Bucket = bucket
	}
	if cfg.Endpoint == "" {
		cfg.Endpoint = env["LFUSE_TEST_S3_ENDPOINT"]
	}
	if cfg.AccessKeyID == "" {
		cfg.AccessKeyID, cfg.SecretAccessKey = env["LFUSE_TEST_S3_ACCESS_KEY_ID"], env["LFUSE_TEST_S3_SECRET_ACCESS_KEY"]
	}
	c, err := s3.New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// sdkClient is the SDK's own client of the test server, to check what
// lfuse's did.
func sdkClient(env map[string]string, endpoint string) *awss3.Client {
	return awss3.New(awss3.Options{
		Region:       "us-east-1",
		BaseEndpoint: aws.String(endpoint),
		UsePathStyle: true,
		Credentials: aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
			return aws.Credentials{AccessKeyID: env["LFUSE_TEST_S3_ACCESS_KEY_ID"], SecretAccessKey: env["LFUSE_TEST_S3_SECRET_ACCESS_KEY"]}, nil
		}),
	})
}

// ensureBucket creates the test bucket through the SDK itself.
func ensureBucket(t testing.TB, env map[string]string, endpoint string) {
	t.Helper()
	_, err := sdkClient(env, endpoint).CreateBucket(context.Background(), &awss3.CreateBucketInput{Bucket: aws.String(bucket)})
	if err != nil && !strings.Contains(err.Error(), "BucketAlreadyOwnedByYou") && !strings.Contains(err.Error(), "BucketAlreadyExists") {
		t.Fatalf("create bucket: %v", err)
	}
}

func TestConformance(t *testing.T) {
	env := backendtest.Servers(t)
	ensureBucket(t, env, env["LFUSE_TEST_S3_ENDPOINT"])
	backendtest.Run(t, backendtest.Options{
		New: func(t *testing.T, root string) backendtest.Client {
			return newClient(t, env, s3.Config{Path: root})
		},
		ListTimesApprox: true,
		Secrets:         []string{env["LFUSE_TEST_S3_SECRET_ACCESS_KEY"]},
	})
}

func TestCheck(t *testing.T) {
	env := backendtest.Servers(t)
	ensureBucket(t, env, env["LFUSE_TEST_S3_ENDPOINT"])
	ctx := context.Background()
	if err := newClient(t, env, s3.Config{Path: "x"}).Check(ctx); err != nil {
		t.Fatalf("a good replica fails its check: %v", err)
	}
	err := newClient(t, env, s3.Config{Bucket: "no-such-bucket-here"}).Check(ctx)
	if err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("missing bucket: %v", err)
	}
	const wrong = "wrong-secret-key-1234567890"
	err = newClient(t, env, s3.Config{AccessKeyID: env["LFUSE_TEST_S3_ACCESS_KEY_ID"], SecretAccessKey: wrong}).Check(ctx)
	if err == nil || !strings.Contains(err.Error(), "access denied") || strings.Contains(err.Error(), wrong) {
		t.Fatalf("wrong secret: %v", err)
	}
	if strings.Contains(err.Error(), "\n") {
		t.Fatalf("the error is more than one line: %q", err)
	}
}

// A self-signed endpoint is refused unless told to trust it.
func TestTLS(t *testing.T) {
	env := backendtest.Servers(t)
	tlsURL := env["LFUSE_TEST_S3_TLS_ENDPOINT"]
	ctx := context.Background()
	err := newClient(t, env, s3.Config{Endpoint: tlsURL}).Check(ctx)
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("a self-signed endpoint without skip-verify: %v", err)
	}
	// The TLS server holds no buckets: reaching "does not exist" proves the
	// handshake and the signature passed.
	err = newClient(t, env, s3.Config{Endpoint: tlsURL, SkipVerify: true}).Check(ctx)
	if err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("with skip-verify: %v", err)
	}
}

func TestDatabases(t *testing.T) {
	env := backendtest.Servers(t)
	ensureBucket(t, env, env["LFUSE_TEST_S3_ENDPOINT"])
	root := newClient(t, env, s3.Config{Path: "dbs-" + t.Name() + "/" + strings.ReplaceAll(t.TempDir(), "/", "_")})
	for i, rel := range backendtest.DatabaseNames {
		body := backendtest.EncodeFile(t, 1, 1, 1, int64(i), testTime)
		if err := root.Sub(rel).WriteLTXFile(context.Background(), 9, 1, 1, strings.NewReader(string(body)), int64(len(body)), meta); err != nil {
			t.Fatal(err)
		}
		// A deletion marker beside it is no database of its own.
		if err := root.Sub(rel).WriteMarker(context.Background(), "lfuse-deleted.json", []byte("{}")); err != nil {
			t.Fatal(err)
		}
	}
	dbs, err := root.Databases(context.Background())
	if err != nil || !slices.Equal(dbs, backendtest.DatabaseNames) {
		t.Fatalf("databases %q, %v", dbs, err)
	}
	if _, err := root.Sub("a.db").FileMeta(context.Background(), 0, 1, 1); !errors.Is(err, errNotFound) {
		t.Fatalf("meta of a missing file: %v", err)
	}
}

// flakyProxy forwards to the S3 server but answers every third request
// with a 503, cuts the connection of every fifth without an answer, and
// holds every seventh longer than the client waits.
func flakyProxy(t *testing.T, target string) (url string, failures *atomic.Int64) {
	u, err := neturl.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(u)
	var n atomic.Int64
	failures = new(atomic.Int64)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch i := n.Add(1); {
		case i%7 == 3:
			failures.Add(1)
			time.Sleep(2 * time.Second) // longer than the client waits: a timeout
			rp.ServeHTTP(w, r)
		case i%3 == 1:
			failures.Add(1)
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprint(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>injected</Message></Error>`)
		case i%5 == 2:
			failures.Add(1)
			conn, _, err := w.(http.Hijacker).Hijack()
			if err == nil {
				conn.(*net.TCPConn).SetLinger(0) // a reset, not a clean close
				conn.Close()
			}
		default:
			rp.ServeHTTP(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv.URL, failures
}

// 503s, connection resets and timeouts are retried: every operation still
// succeeds.
func TestTransientErrors(t *testing.T) {
	env := backendtest.Servers(t)
	ensureBucket(t, env, env["LFUSE_TEST_S3_ENDPOINT"])
	proxy, failures := flakyProxy(t, env["LFUSE_TEST_S3_ENDPOINT"])
	c := newClient(t, env, s3.Config{Endpoint: proxy, Path: fmt.Sprintf("flaky-%d", time.Now().UnixNano()), ResponseTimeout: 500 * time.Millisecond})
	ctx := context.Background()
	for i := 1; i <= 5; i++ {
		id := ltx.TXID(i)
		body := backendtest.EncodeFile(t, id, id, 3, int64(i), testTime)
		if err := c.WriteLTXFile(ctx, 0, id, id, bytes.NewReader(body), int64(len(body)), meta); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		rc, err := c.OpenLTXFile(ctx, 0, id, id, 0, 0)
		if err != nil {
			t.Fatalf("open %d: %v", i, err)
		}
		got, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || !bytes.Equal(got, body) {
			t.Fatalf("read %d: %v", i, err)
		}
		if _, err := c.FileMeta(ctx, 0, id, id); err != nil {
			t.Fatalf("meta %d: %v", i, err)
		}
	}
	files, err := c.LTXFiles(ctx, 0)
	if err != nil || len(files) != 5 {
		t.Fatalf("listed %d files: %v", len(files), err)
	}
	if err := c.DeleteLTXFiles(ctx, files); err != nil {
		t.Fatal(err)
	}
	if failures.Load() < 5 {
		t.Fatalf("only %d failures injected", failures.Load())
	}
}

// A store that acknowledges a multipart upload it does not hold (versitygw
// v1.8.0 does, for a retried CompleteMultipartUpload after a crash) makes
// the write fail, so that the replica writes the file again, rather than
// count a file that is not there.
func TestLostMultipartUploadIsAnError(t *testing.T) {
	env := backendtest.Servers(t)
	ensureBucket(t, env, env["LFUSE_TEST_S3_ENDPOINT"])
	u, err := neturl.Parse(env["LFUSE_TEST_S3_ENDPOINT"])
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(u)
	var swallowed atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && r.URL.Query().Has("uploadId") {
			swallowed.Add(1)
			w.Header().Set("Content-Type", "application/xml")
			fmt.Fprint(w, `<?xml version="1.0" encoding="UTF-8"?><CompleteMultipartUploadResult><Bucket>b</Bucket><Key>k</Key><ETag>"0123456789abcdef0123456789abcdef-2"</ETag></CompleteMultipartUploadResult>`)
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	path := fmt.Sprintf("lost-%d", time.Now().UnixNano())
	body := bytes.Repeat([]byte("lfuse"), 7<<20/5) // over one 5 MiB part
	ctx := context.Background()

	lossy := newClient(t, env, s3.Config{Endpoint: srv.URL, Path: path})
	err = lossy.WriteLTXFile(ctx, 9, 1, 9, bytes.NewReader(body), int64(len(body)), meta)
	if err == nil || swallowed.Load() == 0 || strings.Contains(err.Error(), "\n") {
		t.Fatalf("write through a store that drops the upload: err %v, %d completions swallowed", err, swallowed.Load())
	}
	t.Logf("%v", err)

	// The same write against the store itself succeeds and is read back.
	backendtest.WriteReadBack(t, newClient(t, env, s3.Config{Path: path}), body, meta)
}

// An upload that a cancelled context cuts off (a stop, the upload timeout)
// leaves no multipart upload in the bucket. (Found by an adversarial run:
// the SDK aborts with the cancelled context, which fails, and the parts
// stayed in the store, billed and listed by nothing lfuse reads.)
func TestCancelledUploadIsAborted(t *testing.T) {
	env := backendtest.Servers(t)
	ensureBucket(t, env, env["LFUSE_TEST_S3_ENDPOINT"])
	path := fmt.Sprintf("cancelled-%d", time.Now().UnixNano())
	c := newClient(t, env, s3.Config{Path: path})
	ctx, cancel := context.WithCancel(context.Background())
	body := bytes.Repeat([]byte("lfuse"), 12<<20/5) // three 5 MiB parts
	err := c.WriteLTXFile(ctx, 9, 1, 9, backendtest.CancelAfter(bytes.NewReader(body), 6<<20, cancel), int64(len(body)), meta)
	if err == nil {
		t.Fatal("an upload whose context was cancelled succeeded")
	}
	out, err := sdkClient(env, env["LFUSE_TEST_S3_ENDPOINT"]).ListMultipartUploads(context.Background(), &awss3.ListMultipartUploadsInput{Bucket: aws.String(bucket), Prefix: aws.String(path + "/")})
	if err != nil {
		t.Fatal(err)
	}
	if len(out.Uploads) != 0 {
		t.Fatalf("%d multipart uploads left after a cancelled write: %s", len(out.Uploads), aws.ToString(out.Uploads[0].Key))
	}
}

// The check before a mount opens holds the application's start: it makes
// one request, and the replica retries on its own.
func TestCheckTriesOnce(t *testing.T) {
	backendtest.Unavailable(t, 1, func(ctx context.Context, endpoint string) error {
		c, err := s3.New(ctx, s3.Config{Bucket: bucket, Endpoint: endpoint, AccessKeyID: "id", SecretAccessKey: "secret"})
		if err != nil {
			return err
		}
		return c.Check(ctx)
	})
}
