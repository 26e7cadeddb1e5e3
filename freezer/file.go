package freezer

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// maxFileSize bounds what is read from one control file. cgroup.procs of a
// cgroup with a million tasks is about 8 MiB.
const maxFileSize = 16 << 20

// maxEINTRRetries bounds the EINTR retry loops. The kernel restarts most
// of these calls itself (SA_RESTART, which the Go runtime sets), so one retry
// is nearly always enough.
const maxEINTRRetries = 100

// openat2Missing is set once openat2 failed with ENOSYS (kernel before 5.6)
// or EPERM (a seccomp profile that does not know it), so that later opens go
// straight to the fallback.
var openat2Missing atomic.Bool

// readCgroupFile and writeCgroupFile are how the package reads and writes
// control files. Tests replace them to script files whose content changes
// from one read to the next, as the kernel's do.
var (
	readCgroupFile  = readFile
	writeCgroupFile = writeFile
)

// OpenFile opens the control file name (a plain file name, no slashes) of
// the cgroup directory dir, the way this package opens every cgroup file:
// see openCgroupFile. It is exported so that other packages touching
// cgroupfs share one implementation.
func OpenFile(dir, name string, flag int) (*os.File, error) {
	return openCgroupFile(dir, name, flag)
}

// openCgroupFile opens dir/name with flags (O_CLOEXEC is added).
//
// dir is opened with O_PATH and name is resolved beneath it with openat2
// and RESOLVE_BENEATH|RESOLVE_NO_MAGICLINKS|RESOLVE_NO_SYMLINKS|RESOLVE_NO_XDEV,
// as opencontainers/cgroups file.go does from /sys/fs/cgroup. Anchoring at
// the cgroup directory itself lets NO_SYMLINKS and NO_XDEV apply on v1 too
// (the cpu,cpuacct symlinks live above it), so the file is known to sit on
// the same filesystem as dir; that dir is cgroupfs is checked by
// detectVersion. Where openat2 is missing, it falls back to openat with
// O_NOFOLLOW plus a check that the file and dir share a filesystem.
func openCgroupFile(dir, name string, flags int) (*os.File, error) {
	path := filepath.Join(dir, name)
	if name == "" || name == "." || name == ".." || strings.ContainsRune(name, '/') {
		return nil, &os.PathError{Op: "open", Path: path, Err: unix.EINVAL}
	}
	dirfd, err := retryOnEINTR2(func() (int, error) {
		return unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	})
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	defer unix.Close(dirfd)

	if !openat2Missing.Load() {
		fd, err := retryOnEINTR2(func() (int, error) {
			return unix.Openat2(dirfd, name, &unix.OpenHow{
				Flags: uint64(flags) | unix.O_CLOEXEC,
				Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_MAGICLINKS |
					unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_XDEV,
			})
		})
		switch {
		case err == nil:
			return os.NewFile(uintptr(fd), path), nil
		case errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM):
			openat2Missing.Store(true)
		default:
			return nil, &os.PathError{Op: "openat2", Path: path, Err: err}
		}
	}

	fd, err := retryOnEINTR2(func() (int, error) {
		return unix.Openat(dirfd, name, flags|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	})
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	var dst, fst unix.Stat_t
	if err := unix.Fstat(dirfd, &dst); err != nil {
		unix.Close(fd)
		return nil, &os.PathError{Op: "fstat", Path: dir, Err: err}
	}
	if err := unix.Fstat(fd, &fst); err != nil {
		unix.Close(fd)
		return nil, &os.PathError{Op: "fstat", Path: path, Err: err}
	}
	if dst.Dev != fst.Dev {
		unix.Close(fd)
		return nil, &os.PathError{Op: "open", Path: path, Err: unix.EXDEV}
	}
	return os.NewFile(uintptr(fd), path), nil
}

// readFile reads a whole control file through a fresh open, so that each
// call sees the kernel's current content.
func readFile(dir, name string) ([]byte, error) {
	f, err := openCgroupFile(dir, name, unix.O_RDONLY)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxFileSize+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxFileSize {
		return nil, fmt.Errorf("reading %q: larger than %d bytes", f.Name(), maxFileSize)
	}
	return data, nil
}

// writeFile writes data to a control file in one write(2).
func writeFile(dir, name, data string) error {
	f, err := openCgroupFile(dir, name, unix.O_WRONLY)
	if err != nil {
		return err
	}
	_, err = f.WriteString(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// gone reports whether err means the cgroup went away: ENOENT on open,
// ENODEV on read, write or seek (cgroups ignoreNotExistOrNoDeviceError).
func gone(err error) bool {
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV)
}

// classify adds ErrNotExist to an error that means the cgroup went away.
func classify(err error) error {
	if err != nil && gone(err) && !errors.Is(err, ErrNotExist) {
		return fmt.Errorf("%w: %w", ErrNotExist, err)
	}
	return err
}

// retryOnEINTR calls fn until it returns something other than EINTR, at
// most maxEINTRRetries times.
func retryOnEINTR(fn func() error) error {
	var err error
	for range maxEINTRRetries {
		if err = fn(); !errors.Is(err, unix.EINTR) {
			return err
		}
	}
	return err
}

// retryOnEINTR2 is retryOnEINTR for functions that also return a value.
func retryOnEINTR2[T any](fn func() (T, error)) (T, error) {
	var (
		v   T
		err error
	)
	for range maxEINTRRetries {
		if v, err = fn(); !errors.Is(err, unix.EINTR) {
			return v, err
		}
	}
	return v, err
}
