package store

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/ferry-cr/ferry/internal/atomicfile"
	"golang.org/x/sys/unix"
)

// Directory backend layout: object "a/b/c" is the file DIR/a/b/c.
// In-progress objects are written under DIR/tmp (the same filesystem, so
// Commit is a rename) and anything found there after a crash is garbage.
const (
	tmpDirName  = "tmp"
	lockName    = "lock"
	dirPerm     = 0o700 // snapshots hold process memory: keys, tokens
	filePerm    = 0o600
	maxNameLen  = 255 // one file name component (NAME_MAX)
	maxEINTR    = 100
	lockPollMin = time.Millisecond      // first wait between flock attempts
	lockPollMax = 50 * time.Millisecond // longest wait between attempts
	// writebackEvery starts the kernel's writeback of an object being
	// written every so many bytes (sync_file_range SYNC_FILE_RANGE_WRITE,
	// which does not wait), so the fsync in Commit finds little left to
	// do and a snapshot's packs stream to disk while it is being hashed.
	writebackEvery = 8 << 20
)

// layoutNames are the only entries an initialised (or half-initialised)
// store directory may hold; Open refuses a directory with anything else.
var layoutNames = map[string]bool{"config": true, "packs": true, "snapshots": true, tmpDirName: true, lockName: true}

// dirBackend keeps objects as files under root; see Backend.
type dirBackend struct {
	root string
}

// newDirBackend opens the directory store at root, creating root and its
// layout when root is missing or empty. fresh says that no config exists
// yet. A directory holding anything else is refused with ErrNotStore.
func newDirBackend(root string) (b *dirBackend, fresh bool, err error) {
	if st, err := os.Stat(root); err == nil && !st.IsDir() {
		return nil, false, fmt.Errorf("opening store %q: not a directory: %w", root, ErrNotStore)
	}
	if err := os.MkdirAll(root, dirPerm); err != nil {
		return nil, false, fmt.Errorf("creating store %q: %w", root, err)
	}
	entries, err := os.ReadDir(root)
	if err != nil {
		return nil, false, fmt.Errorf("opening store %q: %w", root, err)
	}
	fresh = true
	for _, e := range entries {
		switch {
		case !layoutNames[e.Name()]:
			return nil, false, fmt.Errorf("opening store %q: unexpected entry %q: %w", root, e.Name(), ErrNotStore)
		case e.Name() == "config":
			fresh = false
		case e.Name() != lockName && !e.IsDir():
			return nil, false, fmt.Errorf("opening store %q: %q is not a directory: %w", root, e.Name(), ErrNotStore)
		}
	}
	if fresh {
		// Only an interrupted Open of an empty directory leaves the
		// layout without a config; anything in it then is foreign.
		for _, d := range []string{"packs", "snapshots"} {
			sub, err := os.ReadDir(filepath.Join(root, d))
			if err == nil && len(sub) > 0 {
				return nil, false, fmt.Errorf("opening store %q: %q holds data but there is no config: %w", root, d, ErrNotStore)
			}
		}
	}
	for _, d := range []string{"packs", "snapshots", tmpDirName} {
		if err := os.Mkdir(filepath.Join(root, d), dirPerm); err != nil && !errors.Is(err, fs.ErrExist) {
			return nil, false, fmt.Errorf("creating store %q: %w", root, err)
		}
	}
	if err := atomicfile.SyncDir(root); err != nil {
		return nil, false, err
	}
	return &dirBackend{root: root}, fresh, nil
}

// checkObjectName refuses names that could leave the root: every
// slash-separated component must be a plain file name.
func checkObjectName(name string) error {
	if name == "" {
		return &NameError{Kind: "object", Name: name, Err: ErrBadName}
	}
	for c := range strings.SplitSeq(name, "/") {
		if err := checkComponent(c); err != nil {
			return &NameError{Kind: "object", Name: name, Err: ErrBadName}
		}
	}
	return nil
}

// checkComponent is the rule for job names, file names and object name
// components alike: what one directory entry may be called, minus the
// surprises (hidden names, control characters, invalid UTF-8).
func checkComponent(c string) error {
	if c == "" || len(c) > maxNameLen || c[0] == '.' || strings.ContainsRune(c, '/') {
		return ErrBadName
	}
	if !utf8.ValidString(c) {
		return ErrBadName
	}
	for _, r := range c {
		if r < 0x20 || r == 0x7f {
			return ErrBadName
		}
	}
	return nil
}

