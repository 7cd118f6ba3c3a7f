package main

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lfuse/lfuse/replicate"
)

func TestParseReplicaURL(t *testing.T) {
	for _, c := range []struct {
		url, err string
	}{
		{"s3://bucket/prod", ""},
		{"s3://bucket.localhost:9000/x?skip-verify=true", ""},
		{"gs://bucket/p", ""},
		{"abs://acct@container/p", ""},
		{"sftp://u:pw@host:2222/srv/backups", ""},
		{"s3:///nobucket", "no bucket"},
		{"s3://AKIA:secret@bucket/x", "credentials do not belong"},
		{"abs://container/p", "abs://ACCOUNT@CONTAINER"},
		{"abs://acct:key@container/p", "account key does not belong"},
		{"sftp://host/p", "sftp://USER@HOST"},
		{"s3://bucket/x?regoin=eu", `unknown parameter "regoin"`},
		{"ftp://host/x", `unknown scheme "ftp"`},
		// Found by an audit: secrets a message repeated.
		{"abs://acct:Eby8vd/K1SZ+secret==@container/app.db", "cannot be parsed"},
		{"sftp://u:TOP/secret@127.0.0.1:2222/p", "cannot be parsed"},
		{"sftp://u:TOP@secret@127.0.0.1:2222/p?bogus=1", `unknown parameter "bogus"`},
		{"s3://bucket/x?sig=hunter2", `unknown parameter "sig"`},
		{"sftp://u:hunter2/x@127.0.0.1:2222/p", "must be percent-encoded"},
		{"sftp://u:hunter2?x@127.0.0.1:2222/p", "must be percent-encoded"},
	} {
		_, err := parseReplicaURL(c.url)
		if c.err == "" && err != nil || c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)) {
			t.Errorf("%s: %v, want %q", c.url, err, c.err)
		}
		if err != nil && (strings.Contains(err.Error(), "secret") || strings.Contains(err.Error(), "hunter2") || strings.Contains(err.Error(), ":pw@") || strings.Contains(err.Error(), ":key@")) {
			t.Errorf("%s: the error shows a credential: %v", c.url, err)
		}
	}
	// A password in an SFTP URL never shows in the client's name.
	root, err := openReplica(context.Background(), ReplicaConfig{URL: "sftp://u:hunter2@127.0.0.1:2222/srv"})
	if err != nil {
		t.Fatal(err)
	}
	if s := root.client.String(); strings.Contains(s, "hunter2") {
		t.Fatalf("client name %q shows the password", s)
	}
	// Nor credentials in an endpoint, which the client's name repeats.
	for _, r := range []ReplicaConfig{
		{URL: "s3://bucket/x?endpoint=http://AKIA:secret@127.0.0.1:7070"},
		{URL: "s3://bucket/x", Endpoint: "http://AKIA:secret@127.0.0.1:7070"},
		{URL: "s3://bucket/x?endpoint=https%3A%2F%2FAKIA%3Asecret%40127.0.0.1"},
	} {
		_, err := openReplica(context.Background(), r)
		if err == nil || !strings.Contains(err.Error(), "endpoint holds credentials") || strings.Contains(err.Error(), "secret") {
			t.Errorf("%+v: %v", r, err)
		}
	}
}

func TestS3Host(t *testing.T) {
	for _, c := range []struct{ host, bucket, endpoint, region string }{
		{"mybucket", "mybucket", "", ""},
		{"mybucket.localhost:9000", "mybucket", "http://localhost:9000", "us-east-1"},
		{"b.s3.us-west-002.backblazeb2.com", "b", "https://s3.us-west-002.backblazeb2.com", "us-west-002"},
		{"b.nyc3.digitaloceanspaces.com", "b", "https://nyc3.digitaloceanspaces.com", "us-east-1"},
		{"b.us-east-1.linodeobjects.com", "b", "https://us-east-1.linodeobjects.com", "us-east-1"},
		{"b.s3.filebase.com", "b", "https://s3.filebase.com", "us-east-1"},
		{"my.bucket.s3.eu-west-1.amazonaws.com", "my.bucket", "", "eu-west-1"},
		{"b.s3.amazonaws.com", "b", "", ""},
	} {
		b, e, r := s3Host(c.host, "")
		if b != c.bucket || e != c.endpoint || r != c.region {
			t.Errorf("%s: bucket %q endpoint %q region %q, want %q %q %q", c.host, b, e, r, c.bucket, c.endpoint, c.region)
		}
	}
}

