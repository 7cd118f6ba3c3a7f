package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/lfuse/lfuse/backends/file"
	"github.com/lfuse/lfuse/replicate"
)

// replicaURL is a parsed replica location. Only file replicas exist so far.
type replicaURL struct {
	scheme string
	path   string // for file: an absolute directory
}

// parseReplicaURL accepts file:///abs/path and a plain path.
func parseReplicaURL(raw string) (replicaURL, error) {
	if raw == "" {
		return replicaURL{}, errors.New("empty replica URL")
	}
	if !strings.Contains(raw, "://") {
		abs, err := filepath.Abs(raw)
		if err != nil {
			return replicaURL{}, err
		}
		return replicaURL{scheme: "file", path: abs}, nil
	}
	u, err := url.Parse(raw)
	if err != nil {
		return replicaURL{}, fmt.Errorf("replica URL %q: %v", raw, err)
	}
	switch u.Scheme {
	case "file":
		if u.Host != "" && u.Host != "localhost" {
			return replicaURL{}, fmt.Errorf("replica URL %q: a file URL has no host; write file:///absolute/path", raw)
		}
		if !filepath.IsAbs(u.Path) {
			return replicaURL{}, fmt.Errorf("replica URL %q: the path must be absolute", raw)
		}
		return replicaURL{scheme: "file", path: filepath.Clean(u.Path)}, nil
	default:
		return replicaURL{}, fmt.Errorf("replica URL %q: unknown scheme %q (supported: file:// or a plain path)", raw, u.Scheme)
	}
}

// client returns the client for the database at rel (relative to the mount)
// under this replica; rel "" is the replica root itself.
func (u replicaURL) client(rel string) replicate.ReplicaClient {
	return file.New(filepath.Join(u.path, filepath.FromSlash(rel)))
}

func (u replicaURL) String() string { return u.scheme + "://" + u.path }

// databases lists the databases a replica holds, by their path relative to
// the mount: every directory under the root with LTX levels in it. A
// replica that does not exist yet holds none.
func (u replicaURL) databases(ctx context.Context) ([]string, error) {
	var rels []string
	err := filepath.WalkDir(u.path, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if path == u.path {
				return err
			}
			return nil
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if !d.IsDir() {
			return nil
		}
		if d.Name() == "ltx" {
			if rel, err := filepath.Rel(u.path, filepath.Dir(path)); err == nil && rel != "." && filepath.IsLocal(rel) {
				rels = append(rels, filepath.ToSlash(rel))
			}
			return filepath.SkipDir
		}
		return nil
	})
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil // nothing replicated yet: a first start
	}
	slices.Sort(rels)
	return rels, err
}

// replicaSpecs maps each database to its replicas: its own, if the config
// lists it, otherwise the global ones.
func replicaSpecs(cfg Config) func(rel string) []replicate.ReplicaSpec {
	return func(rel string) []replicate.ReplicaSpec {
		var specs []replicate.ReplicaSpec
		for _, t := range replicaTargets(cfg, rel) {
			specs = append(specs, replicate.ReplicaSpec{Client: t.client, Options: t.cfg.options()})
		}
		return specs
	}
}

type replicaTarget struct {
	cfg    ReplicaConfig
	client replicate.ReplicaClient
}

// replicaTargets are the replicas of the database at rel. A database listed
// in the config has its own, whose URLs name its replica directly; every
// other database is under each global replica, at its path.
func replicaTargets(cfg Config, rel string) []replicaTarget {
	var out []replicaTarget
	for _, d := range cfg.Databases {
		if filepath.Clean(d.Path) == filepath.Clean(rel) {
			for _, r := range d.Replicas {
				if u, err := parseReplicaURL(r.URL); err == nil {
					out = append(out, replicaTarget{r, u.client("")})
				}
			}
			return out
		}
	}
	for _, r := range cfg.Replicas {
		if u, err := parseReplicaURL(r.URL); err == nil {
			out = append(out, replicaTarget{r, u.client(rel)})
		}
	}
	return out
}