func (b *dirBackend) path(name string) string {
	return filepath.Join(b.root, filepath.FromSlash(name))
}

// Create implements Backend: the object is written to DIR/tmp, opened
// O_EXCL.
func (b *dirBackend) Create(_ context.Context, name string) (ObjectWriter, error) {
	if err := checkObjectName(name); err != nil {
		return nil, err
	}
	var rnd [8]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, fmt.Errorf("creating %q: %w", name, err)
	}
	tmp := filepath.Join(b.root, tmpDirName, strings.ReplaceAll(name, "/", "_")+"."+hex.EncodeToString(rnd[:]))
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_CLOEXEC, filePerm)
	if err != nil {
		return nil, fmt.Errorf("creating %q: %w", name, err)
	}
	return &dirObjectWriter{b: b, name: name, tmp: tmp, f: f}, nil
}

type dirObjectWriter struct {
	b       *dirBackend
	name    string
	tmp     string
	f       *os.File
	written int64
	synced  int64 // bytes handed to writeback
	done    bool
}

// Write implements ObjectWriter.
func (w *dirObjectWriter) Write(p []byte) (int, error) {
	if w.done {
		return 0, fmt.Errorf("writing %q: %w", w.name, ErrClosed)
	}
	n, err := w.f.Write(p)
	w.written += int64(n)
	if err != nil {
		return n, fmt.Errorf("writing %q: %w", w.name, err)
	}
	if w.written-w.synced >= writebackEvery {
		// Advisory: a failure here only means Commit's fsync does
		// all the work, so it is ignored.
		_ = unix.SyncFileRange(int(w.f.Fd()), w.synced, w.written-w.synced, unix.SYNC_FILE_RANGE_WRITE)
		w.synced = w.written
	}
	return n, nil
}

// Commit implements ObjectWriter: fsync, rename into place without
// replacing anything, fsync of the directory.
func (w *dirObjectWriter) Commit() (retErr error) {
	if w.done {
		return fmt.Errorf("committing %q: %w", w.name, ErrClosed)
	}
	defer func() {
		if retErr != nil {
			retErr = errors.Join(retErr, w.Abort())
		}
	}()
	if err := w.f.Sync(); err != nil {
		return fmt.Errorf("syncing %q: %w", w.name, err)
	}
	if err := w.f.Close(); err != nil {
		return fmt.Errorf("writing %q: %w", w.name, err)
	}
	final := w.b.path(w.name)
	dir := filepath.Dir(final)
	if err := w.b.mkdirAll(dir); err != nil {
		return err
	}
	if err := renameNoReplace(w.tmp, final); err != nil {
		return fmt.Errorf("committing %q: %w", w.name, err)
	}
	w.done = true
	return atomicfile.SyncDir(dir)
}

// Abort implements ObjectWriter.
func (w *dirObjectWriter) Abort() error {
	if w.done {
		return nil
	}
	w.done = true
	w.f.Close()
	if err := os.Remove(w.tmp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing %q: %w", w.tmp, err)
	}
	return nil
}

// mkdirAll creates dir and its missing parents below the root, fsyncing
// the parent of each one it creates so the new entry survives a crash.
func (b *dirBackend) mkdirAll(dir string) error {
	if _, err := os.Stat(dir); err == nil {
		return nil
	}
	parent := filepath.Dir(dir)
	if parent != b.root && len(parent) > len(b.root) {
		if err := b.mkdirAll(parent); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, dirPerm); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil // another writer made it
		}
		return fmt.Errorf("creating %q: %w", dir, err)
	}
	return atomicfile.SyncDir(parent)
}

// Open implements Backend.
func (b *dirBackend) Open(_ context.Context, name string) (Object, error) {
	if err := checkObjectName(name); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(b.path(name), os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening %q: %w", name, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("opening %q: %w", name, err)
	}
	return &dirObject{File: f, size: st.Size()}, nil
}

type dirObject struct {
	*os.File
	size int64
}

// Size implements Object.
func (o *dirObject) Size() int64 { return o.size }

