package main

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestLoadConfig(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		name, text string
		want       func(c Config) bool
		err        string
	}{
		{name: "defaults", text: ``, want: func(c Config) bool {
			return c.Passthrough == "auto" && c.Log.Level == "info" && c.Log.Format == "text" && !c.XAttrs
		}},
		{name: "every key", text: `
mount-dir = "/data"
data-dir = "backing"
state-dir = "/var/lib/lfuse"
passthrough = "off"
xattrs = true
[log]
level = "debug"
format = "json"
[metrics]
addr = "127.0.0.1:9090"
`, want: func(c Config) bool {
			return c.MountDir == "/data" && c.DataDir == filepath.Join(dir, "backing") && c.StateDir == "/var/lib/lfuse" &&
				c.Passthrough == "off" && c.XAttrs && c.Log.Level == "debug" && c.Log.Format == "json" && c.Metrics.Addr == "127.0.0.1:9090"
		}},
		{name: "unknown key", text: "mount-dir = \"/data\"\nmount_dir = \"/x\"\n", err: `line 2: unknown key "mount_dir"`},
		{name: "unknown key in a table", text: "[log]\nlevel = \"info\"\nverbose = true\n", err: `line 3: unknown key "log.verbose"`},
		{name: "unknown table", text: "[replica]\nurl = \"s3://x\"\n", err: `unknown key "replica`},
		// The parser quotes what it found: not when that is a secret.
		{name: "unquoted secret", text: "[[replicas]]\nurl = \"s3://b/p\"\nsecret-access-key = wJalrXUtnFEMI/K7MDENG\n", err: `line 3: the value of secret-access-key does not parse: write it in quotes`},
		{name: "unquoted secret in an inline table", text: "replicas = [{url = \"/x\", secret-access-key = wJalrXUtnFEMI/K7MDENG}]\n", err: `line 1: the value of secret-access-key does not parse: write it in quotes`},
		{name: "key in the wrong table", text: "[log]\npassthrough = \"on\"\n", err: `line 2: unknown key "log.passthrough"`},
		{name: "key named like one of another table", text: "[[databases]]\npath = \"app.db\"\n\n[log]\nlevel = \"info\"\npath = \"x\"\n", err: `line 6: unknown key "log.path"`},
		{name: "wrong type", text: "xattrs = \"yes\"\n", err: "xattrs"},
		{name: "syntax error", text: "mount-dir = /data\n", err: "line 1"},
		{name: "replicas", text: `
restore-if-missing = true
shutdown-timeout = "10s"
[[replicas]]
url = "file:///backups"
sync-interval = "250ms"
snapshot-interval = "12h"
retention = "48h"
compact-intervals = ["10s", "1m"]
[[replicas]]
url = "/second"
[[databases]]
path = "sub/own.db"
[[databases.replicas]]
url = "file:///own"
`, want: func(c Config) bool {
			o := c.Replicas[0].options()
			d := c.Replicas[1].options()
			return c.RestoreIfMissing && c.ShutdownTimeout.Duration == 10*time.Second && len(c.Replicas) == 2 &&
				o.SyncInterval == 250*time.Millisecond && o.SnapshotInterval == 12*time.Hour && o.Retention == 48*time.Hour &&
				len(o.CompactIntervals) == 2 && o.CompactIntervals[1] == time.Minute &&
				d.SyncInterval == time.Second && d.Retention == 24*time.Hour && len(d.CompactIntervals) == 3 &&
				c.Databases[0].Path == "sub/own.db" && c.Databases[0].Replicas[0].URL == "file:///own" && c.validate() == nil
		}},
		{name: "bad duration", text: "[[replicas]]\nurl = \"/b\"\nsync-interval = \"1 second\"\n", err: `bad duration "1 second"`},
		{name: "unknown replica key", text: "[[replicas]]\nurl = \"/b\"\ninterval = \"1s\"\n", err: `line 3: unknown key "replicas.interval"`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(dir, "lfuse.toml")
			os.WriteFile(path, []byte(c.text), 0o644)
			cfg, err := loadConfig(path, true)
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) || !strings.Contains(err.Error(), path) {
					t.Fatalf("error %v, want one naming the file and %q", err, c.err)
				}
				if strings.Contains(err.Error(), "\n") || strings.Contains(err.Error(), "wJal") {
					t.Fatalf("error is not one line, or shows a secret: %q", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !c.want(cfg) {
				t.Fatalf("config %+v", cfg)
			}
		})
	}
	if _, err := loadConfig(filepath.Join(dir, "missing.toml"), true); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("missing file: %v", err)
	}
}

