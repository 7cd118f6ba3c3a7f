package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/lfuse/lfuse/backends/backendtest"
	"github.com/lfuse/lfuse/replicate"
)

// Requests per hour by kind, for each backend, of a database doing 10
// transactions a second with the default intervals: counted by lfuse
// (/metrics) over a minute of the steady state, after start-up.
func BenchmarkReplicaRequests(b *testing.B) {
	env := backendtest.Servers(b)
	fileRoot := filepath.Join(benchDir(b), "requests-file")
	all := append([]cloudReplica{{"file", func(t testing.TB, env map[string]string, root string) string {
		return fmt.Sprintf("url = %q\n", "file://"+filepath.Join(fileRoot, root))
	}}}, cloudReplicas...)
	const window = 60 * time.Second
	for _, c := range all {
		b.Run(c.name, func(b *testing.B) {
			rb := newReplicaBench(b, "requests")
			os.RemoveAll(rb.data)
			os.MkdirAll(rb.data, 0o755)
			root := fmt.Sprintf("bench-requests-%d", time.Now().UnixNano())
			os.WriteFile(rb.cfg, []byte("[[replicas]]\n"+c.config(b, env, root)), 0o600)
			addr := freeAddr(b)
			p := startLfuse(b, "mount", "-config", rb.cfg, "-data", rb.data, "-metrics-addr", addr, rb.mnt)
			defer p.cleanup()
			if err := p.log.wait("mount ready", time.Minute, p.done); err != nil {
				b.Fatalf("%v\n%s", err, p.log)
			}
			db := benchOpen(b, filepath.Join(rb.mnt, "app.db"))
			defer db.Close()
			benchExec(b, db, "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
			tick := time.NewTicker(100 * time.Millisecond)
			defer tick.Stop()
			run := func(d time.Duration) {
				for end := time.Now().Add(d); time.Now().Before(end); {
					<-tick.C
					benchExec(b, db, "INSERT INTO t(v) VALUES(randomblob(200))")
				}
			}
			run(5 * time.Second) // start-up: the first listing and snapshot
			before := scrapeOps(b, addr, c.name)
			run(window)
			after := scrapeOps(b, addr, c.name)
			for _, op := range replicate.OpNames {
				b.ReportMetric((after[op]-before[op])*float64(time.Hour/window), op+"/h")
			}
		})
	}
}

func scrapeOps(b *testing.B, addr, typ string) map[string]float64 {
	ops := map[string]float64{}
	for _, op := range replicate.OpNames {
		ops[op] = scrape(b, addr, fmt.Sprintf(`lfuse_replica_operation_total{operation=%q,replica_type=%q}`, op, typ))
	}
	return ops
}
