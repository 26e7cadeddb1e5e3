package freezer

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Control files that tell the two freezers apart.
const (
	v1StateFile  = "freezer.state"
	v2FreezeFile = "cgroup.freeze"
	v2EventsFile = "cgroup.events"
)

// fsType returns the filesystem magic of dir (statfs f_type). Tests replace
// it so that a fake cgroupfs in a temporary directory reads as cgroupfs;
// outside tests, only a real cgroup or cgroup2 filesystem is accepted.
var fsType = func(dir string) (int64, error) {
	var st unix.Statfs_t
	if err := retryOnEINTR(func() error { return unix.Statfs(dir, &st) }); err != nil {
		return 0, &os.PathError{Op: "statfs", Path: dir, Err: err}
	}
	return st.Type, nil
}

// Version reports which freezer the cgroup directory dir has: 1
// (freezer.state on a cgroup v1 filesystem) or 2 (cgroup.freeze on cgroup2).
// The version comes from the filesystem the directory is on, so it is right
// on pure v1, pure v2 and hybrid hosts alike. It returns an error wrapping
// ErrNotExist when dir does not exist, and ErrNotSupported when dir is not on
// cgroupfs or has no freezer (a v1 hierarchy without the freezer controller,
// the root cgroup of v2, a v2 kernel before 5.2).
func Version(dir string) (int, error) {
	magic, err := fsType(dir)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) {
			return 0, fmt.Errorf("%w: %w", ErrNotExist, err)
		}
		return 0, fmt.Errorf("detecting cgroup version of %q: %w", dir, err)
	}
	var version int
	var file string
	switch magic {
	case unix.CGROUP2_SUPER_MAGIC:
		version, file = 2, v2FreezeFile
	case unix.CGROUP_SUPER_MAGIC:
		version, file = 1, v1StateFile
	default:
		return 0, fmt.Errorf("%w: %q is not on cgroupfs (filesystem magic %#x)", ErrNotSupported, dir, magic)
	}
	if _, err := os.Lstat(filepath.Join(dir, file)); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			if _, derr := os.Stat(dir); errors.Is(derr, fs.ErrNotExist) {
				return 0, fmt.Errorf("%w: %w", ErrNotExist, derr) // removed meanwhile
			}
			return 0, fmt.Errorf("%w: %q has no %s", ErrNotSupported, dir, file)
		}
		return 0, fmt.Errorf("detecting cgroup version of %q: %w", dir, err)
	}
	return version, nil
}