// The example file documents every key: it must load and validate as is.
func TestExampleConfig(t *testing.T) {
	cfg, err := loadConfig("../../litefs.toml.example", true)
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.validate(); err != nil {
		t.Fatal(err)
	}
	if len(cfg.Replicas) != 1 || cfg.ShutdownTimeout.Duration != 30*time.Second {
		t.Fatalf("example config: %+v", cfg)
	}
}

func TestValidate(t *testing.T) {
	for _, c := range []struct {
		mod func(*Config)
		err string
	}{
		{func(c *Config) { c.Passthrough = "sometimes" }, `passthrough = "sometimes"`},
		{func(c *Config) { c.Log.Level = "loud" }, `log level "loud"`},
		{func(c *Config) { c.Log.Format = "xml" }, `log format "xml"`},
		{func(c *Config) { c.Replicas = []ReplicaConfig{{URL: "s4://bucket"}} }, `unknown scheme "s4"`},
		{func(c *Config) { c.Replicas = []ReplicaConfig{{}} }, `url is required`},
		{func(c *Config) { c.Replicas = []ReplicaConfig{{URL: "s3:/bucket/prod"}} }, `write s3://..., or ./s3:/bucket/prod`},
		{func(c *Config) { c.Replicas = []ReplicaConfig{{URL: "file:backups"}} }, `write file://..., or ./file:backups`},
		{func(c *Config) { c.Replicas = []ReplicaConfig{{URL: "file://host/x"}} }, `has no host`},
		{func(c *Config) { c.Databases = []DatabaseConfig{{Path: "../x.db"}} }, `relative to the mount`},
		{func(c *Config) { c.Databases = []DatabaseConfig{{Path: "*.db"}} }, `patterns are not supported`},
		{func(c *Config) { c.Databases = []DatabaseConfig{{Path: "a.db-wal"}} }, `give the database's own path`},
		{func(c *Config) { c.Exec = "  " }, `exec is blank`},
		{func(c *Config) {
			c.Replicas = []ReplicaConfig{{URL: "/r"}}
			c.Databases = []DatabaseConfig{{Path: "a.db"}}
		}, `databases: "a.db" has no replicas, so it would be backed up nowhere`},
		{func(c *Config) {
			c.Databases = []DatabaseConfig{{Path: "a.db", Replicas: []ReplicaConfig{{URL: "/r"}}}, {Path: "./a.db"}}
		}, `listed twice`},
	} {
		cfg := defaultConfig()
		c.mod(&cfg)
		if err := cfg.validate(); err == nil || !strings.Contains(err.Error(), c.err) {
			t.Errorf("validate: %v, want %q", err, c.err)
		}
	}
	if err := defaultConfig().validate(); err != nil {
		t.Fatal(err)
	}
}

