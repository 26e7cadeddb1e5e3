package cgroup

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

const (
	magicTmpfs  = 0x01021994
	magicCgroup = unix.CGROUP_SUPER_MAGIC
	magicV2     = unix.CGROUP2_SUPER_MAGIC
)

// fakeRoot creates the given directories (relative, with their fake
// filesystem magic) under a temporary root and returns the root and an
// fsType function reporting those magics (tmpfs for any other existing
// path).
func fakeRoot(t *testing.T, rootMagic int64, dirs map[string]int64) (string, func(string) (int64, error)) {
	t.Helper()
	root := t.TempDir()
	magics := map[string]int64{root: rootMagic}
	for d, m := range dirs {
		p := filepath.Join(root, d)
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		magics[p] = m
	}
	return root, func(path string) (int64, error) {
		if _, err := os.Stat(path); err != nil {
			return 0, err
		}
		if m, ok := magics[filepath.Clean(path)]; ok {
			return m, nil
		}
		return magicTmpfs, nil
	}
}

func touch(t *testing.T, path string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestDetectLayout(t *testing.T) {
	for _, tc := range []struct {
		name      string
		rootMagic int64
		dirs      map[string]int64
		mountinfo string // with ROOT standing for the fake root
		wantMode  Mode
		wantV2    string // relative to the root, "." for the root
		wantV1    string
		wantErr   error
	}{
		{name: "unified", rootMagic: magicV2, wantMode: Unified, wantV2: "."},
		{
			name: "hybrid", rootMagic: magicTmpfs, wantMode: Hybrid, wantV2: "unified", wantV1: "freezer",
			dirs: map[string]int64{"unified": magicV2, "freezer": magicCgroup, "cpu": magicCgroup, "systemd": magicCgroup},
		},
		{
			name: "hybrid without v1 freezer", rootMagic: magicTmpfs, wantMode: Hybrid, wantV2: "unified",
			dirs: map[string]int64{"unified": magicV2, "cpu": magicCgroup},
		},
		{
			name: "legacy", rootMagic: magicTmpfs, wantMode: Legacy, wantV1: "freezer",
			dirs: map[string]int64{"freezer": magicCgroup, "memory": magicCgroup},
		},
		{
			name: "legacy without freezer", rootMagic: magicTmpfs, wantMode: Legacy,
			dirs: map[string]int64{"memory": magicCgroup},
		},
		{
			name: "legacy, freezer co-mounted", rootMagic: magicTmpfs, wantMode: Legacy, wantV1: "devices,freezer",
			dirs:      map[string]int64{"devices,freezer": magicCgroup},
			mountinfo: "36 30 0:33 / ROOT/devices,freezer rw,relatime shared:9 - cgroup cgroup rw,devices,freezer\n",
		},
		{
			name: "freezer mounted elsewhere is ignored", rootMagic: magicTmpfs, wantMode: Legacy,
			dirs:      map[string]int64{"memory": magicCgroup},
			mountinfo: "36 30 0:33 / /elsewhere/freezer rw - cgroup cgroup rw,freezer\n",
		},
		{name: "unified is not cgroup2", rootMagic: magicTmpfs, dirs: map[string]int64{"unified": magicTmpfs}, wantErr: ErrNoHierarchy},
		{name: "empty tmpfs", rootMagic: magicTmpfs, wantErr: ErrNoHierarchy},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root, fsType := fakeRoot(t, tc.rootMagic, tc.dirs)
			mountinfo := filepath.Join(t.TempDir(), "mountinfo")
			if err := os.WriteFile(mountinfo, []byte(strings.ReplaceAll(tc.mountinfo, "ROOT", root)), 0o644); err != nil {
				t.Fatal(err)
			}
			l, err := detectLayout(root, fsType, mountinfo)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("detectLayout = %+v, %v; want %v", l, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := &Layout{Mode: tc.wantMode, Root: root, V2: rel(root, tc.wantV2), V1Freezer: rel(root, tc.wantV1)}
			if !reflect.DeepEqual(l, want) {
				t.Errorf("detectLayout =\n%+v\nwant\n%+v", l, want)
			}
		})
	}
	if _, err := detectLayout(filepath.Join(t.TempDir(), "none"), statfsType, "/nonexistent"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing root: %v, want fs.ErrNotExist", err)
	}
}

func rel(root, p string) string {
	if p == "" {
		return ""
	}
	return filepath.Join(root, p)
}