// Database names come from the replica, which is not trusted to say where
// files go.
func TestLocalDBPath(t *testing.T) {
	for rel, want := range map[string]bool{
		"app.db": true, "sub/app.db": true, "a/b/c.db": true, `back\slash.db`: true, `..\x.db`: true,
		"": false, "..": false, "../x.db": false, "a/../../x.db": false, "/etc/passwd": false, "a/\x00b": false,
	} {
		if got := localDBPath(rel); got != want {
			t.Errorf("localDBPath(%q) = %v, want %v", rel, got, want)
		}
	}
}

// Any string: parsing never panics, and an error never shows a password.
func FuzzParseReplicaURL(f *testing.F) {
	for _, s := range []string{"s3://b/p", "sftp://u:pw@h:22/~/x", "abs://a@c/p?endpoint=http://x", "file:///x", "/plain/path", "gs://b", "s3://b/x?skip-verify=maybe"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		_, err := parseReplicaURL(raw)
		if err != nil && strings.Contains(raw, ":s3cr3t@") && strings.Contains(err.Error(), "s3cr3t") {
			t.Fatalf("error shows the password: %v", err)
		}
	})
}

// Where a restore writes is checked before anything is downloaded (found by
// an audit: raw errors after the download, /dev/null replaced by a file,
// and a restore under a running mount that the mount then overwrote).
func TestRestoreOutputChecks(t *testing.T) {
	dir := t.TempDir()
	os.Mkdir(filepath.Join(dir, "sub"), 0o755)
	f := restoreFlags{force: true, parallelism: 1}
	for _, c := range []struct {
		out, err string
	}{
		{filepath.Join(dir, "missing", "app.db"), "output directory " + filepath.Join(dir, "missing") + " does not exist"},
		{filepath.Join(dir, "sub"), "is not a regular file (a directory)"},
		{"/dev/null", "is not a regular file (a device)"},
	} {
		_, err := restoreOne(context.Background(), slog.New(slog.DiscardHandler), io.Discard, nil, c.out, replicate.Target{}, f)
		if err == nil || !strings.Contains(err.Error(), c.err) {
			t.Errorf("%s: %v, want %q", c.out, err, c.err)
		}
	}
	if st, err := os.Stat("/dev/null"); err != nil || st.Mode().IsRegular() {
		t.Fatalf("/dev/null: %v %v", st, err)
	}

	unlock, err := lockData(dir) // as a running mount holds it
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{dir, filepath.Join(dir, "sub")} {
		if _, err := lockServed(d); err == nil || !strings.Contains(err.Error(), dir+" is served by a running lfuse mount") {
			t.Fatalf("restore into %s, served: %v", d, err)
		}
	}
	unlock()
	// Restores share the directory; a mount waits for them.
	release, err := lockServed(dir)
	if err != nil {
		t.Fatalf("restore into a directory no mount serves: %v", err)
	}
	release2, err := lockServed(dir)
	if err != nil {
		t.Fatalf("a second restore into the same directory: %v", err)
	}
	if _, err := lockData(dir); err == nil {
		t.Fatal("a mount started during a restore into its data directory")
	}
	release()
	release2()
}

// A replica that never synced lags since lfuse began shipping to it, not
// 0 s (found by an audit: a replica unwritable from the start showed no
// lag, so an alert on lfuse_replica_lag_seconds never fired).
func TestReplicaLag(t *testing.T) {
	start := time.Now().Add(-time.Minute).UnixNano()
	if n, s := replicaLag(10, replicate.ReplicaStats{TXID: 10, StartedAt: start}); n != 0 || s != 0 {
		t.Errorf("in sync: %d txids, %.0f s", n, s)
	}
	if n, s := replicaLag(10, replicate.ReplicaStats{TXID: 0, StartedAt: start}); n != 10 || s < 59 {
		t.Errorf("never synced: %d txids, %.0f s, want 10 and about 60", n, s)
	}
	if _, s := replicaLag(10, replicate.ReplicaStats{TXID: 5, SyncedAt: time.Now().Add(-5 * time.Second).UnixNano(), StartedAt: start}); s < 4 || s > 30 {
		t.Errorf("synced 5 s ago: %.0f s", s)
	}
}