// A replica's duration written as zero, or compaction levels out of order,
// are refused: zero used to mean the default, so retention = "0s" kept a
// day of backups rather than all of them.
func TestReplicaDurations(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct{ text, err string }{
		{`retention = "0h"`, `retention is zero: it must be more than zero (leave the key out for the default, 24h0m0s)`},
		{`sync-interval = "0s"`, `sync-interval is zero`},
		{`snapshot-interval = "0m"`, `snapshot-interval is zero`},
		{`compact-intervals = ["30s", "0s"]`, `compact-intervals: level 2 is zero`},
		{`compact-intervals = ["5m", "30s"]`, `level 2 (30s) must be longer than level 1 (5m0s)`},
		{`compact-intervals = ["1m", "1m"]`, `level 2 (1m0s) must be longer than level 1 (1m0s)`},
		{`compact-intervals = []`, ``},
		{`retention = "1h"` + "\n" + `sync-interval = "10ms"`, ``},
		{``, ``},
	} {
		path := filepath.Join(dir, "c.toml")
		if err := os.WriteFile(path, []byte("[[replicas]]\nurl = \"/r\"\n"+c.text+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := loadConfig(path, false)
		if err == nil {
			err = cfg.validate()
		}
		if c.err == "" && err != nil || c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)) {
			t.Errorf("%s: %v, want %q", c.text, err, c.err)
		}
	}
	// The same for shutdown-timeout, where zero meant 30 s.
	path := filepath.Join(dir, "s.toml")
	if err := os.WriteFile(path, []byte("shutdown-timeout = \"0s\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := loadConfig(path, false)
	if err == nil {
		err = cfg.validate()
	}
	if err == nil || !strings.Contains(err.Error(), "shutdown-timeout is zero") {
		t.Errorf("shutdown-timeout = \"0s\": %v", err)
	}
}

func TestCommandLine(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := run([]string{"frobnicate"}, &out, &errOut); code != 2 || !strings.Contains(errOut.String(), `unknown command "frobnicate"`) {
		t.Fatalf("unknown command: %d %q", code, errOut.String())
	}
	out.Reset()
	if code := run([]string{"version"}, &out, &errOut); code != 0 || !strings.HasPrefix(out.String(), "lfuse ") {
		t.Fatalf("version: %d %q", code, out.String())
	}
	errOut.Reset()
	if code := run([]string{"mount"}, &out, &errOut); code != 1 || !strings.Contains(errOut.String(), "no mount point") {
		t.Fatalf("mount without a mount point: %d %q", code, errOut.String())
	}
	errOut.Reset()
	// The usage text, then one line that says what was wrong.
	if code := run([]string{"mount", "-data", "/x", "a", "b"}, &out, &errOut); code != 2 || !strings.HasSuffix(errOut.String(), "lfuse: one mount point expected, got [\"a\" \"b\"] (flags go before it)\n") {
		t.Fatalf("two mount points: %d %q", code, errOut.String())
	}
}

func TestResolveStateDir(t *testing.T) {
	for _, c := range []struct {
		state, dir, hide, err string
	}{
		{"", "/d/.lfuse", ".lfuse", ""},
		{"/d/state", "/d/state", "state", ""},
		{"/d/a/b", "", "", "inside the data directory"},
		{"/d", "", "", "inside the data directory"},
		{"/m/s", "", "", "inside the mount point"},
		{"/var/lib/lfuse", "/var/lib/lfuse", "", ""},
	} {
		dir, hide, err := resolveStateDir(c.state, "/d", "/m")
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%q: %v, want %q", c.state, err, c.err)
			}
			continue
		}
		if err != nil || dir != c.dir || hide != c.hide {
			t.Errorf("%q: %q %q %v", c.state, dir, hide, err)
		}
	}

	// Through symlinks (found by a review: a state directory reached
	// through a link into the mount was written through lfuse's own
	// mount, and the stop then never ended).
	base := t.TempDir()
	data, mnt := filepath.Join(base, "data"), filepath.Join(base, "mnt")
	os.MkdirAll(data, 0o755)
	os.MkdirAll(mnt, 0o755)
	os.Symlink(mnt, filepath.Join(base, "to-mnt"))
	os.Symlink(data, filepath.Join(base, "to-data"))
	if _, _, err := resolveStateDir(filepath.Join(base, "to-mnt", "st"), data, mnt); err == nil || !strings.Contains(err.Error(), "inside the mount point") {
		t.Errorf("through a link into the mount: %v", err)
	}
	if _, _, err := resolveStateDir(filepath.Join(base, "to-data", "a", "b"), data, mnt); err == nil || !strings.Contains(err.Error(), "inside the data directory") {
		t.Errorf("through a link deep into the data directory: %v", err)
	}
	if _, hide, err := resolveStateDir(filepath.Join(base, "to-data", "st"), data, mnt); err != nil || hide != "st" {
		t.Errorf("through a link directly into the data directory: hide %q, %v", hide, err)
	}
}

// A file replica inside the data directory or the mount point is refused
// (found by an audit: through the mount its files landed in the data
// directory, and the URL's directory stayed empty).
func TestReplicaPlaces(t *testing.T) {
	base := t.TempDir()
	data, mnt := filepath.Join(base, "data"), filepath.Join(base, "mnt")
	os.MkdirAll(data, 0o755)
	os.MkdirAll(mnt, 0o755)
	os.Symlink(data, filepath.Join(base, "link"))
	for _, c := range []struct {
		url, err string
	}{
		{filepath.Join(base, "backups"), ""},
		{"file://" + filepath.Join(base, "backups"), ""},
		{filepath.Join(data, "rep"), "inside the data directory"},
		{data, "inside the data directory"},
		{filepath.Join(mnt, "rep"), "inside the mount point"},
		{filepath.Join(base, "link", "rep"), "inside the data directory"},
		{"s3://bucket/data", ""},
	} {
		for _, cfg := range []Config{
			{Replicas: []ReplicaConfig{{URL: c.url}}},
			{Databases: []DatabaseConfig{{Path: "app.db", Replicas: []ReplicaConfig{{URL: c.url}}}}},
		} {
			err := checkReplicaPlaces(cfg, data, mnt)
			if c.err == "" && err != nil || c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)) {
				t.Errorf("%s: %v, want %q", c.url, err, c.err)
			}
		}
	}
}

