package backends

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"syscall"
	"testing"
)

// Down tells a store that is down from one that answered: a restore leaves
// out only the first, with -skip-unreachable.
func TestDown(t *testing.T) {
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}
	for _, c := range []struct {
		name string
		err  error
		want bool
	}{
		{"refused", Errorf(refused, "s3://b: list: connection refused"), true},
		{"no such host", &net.DNSError{Err: "no such host", Name: "x", IsNotFound: true}, true},
		{"no answer in time", fmt.Errorf("list (no answer within 5m0s): %w", context.DeadlineExceeded), true},
		{"HTTP 503", UnavailableError(errors.New("HTTP 503")), true},
		{"NFS gone", &fs.PathError{Op: "open", Path: "/mnt/nfs/r", Err: syscall.ESTALE}, true},
		{"access denied", ConfigError(errors.New("access denied")), false},
		{"bad host key, over a connection", ConfigError(fmt.Errorf("handshake: %w", refused)), false},
		{"missing file", fmt.Errorf("ltx/0/x: %w", ErrNotFound), false},
		{"file where a directory belongs", &fs.PathError{Op: "open", Path: "/r/ltx/0", Err: syscall.ENOTDIR}, false},
		{"corrupt", errors.New("checksum mismatch"), false},
		{"connection closed before an answer", Errorf(&url.Error{Op: "Get", URL: "http://x", Err: io.EOF}, "s3://b: list: EOF"), false},
		{"body cut off", fmt.Errorf("read ltx/0/x: %w", io.ErrUnexpectedEOF), false},
		{"TLS alert", Errorf(&net.OpError{Op: "remote error", Err: errors.New("tls: certificate required")}, "s3://b: list: tls"), false},
	} {
		if got := Down(c.err); got != c.want {
			t.Errorf("%s: Down(%v) = %v, want %v", c.name, c.err, got, c.want)
		}
	}

	// A real one: a server that takes the connection and closes it, as a
	// TLS port spoken to in plain HTTP can. It may be down behind a proxy,
	// or misconfigured: not counted as down, so -skip-unreachable does
	// not leave out a replica that is only misconfigured.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	resp, err := http.Get("http://" + ln.Addr().String() + "/")
	if err == nil {
		resp.Body.Close()
		t.Fatal("a server that closes every connection answered")
	}
	if Down(err) {
		t.Errorf("a server that closes every connection: Down(%v) = true", err)
	}
}
