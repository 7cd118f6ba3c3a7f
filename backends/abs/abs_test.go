package abs

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/bloberror"
	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/sas"
	"github.com/lfuse/lfuse/backends"
	"github.com/lfuse/lfuse/backends/backendtest"
)

const testContainer = "lfuse-test"

// server returns Azurite's settings, with the test container created.
func server(t *testing.T) Config {
	t.Helper()
	env := backendtest.Servers(t)
	cfg := Config{AccountName: env["LFUSE_TEST_AZURE_ACCOUNT"], AccountKey: env["LFUSE_TEST_AZURE_KEY"],
		Endpoint: env["LFUSE_TEST_AZURE_ENDPOINT"], Container: testContainer}
	if cfg.Endpoint == "" {
		t.Skip("no Azurite in the test servers' settings")
	}
	c := newClient(t, cfg)
	if _, err := c.cc.Create(context.Background(), nil); err != nil && !bloberror.HasCode(err, bloberror.ContainerAlreadyExists) {
		t.Fatalf("create container %s: %v", testContainer, err)
	}
	return cfg
}

func newClient(t *testing.T, cfg Config) *Client {
	t.Helper()
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func uniqueRoot(t *testing.T) string {
	return fmt.Sprintf("lfuse-test-%d-%d/%s", os.Getpid(), time.Now().UnixNano(), t.Name())
}

func TestConformance(t *testing.T) {
	cfg := server(t)
	backendtest.Run(t, backendtest.Options{
		New: func(t *testing.T, root string) backendtest.Client {
			cfg := cfg
			cfg.Path = root
			return newClient(t, cfg)
		},
		Secrets: []string{cfg.AccountKey},
	})
}

func TestCheck(t *testing.T) {
	cfg := server(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg.Path = uniqueRoot(t)
	if err := newClient(t, cfg).Check(ctx); err != nil {
		t.Fatalf("check an existing container: %v", err)
	}

	missing := cfg
	missing.Container = "lfuse-no-such-container"
	err := newClient(t, missing).Check(ctx)
	if err == nil || !strings.Contains(err.Error(), `container "lfuse-no-such-container" does not exist: create it`) || strings.Contains(err.Error(), "\n") || !errors.Is(err, backends.ErrConfig) {
		t.Fatalf("check a missing container: %v", err)
	}

	wrong := cfg
	key := make([]byte, 64)
	rand.Read(key)
	wrong.AccountKey = base64.StdEncoding.EncodeToString(key)
	err = newClient(t, wrong).Check(ctx)
	if err == nil || !strings.Contains(err.Error(), "access denied") || strings.Contains(err.Error(), "\n") || !errors.Is(err, backends.ErrConfig) {
		t.Fatalf("check with a wrong key: %v", err)
	}
	for _, secret := range []string{wrong.AccountKey, cfg.AccountKey} {
		if strings.Contains(err.Error(), secret) {
			t.Fatalf("the error shows the key: %v", err)
		}
	}

	// Nothing listens on port 1; the SDK retries a refused connection.
	short, cancel2 := context.WithTimeout(ctx, 3*time.Second)
	defer cancel2()
	unreachable := cfg
	unreachable.Endpoint = "http://127.0.0.1:1/devstoreaccount1/"
	err = newClient(t, unreachable).Check(short)
	if err == nil || !strings.Contains(err.Error(), "cannot reach http://127.0.0.1:1/") || strings.Contains(err.Error(), "\n") || errors.Is(err, backends.ErrConfig) {
		t.Fatalf("check an unreachable endpoint: %v", err)
	}
}

// A SAS token works in place of the key and shows nowhere.
func TestSAS(t *testing.T) {
	cfg := server(t)
	cred, err := azblob.NewSharedKeyCredential(cfg.AccountName, cfg.AccountKey)
	if err != nil {
		t.Fatal(err)
	}
	qp, err := sas.AccountSignatureValues{
		Protocol:      sas.ProtocolHTTPSandHTTP,
		ExpiryTime:    time.Now().Add(time.Hour).UTC(),
		Permissions:   (&sas.AccountPermissions{Read: true, Write: true, Delete: true, List: true, Create: true}).String(),
		ResourceTypes: (&sas.AccountResourceTypes{Container: true, Object: true}).String(),
	}.SignWithSharedKey(cred)
	if err != nil {
		t.Fatal(err)
	}
	token := qp.Encode()
	cfg.AccountKey, cfg.SASToken, cfg.Path = "", "?"+token, uniqueRoot(t)
	c := newClient(t, cfg)
	secrets := []string{token, qp.Signature(), cfg.AccountKey}
	noSecret := func(what string) {
		t.Helper()
		for _, s := range secrets {
			if s != "" && strings.Contains(what, s) {
				t.Fatalf("a secret shows in %q", what)
			}
		}
	}
	noSecret(c.String())
	ctx := context.Background()
	if err := c.Check(ctx); err != nil {
		t.Fatal(err)
	}
	ts := time.Now().UTC().Truncate(time.Millisecond)
	body := backendtest.EncodeFile(t, 1, 2, 3, 1, ts)
	if err := c.WriteLTXFile(ctx, 0, 1, 2, bytes.NewReader(body), int64(len(body)), backends.FileMeta{Timestamp: ts}); err != nil {
		t.Fatal(err)
	}
	rc, err := c.OpenLTXFile(ctx, 0, 1, 2, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read back %d bytes, %v", len(got), err)
	}
	_, err = c.OpenLTXFile(ctx, 0, 7, 7, 0, 0)
	if !errors.Is(err, backends.ErrNotFound) {
		t.Fatalf("open a missing file: %v", err)
	}
	noSecret(err.Error())

	cfg.Endpoint = "http://127.0.0.1:1/devstoreaccount1/"
	short, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	_, err = newClient(t, cfg).LTXFiles(short, 0)
	if err == nil {
		t.Fatal("listed from nowhere")
	}
	noSecret(err.Error())
}

func TestRedact(t *testing.T) {
	s := `Get "http://h/c/b?se=2026&sig=abc%2Bdef%3D&sp=rl": dial tcp: refused`
	if got := redact(s, nil); strings.Contains(got, "abc") || !strings.Contains(got, "sig=REDACTED&sp=rl") {
		t.Fatalf("redacted to %q", got)
	}
	if got := redact("key K3y+/= in text", []string{"K3y+/="}); strings.Contains(got, "K3y") {
		t.Fatalf("redacted to %q", got)
	}
}

func TestDatabases(t *testing.T) {
	cfg := server(t)
	cfg.Path = uniqueRoot(t)
	ctx := context.Background()
	base := newClient(t, cfg)
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
	// Not databases: a stray blob, and an ltx/ without levels.
	for _, name := range []string{"stray/file", "c.db/ltx/notalevel"} {
		if _, err := base.cc.NewBlockBlobClient(base.key(name)).UploadBuffer(ctx, []byte("x"), nil); err != nil {
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
	c := &Client{account: "acct", container: "cont", root: "r"}
	for rel, want := range map[string]string{"": "r", ".": "r", "a.db": "r/a.db", "/x/./y.db/": "r/x/y.db", "a/../b.db": "r/b.db"} {
		if got := c.Sub(rel); got.err != nil || got.root != want {
			t.Errorf("Sub(%q) = %q, %v; want %q", rel, got.root, got.err, want)
		}
	}
	for _, rel := range []string{"..", "../x", "a/../../x"} {
		if _, err := c.Sub(rel).LTXFiles(context.Background(), 0); err == nil {
			t.Errorf("Sub(%q) lists", rel)
		}
	}
	if got := c.String(); got != "abs://acct@cont/r" {
		t.Errorf("String() = %q", got)
	}
	if _, err := New(Config{AccountName: "a", Container: "c", Path: "x/../../y"}); err == nil {
		t.Error(`a path with ".." is accepted`)
	}
}

// A deadline that ends in the middle of an attempt, after refused ones,
// leaves no connection error in the chain; it is still an endpoint that
// did not answer.
func TestDeadlineMidAttemptIsUnreachable(t *testing.T) {
	c := &Client{account: "acct", container: "box", endpoint: "http://127.0.0.1:1/acct/"}
	err := c.wrap(&url.Error{Op: "Get", URL: "http://127.0.0.1:1/acct/box", Err: context.DeadlineExceeded}, "check")
	if !strings.Contains(err.Error(), "cannot reach http://127.0.0.1:1/acct/: no response before the deadline") || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v", err)
	}
}

// A store that acknowledges the commit of a large upload's block list
// without making the blob must make the write fail, so that the replica
// writes the file again, rather than count a file that is not there. Here a
// proxy in front of Azurite answers the commit itself.
func TestLostUploadIsAnError(t *testing.T) {
	cfg := server(t)
	u, err := url.Parse(cfg.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	host := &url.URL{Scheme: u.Scheme, Host: u.Host}
	rp := &httputil.ReverseProxy{Rewrite: func(r *httputil.ProxyRequest) { r.SetURL(host) }}
	var swallowed atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut && r.URL.Query().Get("comp") == "blocklist" {
			swallowed.Add(1)
			w.Header().Set("ETag", `"0x8D000000000000"`)
			w.Header().Set("Last-Modified", time.Now().UTC().Format(http.TimeFormat))
			w.WriteHeader(http.StatusCreated)
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	root := uniqueRoot(t)
	body := bytes.Repeat([]byte("lfuse"), 6<<20/5) // over one 4 MiB block
	meta := backends.FileMeta{Timestamp: time.Now()}
	ctx := context.Background()

	lossy := cfg
	lossy.Endpoint, lossy.Path = srv.URL+u.Path, root
	err = newClient(t, lossy).WriteLTXFile(ctx, 9, 1, 9, bytes.NewReader(body), int64(len(body)), meta)
	if err == nil || swallowed.Load() == 0 || strings.Contains(err.Error(), "\n") || !strings.Contains(err.Error(), "written again") {
		t.Fatalf("write through a store that drops the upload: err %v, %d commits swallowed", err, swallowed.Load())
	}
	t.Logf("%v", err)

	// The same write against the store itself succeeds and is read back.
	direct := cfg
	direct.Path = root
	backendtest.WriteReadBack(t, newClient(t, direct), body, meta)
}

// The check before a mount opens holds the application's start: it makes
// one request, and the replica retries on its own.
func TestCheckTriesOnce(t *testing.T) {
	backendtest.Unavailable(t, 1, func(ctx context.Context, endpoint string) error {
		return newClient(t, Config{AccountName: "acct", AccountKey: "a2V5", Container: testContainer, Endpoint: endpoint}).Check(ctx)
	})
}