// $VAR and ${VAR} come from the environment (so secrets need not be in the
// file) unless -no-expand-env; LFUSE_CONFIG names the file when -config
// does not.
func TestConfigEnv(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "lfuse.toml")
	os.WriteFile(path, []byte(`data-dir = "$LFUSE_TEST_DATA"
[[replicas]]
url = "s3://bucket/${LFUSE_TEST_PREFIX}"
secret-access-key = "${LFUSE_TEST_SECRET}"
`), 0o600)
	t.Setenv("LFUSE_TEST_DATA", "/srv/data")
	t.Setenv("LFUSE_TEST_PREFIX", "prod")
	t.Setenv("LFUSE_TEST_SECRET", "s3cr$t")
	t.Setenv("LFUSE_CONFIG", path)

	fl := flag.NewFlagSet("x", flag.ContinueOnError)
	cf := addConfigFlags(fl, "config")
	if err := fl.Parse(nil); err != nil {
		t.Fatal(err)
	}
	cfg, err := cf.load()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.DataDir != "/srv/data" || cfg.Replicas[0].URL != "s3://bucket/prod" || cfg.Replicas[0].SecretAccessKey != "s3cr$t" {
		t.Fatalf("expanded config: data-dir %q, url %q, secret %q", cfg.DataDir, cfg.Replicas[0].URL, cfg.Replicas[0].SecretAccessKey)
	}

	fl = flag.NewFlagSet("x", flag.ContinueOnError)
	cf = addConfigFlags(fl, "config")
	if err := fl.Parse([]string{"-no-expand-env"}); err != nil {
		t.Fatal(err)
	}
	if cfg, err = cf.load(); err != nil {
		t.Fatal(err)
	}
	if cfg.Replicas[0].URL != "s3://bucket/${LFUSE_TEST_PREFIX}" {
		t.Fatalf("-no-expand-env: url %q", cfg.Replicas[0].URL)
	}

	// $$ is a literal $, a default covers an unset variable, and an unset
	// one without a default is an error naming it; comment lines are not
	// expanded.
	os.WriteFile(path, []byte("# $NOT_SET in a comment\n[[replicas]]\nurl = \"sftp://u@h/${LFUSE_TEST_UNSET:-p}\" # costs $5 a month\npassword = \"pa$$w0rd#1\"\n"), 0o600)
	if cfg, err = loadConfig(path, true); err != nil || cfg.Replicas[0].Password != "pa$w0rd#1" || cfg.Replicas[0].URL != "sftp://u@h/p" {
		t.Fatalf("$$ and a default: %v, %+v", err, cfg.Replicas)
	}
	os.WriteFile(path, []byte("data-dir = \"/x\"\nstate-dir = \"${LFUSE_TEST_UNSET}/lfuse\"\n"), 0o600)
	if _, err = loadConfig(path, true); err == nil || !strings.Contains(err.Error(), "line 2: $LFUSE_TEST_UNSET is not set") {
		t.Fatalf("an unset variable: %v", err)
	}

	// A value arrives as the environment holds it, whatever TOML would make
	// of its characters (found by two reviews: a password's \t became a
	// tab, and a " was refused with advice to quote what was quoted).
	for _, v := range []string{`a\tb`, `C:\temp`, `say "hi"`, `it's`, "tab\there", `\u00e9`} {
		t.Setenv("LFUSE_TEST_SECRET", v)
		os.WriteFile(path, []byte("[[replicas]]\nurl = \"sftp://u@h/p\"\npassword = \"${LFUSE_TEST_SECRET}\"\nkey-path = \"/k/$LFUSE_TEST_SECRET\" # $NOT_SET\n"), 0o600)
		cfg, err := loadConfig(path, true)
		if err != nil || cfg.Replicas[0].Password != v || cfg.Replicas[0].KeyPath != "/k/"+v {
			t.Fatalf("%q in double quotes: %v, %+v", v, err, cfg.Replicas)
		}
	}
	t.Setenv("LFUSE_TEST_SECRET", `a\b`)
	os.WriteFile(path, []byte("data-dir = '/d/${LFUSE_TEST_SECRET}'\n"), 0o600)
	if cfg, err := loadConfig(path, true); err != nil || cfg.DataDir != `/d/a\b` {
		t.Fatalf("in single quotes: %v, %q", err, cfg.DataDir)
	}
	t.Setenv("LFUSE_TEST_SECRET", "it's")
	if _, err := loadConfig(path, true); err == nil || !strings.Contains(err.Error(), "line 1: the value of $LFUSE_TEST_SECRET cannot go in a 'literal string'") || strings.Contains(err.Error(), "it's") {
		t.Fatalf("a ' in single quotes: %v", err)
	}
	for text, want := range map[string]string{
		"data-dir = \"/pa${ss\"\n":  "line 1: ${ without a closing }",
		"data-dir = \"/pa${}ss\"\n": "line 1: ${} names no variable",
	} {
		os.WriteFile(path, []byte(text), 0o600)
		if _, err := loadConfig(path, true); err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("%q: %v, want %q", text, err, want)
		}
	}
	// A default is written in the file's own syntax, and multi-line
	// strings are followed across lines (a second review: a default's \\
	// was escaped twice, and a value in a ''' string taken as in "...").
	t.Setenv("LFUSE_TEST_SECRET", `a"b\c`)
	os.WriteFile(path, []byte(`data-dir = "/d/${LFUSE_TEST_UNSET:-C:\\data}"
exec = '''
sh -c "run $LFUSE_TEST_SECRET"
'''
`), 0o600)
	if cfg, err := loadConfig(path, true); err != nil || cfg.DataDir != `/d/C:\data` || cfg.Exec != `sh -c "run a"b\c"`+"\n" {
		t.Fatalf("a default and a multi-line literal string: %v, %q, %q", err, cfg.DataDir, cfg.Exec)
	}
	t.Setenv("LFUSE_TEST_SECRET", "it's")
	os.WriteFile(path, []byte("exec = \"\"\"\nsh -c 'run $LFUSE_TEST_SECRET'\n\"\"\"\n"), 0o600)
	if cfg, err := loadConfig(path, true); err != nil || cfg.Exec != "sh -c 'run it's'\n" {
		t.Fatalf("a multi-line basic string: %v, %q", err, cfg.Exec)
	}
	os.WriteFile(path, []byte("data-dir = \"/costs $ 5\"\n"), 0o600)
	if cfg, err := loadConfig(path, true); err != nil || cfg.DataDir != "/costs $ 5" {
		t.Fatalf("a $ without a name: %v, %q", err, cfg.DataDir)
	}

	// A $VAR left unquoted: the parser's message would quote the secret.
	os.WriteFile(path, []byte("[[replicas]]\nurl = \"sftp://u@h/p\"\npassword = ${LFUSE_TEST_SECRET}\n"), 0o600)
	t.Setenv("LFUSE_TEST_SECRET", "correcthorse")
	_, err = loadConfig(path, true)
	if err == nil || strings.Contains(err.Error(), "correcthorse") || !strings.Contains(err.Error(), "line 3: a value taken from the environment") {
		t.Fatalf("unquoted $VAR: %v", err)
	}
}

