// Package cgroup finds out how a host mounts its cgroups and creates,
// fills, freezes, kills and removes the per-job cgroups that ferry runs its
// jobs in. Freezing itself is the freezer package's business; this package
// decides where job cgroups live.
//
// Three layouts exist in the wild, all handled:
//
//	unified  /sys/fs/cgroup is cgroup2 (systemd's default since v247)
//	hybrid   /sys/fs/cgroup is a tmpfs with v1 controllers under it, one
//	         directory each, and cgroup2 at /sys/fs/cgroup/unified
//	legacy   /sys/fs/cgroup is a tmpfs with only v1 controllers under it
//
// Job cgroups go to cgroup2 when its freezer works there (unified, and
// hybrid on Linux 5.2+), otherwise to the v1 freezer hierarchy.
package cgroup

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultRoot is where cgroup hierarchies are mounted on every mainstream
// distribution.
const DefaultRoot = "/sys/fs/cgroup"

// Mode is a host's cgroup layout. The zero value means unknown.
type Mode string

// The layouts DetectLayout tells apart.
const (
	Unified Mode = "unified"
	Hybrid  Mode = "hybrid"
	Legacy  Mode = "legacy"
)

// Layout says where a host mounts its cgroup hierarchies.
type Layout struct {
	// Mode is the kind of layout.
	Mode Mode
	// Root is the directory DetectLayout looked at, normally DefaultRoot.
	Root string
	// V2 is the cgroup2 mount point, or "" if there is none.
	V2 string
	// V1Freezer is the mount point of the cgroup v1 freezer hierarchy, or
	// "" if there is none.
	V1Freezer string
}

// statfsType returns the filesystem magic of path, following symlinks.
func statfsType(path string) (int64, error) {
	var st unix.Statfs_t
	var err error
	for range 100 { // EINTR: statfs on a FUSE or NFS path can be interrupted
		if err = unix.Statfs(path, &st); !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		return 0, &os.PathError{Op: "statfs", Path: path, Err: err}
	}
	return st.Type, nil
}

// mountinfoPath is read to find a v1 freezer hierarchy that is not mounted
// at <root>/freezer.
const mountinfoPath = "/proc/self/mountinfo"

// DetectLayout inspects root (normally DefaultRoot) with statfs:
//
//   - root is cgroup2: Unified, V2 = root.
//   - otherwise (a tmpfs on real hosts): <root>/unified being cgroup2 makes
//     it Hybrid, else Legacy. V1Freezer is <root>/freezer when that is a
//     cgroup v1 filesystem, or else a v1 mount beneath root with the
//     freezer controller listed in /proc/self/mountinfo.
//
// It fails when root does not exist or nothing under it is cgroupfs.
func DetectLayout(root string) (*Layout, error) {
	return detectLayout(root, statfsType, mountinfoPath)
}

func detectLayout(root string, fsType func(string) (int64, error), mountinfo string) (*Layout, error) {
	root = filepath.Clean(root)
	magic, err := fsType(root)
	if err != nil {
		return nil, fmt.Errorf("detecting cgroup layout at %q: %w", root, err)
	}
	l := &Layout{Root: root}
	if magic == unix.CGROUP2_SUPER_MAGIC {
		l.Mode, l.V2 = Unified, root
		return l, nil
	}
	isV1 := magic == unix.CGROUP_SUPER_MAGIC // a lone v1 hierarchy at root
	if unified := filepath.Join(root, "unified"); !isV1 {
		if m, err := fsType(unified); err == nil && m == unix.CGROUP2_SUPER_MAGIC {
			l.V2 = unified
		}
	}
	if dir := filepath.Join(root, "freezer"); !isV1 {
		if m, err := fsType(dir); err == nil && m == unix.CGROUP_SUPER_MAGIC {
			l.V1Freezer = dir
		}
	}
	if l.V1Freezer == "" {
		l.V1Freezer = findV1Mount(mountinfo, root, "freezer")
	}
	switch {
	case l.V2 != "":
		l.Mode = Hybrid
	case isV1 || l.V1Freezer != "" || hasV1Child(root, fsType):
		l.Mode = Legacy
	default:
		return nil, fmt.Errorf("detecting cgroup layout at %q: %w: no cgroup filesystem there", root, ErrNoHierarchy)
	}
	return l, nil
}

