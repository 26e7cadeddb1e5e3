// Package scratch names ferry's temporary directories and files after the
// process that owns them, so that whatever a killed ferry left behind can
// be told from what a live one is using, and removed by the next ferry
// command.
//
// A scratch entry is named
//
//	.ferry-scratch-<prefix>-<pid>-<start>-<random>
//
// where pid and start are the owner's pid and its start time in clock
// ticks since boot (/proc/PID/stat field 22): the pair is a process's
// identity, since a pid alone may be reused. Sweep removes the entries of
// a directory whose owner is gone and leaves everything else alone: a
// live owner's, a name that does not match, a symbolic link, an entry of
// another user.
//
// What the scheme cannot tell: an owner in another PID namespace (a
// ferry in a container sharing the directory) looks gone; after a reboot
// a new process may by chance have a dead owner's pid and start time, and
// its entry is then kept until that process ends.
package scratch

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/ferry-cr/ferry/internal/proc"
)

// marker starts every scratch name; a dot keeps them out of plain ls.
const marker = ".ferry-scratch-"

// maxTries bounds the attempts at a name nobody has taken.
const maxTries = 100

// nameRE parses a scratch name. The prefix may hold dashes: the last three
// fields are read from the right.
var nameRE = regexp.MustCompile(`^` + regexp.QuoteMeta(marker) + `(.*)-([0-9]+)-([0-9]+)-[0-9a-f]{8}$`)

// self is this process's identity, read once.
var self = sync.OnceValues(func() (owner, error) {
	st, err := proc.ReadStat(os.Getpid())
	if err != nil {
		return owner{}, fmt.Errorf("reading this process's start time: %w", err)
	}
	return owner{pid: st.PID, start: st.StartTime}, nil
})

// owner is a process's identity: its pid and start time.
type owner struct {
	pid   int
	start uint64
}

func (o owner) name(prefix string) string {
	var b [4]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on Linux.
	return fmt.Sprintf("%s%s-%d-%d-%s", marker, prefix, o.pid, o.start, hex.EncodeToString(b[:]))
}

func checkPrefix(prefix string) error {
	if strings.ContainsRune(prefix, '/') || strings.ContainsRune(prefix, 0) {
		return fmt.Errorf("scratch prefix %q: contains a slash or NUL", prefix)
	}
	return nil
}

// Dir creates a new directory, mode 0700, in base (which must exist),
// named after prefix and this process, and returns its path. The caller
// removes it when done; should the caller be killed first, Sweep removes
// it. A directory renamed into place (a finished checkpoint) stops being
// scratch.
func Dir(base, prefix string) (string, error) {
	return create(base, prefix, func(path string) error { return os.Mkdir(path, 0o700) })
}

// File creates a new file, mode 0600, in base, named after prefix and this
// process, opened for reading and writing (close on exec). Like Dir's, a
// file the caller never renames or removes is removed by Sweep once the
// caller is gone.
func File(base, prefix string) (*os.File, error) {
	var f *os.File
	_, err := create(base, prefix, func(path string) error {
		var err error
		f, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|syscall.O_CLOEXEC, 0o600)
		return err
	})
	return f, err
}

func create(base, prefix string, make func(string) error) (string, error) {
	if err := checkPrefix(prefix); err != nil {
		return "", err
	}
	me, err := self()
	if err != nil {
		return "", err
	}
	for range maxTries {
		path := filepath.Join(base, me.name(prefix))
		err := make(path)
		if err == nil {
			return path, nil
		}
		if !errors.Is(err, fs.ErrExist) {
			return "", fmt.Errorf("creating scratch space in %q: %w", base, err)
		}
	}
	return "", fmt.Errorf("creating scratch space in %q: no free name after %d tries", base, maxTries)
}

// Owner parses a scratch name into its owner's pid and start time; ok is
// false for a name that is not a scratch name.
func Owner(name string) (pid int, start uint64, ok bool) {
	m := nameRE.FindStringSubmatch(name)
	if m == nil {
		return 0, 0, false
	}
	pid, err := strconv.Atoi(m[2])
	if err != nil || pid <= 0 {
		return 0, 0, false
	}
	start, err = strconv.ParseUint(m[3], 10, 64)
	if err != nil {
		return 0, 0, false
	}
	return pid, start, true
}

// Sweep removes the scratch directories and files in base whose owner is
// gone: its pid has exited, or now belongs to a process that started at
// another time. It reads base once and looks at nothing else: an entry
// whose name does not parse, a symbolic link (never followed: only the
// directory named is removed, and os.RemoveAll does not follow links
// inside it), anything but a directory or a regular file, and an entry
// owned by another user are left alone. A base that does not exist has
// nothing to sweep. It returns the paths it removed and what it could not
// remove.
func Sweep(base string) ([]string, error) {
	entries, err := os.ReadDir(base)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("sweeping %q: %w", base, err)
	}
	uid := os.Geteuid()
	var removed []string
	var errs []error
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), marker) {
			continue
		}
		pid, start, ok := Owner(e.Name())
		if !ok || proc.Alive(pid, start) {
			continue
		}
		path := filepath.Join(base, e.Name())
		fi, err := os.Lstat(path)
		if err != nil || !(fi.IsDir() || fi.Mode().IsRegular()) {
			continue
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); !ok || int(st.Uid) != uid {
			continue
		}
		if err := os.RemoveAll(path); err != nil {
			errs = append(errs, err)
			continue
		}
		slog.Debug("removed scratch space of a process that is gone", "path", path, "owner", pid)
		removed = append(removed, path)
	}
	return removed, errors.Join(errs...)
}

// OwnedBy is how the names of the scratch entries that process pid made
// with prefix begin.
func OwnedBy(prefix string, pid int) string {
	return marker + prefix + "-" + strconv.Itoa(pid) + "-"
}
