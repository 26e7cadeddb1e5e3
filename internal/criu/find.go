// Package criu finds and checks the CRIU binary and drives it: the swrk
// RPC driver (swrk.go), feature checks by asking CRIU itself (go-criu v7's
// FeatureCheck echoes the request), and quoting CRIU's log on failure.
package criu

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Errors callers tell apart with errors.Is.
var (
	ErrNotFound = errors.New("CRIU not found")
	ErrTooOld   = errors.New("CRIU too old")
)

// MinVersion is the oldest CRIU ferry accepts: 4.1 cannot dump TCP sockets
// on current kernels, 3.x does not start on them (see ENGINE.md).
var MinVersion = Version{4, 2, 0}

// commandTimeout bounds `criu --version` and `criu check`.
const commandTimeout = 30 * time.Second

// Version is a CRIU release number.
type Version struct{ Major, Minor, Sub int }

func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Sub) }

// AtLeast reports whether v >= w.
func (v Version) AtLeast(w Version) bool {
	if v.Major != w.Major {
		return v.Major > w.Major
	}
	if v.Minor != w.Minor {
		return v.Minor > w.Minor
	}
	return v.Sub >= w.Sub
}

var versionRE = regexp.MustCompile(`(?m)^Version:\s*(\d+)\.(\d+)(?:\.(\d+))?`)

// ParseVersion reads the output of `criu --version`.
func ParseVersion(out string) (Version, error) {
	m := versionRE.FindStringSubmatch(out)
	if m == nil {
		return Version{}, fmt.Errorf("no version in %q", firstLine(out))
	}
	var v Version
	v.Major, _ = strconv.Atoi(m[1])
	v.Minor, _ = strconv.Atoi(m[2])
	if m[3] != "" {
		v.Sub, _ = strconv.Atoi(m[3])
	}
	return v, nil
}

// Binary is a CRIU that ferry found and checked.
type Binary struct {
	Path    string  `json:"path"`
	Version Version `json:"version"`
	Source  string  `json:"source"` // --criu, $FERRY_CRIU, provisioned, PATH

	facts *factCache // what earlier commands learned of it (facts.go)
	fresh bool       // ask CRIU itself, whatever the cache says
}

// FindOptions lists where Find looks, in order.
type FindOptions struct {
	Flag            string   // --criu
	Env             string   // $FERRY_CRIU
	ProvisionedDirs []string // candidate paths of the copy `make deps` provisions
	Fresh           bool     // ask CRIU afresh rather than trust what earlier commands learned (ferry doctor)
}

// TooOldError is a CRIU older than MinVersion.
type TooOldError struct {
	Path    string
	Version Version
}

func (e *TooOldError) Error() string {
	return fmt.Sprintf("CRIU %s at %s is too old (need >= %s: older CRIU cannot dump TCP sockets or does not start on current kernels): run \"make deps\" or pass --criu", e.Version, e.Path, MinVersion)
}

func (e *TooOldError) Unwrap() error { return ErrTooOld }

// Find locates CRIU: the --criu flag, then $FERRY_CRIU, then the
// provisioned copy, then PATH. The first one that is set (or exists, for
// the last two) is used and checked; a flag or variable naming a missing
// file is an error rather than a silent fall-through.
func Find(ctx context.Context, opts FindOptions) (*Binary, error) {
	var path, source string
	switch {
	case opts.Flag != "":
		path, source = opts.Flag, "--criu"
	case opts.Env != "":
		path, source = opts.Env, "$FERRY_CRIU"
	default:
		for _, p := range opts.ProvisionedDirs {
			if st, err := os.Stat(p); err == nil && !st.IsDir() {
				path, source = p, "provisioned"
				break
			}
		}
		if path == "" {
			if p, err := exec.LookPath("criu"); err == nil {
				path, source = p, "PATH"
			}
		}
	}
	if path == "" {
		looked := append([]string{"--criu", "$FERRY_CRIU"}, opts.ProvisionedDirs...)
		return nil, fmt.Errorf("%w (looked at %s and PATH): run \"make deps\" or install CRIU >= %s", ErrNotFound, strings.Join(looked, ", "), MinVersion)
	}
	if _, err := os.Stat(path); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w at %s (from %s): run \"make deps\" or fix the path", ErrNotFound, path, source)
		}
		return nil, fmt.Errorf("CRIU at %s: %w", path, err)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	b := &Binary{Path: abs, Source: source, facts: loadFacts(abs), fresh: opts.Fresh}
	v, known := b.facts.version()
	if !known || b.fresh {
		ctx, cancel := context.WithTimeout(ctx, commandTimeout)
		defer cancel()
		out, err := exec.CommandContext(ctx, abs, "--version").CombinedOutput()
		if err != nil {
			return nil, fmt.Errorf("%w: %s (from %s) does not run: %w: %s", ErrNotFound, abs, source, err, firstLine(string(out)))
		}
		if v, err = ParseVersion(string(out)); err != nil {
			return nil, fmt.Errorf("%w: %s (from %s) is not CRIU: %w", ErrNotFound, abs, source, err)
		}
		b.facts.learn(func(f *facts) {
			if f.Version != v {
				*f = facts{Key: f.Key} // another binary, or the cache was wrong
			}
			f.Version = v
		})
	}
	if !v.AtLeast(MinVersion) {
		return nil, &TooOldError{Path: abs, Version: v}
	}
	b.Version = v
	return b, nil
}

