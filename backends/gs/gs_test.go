package gs

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends"
	"github.com/lfuse/lfuse/backends/backendtest"
	"google.golang.org/api/googleapi"
)

const testBucket = "lfuse-test"

// server returns the emulator's endpoint, with the test bucket created.
func server(t *testing.T) string {
	t.Helper()
	endpoint := backendtest.Servers(t)["LFUSE_TEST_GCS_ENDPOINT"]
	if endpoint == "" {
		t.Skip("no GCS emulator in the test servers' settings")
	}
	c := newClient(t, endpoint, testBucket, "")
	err := c.bucket.Create(context.Background(), "lfuse-test-project", nil)
	var ge *googleapi.Error
	if err != nil && !(errors.As(err, &ge) && ge.Code == 409) {
		t.Fatalf("create bucket %s: %v", testBucket, err)
	}
	return endpoint
}

func newClient(t *testing.T, endpoint, bucket, root string) *Client {
	t.Helper()
	c, err := New(context.Background(), Config{Bucket: bucket, Path: root, Endpoint: endpoint})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func uniqueRoot(t *testing.T) string {
	return fmt.Sprintf("lfuse-test-%d-%d/%s", os.Getpid(), time.Now().UnixNano(), t.Name())
}

func TestConformance(t *testing.T) {
	endpoint := server(t)
	backendtest.Run(t, backendtest.Options{
		New: func(t *testing.T, root string) backendtest.Client { return newClient(t, endpoint, testBucket, root) },
	})
}

func TestCheck(t *testing.T) {
	endpoint := server(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := newClient(t, endpoint, testBucket, uniqueRoot(t)).Check(ctx); err != nil {
		t.Fatalf("check an existing bucket: %v", err)
	}

	err := newClient(t, endpoint, "lfuse-no-such-bucket", "x").Check(ctx)
	if err == nil || !strings.Contains(err.Error(), `bucket "lfuse-no-such-bucket" does not exist: create it`) || strings.Contains(err.Error(), "\n") || !errors.Is(err, backends.ErrConfig) {
		t.Fatalf("check a missing bucket: %v", err)
	}

	// Nothing listens on port 1; the SDK retries a refused connection
	// until the context ends.
	short, cancel2 := context.WithTimeout(ctx, 3*time.Second)
	defer cancel2()
	err = newClient(t, "http://127.0.0.1:1", testBucket, "").Check(short)
	if err == nil || !strings.Contains(err.Error(), "cannot reach http://127.0.0.1:1") || strings.Contains(err.Error(), "\n") || errors.Is(err, backends.ErrConfig) {
		t.Fatalf("check an unreachable endpoint: %v", err)
	}
}

func TestDatabases(t *testing.T) {
	endpoint := server(t)
	ctx := context.Background()
	base := newClient(t, endpoint, testBucket, uniqueRoot(t))
	if dbs, err := base.Databases(ctx); err != nil || dbs != nil {
		t.Fatalf("an empty root holds %q, %v", dbs, err)
	}
	ts := time.Now().UTC().Truncate(time.Millisecond)
	body := backendtest.EncodeFile(t, 1, 1, 1, 1, ts)
	for _, rel := range backendtest.DatabaseNames {
		if err := base.Sub(rel).WriteLTXFile(ctx, 0, 1, 1, bytes.NewReader(body), int64(len(body)), backends.FileMeta{Timestamp: ts}); err != nil {
			t.Fatal(err)
		}
		// A deletion marker beside it is no database of its own.
		if err := base.Sub(rel).WriteMarker(ctx, "lfuse-deleted.json", []byte("{}")); err != nil {
			t.Fatal(err)
		}
	}
	// Not databases: a stray object, and an ltx/ without levels.
	for _, name := range []string{"stray/file", "c.db/ltx/notalevel"} {
		w := base.bucket.Object(base.key(name)).NewWriter(ctx)
		w.Write([]byte("x"))
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
	}
	dbs, err := base.Databases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if want := backendtest.DatabaseNames; !slices.Equal(dbs, want) {
		t.Fatalf("databases %q, want %q", dbs, want)
	}
}

func TestSub(t *testing.T) {
	c := &Client{name: "b", root: "r"}
	for rel, want := range map[string]string{"": "r", ".": "r", "a.db": "r/a.db", "/x/./y.db/": "r/x/y.db", "a/../b.db": "r/b.db"} {
		if got := c.Sub(rel); got.err != nil || got.root != want {
			t.Errorf("Sub(%q) = %q, %v; want %q", rel, got.root, got.err, want)
		}
	}
	for _, rel := range []string{"..", "../x", "a/../../x"} {
		sub := c.Sub(rel)
		if _, err := sub.LTXFiles(context.Background(), 0); err == nil {
			t.Errorf("Sub(%q) lists", rel)
		}
	}
	if got := c.String(); got != "gs://b/r" {
		t.Errorf("String() = %q", got)
	}
	if _, err := cleanRoot("a/../../b"); err == nil {
		t.Error(`a path with ".." is accepted`)
	}
}

func TestCredentialsFile(t *testing.T) {
	dir := t.TempDir()
	if _, err := credentialsFile(dir + "/missing.json"); err == nil {
		t.Error("a missing file is accepted")
	}
	name := dir + "/creds.json"
	if err := os.WriteFile(name, []byte(`{"type": "something_else", "secret": "s3cr3t"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := credentialsFile(name)
	if err == nil || !strings.Contains(err.Error(), `unsupported type "something_else"`) || strings.Contains(err.Error(), "s3cr3t") {
		t.Errorf("a file of an unknown type: %v", err)
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	good := string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
	garbled := strings.Replace(good, good[100:140], strings.Repeat("A", 40), 1)
	for _, c := range []struct{ key, err string }{
		{good, ""},
		{"", "holds no PEM private key"},
		{garbled, "private_key cannot be read"},
	} {
		b, _ := json.Marshal(map[string]string{"type": "service_account", "private_key": c.key, "client_email": "x@y"})
		if err := os.WriteFile(name, b, 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := credentialsFile(name)
		if c.err == "" && err != nil || c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err) || !errors.Is(err, backends.ErrConfig) || strings.Contains(err.Error(), "AAAA")) {
			t.Errorf("a service account file with key %.30q: %v, want %q", c.key, err, c.err)
		}
	}
}

// A deadline that ends in the middle of an attempt, after refused ones,
// leaves no connection error in the chain; it is still an endpoint that
// did not answer.
func TestDeadlineMidAttemptIsUnreachable(t *testing.T) {
	c := &Client{name: "bucket", endpoint: "http://127.0.0.1:1/storage/v1/"}
	err := c.wrap(&url.Error{Op: "Get", URL: "http://127.0.0.1:1/storage/v1/b/bucket", Err: context.DeadlineExceeded}, "check")
	if !strings.Contains(err.Error(), "cannot reach http://127.0.0.1:1/storage/v1/: no response before the deadline") || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v", err)
	}
}

// A store whose answer to an upload describes another object than the one
// sent (here a proxy in front of the emulator shrinks the size it reports)
// must make the write fail, so that the replica writes the file again.
func TestLostUploadIsAnError(t *testing.T) {
	endpoint := server(t)
	u, err := url.Parse(endpoint)
	if err != nil {
		t.Fatal(err)
	}
	var rewritten atomic.Int64
	var proxyHost string
	sizeRe := regexp.MustCompile(`"size"\s*:\s*"\d+"`)
	rp := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) { r.SetURL(u) },
		ModifyResponse: func(resp *http.Response) error {
			if !strings.HasPrefix(resp.Request.URL.Path, "/upload/") {
				return nil
			}
			if loc := resp.Header.Get("Location"); loc != "" {
				// The chunks of a resumable upload go where this says.
				resp.Header.Set("Location", strings.Replace(loc, u.Host, proxyHost, 1))
			}
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil {
				return err
			}
			if sizeRe.Match(b) {
				rewritten.Add(1)
				b = sizeRe.ReplaceAll(b, []byte(`"size":"1"`))
			}
			resp.Body = io.NopCloser(bytes.NewReader(b))
			resp.ContentLength = int64(len(b))
			resp.Header.Set("Content-Length", strconv.Itoa(len(b)))
			return nil
		},
	}
	srv := httptest.NewServer(rp)
	t.Cleanup(srv.Close)
	proxyHost = strings.TrimPrefix(srv.URL, "http://")
	root := uniqueRoot(t)
	ctx := context.Background()
	meta := backends.FileMeta{Timestamp: time.Now()}
	for _, n := range []int{1000, 9 << 20} { // one request; several chunks
		body := bytes.Repeat([]byte("lfuse"), n/5)
		err := newClient(t, srv.URL, testBucket, root).WriteLTXFile(ctx, 9, 1, 9, bytes.NewReader(body), int64(len(body)), meta)
		if err == nil || strings.Contains(err.Error(), "\n") || !strings.Contains(err.Error(), "written again") {
			t.Fatalf("%d bytes through a store that reports another size: err %v, %d answers rewritten", len(body), err, rewritten.Swap(0))
		}
		t.Logf("%v", err)
		backendtest.WriteReadBack(t, newClient(t, endpoint, testBucket, root), body, meta)
	}
}

// The check before a mount opens holds the application's start: it makes
// one request, and the replica retries on its own.
func TestCheckTriesOnce(t *testing.T) {
	backendtest.Unavailable(t, 1, func(ctx context.Context, endpoint string) error {
		return newClient(t, endpoint, testBucket, "x").Check(ctx)
	})
}

// A store that stays down is given five tries, not the SDK's unlimited
// ones nor the eight (20–90 s) lfuse first allowed: a restore waits for them.
func TestRetriesBounded(t *testing.T) {
	backendtest.Unavailable(t, 5, func(ctx context.Context, endpoint string) error {
		_, err := newClient(t, endpoint, testBucket, "x").LTXFiles(ctx, 0)
		return err
	})
}
