package main

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/lfuse/lfuse/replicate"
)

// Config is lfuse's configuration file (see litefs.toml.example for every
// key). Command-line flags override it.
type Config struct {
	MountDir    string        `toml:"mount-dir"`
	DataDir     string        `toml:"data-dir"`
	StateDir    string        `toml:"state-dir"`
	Passthrough string        `toml:"passthrough"`
	XAttrs      bool          `toml:"xattrs"`
	Log         LogConfig     `toml:"log"`
	Metrics     MetricsConfig `toml:"metrics"`

	// Replicas apply to every database in the mount, each under its own
	// path relative to the mount.
	Replicas []ReplicaConfig `toml:"replicas"`
	// Databases give one database its own replicas instead.
	Databases []DatabaseConfig `toml:"databases"`
	// RestoreIfMissing restores, before mounting, every database a replica
	// holds that the data directory lacks.
	RestoreIfMissing bool `toml:"restore-if-missing"`
	// RestoreSkipUnreachable lets a restore of every database go on from
	// the other replicas when one cannot be reached.
	RestoreSkipUnreachable bool `toml:"restore-skip-unreachable"`
	// ShutdownTimeout bounds the wait for replicas when lfuse stops.
	ShutdownTimeout Duration `toml:"shutdown-timeout"`
	// Exec is the application lfuse starts once the mount is ready, run by
	// /bin/sh; lfuse lives as long as it does.
	Exec string `toml:"exec"`
}

// ReplicaConfig is one replica: where, and its policy.
type ReplicaConfig struct {
	URL              string     `toml:"url"`
	SyncInterval     Duration   `toml:"sync-interval"`
	SnapshotInterval Duration   `toml:"snapshot-interval"`
	Retention        Duration   `toml:"retention"`
	CompactIntervals []Duration `toml:"compact-intervals"`

	// Backend settings; a key here wins over the URL parameter of the
	// same name.
	Region          string `toml:"region"`            // s3
	Endpoint        string `toml:"endpoint"`          // s3, gs, abs
	ForcePathStyle  *bool  `toml:"force-path-style"`  // s3
	SkipVerify      bool   `toml:"skip-verify"`       // s3
	AccessKeyID     string `toml:"access-key-id"`     // s3
	SecretAccessKey string `toml:"secret-access-key"` // s3
	AccountName     string `toml:"account-name"`      // abs
	AccountKey      string `toml:"account-key"`       // abs
	SASToken        string `toml:"sas-token"`         // abs
	Password        string `toml:"password"`          // sftp
	KeyPath         string `toml:"key-path"`          // sftp
	HostKey         string `toml:"host-key"`          // sftp
	KnownHosts      string `toml:"known-hosts"`       // sftp
	CredentialsFile string `toml:"credentials-file"`  // gs
}

// DatabaseConfig names one database (relative to the mount) and its replicas.
type DatabaseConfig struct {
	Path     string          `toml:"path"`
	Replicas []ReplicaConfig `toml:"replicas"`
}

// Duration is a time.Duration written as "1s", "5m", "24h" in the file.
type Duration struct {
	time.Duration
	set bool // written in the file, so "0s" is told from a key left out
}

func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("bad duration %q: write it like \"1s\", \"5m\" or \"24h\"", b)
	}
	if v < 0 {
		return fmt.Errorf("bad duration %q: must not be negative", b)
	}
	d.Duration, d.set = v, true
	return nil
}

func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// options turns a replica's settings into the replicator's, defaults filled.
func (r ReplicaConfig) options() replicate.ReplicaOptions {
	o := replicate.ReplicaOptions{
		SyncInterval:     r.SyncInterval.Duration,
		SnapshotInterval: r.SnapshotInterval.Duration,
		Retention:        r.Retention.Duration,
	}
	if r.CompactIntervals != nil {
		o.CompactIntervals = []time.Duration{}
		for _, d := range r.CompactIntervals {
			o.CompactIntervals = append(o.CompactIntervals, d.Duration)
		}
	}
	return o.WithDefaults()
}

type LogConfig struct {
	Level  string `toml:"level"`
	Format string `toml:"format"`
}

type MetricsConfig struct {
	Addr string `toml:"addr"`
}