// Any file: loading never panics, and a refusal is one line.
func FuzzLoadConfig(f *testing.F) {
	if b, err := os.ReadFile("../../litefs.toml.example"); err == nil {
		f.Add(b)
	}
	f.Add([]byte("data-dir = \"/x\"\n[[replicas]]\nurl = \"s3://b/p\"\nsync-interval = \"1s\"\n"))
	f.Add([]byte("[[databases]]\npath = \"a.db\"\n[[databases.replicas]]\nurl = \"/r\"\n"))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(dir, "fuzz.toml")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Skip()
		}
		cfg, err := loadConfig(path, false)
		if err == nil {
			err = cfg.validate()
		}
		if err != nil && strings.Contains(err.Error(), "\n") {
			t.Fatalf("a refusal over several lines: %q", err)
		}
		if _, err := expandEnv(data); err != nil && strings.Contains(err.Error(), "\n") {
			t.Fatalf("an expansion's refusal over several lines: %q", err)
		}
	})
}

// Relative paths in the file are relative to the file, replicas given as
// plain paths included (resolved against the working directory, one
// landed in / under systemd).
func TestConfigRelativePaths(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "lfuse.toml")
	os.WriteFile(path, []byte("data-dir = \"data\"\n[[replicas]]\nurl = \"backups\"\n[[replicas]]\nurl = \"s3://b/p\"\n[[databases]]\npath = \"a.db\"\n[[databases.replicas]]\nurl = \"own\"\n"), 0o600)
	cfg, err := loadConfig(path, false)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.DataDir != filepath.Join(dir, "data") || cfg.Replicas[0].URL != filepath.Join(dir, "backups") ||
		cfg.Replicas[1].URL != "s3://b/p" || cfg.Databases[0].Replicas[0].URL != filepath.Join(dir, "own") {
		t.Fatalf("data-dir %q, replicas %q %q, database replica %q", cfg.DataDir, cfg.Replicas[0].URL, cfg.Replicas[1].URL, cfg.Databases[0].Replicas[0].URL)
	}
}