func TestUnescapeMountinfo(t *testing.T) {
	for in, want := range map[string]string{
		`/sys/fs/cgroup/freezer`: "/sys/fs/cgroup/freezer",
		`/mnt/with\040space`:     "/mnt/with space",
		`/a\134b`:                `/a\b`,
		`/trailing\04`:           `/trailing\04`,
	} {
		if got := unescapeMountinfo(in); got != want {
			t.Errorf("unescapeMountinfo(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestFreezerBase(t *testing.T) {
	for _, tc := range []struct {
		name        string
		files       []string // created under the fake root
		v2, v1      string
		wantDir     string
		wantVersion int
		wantErr     error
	}{
		{
			name: "v2 with a child cgroup that has cgroup.freeze", v2: "unified", v1: "freezer",
			files:   []string{"unified/cgroup.subtree_control", "unified/system.slice/cgroup.freeze", "freezer/tasks"},
			wantDir: "unified", wantVersion: 2,
		},
		{
			name: "v2 base is a non-root cgroup", v2: "unified",
			files:   []string{"unified/cgroup.subtree_control", "unified/cgroup.freeze"},
			wantDir: "unified", wantVersion: 2,
		},
		{
			name: "v2 kernel without freezer falls back to v1", v2: "unified", v1: "freezer",
			files:   []string{"unified/cgroup.subtree_control", "unified/init.scope/cgroup.procs", "freezer/tasks"},
			wantDir: "freezer", wantVersion: 1,
		},
		{
			// The probe child is a plain directory here: no cgroup.freeze.
			name: "v2 probe finds no freezer", v2: "unified", v1: "freezer",
			files:   []string{"unified/cgroup.subtree_control", "freezer/tasks"},
			wantDir: "freezer", wantVersion: 1,
		},
		{name: "v1 only", v1: "freezer", files: []string{"freezer/tasks"}, wantDir: "freezer", wantVersion: 1},
		{name: "nothing", wantErr: ErrNoHierarchy},
		{name: "v2 unusable, no v1", v2: "unified", files: []string{"unified/cgroup.procs"}, wantErr: ErrNoHierarchy},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			for _, f := range tc.files {
				touch(t, filepath.Join(root, f))
			}
			l := &Layout{Root: root, V2: rel(root, tc.v2), V1Freezer: rel(root, tc.v1)}
			dir, version, err := l.FreezerBase()
			if !errors.Is(err, tc.wantErr) || dir != rel(root, tc.wantDir) || version != tc.wantVersion {
				t.Errorf("FreezerBase = %q, %d, %v; want %q, %d, %v", dir, version, err, rel(root, tc.wantDir), tc.wantVersion, tc.wantErr)
			}
			if tc.v2 != "" {
				entries, _ := os.ReadDir(filepath.Join(root, tc.v2))
				for _, e := range entries {
					if strings.HasPrefix(e.Name(), "ferry-probe-") {
						t.Errorf("probe cgroup %s left behind", e.Name())
					}
				}
			}
		})
	}
}

func TestCreate(t *testing.T) {
	root := t.TempDir()
	touch(t, filepath.Join(root, "freezer", "tasks"))
	l := &Layout{Mode: Legacy, Root: root, V1Freezer: filepath.Join(root, "freezer")}

	c, err := Create(l, "ferry/job1")
	if err != nil {
		t.Fatal(err)
	}
	want := &Cgroup{Path: filepath.Join(root, "freezer", "ferry", "job1"), Version: 1}
	if !reflect.DeepEqual(c, want) {
		t.Errorf("Create = %+v, want %+v", c, want)
	}
	if fi, err := os.Stat(c.Path); err != nil || !fi.IsDir() {
		t.Errorf("job cgroup not created: %v", err)
	}
	if _, err := Create(l, "ferry/job1"); !errors.Is(err, fs.ErrExist) {
		t.Errorf("second Create = %v, want fs.ErrExist", err)
	}
	if _, err := Create(l, "ferry/job2"); err != nil {
		t.Errorf("Create beside an existing parent: %v", err)
	}
	for _, bad := range []string{"", ".", "..", "../x", "/abs", "ferry/../x", "ferry//x"} {
		if _, err := Create(l, bad); err == nil {
			t.Errorf("Create(%q) succeeded", bad)
		}
	}
	if _, err := Create(&Layout{Root: root}, "ferry/x"); !errors.Is(err, ErrNoHierarchy) {
		t.Errorf("Create without hierarchy = %v, want ErrNoHierarchy", err)
	}
}

func TestProcsFake(t *testing.T) {
	dir := t.TempDir()
	c := &Cgroup{Path: dir, Version: 2}
	if _, err := c.Procs(); err == nil {
		t.Error("Procs without cgroup.procs succeeded")
	}
	touch(t, filepath.Join(dir, "cgroup.procs"))
	if empty, err := c.Empty(); err != nil || !empty {
		t.Errorf("Empty = %v, %v; want true", empty, err)
	}
	// An empty cgroup has nothing to kill: no signal is sent.
	if err := c.Kill(context.Background()); err != nil {
		t.Errorf("Kill of an empty cgroup: %v", err)
	}
	if err := c.AddProc(0); err == nil {
		t.Error("AddProc(0) succeeded")
	}
	if err := c.AddProc(4242); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte("4242\n17\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	pids, err := c.Procs()
	if err != nil || !slices.Equal(pids, []int{4242, 17}) {
		t.Errorf("Procs = %v, %v; want [4242 17]", pids, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte("12 x\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Procs(); err == nil {
		t.Error("Procs accepted garbage")
	}
}

func TestAddProcWrites(t *testing.T) {
	dir := t.TempDir()
	touch(t, filepath.Join(dir, "cgroup.procs"))
	c := &Cgroup{Path: dir, Version: 1}
	if err := c.AddProc(31337); err != nil {
		t.Fatal(err)
	}
	if data, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs")); string(data) != "31337" {
		t.Errorf("cgroup.procs = %q, want 31337", data)
	}
	gone := &Cgroup{Path: filepath.Join(dir, "gone"), Version: 1}
	if err := gone.AddProc(1); err == nil {
		t.Error("AddProc to a missing cgroup succeeded")
	}
	if err := gone.Kill(context.Background()); err != nil {
		t.Errorf("Kill of a missing cgroup = %v, want nil", err)
	}
}

func TestRemoveFake(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "job")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	c := &Cgroup{Path: dir, Version: 2}
	if err := c.Remove(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("directory still there: %v", err)
	}
	if err := c.Remove(context.Background()); err != nil {
		t.Errorf("Remove of a removed cgroup = %v, want nil", err)
	}
	// A plain non-empty directory fails at once with ENOTEMPTY (real
	// cgroups say EBUSY while tasks remain, which is retried).
	touch(t, filepath.Join(dir, "file"))
	if err := c.Remove(context.Background()); !errors.Is(err, unix.ENOTEMPTY) {
		t.Errorf("Remove of a non-empty directory = %v, want ENOTEMPTY", err)
	}
}