// defaultConfig holds the defaults every key falls back to.
func defaultConfig() Config {
	return Config{
		Passthrough: "auto",
		Log:         LogConfig{Level: "info", Format: "text"},
	}
}

// defaultConfigPath is read when no -config is given and LFUSE_CONFIG is
// unset, if it exists.
var defaultConfigPath = "/etc/lfuse.toml"

// configFlags are the flags every command that reads the config shares.
type configFlags struct {
	path     *string
	noExpand *bool
}

func addConfigFlags(fl *flag.FlagSet, usage string) configFlags {
	return configFlags{
		path:     fl.String("config", "", usage+" (default $LFUSE_CONFIG, else /etc/lfuse.toml if it exists)"),
		noExpand: fl.Bool("no-expand-env", false, "take $VAR and ${VAR} in the config file literally instead of from the environment"),
	}
}

// given reports whether -config was on the command line.
func (c configFlags) given() bool { return *c.path != "" }

// load reads -config, else $LFUSE_CONFIG, else /etc/lfuse.toml if it
// exists; with none of them, the defaults.
func (c configFlags) load() (Config, error) { return loadConfig(c.file(), !*c.noExpand) }

// file is the config file load reads ("" for none).
func (c configFlags) file() string {
	path := *c.path
	if path == "" {
		path = os.Getenv("LFUSE_CONFIG")
	}
	if path == "" {
		if _, err := os.Stat(defaultConfigPath); err == nil {
			path = defaultConfigPath
		}
	}
	return path
}

// loadConfig reads a configuration file strictly: an unknown key is an error
// that names it, with its line. With expand, $VAR and ${VAR} are replaced
// by the environment's values first, so secrets need not be in the file.
// An empty path gives the defaults.
func loadConfig(path string, expand bool) (Config, error) {
	cfg := defaultConfig()
	if path == "" {
		return cfg, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return cfg, fmt.Errorf("config file %s does not exist", path)
		}
		return cfg, fmt.Errorf("config file %s: %w", path, err)
	}
	raw := data
	if expand {
		if data, err = expandEnv(data); err != nil {
			return cfg, fmt.Errorf("config file %s: %w", path, err)
		}
	}
	md, err := toml.NewDecoder(bytes.NewReader(data)).Decode(&cfg)
	if err != nil {
		var perr toml.ParseError
		if !errors.As(err, &perr) {
			return cfg, fmt.Errorf("config file %s: %s", path, oneLine(err.Error()))
		}
		// The parser quotes what it found, which may be a secret taken
		// from the environment: report the file as written instead.
		if expand {
			var rawErr toml.ParseError
			_, err := toml.NewDecoder(bytes.NewReader(raw)).Decode(&Config{})
			if !errors.As(err, &rawErr) || rawErr.Position.Line == perr.Position.Line && bytes.Contains(lineOf(raw, perr.Position.Line), []byte("$")) {
				return cfg, fmt.Errorf("config file %s: line %d: a value taken from the environment does not parse there: put the $VAR in quotes, like \"${VAR}\"", path, perr.Position.Line)
			}
			perr = rawErr
		}
		if key, ok := secretLine(lineOf(raw, perr.Position.Line)); ok {
			// The parser quotes what it found, here the secret itself.
			return cfg, fmt.Errorf("config file %s: line %d: the value of %s does not parse: write it in quotes, like %s = \"...\"", path, perr.Position.Line, key, key)
		}
		return cfg, fmt.Errorf("config file %s: line %d: %s", path, perr.Position.Line, perr.Message)
	}
	if undec := md.Undecoded(); len(undec) > 0 {
		k := undec[0]
		line := keyLine(data, k)
		where := ""
		if line > 0 {
			where = fmt.Sprintf("line %d: ", line)
		}
		return cfg, fmt.Errorf("config file %s: %sunknown key %q (see litefs.toml.example for the keys lfuse understands)", path, where, k.String())
	}
	// Relative paths in the file are relative to the file.
	base := filepath.Dir(path)
	paths := []*string{&cfg.MountDir, &cfg.DataDir, &cfg.StateDir}
	// A replica given as a plain path too: resolved against the working
	// directory, it landed in / under systemd.
	for i := range cfg.Replicas {
		paths = append(paths, &cfg.Replicas[i].URL)
	}
	for i := range cfg.Databases {
		for j := range cfg.Databases[i].Replicas {
			paths = append(paths, &cfg.Databases[i].Replicas[j].URL)
		}
	}
	for _, p := range paths {
		if *p != "" && !filepath.IsAbs(*p) && !strings.Contains(*p, "://") {
			*p = filepath.Join(base, *p)
		}
	}
	return cfg, nil
}

