package file_test

import (
	"path/filepath"
	"testing"

	"github.com/lfuse/lfuse/backends/backendtest"
	"github.com/lfuse/lfuse/backends/file"
)

func TestConformance(t *testing.T) {
	dir := t.TempDir()
	backendtest.Run(t, backendtest.Options{
		New: func(t *testing.T, root string) backendtest.Client {
			return file.New(filepath.Join(dir, filepath.FromSlash(root)))
		},
		ListTimesApprox: true,
	})
}
