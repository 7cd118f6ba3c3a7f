package backends

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
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
		{"TLS alert", Errorf(&net.OpError{Op: "remote error", Err: errors.New("tls: certificate required")}, "s3://b: list: tls"), false},
	} {
		if got := Down(c.err); got != c.want {
			t.Errorf("%s: Down(%v) = %v, want %v", c.name, c.err, got, c.want)
		}
	}
}