// keyLine finds the line that defines key k, for error messages: a line
// "name = ..." (dotted or quoted names too) under the table header that
// makes up the rest of k, or the header of the table k itself.
func keyLine(data []byte, k toml.Key) int {
	if len(k) == 0 {
		return 0
	}
	header := regexp.MustCompile(`^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$`)
	assign := regexp.MustCompile(`^\s*([A-Za-z0-9_."' -]+?)\s*=`)
	split := func(name string) []string {
		parts := strings.Split(name, ".")
		for i, p := range parts {
			parts[i] = strings.Trim(strings.TrimSpace(p), `"'`)
		}
		return parts
	}
	var table []string
	for i, line := range strings.Split(string(data), "\n") {
		if m := header.FindStringSubmatch(line); m != nil {
			table = split(m[1])
			if slices.Equal(table, k) {
				return i + 1
			}
		} else if m := assign.FindStringSubmatch(line); m != nil {
			if slices.Equal(append(slices.Clone(table), split(m[1])...), k) {
				return i + 1
			}
		}
	}
	return 0
}

// lineOf returns line n (from 1) of data.
func lineOf(data []byte, n int) []byte {
	lines := bytes.Split(data, []byte("\n"))
	if n < 1 || n > len(lines) {
		return nil
	}
	return lines[n-1]
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

// secretLine reports whether a line of the config file sets a secret, and
// which key.
func secretLine(line []byte) (string, bool) {
	// Anywhere in the line: an inline table holds several keys, and its
	// secret was quoted when only a line's first key was looked at.
	if m := secretKey.FindSubmatch(line); m != nil {
		return string(m[1]), true
	}
	return "", false
}

var secretKey = regexp.MustCompile(`(?:^|[\s{,."'])(secret-access-key|account-key|sas-token|password)["']?\s*=`)

// place is where a replica writes, for telling overlaps apart: its
// scheme, endpoint (key or URL parameter: the same bucket name at two
// providers is two places), user and bucket or host, and cleaned path.
func place(r ReplicaConfig) string {
	u, err := parseReplicaURL(r.URL)
	if err != nil {
		return r.URL // validate says what is wrong with it
	}
	endpoint := cmp.Or(r.Endpoint, u.query.Get("endpoint"))
	// Spellings of one place (a review found each accepted twice, every
	// upload then made twice into one place): file://localhost/x is
	// file:///x, a directory reached through a symlink is the one it
	// names, and an SFTP server's port is 22 unless given.
	host, p := u.host, u.path
	switch u.scheme {
	case "file":
		host, p = "", realPath(p)
	case "sftp":
		if _, _, err := net.SplitHostPort(host); err != nil {
			host = net.JoinHostPort(strings.Trim(host, "[]"), "22") // [::1] too
		}
	}
	return u.scheme + "://" + endpoint + "|" + u.user + "@" + host + path.Clean("/"+filepath.ToSlash(p))
}

// within says whether place a is b or lies under it.
func within(a, b string) bool {
	return a == b || strings.HasPrefix(a, strings.TrimSuffix(b, "/")+"/")
}

// checkPlaces refuses replicas that would write into each other: one URL
// given twice, or a database's own replica inside a global replica (where
// the other databases' replicas go) or inside another's. Accepted, two
// histories went to one place: a restore of one database gave another's
// tables.
func (c Config) checkPlaces() error {
	for i, a := range c.Replicas {
		for _, b := range c.Replicas[:i] {
			if within(place(a), place(b)) || within(place(b), place(a)) {
				return fmt.Errorf("replicas %s and %s write into the same place: give each its own", redact(b.URL), redact(a.URL))
			}
		}
	}
	type own struct {
		db string
		r  ReplicaConfig
	}
	var owns []own
	for _, d := range c.Databases {
		for _, r := range d.Replicas {
			for _, g := range c.Replicas {
				if own := strings.TrimSuffix(place(g), "/") + "/" + filepath.ToSlash(filepath.Clean(d.Path)); within(place(r), place(g)) && place(r) != own {
					return fmt.Errorf("databases: the replica %s of %s lies inside the replica %s, where every database's replica goes: give it a place outside", redact(r.URL), d.Path, redact(g.URL))
				}
			}
			for _, o := range owns {
				if within(place(r), place(o.r)) || within(place(o.r), place(r)) {
					return fmt.Errorf("databases: the replicas %s (of %s) and %s (of %s) write into the same place: give each its own", redact(o.r.URL), o.db, redact(r.URL), d.Path)
				}
			}
			owns = append(owns, own{d.Path, r})
		}
	}
	return nil
}

// validate checks values that the types alone do not.
func (c Config) validate() error {
	if c.ShutdownTimeout.Duration < 0 {
		return fmt.Errorf("shutdown-timeout %s: must not be negative", c.ShutdownTimeout.Duration)
	}
	if c.ShutdownTimeout.set && c.ShutdownTimeout.Duration == 0 {
		// Zero would mean the default, 30 s, not "do not wait".
		return errors.New("shutdown-timeout is zero: it must be more than zero (leave it out for the default, 30s)")
	}
	switch c.Passthrough {
	case "auto", "on", "off":
	default:
		return fmt.Errorf("passthrough = %q: must be \"auto\", \"on\" or \"off\"", c.Passthrough)
	}
	for _, r := range c.Replicas {
		if err := r.validate(""); err != nil {
			return err
		}
	}
	seen := map[string]bool{}
	for _, d := range c.Databases {
		if d.Path == "" || !filepath.IsLocal(d.Path) {
			return fmt.Errorf("databases: path %q must be a path relative to the mount, like \"app.db\" or \"sub/app.db\"", d.Path)
		}
		if seen[filepath.Clean(d.Path)] {
			return fmt.Errorf("databases: %q is listed twice", d.Path)
		}
		// Silently matching no database, these sent it to the global
		// replicas instead of its own.
		if strings.ContainsAny(d.Path, "*?[") {
			return fmt.Errorf("databases: path %q: give one database's path; patterns are not supported", d.Path)
		}
		for _, suffix := range []string{"-wal", "-shm", "-journal"} {
			if strings.HasSuffix(d.Path, suffix) {
				return fmt.Errorf("databases: path %q is a database's %s file: give the database's own path", d.Path, suffix)
			}
		}
		seen[filepath.Clean(d.Path)] = true
		if len(d.Replicas) == 0 {
			// Its own replicas replace the global ones: with none, the
			// database was backed up nowhere, and nothing said so.
			return fmt.Errorf("databases: %q has no replicas, so it would be backed up nowhere: give it a [[databases.replicas]] table, or remove the entry to use the global replicas", d.Path)
		}
		for _, r := range d.Replicas {
			if err := r.validate(d.Path); err != nil {
				return err
			}
		}
	}
	if c.Exec != "" && strings.TrimSpace(c.Exec) == "" {
		return errors.New("exec is blank: give the application's command, or leave exec out")
	}
	if err := c.checkPlaces(); err != nil {
		return err
	}
	if _, err := parseLevel(c.Log.Level); err != nil {
		return err
	}
	switch c.Log.Format {
	case "text", "json":
	default:
		return fmt.Errorf("log format %q: must be \"text\" or \"json\"", c.Log.Format)
	}
	return nil
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return l, fmt.Errorf("log level %q: must be debug, info, warn or error", s)
	}
	return l, nil
}

