package main

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/BurntSushi/toml"
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

// loadConfig reads a configuration file strictly: an unknown key is an error
// that names it, with its line. An empty path gives the defaults.
func loadConfig(path string) (Config, error) {
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
	md, err := toml.NewDecoder(bytes.NewReader(data)).Decode(&cfg)
	if err != nil {
		var perr toml.ParseError
		if errors.As(err, &perr) {
			return cfg, fmt.Errorf("config file %s: line %d: %s", path, perr.Position.Line, perr.Message)
		}
		return cfg, fmt.Errorf("config file %s: %s", path, oneLine(err.Error()))
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
	for _, p := range []*string{&cfg.MountDir, &cfg.DataDir, &cfg.StateDir} {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(base, *p)
		}
	}
	return cfg, nil
}

// keyLine finds the line that defines key k, for error messages.
func keyLine(data []byte, k toml.Key) int {
	if len(k) == 0 {
		return 0
	}
	last := regexp.QuoteMeta(k[len(k)-1])
	keyRe := regexp.MustCompile(`^\s*"?` + last + `"?\s*=`)
	tableRe := regexp.MustCompile(`^\s*\[+\s*"?` + last + `"?\s*\]+`)
	for i, line := range strings.Split(string(data), "\n") {
		if keyRe.MatchString(line) || tableRe.MatchString(line) {
			return i + 1
		}
	}
	return 0
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

// validate checks values that the types alone do not.
func (c Config) validate() error {
	switch c.Passthrough {
	case "auto", "on", "off":
	default:
		return fmt.Errorf("passthrough = %q: must be \"auto\", \"on\" or \"off\"", c.Passthrough)
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