// List implements Backend. The tmp directory and the lock are not
// objects.
func (b *dirBackend) List(ctx context.Context, prefix string) ([]ObjectInfo, error) {
	start := b.root
	if i := strings.LastIndexByte(prefix, '/'); i >= 0 {
		if err := checkObjectName(prefix[:i]); err != nil {
			return nil, err
		}
		start = b.path(prefix[:i])
	}
	var out []ObjectInfo
	err := filepath.WalkDir(start, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // the prefix's directory does not exist yet, or was just removed
			}
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		rel, err := filepath.Rel(b.root, p)
		if err != nil {
			return err
		}
		name := filepath.ToSlash(rel)
		if d.IsDir() {
			if name == tmpDirName || (p != start && strings.HasPrefix(d.Name(), ".")) {
				return filepath.SkipDir
			}
			return nil
		}
		if !d.Type().IsRegular() || name == lockName || strings.HasPrefix(d.Name(), ".") || !strings.HasPrefix(name, prefix) {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // deleted while listing
			}
			return err
		}
		out = append(out, ObjectInfo{Name: name, Size: info.Size()})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("listing %q: %w", prefix, err)
	}
	return out, nil
}

// Delete implements Backend: unlink, then fsync of the directory, so a
// deleted snapshot record cannot come back after a crash once GC has
// removed the chunks it referred to.
func (b *dirBackend) Delete(_ context.Context, name string) error {
	if err := checkObjectName(name); err != nil {
		return err
	}
	p := b.path(name)
	if err := os.Remove(p); err != nil {
		return fmt.Errorf("deleting %q: %w", name, err)
	}
	return atomicfile.SyncDir(filepath.Dir(p))
}

// RemoveTemp implements TempCleaner.
func (b *dirBackend) RemoveTemp(_ context.Context) (n int, size int64, err error) {
	dir := filepath.Join(b.root, tmpDirName)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0, 0, fmt.Errorf("listing %q: %w", dir, err)
	}
	for _, e := range entries {
		if info, err := e.Info(); err == nil {
			size += info.Size()
		}
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return n, size, fmt.Errorf("removing temporary %q: %w", e.Name(), err)
		}
		n++
	}
	return n, size, nil
}

// Lock implements Locker with flock(2) on DIR/lock. Each call opens the
// file anew, so each holder has its own open file description: shared
// holders in one process coexist and an exclusive request from the same
// process waits for them, as it would from another process. The kernel
// drops the lock when the holder dies, so a SIGKILLed ferry never leaves
// the store locked.
//
// flock is polled with LOCK_NB rather than blocking, because a blocking
// flock cannot be interrupted when ctx ends.
func (b *dirBackend) Lock(ctx context.Context, exclusive bool) (func() error, error) {
	f, err := os.OpenFile(filepath.Join(b.root, lockName), os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, filePerm)
	if err != nil {
		return nil, fmt.Errorf("opening store lock: %w", err)
	}
	how := unix.LOCK_SH
	if exclusive {
		how = unix.LOCK_EX
	}
	fd := int(f.Fd())
	wait := lockPollMin
	for {
		err := retryOnEINTR(func() error { return unix.Flock(fd, how|unix.LOCK_NB) })
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("locking store: %w", os.NewSyscallError("flock", err))
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			f.Close()
			return nil, fmt.Errorf("waiting for the store lock: %w: %w", ErrBusy, ctx.Err())
		case <-t.C:
		}
		wait = min(2*wait, lockPollMax)
	}
	var once sync.Once
	return func() error {
		var err error
		once.Do(func() { err = f.Close() })
		return err
	}, nil
}

// renameNoReplace renames old to new, failing with fs.ErrExist rather
// than replacing new: objects are immutable. Filesystems without
// RENAME_NOREPLACE get link+unlink, which has the same guarantee.
func renameNoReplace(old, new string) error {
	err := retryOnEINTR(func() error {
		return unix.Renameat2(unix.AT_FDCWD, old, unix.AT_FDCWD, new, unix.RENAME_NOREPLACE)
	})
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
		if err := os.Link(old, new); err != nil {
			return err
		}
		return os.Remove(old)
	}
	if err != nil {
		return &os.LinkError{Op: "renameat2", Old: old, New: new, Err: err}
	}
	return nil
}

// retryOnEINTR calls fn until it returns something other than EINTR, at
// most maxEINTR times.
func retryOnEINTR(fn func() error) error {
	var err error
	for range maxEINTR {
		if err = fn(); !errors.Is(err, unix.EINTR) {
			return err
		}
	}
	return err
}