func newLogger(c LogConfig) *slog.Logger {
	level, _ := parseLevel(c.Level)
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}

func (r ReplicaConfig) validate(db string) error {
	where := "replica"
	if db != "" {
		where = fmt.Sprintf("replica of %s", db)
	}
	if r.URL == "" {
		return fmt.Errorf("%s: url is required", where)
	}
	if _, err := openReplica(context.Background(), r); err != nil {
		return fmt.Errorf("%s: %w", where, err)
	}
	if len(r.CompactIntervals) > 8 {
		return fmt.Errorf("%s %s: at most 8 compaction levels", where, redact(r.URL))
	}
	// Zero used to mean the default, silently: retention = "0s" written
	// to keep every backup kept 24 hours of them.
	for _, d := range []struct {
		key   string
		value Duration
		def   time.Duration
	}{
		{"sync-interval", r.SyncInterval, replicate.DefaultSyncInterval},
		{"snapshot-interval", r.SnapshotInterval, replicate.DefaultSnapshotInterval},
		{"retention", r.Retention, replicate.DefaultRetention},
	} {
		if d.value.set && d.value.Duration == 0 {
			return fmt.Errorf("%s %s: %s is zero: it must be more than zero (leave the key out for the default, %s)", where, redact(r.URL), d.key, d.def)
		}
	}
	for i, d := range r.CompactIntervals {
		if d.Duration == 0 {
			return fmt.Errorf("%s %s: compact-intervals: level %d is zero: each must be more than zero (an empty list turns compaction off)", where, redact(r.URL), i+1)
		}
		if i > 0 && d.Duration <= r.CompactIntervals[i-1].Duration {
			return fmt.Errorf("%s %s: compact-intervals: level %d (%s) must be longer than level %d (%s): each level merges the files of the one below", where, redact(r.URL), i+1, d.Duration, i, r.CompactIntervals[i-1].Duration)
		}
	}
	return nil
}

