package criu

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/ferry-cr/ferry/internal/atomicfile"
)

// What ferry learns by running a CRIU binary (its version, whether it
// streams, which kernel features it can use) is remembered between ferry
// commands: asking costs a process start each, 10 ms for --version and
// --help and 45-60 ms for a `criu check --feature`, and a checkpoint asked
// three of them every time (about 80 ms of its wall time, a restore 10
// ms before CRIU's first image).
//
// The answers hold for one binary on one boot, so that is the key: the
// binary's path, device, inode, size, modification and change times, and
// the kernel's boot id. A CRIU upgraded in place, or a reboot, misses and
// asks again. Only what CRIU answered is kept (a feature check that timed
// out is not), and a feature CRIU said is missing is asked again after
// missingTTL: a module loaded since, or a check that failed for a passing
// reason, is seen without a reboot. `ferry doctor` always asks afresh
// and stores what it hears.
//
// The cache lives in /run (tmpfs, root's): one small JSON file per binary
// path, written whole and renamed into place, so concurrent ferry
// commands never read half of one; the last writer wins, and a lost
// answer is asked again. A file not owned by this user, or writable by
// others, is ignored.

// FactsDirEnv names another directory for the cache (tests), or "off".
const FactsDirEnv = "FERRY_CRIU_FACTS"

// factsDir is where the cache lives.
var factsDir = "/run/ferry-criu"

func cacheDir() string {
	if d := os.Getenv(FactsDirEnv); d != "" {
		if d == "off" {
			return ""
		}
		return d
	}
	return factsDir
}

// factsTTL is how long an unused entry stays: each write prunes older ones.
const factsTTL = 7 * 24 * time.Hour

// missingTTL is how long a feature CRIU said is missing is taken as so.
var missingTTL = 10 * time.Minute

// facts is one binary's cache entry.
type facts struct {
	Key      string             `json:"key"`
	Version  Version            `json:"version"`
	Stream   *bool              `json:"stream,omitempty"`
	Features map[string]feature `json:"features,omitempty"`
}

// feature is CRIU's answer to `criu check --feature NAME`.
type feature struct {
	OK bool      `json:"ok"`
	At time.Time `json:"at"`
}

// factCache is a Binary's view of its entry.
type factCache struct {
	mu   sync.Mutex
	file string // "": no caching (no identity, or caching off)
	f    facts
}

// binaryKey identifies the binary at path on this boot.
func binaryKey(path string) (string, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return "", err
	}
	boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%s dev=%d ino=%d size=%d mtime=%d.%09d ctime=%d.%09d boot=%s",
		path, st.Dev, st.Ino, st.Size, st.Mtim.Sec, st.Mtim.Nsec, st.Ctim.Sec, st.Ctim.Nsec, string(bytes.TrimSpace(boot))), nil
}

// loadFacts reads the cache entry of the binary at path (absolute): the
// entry's facts when it is this binary's on this boot, else a fresh one
// with only the key.
func loadFacts(path string) *factCache {
	c := &factCache{}
	dir := cacheDir()
	if dir == "" {
		return c
	}
	key, err := binaryKey(path)
	if err != nil {
		return c
	}
	sum := sha256.Sum256([]byte(path))
	c.file = filepath.Join(dir, hex.EncodeToString(sum[:12])+".json")
	c.f = facts{Key: key}
	fh, err := os.Open(c.file)
	if err != nil {
		return c
	}
	defer fh.Close()
	var st syscall.Stat_t
	if syscall.Fstat(int(fh.Fd()), &st) != nil || int(st.Uid) != os.Geteuid() || st.Mode&0o022 != 0 || st.Size > 64<<10 {
		return c
	}
	var f facts
	if json.NewDecoder(fh).Decode(&f) != nil || f.Key != key {
		return c
	}
	c.f = f
	return c
}

// version is the cached version, if any.
func (c *factCache) version() (Version, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.f.Version, c.f.Version != (Version{})
}

func (c *factCache) stream() (bool, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.f.Stream == nil {
		return false, false
	}
	return *c.f.Stream, true
}

func (c *factCache) feature(name string) (bool, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	f, known := c.f.Features[name]
	if known && !f.OK && time.Since(f.At) > missingTTL {
		return false, false // ask again
	}
	return f.OK, known
}

// learn records what CRIU answered and writes the entry.
func (c *factCache) learn(update func(*facts)) {
	c.note(update)
	c.persist()
}

// note records what CRIU answered, in memory only (persist writes it).
func (c *factCache) note(update func(*facts)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	update(&c.f)
}

// persist writes the entry, if it has a file; a failure only costs the
// next command CRIU's answers again.
func (c *factCache) persist() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.file != "" {
		_ = c.save()
	}
}

func (c *factCache) save() error {
	dir := filepath.Dir(c.file)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	b, err := json.Marshal(c.f)
	if err != nil {
		return err
	}
	if err := atomicfile.Write(c.file, b, false); err != nil {
		return err
	}
	pruneFacts(dir)
	return nil
}

// pruneFacts removes entries (and stray temporary files) not written for
// factsTTL: binaries that went away, or test wrappers.
func pruneFacts(dir string) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if info, err := e.Info(); err == nil && time.Since(info.ModTime()) > factsTTL {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
}