// Replicas that would write into each other are refused: two databases'
// histories in one place restored one database with the other's tables.
func TestReplicaPlacesOverlap(t *testing.T) {
	db := func(p string, urls ...string) DatabaseConfig {
		d := DatabaseConfig{Path: p}
		for _, u := range urls {
			d.Replicas = append(d.Replicas, ReplicaConfig{URL: u})
		}
		return d
	}
	for _, c := range []struct {
		global []string
		dbs    []DatabaseConfig
		err    string
	}{
		{[]string{"/r", "file:///r/"}, nil, "write into the same place"},
		{[]string{"/r", "file://localhost/r"}, nil, "write into the same place"},
		{[]string{"s3://b/p?endpoint=x", "s3://b/p/sub?endpoint=x&region=y"}, nil, "write into the same place"},
		{[]string{"/r"}, []DatabaseConfig{db("a.db", "/r/b.db")}, "lies inside the replica /r"},
		{[]string{"/r"}, []DatabaseConfig{db("a.db", "/own"), db("b.db", "file:///own/x")}, "write into the same place"},
		{[]string{"/r", "/r2", "s3://b/p", "s3://c/p"}, []DatabaseConfig{db("a.db", "/r/a.db", "/own/a"), db("b.db", "/own/b")}, ""},
		// The same bucket name at two providers is two places.
		{[]string{"s3://b/p", "s3://b/p?endpoint=https://minio.example"}, nil, ""},
		{[]string{"s3://b/p?endpoint=https://e"}, []DatabaseConfig{db("a.db", "s3://b/p/a.db?endpoint=https://e")}, ""},
		{[]string{"s3://b/p?endpoint=https://e"}, []DatabaseConfig{db("a.db", "s3://b/p/b.db?endpoint=https://e")}, "lies inside"},
	} {
		cfg := defaultConfig()
		for _, u := range c.global {
			cfg.Replicas = append(cfg.Replicas, ReplicaConfig{URL: u})
		}
		cfg.Databases = c.dbs
		err := cfg.validate()
		if c.err == "" && err != nil || c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)) {
			t.Errorf("%v %v: %v, want %q", c.global, c.dbs, err, c.err)
		}
	}

	// A directory and a symlink to it are one place.
	base := t.TempDir()
	os.MkdirAll(filepath.Join(base, "r"), 0o755)
	os.Symlink(filepath.Join(base, "r"), filepath.Join(base, "link"))
	cfg := defaultConfig()
	cfg.Replicas = []ReplicaConfig{{URL: filepath.Join(base, "r")}, {URL: filepath.Join(base, "link")}}
	if err := cfg.validate(); err == nil || !strings.Contains(err.Error(), "write into the same place") {
		t.Errorf("a directory and a symlink to it: %v", err)
	}

	// An SFTP server's port is 22 unless given.
	for _, host := range []string{"h", "[::1]"} {
		for port, want := range map[string]string{":22": "write into the same place", ":2222": ""} {
			cfg.Replicas = []ReplicaConfig{{URL: "sftp://u@" + host + "/r", Password: "pw"}, {URL: "sftp://u@" + host + port + "/r", Password: "pw"}}
			if err := cfg.validate(); want == "" && err != nil || want != "" && (err == nil || !strings.Contains(err.Error(), want)) {
				t.Errorf("sftp://u@%s/r and port %s: %v, want %q", host, port, err, want)
			}
		}
	}
}