// stateFromFlags finds the state directory of an lfuse from -data/-state
// flags over the config: state-dir, else DATA/.lfuse.
func stateFromFlags(fl *flag.FlagSet, cf configFlags, dataDir, stateDir string) (string, error) {
	if stateDir != "" && !cf.given() {
		return stateDir, nil
	}
	cfg, err := cf.load()
	if errors.Is(err, errUnsetVar) && !cf.given() && dataDir != "" {
		// The config read by default (/etc/lfuse.toml, $LFUSE_CONFIG) may
		// need the service's environment for its secrets: an operator's
		// shell asking with -data got "$SECRET is not set" instead. Its
		// directories are all that is needed here, if they need no
		// variable; any other fault of the file still stops it.
		if raw, rerr := loadConfig(cf.file(), false); rerr == nil && !strings.Contains(raw.StateDir, "$") {
			cfg, err = raw, nil
		}
	}
	if err != nil {
		return "", err
	}
	if dataDir != "" {
		cfg.DataDir = dataDir
	}
	if stateDir != "" {
		cfg.StateDir = stateDir
	}
	if cfg.StateDir != "" {
		return cfg.StateDir, nil
	}
	if cfg.DataDir == "" {
		fl.Usage()
		return "", fmt.Errorf("%w: give -data DIR, -state DIR or -config FILE", errUsage)
	}
	return filepath.Join(cfg.DataDir, defaultStateName), nil
}