// DefaultProvisionedPaths are where `make deps` puts CRIU relative to the
// ferry binary: bin/ferry finds the repository's .deps/bin/criu, and an
// installed ferry a criu installed beside it.
func DefaultProvisionedPaths() []string {
	exe, err := os.Executable()
	if err != nil {
		return nil
	}
	dir := filepath.Dir(exe)
	return []string{filepath.Join(dir, "..", ".deps", "bin", "criu"), filepath.Join(dir, "criu")}
}

// Check runs `criu check` and reports whether CRIU says "Looks good".
func (b *Binary) Check(ctx context.Context) (bool, string, error) {
	ctx, cancel := context.WithTimeout(ctx, commandTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, b.Path, "check").CombinedOutput()
	text := cleanOutput(string(out))
	if strings.Contains(text, "Looks good") {
		return true, text, nil
	}
	if err != nil && ctx.Err() != nil {
		return false, text, ctx.Err()
	}
	return false, text, nil
}

// HasFeature asks CRIU whether the kernel supports a feature
// (`criu check --feature NAME`: exit status 0 means supported). An unknown
// feature name is an error.
func (b *Binary) HasFeature(ctx context.Context, name string) (bool, error) {
	if ok, known := b.cached().feature(name); known && !b.fresh {
		return ok, nil
	}
	ok, err := b.learnFeature(ctx, name)
	if err == nil {
		b.cached().persist()
	}
	return ok, err
}

// learnFeature asks CRIU about feature name and notes its answer in the
// cache's memory.
func (b *Binary) learnFeature(ctx context.Context, name string) (bool, error) {
	ok, err := b.askFeature(ctx, name)
	if err == nil {
		b.cached().note(func(f *facts) {
			if f.Features == nil {
				f.Features = map[string]feature{}
			}
			f.Features[name] = feature{OK: ok, At: time.Now()}
		})
	}
	return ok, err
}

// askFeature runs `criu check --feature NAME`.
func (b *Binary) askFeature(ctx context.Context, name string) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, commandTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, b.Path, "check", "--feature", name).CombinedOutput()
	if strings.Contains(string(out), "Unknown feature") {
		return false, fmt.Errorf("criu check: unknown feature %q", name)
	}
	if err == nil {
		return true, nil
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return false, nil
	}
	return false, fmt.Errorf("criu check --feature %s: %w", name, err)
}

// Features checks several features at once; a feature CRIU could not
// check counts as missing.
func (b *Binary) Features(ctx context.Context, names ...string) map[string]bool {
	var (
		mu     sync.Mutex
		wg     sync.WaitGroup
		m      = make(map[string]bool, len(names))
		learnt bool
	)
	for _, n := range names {
		if ok, known := b.cached().feature(n); known && !b.fresh {
			m[n] = ok
			continue
		}
		// Asked in parallel: each `criu check` probes the kernel first.
		wg.Go(func() {
			ok, err := b.learnFeature(ctx, n)
			mu.Lock()
			defer mu.Unlock()
			m[n] = ok
			learnt = learnt || err == nil
		})
	}
	wg.Wait()
	if learnt {
		b.cached().persist() // once for all the answers
	}
	return m
}

// HasStream reports whether this CRIU was built with image streaming
// (--stream), which its help text mentions when compiled in.
func (b *Binary) HasStream(ctx context.Context) bool {
	if ok, known := b.cached().stream(); known && !b.fresh {
		return ok
	}
	ctx, cancel := context.WithTimeout(ctx, commandTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, b.Path, "--help").CombinedOutput()
	ok := strings.Contains(string(out), "--stream")
	if err == nil || ok {
		b.cached().learn(func(f *facts) { f.Stream = &ok })
	}
	return ok
}

// cached is b's cache entry; a Binary made by hand remembers nothing.
func (b *Binary) cached() *factCache {
	if b.facts == nil {
		return &factCache{}
	}
	return b.facts
}

// cleanOutput drops the noise CRIU prints on VMs without
// CAP_SYS_RESOURCE (the rlimit error) and kerndat warnings.
func cleanOutput(s string) string {
	var keep []string
	for _, l := range strings.Split(strings.TrimSpace(s), "\n") {
		if strings.Contains(l, "RLIMIT_NOFILE") || strings.HasPrefix(l, "Warn") {
			continue
		}
		keep = append(keep, l)
	}
	return strings.Join(keep, "\n")
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	return l
}
