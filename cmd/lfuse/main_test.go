package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// An error made of several (errors.Join) is still one line that starts
// with "lfuse: ": here, two replicas that each hold no backup of a
// database. (Found by an adversarial run: a stop with two databases left
// unshipped printed the second on a line of its own.)
func TestErrorIsOneLine(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "lfuse.toml")
	text := fmt.Sprintf("data-dir = %q\n[[databases]]\npath = \"a.db\"\n[[databases.replicas]]\nurl = %q\n[[databases.replicas]]\nurl = %q\n",
		filepath.Join(dir, "data"), filepath.Join(dir, "r1"), filepath.Join(dir, "r2"))
	if err := os.WriteFile(cfg, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	if code := run([]string{"restore", "-config", cfg}, &stdout, &stderr); code != 1 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	out := strings.TrimSuffix(stderr.String(), "\n")
	if strings.Contains(out, "\n") || !strings.HasPrefix(out, "lfuse: ") || strings.Count(out, "holds no backup") != 2 {
		t.Fatalf("not one line naming both replicas:\n%s", stderr.String())
	}
}