// hasV1Child reports whether a directory right under root is a cgroup v1
// mount (a legacy host whose v1 hierarchies lack the freezer).
func hasV1Child(root string, fsType func(string) (int64, error)) bool {
	entries, err := os.ReadDir(root)
	if err != nil {
		return false
	}
	for _, e := range entries {
		if m, err := fsType(filepath.Join(root, e.Name())); err == nil && m == unix.CGROUP_SUPER_MAGIC {
			return true
		}
	}
	return false
}

// findV1Mount returns the mount point of the cgroup v1 hierarchy with
// controller among its super options, if it is mounted at or beneath root,
// according to the mountinfo file (proc(5)):
//
//	36 30 0:33 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
func findV1Mount(mountinfo, root, controller string) string {
	f, err := os.Open(mountinfo)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		fields, opts := strings.Fields(pre), strings.Fields(post)
		if len(fields) < 5 || len(opts) < 3 || opts[0] != "cgroup" {
			continue
		}
		mnt := unescapeMountinfo(fields[4])
		if mnt != root && !strings.HasPrefix(mnt, root+"/") {
			continue
		}
		for _, o := range strings.Split(opts[2], ",") {
			if o == controller {
				return mnt
			}
		}
	}
	return ""
}

// unescapeMountinfo undoes the octal escapes (\040 for a space) that the
// kernel uses for white space and backslashes in mountinfo paths.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// FreezerBase returns the directory under which job cgroups are created and
// the cgroup version of its freezer: the cgroup2 mount when child cgroups
// there have cgroup.freeze, otherwise the v1 freezer mount. It fails with
// ErrNoHierarchy when neither exists.
//
// The root cgroup never has cgroup.freeze (CFTYPE_NOT_ON_ROOT), so v2 is
// judged by an existing child cgroup, or, when there is none, by creating
// and removing a probe child, as runc's bats helper requireCgroupV2 judges
// by a non-root cgroup.
func (l *Layout) FreezerBase() (dir string, version int, err error) {
	var v2Err error
	if l.V2 != "" {
		var ok bool
		if ok, v2Err = v2Usable(l.V2); ok {
			return l.V2, 2, nil
		}
	}
	if l.V1Freezer != "" {
		return l.V1Freezer, 1, nil
	}
	if v2Err != nil {
		return "", 0, fmt.Errorf("%w (cgroup2 at %q: %w)", ErrNoHierarchy, l.V2, v2Err)
	}
	return "", 0, ErrNoHierarchy
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// v2Usable reports whether job cgroups under the cgroup2 directory dir
// would have a freezer.
func v2Usable(dir string) (bool, error) {
	if !exists(filepath.Join(dir, "cgroup.subtree_control")) {
		return false, fmt.Errorf("%q is not a cgroup2 directory", dir)
	}
	// Inside a cgroup namespace, dir may itself be a non-root cgroup.
	if exists(filepath.Join(dir, "cgroup.freeze")) {
		return true, nil
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return false, err
	}
	for _, e := range entries {
		if e.IsDir() {
			// Every child cgroup has the same core files: one tells.
			return exists(filepath.Join(dir, e.Name(), "cgroup.freeze")), nil
		}
	}
	probe := filepath.Join(dir, fmt.Sprintf("ferry-probe-%d-%08x", os.Getpid(), rand.Uint32()))
	if err := os.Mkdir(probe, 0o755); err != nil {
		return false, fmt.Errorf("probing for cgroup.freeze: %w", err)
	}
	ok := exists(filepath.Join(probe, "cgroup.freeze"))
	if err := unix.Rmdir(probe); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return ok, &os.PathError{Op: "rmdir", Path: probe, Err: err}
	}
	return ok, nil
}