// expandEnv replaces $VAR and ${VAR} outside comments. A variable
// that is not set is an error (${VAR:-default} gives a default, ${VAR:-}
// an empty value), and $$ is a literal $: a password like pa$$w0rd became
// paw0rd, and a state-dir of "${UNSET}/lfuse" made /lfuse, both silently.
//
// A value from the environment lands in a "basic string" escaped, so that
// it arrives as the environment holds it: pasted as it was, a password's \t
// became a tab, and its " broke the file. A 'literal string' cannot escape,
// so a value it cannot hold is an error. Outside quotes (a number, a
// boolean) a value goes in as it is, and so does a default anywhere: it is
// written in the file's own syntax. Multi-line strings are followed across
// lines.
func expandEnv(data []byte) ([]byte, error) {
	const (
		code = iota
		basic
		literal
		multiBasic
		multiLiteral
	)
	s, state, line := string(data), code, 1
	var b strings.Builder
	// closeMulti copies a multi-line string's closing delimiter at s[i:],
	// with the up to two quotes before it that belong to the string.
	closeMulti := func(i int, q byte) int {
		j := 3
		for j < 5 && i+j < len(s) && s[i+j] == q {
			j++
		}
		b.WriteString(s[i : i+j])
		state = code
		return i + j - 1
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '\n':
			line++
			if state == basic || state == literal {
				state = code // unterminated: the parser says so
			}
		case state == code && c == '#':
			end := strings.IndexByte(s[i:], '\n')
			if end < 0 {
				end = len(s) - i
			}
			b.WriteString(s[i : i+end])
			i += end - 1
			continue
		case state == code && strings.HasPrefix(s[i:], `"""`), state == code && strings.HasPrefix(s[i:], "'''"):
			state = multiBasic
			if c == '\'' {
				state = multiLiteral
			}
			b.WriteString(s[i : i+3])
			i += 2
			continue
		case state == code && c == '"':
			state = basic
		case state == code && c == '\'':
			state = literal
		case (state == basic || state == multiBasic) && c == '\\' && i+1 < len(s):
			b.WriteString(s[i : i+2]) // an escape: the next byte is not a closing quote
			i++
			continue
		case state == basic && c == '"', state == literal && c == '\'':
			state = code
		case state == multiBasic && strings.HasPrefix(s[i:], `"""`):
			i = closeMulti(i, '"')
			continue
		case state == multiLiteral && strings.HasPrefix(s[i:], "'''"):
			i = closeMulti(i, '\'')
			continue
		}
		if c != '$' {
			b.WriteByte(c)
			continue
		}
		name, n, err := varName(s[i+1:])
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		if n == 0 {
			b.WriteByte(c) // a $ not followed by a name stays
			continue
		}
		i += n
		if name == "$" {
			b.WriteByte('$')
			continue
		}
		if k, def, hasDef := strings.Cut(name, ":-"); hasDef {
			if v := os.Getenv(k); v != "" {
				name = k
			} else {
				b.WriteString(def)
				continue
			}
		}
		v, ok := os.LookupEnv(name)
		if !ok {
			return nil, fmt.Errorf("line %d: $%s is %w: set it, write ${%s:-} for an empty value, $$ for a literal $, or use -no-expand-env", line, name, errUnsetVar, name)
		}
		switch state {
		case basic, multiBasic:
			v = escapeBasic(v)
		case literal, multiLiteral:
			bad := func(r rune) bool { return r == '\'' || r < 0x20 && r != '\t' || r == 0x7f }
			if state == multiLiteral {
				bad = func(r rune) bool { return r < 0x20 && r != '\t' && r != '\n' && r != '\r' || r == 0x7f }
			}
			if strings.ContainsFunc(v, bad) || state == multiLiteral && strings.Contains(v, "'''") {
				return nil, fmt.Errorf("line %d: the value of $%s cannot go in a 'literal string' (it holds a quote or a control character): put it in double quotes, like \"${%s}\"", line, name, name)
			}
		}
		b.WriteString(v)
	}
	return []byte(b.String()), nil
}

// errUnsetVar: the config names a variable the environment does not hold.
var errUnsetVar = errors.New("not set in the environment")

// varName reads what follows a $: "$" for $$, NAME for $NAME, and what is
// between the braces of ${...}; n is how many bytes that took (0: no name).
// A ${ without its } is an error: os.Expand dropped it silently, so
// "pa${ss" gave "pass".
func varName(s string) (name string, n int, err error) {
	switch {
	case s == "":
		return "", 0, nil
	case s[0] == '$':
		return "$", 1, nil
	case s[0] == '{':
		end := strings.IndexByte(s, '}')
		if nl := strings.IndexByte(s, '\n'); end < 0 || nl >= 0 && nl < end {
			return "", 0, errors.New("${ without a closing }: write ${VAR}, or $$ for a literal $")
		}
		if end == 1 {
			return "", 0, errors.New("${} names no variable: write ${VAR}, or $$ for a literal $")
		}
		return s[1:end], end + 1, nil
	}
	for n < len(s) && (s[n] == '_' || s[n] >= '0' && s[n] <= '9' || s[n] >= 'a' && s[n] <= 'z' || s[n] >= 'A' && s[n] <= 'Z') {
		n++
	}
	return s[:n], n, nil
}

// escapeBasic escapes s for a TOML basic string.
func escapeBasic(s string) string {
	var b strings.Builder
	for _, r := range s {
		switch {
		case r == '\\' || r == '"':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, "\\u%04X", r)
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}
